/**
 * examples/mail-server.ts runs against real peers, all started here on loopback:
 *
 * - Dovecot 2.3 (test/helpers/dovecot.ts) as the mail server's Dovecot: LMTP into Maildir,
 *   the auth service (passwd-file with passwords) behind SMTP AUTH, and Pigeonhole Sieve
 *   with the example's global rule JUNK_SIEVE as `sieve_before`;
 * - Postfix 3.7 as the remote MX of remote.test (test/helpers/postfix-mta.ts), reached
 *   through MX lookups in a DNS server on loopback, which also publishes our DKIM key;
 * - OpenDKIM verifying what the remote MX received (keys fetched from that DNS server);
 * - nodemailer as the users' mail client, and a raw SMTP client for the transcripts a
 *   client library does not produce.
 *
 * Checked: 587 (STARTTLS + AUTH) and 465 (implicit TLS + AUTH) to a remote domain arrive at
 * the remote Postfix DKIM-signed, and OpenDKIM says dkim=pass; port 25 delivers a local
 * user's mail into the Dovecot INBOX before the 250, and a message a (test) content filter
 * scored as spam into Junk, filed by Dovecot's Sieve on spamTag's X-Spam-Level; the
 * refusals: 538 5.7.11 (AUTH before STARTTLS on 587, AUTH without TLS on 25), 530 5.7.0
 * (MAIL before AUTH), 553 5.7.1 (a sender the login does not own), 535 5.7.8 (a wrong
 * password) and 421 4.7.0 plus the connection closed at maxAuthFailures; port 25 never
 * relays, not even after AUTH. Missing peers fail it; it never skips.
 */
import assert from 'node:assert/strict';
import crypto from 'node:crypto';
import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { after, before, describe, it } from 'node:test';
import nodemailer from 'nodemailer';
import { JUNK_SIEVE, startMailServer, type MailServer } from '../../examples/mail-server.js';
import { defineMilter } from '../../lib/index.js';
import { dkimDnsRecord } from '../../milters/index.js';
import { startDnsServer, type TestDnsServer } from '../helpers/dns-server.js';
import { startDovecot, type Dovecot } from '../helpers/dovecot.js';
import { opendkimVerifier, type OpenDkimVerifier } from '../helpers/opendkim-verify.js';
import type { SinkMessage } from '../helpers/lmtp-sink.js';
import { startRemoteMx, type RemoteMx } from '../helpers/postfix-mta.js';
import { TlsRawClient } from '../helpers/smtp-tls.js';
import { selfSignedCert } from '../helpers/tls.js';
import { waitFor } from '../helpers/wait.js';

const ALICE = { address: 'alice@example.test', password: 'alice s3cret' };
const BOB = { address: 'bob@example.test', password: 'bob s3cret' };
const SELECTOR = 'mail2024';
/** GTUBE, the spam filters' test string (SpamAssassin scores it 1000). */
const GTUBE = 'XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X';

/** A content filter standing in for rspamd/SpamAssassin on port 25: GTUBE in the body is worth 6 points. */
const gtube = defineMilter({
  name: 'gtube',
  async eom(ctx) {
    const chunks: Buffer[] = [];
    for await (const chunk of ctx.message.body()) chunks.push(chunk as Buffer);
    if (Buffer.concat(chunks).includes(GTUBE)) ctx.score.add(6, 'TEST_GTUBE');
  },
});

let dns: TestDnsServer | undefined;
let remote: RemoteMx | undefined;
let dovecot: Dovecot | undefined;
let verifier: OpenDkimVerifier | undefined;
let server: MailServer | undefined;
let base: string | undefined;

/** Headers of a message (up to the blank line), unfolded. */
function headersOf(message: Buffer): string {
  const s = message.toString('utf8');
  const end = s.indexOf('\r\n\r\n');
  return (end < 0 ? s : s.slice(0, end + 2)).replace(/\r\n[ \t]+/g, ' ');
}

const unique = (what: string): string => `${what} ${crypto.randomBytes(4).toString('hex')}`;

/** A mail client of ours: submission with STARTTLS (587) or implicit TLS (465). */
function client(port: number, secure: boolean, auth: { user: string; pass: string }, localAddress?: string): ReturnType<typeof nodemailer.createTransport> {
  return nodemailer.createTransport({
    host: '127.0.0.1',
    port,
    secure,
    requireTLS: !secure,
    tls: { rejectUnauthorized: false },
    auth,
    name: 'laptop.example',
    ...(localAddress ? { localAddress } : {}),
  });
}

