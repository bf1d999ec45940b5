/**
 * dovetail/testing's remote path: the same script drives a filter over the milter protocol
 * (connectMilter, our MTA side) — here our own serveMilter() on a loopback port. A milter
 * served and reached over the wire must come out of runMilter() with the replies, edits and
 * message it gives in process; a filter that is down, or that fails, gives the defined
 * default action, never a hang.
 */
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { connectMilter, defineMilter, formatReply, reject, serveMilter, tempfail, type MilterServer } from '../../lib/index.js';
import { runMilter, type TestRun, type TestScript } from '../../lib/testing/index.js';
import { freePort } from '../helpers/ports.js';

const policy = defineMilter({
  name: 'policy',
  async helo() {},
  async rcpt(_ctx, rcpt) {
    if (rcpt.address.startsWith('nobody@')) return reject(550, '5.1.1', ['No such user', 'really 100%']);
    if (rcpt.address.startsWith('busy@')) return tempfail(452, '4.2.2', 'Mailbox full');
  },
  async eom(ctx) {
    const subject = ctx.headers.find((h) => h.name.toLowerCase() === 'subject')?.value ?? '';
    if (subject.includes('refuse')) return reject(554, '5.7.1', 'Content refused');
    ctx.message.addHeader('X-Checked', `by policy for ${ctx.envelope.recipients.map((r) => r.address).join(' ')}`);
    ctx.message.insertHeader(1, 'X-First', 'yes');
    ctx.message.changeHeader('Subject', 1, `[checked] ${subject}`);
    ctx.message.deleteHeader('X-Internal', 1);
    ctx.message.replaceBody('Replaced.\r\n');
    ctx.envelope.changeSender('bounce@sender.test', 'BODY=8BITMIME');
    ctx.envelope.addRecipient('archive@example.test');
    ctx.envelope.removeRecipient('drop@example.test');
    if (subject.includes('hold')) ctx.quarantine('held by policy');
  },
});

const failing = defineMilter({
  name: 'failing',
  async rcpt() {
    throw new Error('backend down');
  },
});

const MESSAGE = (subject: string) => `From: a@sender.test\r\nSubject: ${subject}\r\nX-Internal: secret\r\n\r\nOriginal.\r\n`;

const SCRIPT: TestScript = {
  hostname: 'mx.test',
  client: { address: '192.0.2.10', hostname: 'mail.sender.test' },
  helo: 'mail.sender.test',
  messages: [
    { from: 'a@sender.test', to: ['bob@example.test', 'nobody@example.test', 'busy@example.test', 'drop@example.test'], message: MESSAGE('hello') },
    { from: 'a@sender.test', to: ['bob@example.test'], message: MESSAGE('refuse this') },
    { from: 'a@sender.test', to: ['bob@example.test'], message: MESSAGE('hold this') },
  ],
};

/** What must be the same in process and over the wire (queue ids and dates masked). */
function comparable(r: TestRun): unknown {
  return r.transactions.map((t) => {
    const mask = (s: string): string =>
      s
        .split(t.queueId ?? '\u0000')
        .join('QUEUEID')
        .replace(/; \w{3}, \d{1,2} \w{3} \d{4} \d\d:\d\d:\d\d \+0000/g, '; DATE');
    return {
      verdict: { stage: t.verdict.stage, type: t.verdict.type, reply: t.verdict.reply ? mask(formatReply(t.verdict.reply)) : undefined },
      rcpt: t.rcpt.map((s) => (s.reply ? formatReply(s.reply) : undefined)),
      // A replacement body comes over the wire as a stream, after the other edits (the order
      // the served side sends them in): compare the body the chain ended up with instead.
      edits: t.edits.all.map((e) => e.edit).filter((e) => e.op !== 'replaceBody'),
      body: t.edits.body?.toString(),
      message: t.message ? mask(t.message.toString('latin1')) : undefined,
      envelope: t.envelope,
      quarantine: t.quarantine,
    };
  });
}

