/**
 * SMTP AUTH is never spoken in clear text (unless allowInsecureAuth), and guessing is slowed
 * and stopped per connection. Regression tests for the hardening issue's first finding: with
 * `authenticate` and no `tls`, EHLO advertised AUTH and a correct password got 235, after
 * which the session could relay.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import nodemailer from 'nodemailer';
import { relayControl } from '../../milters/index.js';
import { selfSignedCert } from '../helpers/tls.js';
import { ehlo, message, startGateway, stored } from '../helpers/smtp.js';

const plain = (user: string, pass: string): string => Buffer.from(`\0${user}\0${pass}`).toString('base64');

test('no TLS: AUTH is not advertised, AUTH PLAIN with the right password gets 538 5.7.11, and the session may not relay', async () => {
  let asked = 0;
  const gw = await startGateway({
    authenticate: async ({ username, password }) => {
      asked++;
      return username === 'alice' && password === 's3cret';
    },
    milters: [relayControl({ localDomains: ['example.test'] })],
  });
  try {
    const c = await ehlo(gw.port);
    const e = await c.cmd('EHLO client.example.test');
    assert.ok(!e.lines.some((l) => /AUTH/.test(l)), `EHLO must not offer AUTH in clear text: ${e.text}`);
    const auth = await c.cmd(`AUTH PLAIN ${plain('alice', 's3cret')}`);
    assert.equal(auth.code, 538);
    assert.match(auth.text, /^538 5\.7\.11 Encryption required/);
    const login = await c.cmd('AUTH LOGIN');
    assert.equal(login.code, 538, 'no LOGIN exchange starts either');
    assert.equal(asked, 0, 'the password was never checked');
    assert.equal((await c.cmd('MAIL FROM:<alice@example.test>')).code, 250);
    const rcpt = await c.cmd('RCPT TO:<x@remote.test>');
    assert.match(rcpt.text, /^554 5\.7\.1 .*Relay access denied/);
    c.end();
  } finally {
    await gw.close();
  }
});

test('STARTTLS offered: AUTH before it gets 538 and is not advertised; after it, AUTH works and the user may relay', async () => {
  const gw = await startGateway({
    tls: selfSignedCert(),
    authenticate: async ({ username, password, client }) => client.tls && username === 'alice' && password === 's3cret',
    milters: [relayControl({ localDomains: ['example.test'] })],
  });
  try {
    const c = await ehlo(gw.port);
    const e = await c.cmd('EHLO client.example.test');
    assert.ok(e.lines.some((l) => /STARTTLS/.test(l)));
    assert.ok(!e.lines.some((l) => /AUTH/.test(l)), e.text);
    assert.equal((await c.cmd(`AUTH PLAIN ${plain('alice', 's3cret')}`)).code, 538);
    c.end();
    // A real client that upgrades first, then logs in, then relays.
    const t = nodemailer.createTransport({ host: '127.0.0.1', port: gw.port, secure: false, requireTLS: true, tls: { rejectUnauthorized: false }, auth: { user: 'alice', pass: 's3cret' } });
    try {
      const info = await t.sendMail({ envelope: { from: 'alice@example.test', to: ['x@remote.test'] }, raw: message('relayed') });
      assert.match(info.response, /^250 /);
    } finally {
      t.close();
    }
    assert.equal((await stored(gw.root, 'x@remote.test')).length, 1);
  } finally {
    await gw.close();
  }
});

test('failed logins: each answered 535 5.7.8 after a growing delay; the limit-th gets 421 4.7.0 and the connection closes', async () => {
  const delay = 60;
  let asked = 0;
  const gw = await startGateway({
    allowInsecureAuth: true,
    authFailureDelay: delay,
    maxAuthFailures: 3,
    authenticate: async () => {
      asked++;
      return false;
    },
  });
  try {
    const c = await ehlo(gw.port);
    for (let i = 1; i <= 2; i++) {
      const started = process.hrtime.bigint();
      const r = await c.cmd(`AUTH PLAIN ${plain('alice', `guess${i}`)}`);
      const ms = Number(process.hrtime.bigint() - started) / 1e6;
      assert.match(r.text, /^535 5\.7\.8 /);
      assert.ok(ms >= i * delay - 5, `failure ${i} was answered after ${ms} ms, before its ${i * delay} ms delay`);
    }
    const last = await c.cmd(`AUTH PLAIN ${plain('alice', 'guess3')}`);
    assert.match(last.text, /^421 4\.7\.0 .*too many failed authentication attempts/);
    await c.waitClosed();
    assert.equal(asked, 3);
  } finally {
    await gw.close();
  }
});
