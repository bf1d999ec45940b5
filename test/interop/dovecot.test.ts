/**
 * Interop with a real Dovecot LMTP (dovecot-lmtpd 2.3, started by the test in a private
 * directory, test/helpers/dovecot.ts): the gateway delivers through lmtp() into Dovecot's
 * Maildir; Dovecot's per-recipient replies (unknown user, quota) come back as the right SMTP
 * replies, at RCPT when verification is on. Fails (does not skip) without Dovecot.
 */
import assert from 'node:assert/strict';
import { subscribe, unsubscribe } from 'node:diagnostics_channel';
import { Readable } from 'node:stream';
import { after, before, describe, it } from 'node:test';
import { Channels } from '../../lib/diagnostics.js';
import { lmtp, type LmtpTransport } from '../../lib/delivery/lmtp.js';
import type { RecipientResult } from '../../lib/delivery/types.js';
import { startDovecot, type Dovecot } from '../helpers/dovecot.js';
import { ehlo, message, send, split, startGateway } from '../helpers/smtp.js';

let dovecot: Dovecot;

before(async () => {
  dovecot = await startDovecot([
    { address: 'alice@example.test' },
    { address: 'bob@example.test' },
    // 1 KiB quota, empty: a bigger message is refused after DATA.
    { address: 'small@example.test', quota: '1K' },
    // 1 KiB quota, already over it: refused at RCPT (lmtp_rcpt_check_quota).
    { address: 'over@example.test', quota: '1K', prefillBytes: 5000 },
  ]);
});

after(async () => {
  await dovecot?.stop();
});

/** The body of a stored message (after the blank line). */
const bodyOf = (m: Buffer): Buffer => split(m).body;

describe('gateway → lmtp() → Dovecot LMTP', () => {
  it('lands in Dovecot\'s Maildir with the body byte-identical and the gateway\'s Received header', async () => {
    const t = lmtp({ port: dovecot.port });
    const gw = await startGateway({ delivery: t });
    try {
      const body = '.leading dot\r\n..two\r\nGrüße ✓ 8-bit\r\n\r\n' + 'line '.repeat(200) + '\r\n.\r\nend\r\n';
      const content = message('to dovecot', body, 'Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n');
      const c = await ehlo(gw.port);
      const r = await send(c, 'sender@sender.test', ['alice@example.test', 'bob@example.test'], content);
      assert.equal(r.data?.code, 250, r.data?.text);
      // A second message on the same SMTP session reuses the pooled LMTP connection.
      assert.equal((await send(c, 'sender@sender.test', ['alice@example.test'], message('second'))).data?.code, 250);
      c.end();
      for (const who of ['alice@example.test', 'bob@example.test']) {
        // Dovecot's file names do not sort in time order (unpadded microseconds): find it by subject.
        const m = (await dovecot.messages(who)).find((x) => x.includes('\r\nSubject: to dovecot\r\n'));
        assert.ok(m, `stored for ${who}`);
        assert.ok(bodyOf(m).equals(Buffer.from(body, 'utf8')), `body byte-identical for ${who}`);
        const headers = split(m).headers;
        // Dovecot's own Received comes first, then the gateway's, then the client's headers unchanged.
        assert.match(headers, /^Received: from client\.example\.test \(unknown \[127\.0\.0\.1\]\)\r\n\tby mx\.test \(dovetail\) with ESMTP id \w+;/m);
        assert.ok(headers.endsWith(content.slice(0, content.indexOf('\r\n\r\n') + 2)), 'client headers unchanged');
        assert.match(headers, /^Return-Path: <sender@sender\.test>/m);
        assert.match(headers, /^Subject: to dovecot\r$/m);
      }
      assert.equal((await dovecot.messages('alice@example.test')).length, 2);
      assert.equal(t.stats().opened, 1);
    } finally {
      await gw.close();
    }
  });

  it('maps Dovecot\'s per-recipient replies: delivered, unknown user (550 5.1.1), quota after DATA (552 5.2.2)', async () => {
    const t = lmtp({ port: dovecot.port });
    try {
      const big = Buffer.from(message('big', 'z'.repeat(3000) + '\r\n'));
      const res = await t.deliver(
        {
          queueId: 'QD1',
          sender: { address: 'sender@sender.test', args: {} },
          recipients: ['bob@example.test', 'nobody@example.test', 'small@example.test'].map((address) => ({ address, args: {} })),
        },
        { size: big.length, stream: () => Readable.from([big]) },
      );
      assert.deepEqual(res.map((r) => `${r.status} ${r.reply.code} ${r.reply.enhanced}`), ['delivered 250 2.0.0', 'failed 550 5.1.1', 'failed 552 5.2.2']);
      assert.match(res[0]!.reply.lines[0]!, /^<bob@example\.test> \S+ Saved$/);
      assert.equal(res[1]!.reply.lines[0], "<nobody@example.test> User doesn't exist: nobody@example.test");
      assert.equal(res[2]!.reply.lines[0], '<small@example.test> Quota exceeded (mailbox for user is full)');
      assert.equal((await dovecot.messages('small@example.test')).length, 0);
    } finally {
      await t.close();
    }
  });

  it('without verification the gateway answers the store\'s refusal at end of DATA (quota: 552 5.2.2)', async () => {
    const results: RecipientResult[][] = [];
    const on = (m: unknown): void => void results.push((m as { results: RecipientResult[] }).results);
    subscribe(Channels.message, on);
    const gw = await startGateway({ delivery: lmtp({ port: dovecot.port }) });
    try {
      const c = await ehlo(gw.port);
      const r = await send(c, 'sender@sender.test', ['small@example.test'], message('big', 'z'.repeat(3000) + '\r\n'));
      c.end();
      assert.deepEqual(r.rcpt.map((x) => x.code), [250]);
      assert.equal(r.data?.text, '552 5.2.2 <small@example.test> Quota exceeded (mailbox for user is full)');
      assert.equal(results[0]?.[0]?.status, 'failed');
    } finally {
      unsubscribe(Channels.message, on);
      await gw.close();
    }
  });

  it('with verifyRecipients, unknown user and full mailbox are refused at RCPT with Dovecot\'s reply', async () => {
    const t: LmtpTransport = lmtp({ port: dovecot.port });
    const gw = await startGateway({ delivery: t, verifyRecipients: true });
    try {
      const c = await ehlo(gw.port);
      const r = await send(c, 'sender@sender.test', ['alice@example.test', 'nobody@example.test', 'over@example.test'], message('verified'));
      c.end();
      assert.deepEqual(r.rcpt.map((x) => x.text), [
        '250 2.1.5 Accepted',
        "550 5.1.1 <nobody@example.test> User doesn't exist: nobody@example.test",
        '552 5.2.2 <over@example.test> Quota exceeded (mailbox for user is full)',
      ]);
      assert.equal(r.data?.code, 250);
      const all = await dovecot.messages('alice@example.test');
      assert.ok(all.some((m) => /^Subject: verified\r$/m.test(split(m).headers)), 'the verified message was stored');
      assert.equal(t.stats().opened, 1, 'verifications (MAIL, RCPT, RSET) and the delivery share one connection');
    } finally {
      await gw.close();
    }
  });
});
