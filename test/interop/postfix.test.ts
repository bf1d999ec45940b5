/**
 * Real Postfix 3.7 with `smtpd_milters` pointing at serveMilter(): a TypeScript milter that
 * rejects one recipient, tempfails another, adds/inserts/changes/deletes headers, changes
 * the sender, adds and deletes a recipient, replaces the body, quarantines a message and
 * rejects one at end of message with a multi-line reply. The results are checked in
 * Postfix's SMTP replies (raw socket client) and in what Postfix delivers over LMTP to a
 * sink the test runs; the quarantined message is on hold in Postfix's queue.
 */
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { defineMilter, quarantine, reject, tempfail, type ClientInfo } from '../../lib/index.js';
import { serveMilter, type MilterServer } from '../../lib/milter/protocol/server.js';
import { startLmtpSink, type LmtpSink } from '../helpers/lmtp-sink.js';
import { startPostfix, type Postfix } from '../helpers/postfix.js';
import { ehlo, send, split } from '../helpers/smtp.js';

interface Seen {
  client?: ClientInfo;
  helo?: string | undefined;
  heloArg?: string;
  queueIds: string[];
  eomHeaders: string[][];
  daemon?: string | undefined;
}
const seen: Seen = { queueIds: [], eomHeaders: [] };

const milter = defineMilter({
  name: 'postfix-interop',
  async connect(ctx) {
    seen.client = ctx.client;
    seen.daemon = ctx.macros['{daemon_name}'];
  },
  async helo(ctx, name) {
    seen.heloArg = name;
    seen.helo = ctx.helo;
  },
  async rcpt(_ctx, rcpt) {
    if (rcpt.address === 'nobody@example.test') return reject(550, '5.1.1', ['No such user here', 'we are 100% sure']);
    if (rcpt.address === 'later@example.test') return tempfail(451, '4.7.1', 'Greylisted, come back later');
  },
  async eom(ctx) {
    seen.queueIds.push(ctx.queueId);
    seen.eomHeaders.push(ctx.headers.map((h) => `${h.name}: ${h.value}`));
    const subject = ctx.headers.find((h) => h.name.toLowerCase() === 'subject')?.value;
    if (subject === 'quarantine me') return quarantine('suspicious attachment');
    if (subject === 'reject me') return reject(554, '5.7.1', ['Rejected: 50% spam', 'see https://example.test/why']);
    if (subject === 'edit me') {
      ctx.message.addHeader('X-Checked', 'yes');
      ctx.message.insertHeader(1, 'X-First', 'first');
      ctx.message.changeHeader('Subject', 1, '[ext] edit me');
      ctx.message.deleteHeader('X-Internal', 1);
      ctx.envelope.changeSender('bounce@sender.test');
      ctx.envelope.addRecipient('archive@example.test');
      ctx.envelope.removeRecipient('old@example.test');
      ctx.message.replaceBody('Replaced body.\nSecond line.\n');
    }
  },
});

let server: MilterServer;
let sink: LmtpSink;
let postfix: Postfix;

before(async () => {
  server = await serveMilter(milter, { listen: 'inet:127.0.0.1:0' });
  sink = await startLmtpSink();
  postfix = await startPostfix({ milter: server.address, lmtpPort: sink.port });
});

after(async () => {
  await postfix?.stop();
  await sink?.close();
  await server?.close();
});

const MSG = (subject: string, body = 'Original body.\r\n'): string =>
  `From: Alice <alice@sender.test>\r\nTo: Bob <bob@example.test>\r\nSubject: ${subject}\r\nX-Internal: secret\r\nX-Folded: one\r\n\ttwo\r\nMessage-ID: <${Math.random().toString(36).slice(2)}@sender.test>\r\n\r\n${body}`;

function queueId(text: string): string {
  const m = /queued as ([0-9A-Za-z]+)/.exec(text);
  assert.ok(m, `no queue id in ${JSON.stringify(text)}`);
  return m[1] as string;
}