/** Stops the server first (it drains and closes its connections to the peers), then the peers together. */
async function stopAll(): Promise<void> {
  const failed: unknown[] = [];
  await server?.close().catch((err: unknown) => failed.push(err));
  const peers = await Promise.allSettled([remote?.stop(), dovecot?.stop(), verifier?.close(), dns?.close()]);
  for (const p of peers) if (p.status === 'rejected') failed.push(p.reason);
  if (base) await fs.rm(base, { recursive: true, force: true });
  if (failed.length > 0) throw failed[0];
}

describe('mail-server example: MX into Dovecot (Junk by Sieve), submission with Dovecot AUTH, DKIM-signed mail out through the queue', () => {
  // The peers start in parallel; one that fails to start fails the suite, and after()
  // stops whatever did start.
  before(async () => {
    const { privateKey } = crypto.generateKeyPairSync('rsa', { modulusLength: 2048 });
    const pem = privateKey.export({ type: 'pkcs8', format: 'pem' }).toString();
    base = await fs.mkdtemp(path.join(os.tmpdir(), 'dovetail-mail-server-'));
    const [d, r, v] = await Promise.allSettled([
      startDnsServer(),
      startRemoteMx({ domains: ['remote.test'], tls: true }),
      startDovecot([ALICE, BOB], { auth: true, sieveBefore: JUNK_SIEVE }),
    ]);
    if (d.status === 'fulfilled') dns = d.value;
    if (r.status === 'fulfilled') remote = r.value;
    if (v.status === 'fulfilled') dovecot = v.value;
    for (const s of [d, r, v]) if (s.status === 'rejected') throw s.reason;
    dns!.add('remote.test', { type: 'MX', value: { exchange: 'mx.remote.test', priority: 10 } });
    dns!.a('mx.remote.test', '127.0.0.1');
    dns!.txt(`${SELECTOR}._domainkey.example.test`, dkimDnsRecord(pem));
    verifier = await opendkimVerifier(dns!.port);
    server = await startMailServer({
      domain: 'example.test',
      host: '127.0.0.1',
      ports: { mx: 0, submission: 0, submissions: 0 },
      tls: selfSignedCert('mail.example.test'),
      dovecot: { lmtp: { host: '127.0.0.1', port: dovecot!.port }, auth: { host: '127.0.0.1', port: dovecot!.authPort! } },
      dkim: { selector: SELECTOR, privateKey: pem },
      base,
      resolver: dns!.resolver({ timeout: 3000, tries: 2 }),
      smtpPort: remote!.port,
      backoff: { min: 200, max: 400 },
      contentFilters: [gtube],
      maxAuthFailures: 3,
      authFailureDelay: 20,
      resolveClientNames: false,
    });
  });

  after(stopAll);

  /** Waits (bounded) for the remote MX to have received the message with this subject. */
  const atRemote = (subject: string): Promise<SinkMessage> => remote!.sink.waitFor((m) => m.data.includes(`Subject: ${subject}`), 20_000);

  /** Checks the DKIM-Signature we added and asks OpenDKIM about it. */
  const assertSigned = async (message: Buffer): Promise<void> => {
    const headers = headersOf(message);
    const sig = /^DKIM-Signature: (.*)$/m.exec(headers)?.[1];
    assert.ok(sig, `signed:\n${headers}`);
    assert.match(sig, /(^|;\s*)d=example\.test;/);
    assert.match(sig, new RegExp(`(^|;\\s*)s=${SELECTOR};`));
    const ar = await verifier!.verify(message);
    assert.match(ar, new RegExp(`dkim=pass \\(2048-bit key[^)]*\\) header\\.d=example\\.test header\\.i=@example\\.test header\\.a=rsa-sha256 header\\.s=${SELECTOR}`), ar);
  };

  it('587: STARTTLS, AUTH against Dovecot, mail to a remote domain queued, DKIM-signed, delivered to the remote MX (Postfix), and OpenDKIM verifies it', async () => {
    const subject = unique('via 587');
    const t = client(server!.ports.submission, false, { user: ALICE.address, pass: ALICE.password });
    try {
      const info = await t.sendMail({ from: `Alice <${ALICE.address}>`, to: 'carol@remote.test', subject, text: 'Hello Carol,\nsent on port 587.\n' });
      assert.match(info.response, /^250 /);
    } finally {
      t.close();
    }
    const { from, to, data } = await atRemote(subject);
    assert.equal(from, ALICE.address);
    assert.deepEqual(to, ['carol@remote.test']);
    const headers = headersOf(data);
    assert.match(headers, /by mail\.example\.test \(dovetail\) with ESMTPSA id /, 'our Received: authenticated, over TLS');
    assert.match(headers, /by mx\.remote\.test \(Postfix\) with ESMTPS id /, 'the remote MX took it over TLS');
    assert.doesNotMatch(headers, /X-Spam-/, 'no spam scoring of our own users');
    await assertSigned(data);
    // OpenDKIM really checks: a changed body fails.
    const tampered = Buffer.from(data.toString('latin1').replace('sent on port 587', 'sent on port 588'), 'latin1');
    assert.match(await verifier!.verify(tampered), /dkim=fail /);
  });

  it('465: implicit TLS, AUTH; one message to a remote and a local recipient: DKIM-verified at the remote MX, and in the local INBOX', async () => {
    const subject = unique('via 465');
    const t = client(server!.ports.submissions, true, { user: ALICE.address, pass: ALICE.password });
    try {
      const info = await t.sendMail({ from: ALICE.address, to: ['dave@remote.test', BOB.address], subject, text: 'Hello both,\nsent on port 465.\n' });
      assert.match(info.response, /^250 /);
      assert.deepEqual(info.accepted, ['dave@remote.test', BOB.address]);
    } finally {
      t.close();
    }
    // The local copy went into Dovecot before the 250.
    const inbox = await dovecot!.messages(BOB.address);
    const local = inbox.find((b) => b.includes(`Subject: ${subject}`));
    assert.ok(local, 'in bob\'s INBOX');
    assert.match(headersOf(local), /^DKIM-Signature: /m);
    await assertSigned((await atRemote(subject)).data);
  });

  it('port 25: mail for a local user lands in the Dovecot INBOX; spam (scored by a content filter, tagged by spamTag) lands in Junk by the global Sieve rule', async () => {
    const t = nodemailer.createTransport({ host: '127.0.0.1', port: server!.ports.mx, secure: false, tls: { rejectUnauthorized: false }, name: 'mx.elsewhere.test' });
    const ham = unique('ham');
    const spam = unique('spam');
    try {
      const a = await t.sendMail({ from: 'someone@elsewhere.test', to: BOB.address, subject: ham, text: 'Hi Bob.\n' });
      assert.match(a.response, /^250 /);
      const b = await t.sendMail({ from: 'spammer@elsewhere.test', to: BOB.address, subject: spam, text: `Buy now.\n${GTUBE}\n` });
      assert.match(b.response, /^250 /);
      await assert.rejects(
        t.sendMail({ from: 'someone@elsewhere.test', to: 'nobody@example.test', subject: 'x', text: 'x' }),
        (err: { response?: string }) => /^550 5\.1\.1 /.test(err.response ?? ''),
        'Dovecot does not know nobody@: refused at RCPT',
      );
      await assert.rejects(
        t.sendMail({ from: 'someone@elsewhere.test', to: 'x@remote.test', subject: 'relay?', text: 'x' }),
        (err: { response?: string }) => /^554 5\.7\.1 <x@remote\.test>: Relay access denied/.test(err.response ?? ''),
      );
    } finally {
      t.close();
    }
    const inbox = await waitFor('the ham in the INBOX', async () => (await dovecot!.messages(BOB.address)).find((m) => m.includes(`Subject: ${ham}`)), 5000);
    const h = headersOf(inbox);
    assert.match(h, /^X-Spam-Status: No, score=0\.0 required=5\.0/m);
    assert.match(h, /by mail\.example\.test \(dovetail\) with ESMTPS id /, 'port 25 took it over STARTTLS');
    assert.doesNotMatch(h, /^DKIM-Signature:/m, 'port 25 signs nothing');
    const junk = await waitFor('the spam in Junk', async () => (await dovecot!.messages(BOB.address, 'Junk')).find((m) => m.includes(`Subject: ${spam}`)), 5000, () => dovecot!.log());
    const j = headersOf(junk);
    assert.match(j, /^X-Spam-Flag: YES$/m);
    assert.match(j, /^X-Spam-Level: \*{6}$/m);
    assert.match(j, /^X-Spam-Status: Yes, score=6\.0 required=5\.0 tests=TEST_GTUBE/m);
    assert.ok(!(await dovecot!.messages(BOB.address)).some((m) => m.includes(`Subject: ${spam}`)), 'not in the INBOX');
  });

  it('refused: AUTH before STARTTLS (538), MAIL before AUTH (530); port 25 offers no AUTH (503) and does not relay', async () => {
    // 587 before STARTTLS: no AUTH offered, and AUTH refused.
    const { client: c, ehlo } = await TlsRawClient.ehlo(server!.ports.submission);
    try {
      assert.ok(ehlo.lines.some((l) => /STARTTLS/.test(l)));
      assert.ok(!ehlo.lines.some((l) => /AUTH/.test(l)), `no AUTH before TLS: ${ehlo.text}`);
      const r = await c.authPlain(ALICE.address, ALICE.password);
      assert.match(r.text, /^538 5\.7\.11 /);
      const after = await c.starttls();
      assert.ok(after.lines.some((l) => /AUTH PLAIN LOGIN/.test(l)), `AUTH offered over TLS: ${after.text}`);
      const mail = await c.cmd(`MAIL FROM:<${ALICE.address}>`);
      assert.match(mail.text, /^530 5\.7\.0 Authentication required/);
    } finally {
      c.close();
    }
    // Port 25 has no AUTH at all (auth: false), before or after STARTTLS, and is no way out.
    const { client: mx, ehlo: mxEhlo } = await TlsRawClient.ehlo(server!.ports.mx);
    try {
      assert.ok(!mxEhlo.lines.some((l) => /AUTH/.test(l)));
      assert.match((await mx.authPlain(ALICE.address, ALICE.password)).text, /^503 5\.5\.1 Error: authentication not enabled/);
      const afterTls = await mx.starttls();
      assert.ok(!afterTls.lines.some((l) => /AUTH/.test(l)));
      assert.match((await mx.authPlain(ALICE.address, ALICE.password)).text, /^503 5\.5\.1 /);
      assert.equal((await mx.cmd(`MAIL FROM:<${ALICE.address}>`)).code, 250);
      assert.match((await mx.cmd('RCPT TO:<x@remote.test>')).text, /^554 5\.7\.1 <x@remote\.test>: Relay access denied/);
    } finally {
      mx.close();
    }
  });

  it('refused: a sender the login does not own (553 5.7.1, senderLogin)', async () => {
    const t = client(server!.ports.submission, false, { user: ALICE.address, pass: ALICE.password });
    try {
      await assert.rejects(
        t.sendMail({ from: BOB.address, to: 'carol@remote.test', subject: 'as bob', text: 'x' }),
        (err: { response?: string }) => /^553 5\.7\.1 <bob@example\.test>: Sender address rejected: not owned by user alice@example\.test/.test(err.response ?? ''),
      );
    } finally {
      t.close();
    }
  });

  it('refused: a wrong password (535 5.7.8); at maxAuthFailures 421 4.7.0 and the connection is closed', async () => {
    // Each from its own client address: Dovecot keeps its auth penalty per address.
    const t = client(server!.ports.submission, false, { user: ALICE.address, pass: 'wrong' }, '127.0.0.2');
    try {
      await assert.rejects(t.sendMail({ from: ALICE.address, to: 'carol@remote.test', subject: 'x', text: 'x' }), (err: { response?: string }) =>
        /^535 5\.7\.8 Error: authentication failed/.test(err.response ?? ''),
      );
    } finally {
      t.close();
    }
    const { client: c } = await TlsRawClient.ehlo(server!.ports.submissions, { implicitTls: true, localAddress: '127.0.0.3' });
    try {
      // A client retrying its saved wrong password. Dovecot answers the requests after the
      // first failure from this address only after its penalty (4 s here: anvil does not
      // raise it for the same user and password again).
      assert.match((await c.authPlain(ALICE.address, 'saved wrong password')).text, /^535 5\.7\.8 Error: authentication failed/);
      assert.match((await c.authPlain(ALICE.address, 'saved wrong password', 30_000)).text, /^535 5\.7\.8 /);
      assert.match((await c.authPlain(ALICE.address, 'saved wrong password', 30_000)).text, /^421 4\.7\.0 Error: too many failed authentication attempts/);
      await c.waitClosed();
    } finally {
      c.close();
    }
  });
});
