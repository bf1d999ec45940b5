/**
 * Testing a milter with dovetail/testing: the milter runs through a scripted SMTP session in
 * process (no sockets, the gateway's own chain), and the test reads each stage's verdict,
 * the edits and the resulting message. The same script then drives the same milter served
 * over the milter protocol, as a remote filter (or any libmilter filter) would be.
 *
 *   npm run build && node --test dist/examples/testing-a-milter.js
 *
 * In your own project the imports are `dovetail`, `dovetail/testing` and `dovetail/milters`
 * (docs/writing-a-milter.md, "Testing your milter", shows this file that way).
 * test/integration/example-testing-a-milter.test.ts runs it with the test suite.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { defineMilter, reject, serveMilter } from '../lib/index.js';
import { runMilter, startSession, type TestScript } from '../lib/testing/index.js';
import { spamTag } from '../milters/index.js';

/** The milter under test: refuses nobody@, scores a test marker, stamps what it checked. */
export const checker = defineMilter({
  name: 'checker',
  async rcpt(_ctx, rcpt) {
    if (rcpt.address.toLowerCase().startsWith('nobody@')) return reject(550, '5.1.1', 'No such user');
  },
  async eom(ctx) {
    if (ctx.headers.some((h) => h.name.toLowerCase() === 'x-test-spam')) ctx.score.add(10, 'TEST_SPAM');
    ctx.message.addHeader('X-Checked', 'yes');
  },
});

const script: TestScript = {
  client: { address: '192.0.2.1', hostname: 'mx.example.net' },
  helo: 'mx.example.net',
  from: 'a@example.net',
  to: ['b@example.com', 'nobody@example.com'],
  message: 'Subject: hi\r\n\r\nbody\r\n',
};

test('checker: refuses nobody@, adds X-Checked at eom', async () => {
  const r = await runMilter(checker, script);
  assert.equal(r.verdict.stage, 'eom');
  assert.equal(r.verdict.type, 'continue');
  const [b, nobody] = r.transactions[0]!.rcpt;
  assert.equal(b!.reply?.code, 250);
  assert.deepEqual(nobody!.reply, { code: 550, enhanced: '5.1.1', lines: ['No such user'] });
  assert.deepEqual(r.edits.headersAdded, [{ name: 'X-Checked', value: 'yes' }]);
  assert.deepEqual(r.envelope?.recipients.map((x) => x.address), ['b@example.com']);
  assert.match(r.message!.toString(), /\r\nSubject: hi\r\nX-Checked: yes\r\n\r\nbody\r\n$/);
});

test('checker in a chain: spamTag after it sees its score', async () => {
  const r = await runMilter([checker, spamTag({ requiredScore: 5 })], {
    ...script,
    message: 'Subject: hi\r\nX-Test-Spam: 1\r\n\r\nbody\r\n',
  });
  assert.equal(r.score.total, 10);
  assert.match(r.message!.toString(), /\r\nX-Spam-Flag: YES\r\n/);
});

test('checker served over the milter protocol gives the same answers', async () => {
  const server = await serveMilter(checker, { listen: 'inet:127.0.0.1:0' });
  try {
    const r = await runMilter(server.address, script); // any filter's socket spec: opendkim, rspamd, a libmilter filter
    assert.equal(r.transactions[0]!.rcpt[1]!.reply?.code, 550);
    assert.deepEqual(r.edits.headersAdded, [{ name: 'X-Checked', value: 'yes' }]);
  } finally {
    await server.close();
  }
});

test('checker step by step', async () => {
  const s = await startSession(checker, { client: { address: '192.0.2.1' } });
  try {
    await s.helo('mx.example.net');
    await s.mail('a@example.net');
    const r = await s.rcpt('nobody@example.com');
    assert.equal(r.outcome.type, 'reject');
    assert.equal(r.outcome.type === 'reject' && r.outcome.milter, 'checker');
  } finally {
    await s.close();
  }
});