describe('runMilter over the milter protocol, against serveMilter()', () => {
  let served: MilterServer;
  let servedFailing: MilterServer;
  before(async () => {
    served = await serveMilter(policy, { listen: 'inet:127.0.0.1:0' });
    servedFailing = await serveMilter(failing, { listen: 'inet:127.0.0.1:0' });
  });
  after(async () => {
    await served?.close();
    await servedFailing?.close();
  });

  it('a served milter gives over the wire what it gives in process', async () => {
    const local = await runMilter(policy, SCRIPT);
    const remote = await runMilter(served.address, SCRIPT);
    assert.deepEqual(comparable(remote), comparable(local));
    // And the scenario did what it says.
    const [first, refused, held] = remote.transactions;
    assert.deepEqual(first?.rcpt.map((s) => s.reply && formatReply(s.reply)), [
      '250 2.1.5 Accepted',
      '550-5.1.1 No such user\r\n550 5.1.1 really 100%',
      '452 4.2.2 Mailbox full',
      '250 2.1.5 Accepted',
    ]);
    assert.deepEqual(first?.edits.headersAdded, [{ name: 'X-Checked', value: 'by policy for bob@example.test drop@example.test' }]);
    assert.deepEqual(first?.edits.headersDeleted, [{ name: 'X-Internal', index: 1 }]);
    assert.deepEqual(first?.edits.sender, { address: 'bounce@sender.test', args: { BODY: '8BITMIME' } });
    assert.deepEqual(first?.envelope?.recipients.map((r) => r.address), ['bob@example.test', 'archive@example.test']);
    assert.equal(first?.edits.body?.toString(), 'Replaced.\r\n');
    assert.equal(refused?.verdict.reply?.code, 554);
    assert.equal(held?.quarantine, 'held by policy');
    // The verdicts are the filter's, reported under the remote milter's name (its socket spec).
    assert.ok(remote.events.length > 0);
    assert.ok(remote.events.every((e) => e.milter === served.address));
    assert.deepEqual(
      remote.events.map((e) => ('verdict' in e ? `${e.stage} ${e.verdict.type}` : `${e.stage} failed`)),
      local.events.map((e) => ('verdict' in e ? `${e.stage} ${e.verdict.type}` : `${e.stage} failed`)),
    );
  });

  it('a connectMilter() result with its own options is a milter like any other', async () => {
    const r = await runMilter(connectMilter(served.address, { name: 'remote-policy' }), {
      from: 'a@sender.test',
      to: ['nobody@example.test', 'bob@example.test'],
      message: MESSAGE('hi'),
    });
    assert.equal(r.verdict.stage, 'eom');
    assert.equal(r.transactions[0]?.rcpt[0]?.outcome.type, 'reject');
    assert.equal(r.events[0]?.milter, 'remote-policy');
    assert.ok(r.edits.all.every((e) => e.milter === 'remote-policy'));
  });

  it('a served milter that throws: the server answers its default action, which the kit reports as the filter verdict', async () => {
    const r = await runMilter(servedFailing.address, { from: 'a@sender.test', to: 'bob@example.test', message: MESSAGE('x') });
    assert.deepEqual(r.verdict, {
      stage: 'rcpt',
      type: 'tempfail',
      reply: { code: 451, enhanced: '4.7.1', lines: ['Service unavailable - try again later'] },
      milter: servedFailing.address,
    });
  });

  it('a filter that is down: the connect stage fails, its default action decides', async () => {
    const port = await freePort(); // nothing listens there
    const down = await runMilter(`inet:127.0.0.1:${port}`, { from: 'a@sender.test', to: 'bob@example.test', message: MESSAGE('x') });
    assert.deepEqual(down.verdict, {
      stage: 'connect',
      type: 'tempfail',
      reply: { code: 421, enhanced: '4.7.1', lines: ['Service unavailable - try again later'] },
      milter: `inet:127.0.0.1:${port}`,
    });
    const e = down.events[0];
    assert.ok(e && 'error' in e && e.action === 'tempfail');
    const lenient = await runMilter(connectMilter(`inet:127.0.0.1:${port}`, { defaultAction: 'accept' }), {
      from: 'a@sender.test',
      to: 'bob@example.test',
      message: MESSAGE('x'),
    });
    assert.equal(lenient.verdict.type, 'continue');
    assert.deepEqual(lenient.edits.all, []);
  });
});
