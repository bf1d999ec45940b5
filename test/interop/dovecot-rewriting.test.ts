/**
 * Address rewriting in front of a real Dovecot LMTP (dovecot-lmtpd 2.3, test/helpers/dovecot.ts,
 * with `recipient_delimiter = +`): SMTP → gateway (relocated, virtual, aliases) → lmtp() →
 * Dovecot → Maildir. An alias with two targets lands in both mailboxes, a virtual catch-all
 * and an exact virtual key land where they should, a relocated user gets 551 5.1.6 at RCPT,
 * `bob+tag@` lands in bob's INBOX with the detail in Dovecot's Delivered-To, and an alias
 * loop ends. Fails (does not skip) without Dovecot.
 */
import assert from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';
import { lmtp } from '../../lib/delivery/lmtp.js';
import type { Transport } from '../../lib/delivery/types.js';
import { aliases, relocated, virtual } from '../../milters/index.js';
import { startDovecot, type Dovecot } from '../helpers/dovecot.js';
import { ehlo, message, send, split, startGateway, type TestGateway } from '../helpers/smtp.js';

let dovecot: Dovecot;
let gw: TestGateway;

before(async () => {
  dovecot = await startDovecot(
    ['alice@example.test', 'bob@example.test', 'carol@example.test'].map((address) => ({ address })),
    { recipientDelimiter: '+' },
  );
  gw = await startGateway({
    milters: [
      relocated({ map: { 'old@example.test': 'alice@example.test' } }),
      virtual({
        map: { '@alias.test': 'carol@example.test', 'bob@alias.test': 'bob@example.test' },
        recipientDelimiter: '+',
        localDomains: ['example.test'],
      }),
      aliases({
        map: { team: ['alice', 'bob'], carol: 'c2', c2: 'carol' },
        domains: ['example.test'],
        recipientDelimiter: '+',
      }),
    ],
    delivery: lmtp({ port: dovecot.port }),
  });
});

after(async () => {
  await gw?.close();
  await dovecot?.stop();
});

/** The messages in a user's INBOX (Maildir/new) with this subject. */
async function inbox(user: string, subject: string): Promise<Buffer[]> {
  return (await dovecot.messages(user)).filter((m) => split(m).headers.includes(`\r\nSubject: ${subject}\r\n`));
}

/** The values of a header field of a stored message. */
function fields(m: Buffer, name: string): string[] {
  const out: string[] = [];
  for (const line of split(m).headers.replace(/\r\n[ \t]+/g, ' ').split('\r\n')) {
    const colon = line.indexOf(':');
    if (colon > 0 && line.slice(0, colon).toLowerCase() === name.toLowerCase()) out.push(line.slice(colon + 1).trim());
  }
  return out;
}

