/**
 * miltertest (Debian package `miltertest`, the MTA side of libmilter scripted in Lua)
 * against serveMilter(): the scripts in test/fixtures/miltertest/ drive a session each and
 * check the replies (mt.getreply) and the end-of-message edits (mt.eom_check); each
 * script's exit status is the verdict. The server's port reaches the script as `-D port=`.
 */
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { defineMilter, quarantine, reject, tempfail } from '../../lib/index.js';
import { serveMilter, type MilterServer } from '../../lib/milter/protocol/server.js';
import { requireBinary, runTool } from '../helpers/postfix.js';

// dist/test/interop → the sources' fixtures (tsc does not copy .lua files).
const FIXTURES = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../../test/fixtures/miltertest');

const milter = defineMilter({
  name: 'miltertest-interop',
  async connect(ctx) {
    if (ctx.client.address === '192.0.2.66') return reject(554, '5.7.1', 'Go away');
  },
  async helo() {},
  async mail() {},
  async rcpt(_ctx, rcpt) {
    if (rcpt.address === 'nobody@example.test') return reject(550, '5.1.1', 'No such user');
    if (rcpt.address === 'later@example.test') return tempfail();
  },
  async data() {},
  async header() {},
  async eoh() {},
  async body() {},
  async eom(ctx) {
    const subject = ctx.headers.find((h) => h.name === 'Subject')?.value;
    if (subject === 'quarantine me') return quarantine('suspicious');
    if (subject === 'reject me') return reject(554, '5.7.1', 'Rejected as spam');
    if (subject === 'edit me') {
      ctx.message.addHeader('X-Checked', 'yes');
      ctx.message.addHeader('X-Seen', `${ctx.queueId} ${ctx.envelope.recipients.map((r) => r.address).join(',')} ${ctx.message.size}`);
      ctx.message.insertHeader(1, 'X-First', 'first');
      ctx.message.changeHeader('Subject', 1, '[ext] edit me');
      ctx.message.deleteHeader('X-Internal', 1);
      ctx.envelope.addRecipient('archive@example.test');
      ctx.envelope.removeRecipient('old@example.test');
      ctx.message.replaceBody('Replaced body.\r\n');
    }
  },
});

let server: MilterServer;
let miltertest: string;

before(async () => {
  miltertest = requireBinary('miltertest', 'Debian package "miltertest"');
  server = await serveMilter(milter, { listen: 'inet:127.0.0.1:0' });
});

after(async () => {
  await server?.close();
});

for (const script of ['session.lua', 'verdicts.lua']) {
  test(`miltertest ${script}`, async () => {
    const r = await runTool(miltertest, ['-D', `port=${server.port}`, '-s', path.join(FIXTURES, script)]);
    assert.equal(r.status, 0, `miltertest ${script} exited ${String(r.status)}:\n${r.out}`);
  });
}
