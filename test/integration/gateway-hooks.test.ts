/**
 * The gateway's hooks for transports and milters: recipient verification at RCPT, the
 * deferred queue for mixed results, and a milter's size limit.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { defineMilter, smtpReply, type DeferredQueue, type RecipientResult, type Transport } from '../../lib/index.js';
import { ehlo, message, RawClient, send, startGateway } from '../helpers/smtp.js';

const ok = (address: string): RecipientResult => ({ recipient: address, status: 'delivered', reply: smtpReply(250, '2.0.0', 'ok') });

test('verifyRecipients: the transport refuses an unknown user at RCPT; a verifier that throws accepts', async () => {
  const store: Transport = {
    name: 'verifying',
    async verifyRecipient(_env, rcpt) {
      if (rcpt.address.startsWith('ghost@')) return smtpReply(550, '5.1.1', `<${rcpt.address}>: User unknown`);
      if (rcpt.address.startsWith('full@')) return smtpReply(452, '4.2.2', 'Mailbox full');
      if (rcpt.address.startsWith('broken@')) throw new Error('store down');
      return undefined;
    },
    async deliver(envelope) {
      return envelope.recipients.map((r) => ok(r.address));
    },
  };
  const gw = await startGateway({ delivery: store, verifyRecipients: true });
  try {
    const c = await ehlo(gw.port);
    const r = await send(c, 'a@sender.test', ['ghost@example.test', 'full@example.test', 'broken@example.test', 'bob@example.test'], message());
    assert.deepEqual(r.rcpt.map((x) => x.text), ['550 5.1.1 <ghost@example.test>: User unknown', '452 4.2.2 Mailbox full', '250 2.1.5 Accepted', '250 2.1.5 Accepted']);
    assert.equal(r.data?.code, 250);
    c.end();
  } finally {
    await gw.close();
  }
});

test('queue: mixed results are handed to the queue and answered 250; a queue that fails gives 451', async () => {
  const handed: { recipients: string[]; statuses: string[]; size: number }[] = [];
  let failQueue = false;
  const queue: DeferredQueue = {
    async defer(envelope, msg, results) {
      if (failQueue) throw new Error('disk full');
      handed.push({ recipients: envelope.recipients.map((r) => r.address), statuses: results.map((x) => x?.status ?? 'untried'), size: msg.size });
    },
  };
  const delivery: Transport = {
    name: 'half',
    async deliver(envelope) {
      return envelope.recipients.map((r) =>
        r.address.startsWith('later@') ? { recipient: r.address, status: 'deferred' as const, reply: smtpReply(452, '4.2.2', 'Mailbox full') } : ok(r.address),
      );
    },
  };
  const gw = await startGateway({ delivery, queue });
  try {
    const c = await ehlo(gw.port);
    let r = await send(c, 'a@sender.test', ['bob@example.test', 'later@example.test'], message());
    assert.match(r.data!.text, /^250 2\.6\.0 Ok: queued as /);
    assert.deepEqual(handed[0]?.recipients, ['bob@example.test', 'later@example.test']);
    assert.deepEqual(handed[0]?.statuses, ['delivered', 'deferred']);
    assert.ok(handed[0]!.size > 0);
    // All alike: no queue, the reply tells the truth.
    r = await send(c, 'a@sender.test', ['later@example.test'], message());
    assert.equal(r.data?.text, '452 4.2.2 Mailbox full');
    assert.equal(handed.length, 1);
    failQueue = true;
    r = await send(c, 'a@sender.test', ['bob@example.test', 'later@example.test'], message());
    assert.equal(r.data?.text, '451 4.3.0 Error: internal error, try again later', 'never 250 when the queue did not take it: 451, the client retries');
    c.end();
  } finally {
    await gw.close();
  }
});

test('a milter’s limits.maxMessageBytes lowers SIZE, refuses a larger declared SIZE, and names our host at the end of DATA', async () => {
  const gw = await startGateway({ milters: [defineMilter({ name: 'limit', limits: { maxMessageBytes: 5000 } })] });
  try {
    const c = await RawClient.connect(gw.port);
    await c.reply();
    const e = await c.cmd('EHLO client.example.test');
    assert.ok(e.lines.some((l) => l.slice(4) === 'SIZE 5000'), e.text);
    const m = await c.cmd('MAIL FROM:<a@sender.test> SIZE=6000');
    assert.equal(m.code, 552);
    const r = await send(c, 'a@sender.test', ['bob@example.test'], message('big', ('y'.repeat(998) + '\r\n').repeat(6)));
    assert.equal(r.data?.text, '552 5.3.4 Error: message size exceeds the 5000-byte limit of mx.test');
    c.end();
  } finally {
    await gw.close();
  }
});

test('a quarantined message with mixed results is not handed to the queue, whose retries would reach the mailbox (regression)', async () => {
  let deferred = 0;
  const queue: DeferredQueue = {
    async defer() {
      deferred++;
    },
  };
  const half: Transport = {
    name: 'half-quarantine',
    async deliver(envelope) {
      return envelope.recipients.map((r, i) => (i === 0 ? ok(r.address) : { recipient: r.address, status: 'deferred' as const, reply: smtpReply(451, '4.3.0', 'Hold store busy') }));
    },
  };
  const delivered: string[] = [];
  const gw = await startGateway({
    queue,
    quarantine: half,
    delivery: {
      name: 'mailbox',
      async deliver(envelope) {
        delivered.push(...envelope.recipients.map((r) => r.address));
        return envelope.recipients.map((r) => ok(r.address));
      },
    },
    milters: [defineMilter({ name: 'hold', eom: async (ctx) => ctx.quarantine('held for review') })],
  });
  try {
    const c = await ehlo(gw.port);
    const r = await send(c, 'a@sender.test', ['bob@example.test', 'carol@example.test'], message());
    assert.equal(r.data?.text, '451 4.3.0 Hold store busy');
    assert.equal(deferred, 0);
    assert.deepEqual(delivered, []);
    c.end();
  } finally {
    await gw.close();
  }
});