describe('gateway rewriting → lmtp() → Dovecot LMTP', () => {
  it('an alias with two targets lands in both mailboxes', async () => {
    const c = await ehlo(gw.port);
    const r = await send(c, 'sender@sender.test', ['team@example.test'], message('to the team'));
    c.end();
    assert.equal(r.rcpt[0]?.code, 250, r.rcpt[0]?.text);
    assert.equal(r.data?.code, 250, r.data?.text);
    for (const user of ['alice@example.test', 'bob@example.test']) {
      const got = await inbox(user, 'to the team');
      assert.equal(got.length, 1, `one copy for ${user}`);
      assert.deepEqual(fields(got[0]!, 'Return-Path'), ['<sender@sender.test>']);
      // Both went in one LMTP transaction: Dovecot then writes no Delivered-To (it would
      // name one recipient to the other); see the next test for one per transaction.
    }
    assert.equal((await inbox('carol@example.test', 'to the team')).length, 0);
  });

  it('with one recipient per LMTP transaction (Postfix: lmtp_destination_recipient_limit = 1) each copy has its own Delivered-To, with the detail carried by the alias', async () => {
    const one = lmtp({ port: dovecot.port });
    const perRecipient: Transport = {
      name: 'lmtp-one-by-one',
      async deliver(envelope, source) {
        const each = await Promise.all(envelope.recipients.map((r) => one.deliver({ ...envelope, recipients: [r] }, source)));
        return each.flat();
      },
      close: () => one.close(),
    };
    const gw1 = await startGateway({
      milters: [aliases({ map: { team: ['alice', 'bob'] }, domains: ['example.test'], recipientDelimiter: '+' })],
      delivery: perRecipient,
    });
    try {
      const c = await ehlo(gw1.port);
      const r = await send(c, 'sender@sender.test', ['team@example.test'], message('team one by one'));
      c.end();
      assert.equal(r.data?.code, 250, r.data?.text);
      for (const user of ['alice@example.test', 'bob@example.test']) {
        const got = await inbox(user, 'team one by one');
        assert.equal(got.length, 1, `one copy for ${user}`);
        assert.deepEqual(fields(got[0]!, 'Delivered-To'), [user]);
      }
      // With a detail, the expanded recipients keep it: Dovecot shows it in Delivered-To.
      const c2 = await ehlo(gw1.port);
      const r2 = await send(c2, 'sender@sender.test', ['team+x@example.test'], message('team detail one by one'));
      c2.end();
      assert.equal(r2.data?.code, 250, r2.data?.text);
      for (const user of ['alice', 'bob']) {
        const got = await inbox(`${user}@example.test`, 'team detail one by one');
        assert.equal(got.length, 1, user);
        assert.deepEqual(fields(got[0]!, 'Delivered-To'), [`${user}+x@example.test`]);
      }
    } finally {
      await gw1.close();
    }
  });

  it('a virtual catch-all takes any user of its domain; the exact key wins over it', async () => {
    const c = await ehlo(gw.port);
    const any = await send(c, 'sender@sender.test', ['Anyone@Alias.Test'], message('catch-all'));
    assert.equal(any.data?.code, 250, any.data?.text);
    const exact = await send(c, 'sender@sender.test', ['bob@alias.test'], message('exact key'));
    assert.equal(exact.data?.code, 250, exact.data?.text);
    c.end();
    // carol@ is itself an alias loop (carol → c2 → carol): it ends at carol.
    assert.equal((await inbox('carol@example.test', 'catch-all')).length, 1);
    assert.equal((await inbox('bob@example.test', 'exact key')).length, 1);
    assert.equal((await inbox('carol@example.test', 'exact key')).length, 0);
  });

  it('a relocated user is refused at RCPT with 551 5.1.6 and the new address; the other recipient gets the mail', async () => {
    const c = await ehlo(gw.port);
    const r = await send(c, 'sender@sender.test', ['old@example.test', 'alice@example.test'], message('relocated'));
    c.end();
    assert.equal(r.rcpt[0]?.text, '551 5.1.6 User has moved; please try <alice@example.test>');
    assert.equal(r.rcpt[1]?.code, 250);
    assert.equal(r.data?.code, 250, r.data?.text);
    assert.equal((await inbox('alice@example.test', 'relocated')).length, 1);
  });

  it('bob+tag@ lands in bob’s INBOX, and Dovecot’s Delivered-To keeps the detail', async () => {
    const c = await ehlo(gw.port);
    const r = await send(c, 'sender@sender.test', ['bob+tag@example.test'], message('detail'));
    c.end();
    assert.equal(r.data?.code, 250, r.data?.text);
    const got = await inbox('bob@example.test', 'detail');
    assert.equal(got.length, 1);
    assert.deepEqual(fields(got[0]!, 'Delivered-To'), ['bob+tag@example.test']);
    // Dovecot's own Received header names the recipient with its detail too.
    assert.match(split(got[0]!).headers, /for <bob\+tag@example\.test>/);
  });

  it('an alias looked up with a detail carries it to the local targets (team+x@ → alice+x@, bob+x@), each in its INBOX', async () => {
    const c = await ehlo(gw.port);
    const r = await send(c, 'sender@sender.test', ['team+x@example.test'], message('team detail'));
    c.end();
    assert.equal(r.data?.code, 250, r.data?.text);
    for (const user of ['alice', 'bob']) {
      const got = await inbox(`${user}@example.test`, 'team detail');
      assert.equal(got.length, 1, user);
    }
  });

  it('an alias loop (carol → c2 → carol) ends: one copy in carol’s INBOX, answered at once', async () => {
    const c = await ehlo(gw.port);
    const started = Date.now();
    const r = await send(c, 'sender@sender.test', ['carol@example.test'], message('loop'));
    c.end();
    assert.equal(r.data?.code, 250, r.data?.text);
    assert.ok(Date.now() - started < 5000);
    const got = await inbox('carol@example.test', 'loop');
    assert.equal(got.length, 1);
    assert.deepEqual(fields(got[0]!, 'Delivered-To'), ['carol@example.test']);
  });
});
