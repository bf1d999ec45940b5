/**
 * Listener profiles (master.cf lines): one gateway with an MX listener, a submission
 * listener (STARTTLS, then AUTH required before MAIL) and an implicit-TLS listener (465),
 * each with its own milter chain and {daemon_name}; AUTH on a listener without TLS; the
 * option checks. Real clients: nodemailer over STARTTLS and implicit TLS, and raw sockets.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import tls from 'node:tls';
import nodemailer from 'nodemailer';
import { createGateway, defineMilter, isDovetailError, maildir, reject, type GatewayOptions } from '../../lib/index.js';
import { relayControl } from '../../milters/index.js';
import { selfSignedCert } from '../helpers/tls.js';
import { TlsRawClient } from '../helpers/smtp-tls.js';
import { ehlo, message, send, startGateway, stored } from '../helpers/smtp.js';

const cert = selfSignedCert('mail.example.test');
const users: Record<string, string> = { 'alice@example.test': 'correct horse' };
const authenticate: GatewayOptions['authenticate'] = async (r) => r.client.tls && users[r.username] === r.password;

test('MX, submission (587) and implicit TLS (465) listeners: their own chains, AUTH required on submission, {daemon_name}', async () => {
  const seen: { daemon: string | undefined; name: string; port: number }[] = [];
  const who = defineMilter({
    name: 'who',
    async mail(ctx) {
      seen.push({ daemon: ctx.macros['{daemon_name}'], name: ctx.server.name, port: ctx.server.port });
    },
  });
  // The MX chain refuses relaying; the submission chains let authenticated users relay.
  const gw = await startGateway({
    tls: cert,
    authenticate,
    milters: [who, relayControl({ localDomains: ['example.test'] })],
    listen: [
      { host: '127.0.0.1', port: 0, name: 'mx' },
      { host: '127.0.0.1', port: 0, name: 'submission', submission: true, milters: [who, relayControl({ localDomains: ['example.test'] })] },
      { host: '127.0.0.1', port: 0, name: 'smtps', submission: true, tls: 'implicit', milters: [who] },
    ],
  });
  const [mx, submission, smtps] = gw.gateway.addresses;
  try {
    // MX: no AUTH needed to deliver to us, relaying refused.
    const c = await ehlo(mx!.port);
    const r = await send(c, 'bob@elsewhere.test', ['alice@example.test', 'x@remote.test'], message('to us'));
    assert.equal(r.rcpt[0]!.code, 250);
    assert.match(r.rcpt[1]!.text, /^554 5\.7\.1 /);
    assert.equal(r.data?.code, 250);
    c.end();

    // Submission: MAIL before AUTH is refused; AUTH is not offered before STARTTLS.
    const s = await ehlo(submission!.port);
    const e = await s.cmd('EHLO laptop.example.test');
    assert.ok(e.lines.some((l) => /STARTTLS/.test(l)));
    assert.ok(!e.lines.some((l) => /AUTH/.test(l)), 'no AUTH before STARTTLS');
    const mail = await s.cmd('MAIL FROM:<alice@example.test>');
    assert.equal(mail.text, '530 5.7.0 Authentication required');
    assert.equal((await s.cmd('AUTH PLAIN ' + Buffer.from('\0alice@example.test\0correct horse').toString('base64'))).code, 538);
    s.end();
    const viaSubmission = nodemailer.createTransport({ host: '127.0.0.1', port: submission!.port, secure: false, requireTLS: true, tls: { rejectUnauthorized: false }, auth: { user: 'alice@example.test', pass: 'correct horse' } });
    const info = await viaSubmission.sendMail({ envelope: { from: 'alice@example.test', to: ['x@remote.test'] }, raw: message('relayed on 587') });
    viaSubmission.close();
    assert.match(info.response, /^250 /);

    // 465: TLS from the first byte, then AUTH.
    const raw = tls.connect({ host: '127.0.0.1', port: smtps!.port, rejectUnauthorized: false });
    const greeting = await new Promise<string>((resolve, rejectP) => {
      raw.once('data', (d: Buffer) => resolve(d.toString()));
      raw.once('error', rejectP);
    });
    raw.destroy();
    assert.match(greeting, /^220 /, 'a TLS handshake first, then the greeting inside it');
    const via465 = nodemailer.createTransport({ host: '127.0.0.1', port: smtps!.port, secure: true, tls: { rejectUnauthorized: false }, auth: { user: 'alice@example.test', pass: 'correct horse' } });
    const info465 = await via465.sendMail({ envelope: { from: 'alice@example.test', to: ['y@remote.test'] }, raw: message('relayed on 465') });
    via465.close();
    assert.match(info465.response, /^250 /);
    const [m465] = await stored(gw.root, 'y@remote.test');
    assert.match(m465!.toString(), /with ESMTPSA id /);

    assert.deepEqual(seen.map((x) => [x.daemon, x.name, x.port]), [
      ['mx', 'mx', mx!.port],
      ['submission', 'submission', submission!.port],
      ['smtps', 'smtps', smtps!.port],
    ]);
  } finally {
    await gw.close();
  }
});

test("a listener with tls 'none' never offers AUTH (538), though the gateway has a certificate", async () => {
  const gw = await startGateway({ tls: cert, authenticate, listen: [{ host: '127.0.0.1', port: 0, tls: 'none' }] });
  try {
    const c = await ehlo(gw.port);
    const e = await c.cmd('EHLO client.example.test');
    assert.ok(!e.lines.some((l) => /STARTTLS|AUTH/.test(l)), e.text);
    assert.match((await c.cmd('AUTH LOGIN')).text, /^538 5\.7\.11 /);
    c.end();
  } finally {
    await gw.close();
  }
});

test("a listener with auth: false never offers AUTH, even after STARTTLS (503 5.5.1), as Postfix's smtpd_sasl_auth_enable = no", async () => {
  const gw = await startGateway({ tls: cert, authenticate, listen: [{ host: '127.0.0.1', port: 0, auth: false }] });
  try {
    const { client } = await TlsRawClient.ehlo(gw.port);
    const e = await client.starttls();
    assert.ok(!e.lines.some((l) => /AUTH/.test(l)), `no AUTH after STARTTLS either: ${e.text}`);
    assert.equal((await client.cmd('AUTH PLAIN AGFsaWNlAHB3')).text, '503 5.5.1 Error: authentication not enabled');
    client.close();
  } finally {
    await gw.close();
  }
});

test('listener options are checked at createGateway', () => {
  const base = { delivery: maildir({ root: '/nonexistent' }) };
  const bad = (o: Partial<GatewayOptions>, why: RegExp): void =>
    assert.throws(() => createGateway({ ...base, ...o }), (e) => isDovetailError(e, 'DOVETAIL_ERR_INVALID_OPTIONS') && why.test((e as Error).message));
  bad({ listen: { port: 0, submission: true } }, /needs authenticate/);
  bad({ authenticate, listen: { port: 0, submission: true } }, /needs TLS/);
  bad({ listen: { port: 0, tls: 'implicit' } }, /needs the gateway's tls/);
  bad({ tls: cert, listen: { port: 0, tls: 'sometimes' as 'none' } }, /tls must be/);
  bad({ listen: { port: 0, name: 'has space' } }, /name must be/);
  // A submission-only chain of its own is allowed without gateway milters.
  assert.ok(createGateway({ ...base, tls: cert, authenticate, listen: { port: 0, submission: true, milters: [defineMilter({ name: 'x', rcpt: async () => reject(550, '5.7.1', 'no') })] } }));
});
