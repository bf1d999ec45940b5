/**
 * senderLogin over SMTP: an authenticated user may use only the sender addresses the map
 * gives it (Postfix smtpd_sender_login_maps + reject_sender_login_mismatch), on a
 * submission listener with STARTTLS and AUTH (a real client, nodemailer); the null sender
 * passes; with checkUnauthenticated an outsider may not use an owned address.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import nodemailer from 'nodemailer';
import { isDovetailError } from '../../lib/index.js';
import { senderLogin } from '../../milters/index.js';
import { selfSignedCert } from '../helpers/tls.js';
import { ehlo, message, startGateway } from '../helpers/smtp.js';

const users: Record<string, string> = { alice: 'pw-alice', bob: 'pw-bob' };
const map = { 'alice@example.test': 'alice', 'sales@example.test': ['alice', 'bob'], '@team.example.test': 'bob' };

test('an authenticated user sends only as its own addresses (553 5.7.1 otherwise); <> passes', async () => {
  const gw = await startGateway({
    tls: selfSignedCert(),
    authenticate: async (r) => r.client.tls && users[r.username] === r.password,
    listen: { host: '127.0.0.1', port: 0, submission: true },
    milters: [senderLogin({ map })],
  });
  const as = (user: string) =>
    nodemailer.createTransport({ host: '127.0.0.1', port: gw.port, secure: false, requireTLS: true, tls: { rejectUnauthorized: false }, auth: { user, pass: users[user]! } });
  const sendAs = async (user: string, from: string): Promise<string> => {
    const t = as(user);
    try {
      return (await t.sendMail({ envelope: { from, to: ['x@example.test'] }, raw: message('who am I') })).response;
    } catch (err) {
      return (err as { response?: string }).response ?? String(err);
    } finally {
      t.close();
    }
  };
  try {
    assert.match(await sendAs('alice', 'alice@example.test'), /^250 /);
    assert.match(await sendAs('alice', 'Sales@Example.TEST'), /^250 /, 'case-insensitive; shared address');
    assert.match(await sendAs('bob', 'sales@example.test'), /^250 /);
    assert.match(await sendAs('bob', 'anyone@team.example.test'), /^250 /, '@domain entry');
    assert.equal(await sendAs('bob', 'alice@example.test'), '553 5.7.1 <alice@example.test>: Sender address rejected: not owned by user bob');
    assert.equal(await sendAs('alice', 'ceo@elsewhere.test'), '553 5.7.1 <ceo@elsewhere.test>: Sender address rejected: not owned by user alice');
    assert.match(await sendAs('alice', ''), /^250 /, 'the null sender is never refused');
  } finally {
    await gw.close();
  }
});

test('checkUnauthenticated: an unauthenticated client may not use an owned address; others may', async () => {
  const gw = await startGateway({ milters: [senderLogin({ map, checkUnauthenticated: true })] });
  try {
    const c = await ehlo(gw.port);
    assert.equal((await c.cmd('MAIL FROM:<alice@example.test>')).text, '553 5.7.1 <alice@example.test>: Sender address rejected: not logged in');
    assert.equal((await c.cmd('MAIL FROM:<stranger@elsewhere.test>')).code, 250);
    c.end();
  } finally {
    await gw.close();
  }
  assert.throws(() => senderLogin({ map: { 'not an address': 'x' } }), (e) => isDovetailError(e, 'DOVETAIL_ERR_INVALID_OPTIONS'));
  assert.throws(() => senderLogin({ map: { 'a@b.test': [] } }), (e) => isDovetailError(e, 'DOVETAIL_ERR_INVALID_OPTIONS'));
});