test('recipient refusals, header/envelope/body edits: Postfix replies and delivers what the milter said', async () => {
  const c = await ehlo(postfix.smtpPort, 'client.sender.test');
  try {
    const r = await send(c, 'alice@sender.test', ['nobody@example.test', 'later@example.test', 'bob@example.test', 'old@example.test'], MSG('edit me'));
    assert.equal(r.mail.code, 250);
    // Postfix gives the milter's reply as is, with "%%" turned back into "%".
    assert.deepEqual(r.rcpt[0]?.lines, ['550-5.1.1 No such user here', '550 5.1.1 we are 100% sure']);
    assert.deepEqual(r.rcpt[1]?.lines, ['451 4.7.1 Greylisted, come back later']);
    assert.equal(r.rcpt[2]?.code, 250);
    assert.equal(r.rcpt[3]?.code, 250);
    assert.equal(r.data?.code, 250, r.data?.text);
    const qid = queueId(r.data?.text ?? '');
    assert.ok(seen.queueIds.includes(qid), `ctx.queueId (macro i) is Postfix's queue id ${qid}: ${seen.queueIds.join(',')}`);

    const got = await sink.waitFor((m) => m.data.includes('[ext] edit me'));
    assert.equal(got.from, 'bounce@sender.test');
    assert.deepEqual([...got.to].sort(), ['archive@example.test', 'bob@example.test']);
    const { headers, body } = split(got.data);
    const lines = headers.split(/\r\n(?![ \t])/).filter(Boolean);
    assert.equal(lines[0], 'X-First: first', headers);
    assert.match(lines[1] ?? '', /^Received: from client\.sender\.test/);
    assert.ok(lines.includes('Subject: [ext] edit me'), headers);
    assert.ok(!lines.some((l) => l.startsWith('Subject: edit me')), headers);
    assert.ok(!lines.some((l) => l.startsWith('X-Internal')), headers);
    assert.ok(lines.includes('X-Folded: one\r\n\ttwo'), headers);
    assert.equal(lines.at(-1), 'X-Checked: yes', headers);
    assert.equal(body.toString(), 'Replaced body.\r\nSecond line.\r\n');

    // What the milter saw: Postfix's CONNECT, HELO, macros; the header values as in the message.
    assert.equal(seen.client?.address, '127.0.0.1');
    assert.equal(seen.client?.family, 'ipv4');
    assert.ok((seen.client?.port ?? 0) > 0);
    assert.equal(seen.heloArg, 'client.sender.test');
    assert.equal(seen.helo, 'client.sender.test');
    assert.ok(seen.daemon, 'connect macros arrive ({daemon_name})');
    const eomHeaders = seen.eomHeaders.at(-1) ?? [];
    assert.ok(eomHeaders.includes('Subject: edit me'), eomHeaders.join('\n'));
    assert.ok(eomHeaders.includes('X-Folded: one\r\n\ttwo'), eomHeaders.join('\n'));
  } finally {
    c.end();
  }
});

test('a multi-line reject at end of message is Postfix\'s reply to DATA', async () => {
  const c = await ehlo(postfix.smtpPort, 'client.sender.test');
  try {
    const r = await send(c, 'alice@sender.test', ['bob@example.test'], MSG('reject me'));
    assert.deepEqual(r.data?.lines, ['554-5.7.1 Rejected: 50% spam', '554 5.7.1 see https://example.test/why']);
  } finally {
    c.end();
  }
});

test('quarantine: Postfix accepts the message and puts it on hold', async () => {
  const c = await ehlo(postfix.smtpPort, 'client.sender.test');
  let qid: string;
  try {
    const r = await send(c, 'alice@sender.test', ['bob@example.test'], MSG('quarantine me'));
    assert.equal(r.data?.code, 250, r.data?.text);
    qid = queueId(r.data?.text ?? '');
  } finally {
    c.end();
  }
  // postqueue -p marks a message on hold with "!" after its queue id.
  const deadline = Date.now() + 10_000;
  let q = '';
  while (Date.now() < deadline) {
    q = postfix.queue();
    if (q.includes(`${qid}!`)) break;
    await new Promise((r) => setTimeout(r, 100));
  }
  assert.ok(q.includes(`${qid}!`), `message ${qid} is not on hold:\n${q}\n${await postfix.log()}`);
  assert.ok(!sink.messages.some((m) => m.data.includes('quarantine me')), 'a held message is not delivered');
});
