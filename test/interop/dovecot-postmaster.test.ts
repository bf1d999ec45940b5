/**
 * postmaster and abuse always reach someone (RFC 5321 4.5.1, RFC 2142), over SMTP into a
 * real Dovecot LMTP: a client that a DNS list blocks is refused for an ordinary recipient
 * but may still write to bare `<Postmaster>` and `abuse@` our domain; both land, once, in
 * the configured mailbox, with the original address kept (ORCPT); the mailstore, which has
 * no postmaster user, is not asked about it (verifyWithMaps); spamTag does not reject a
 * message whose recipients are all role addresses. Also the unit facts of isRoleAddress.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { lmtp, isDovetailError } from '../../lib/index.js';
import { defineMilter } from '../../lib/index.js';
import { dnsbl, isRoleAddress, postmaster, relayControl, spamTag, verifyWithMaps } from '../../milters/index.js';
import { startDnsServer } from '../helpers/dns-server.js';
import { startDovecot } from '../helpers/dovecot.js';
import { ehlo, message, send, startGateway } from '../helpers/smtp.js';

test('role addresses: bare Postmaster and abuse@ from a DNSBL-listed client land once in the postmaster mailbox in Dovecot', async () => {
  const dns = await startDnsServer();
  dns.a('1.0.0.127.bl.example', '127.0.0.2');
  const dovecot = await startDovecot([{ address: 'admin@example.test' }, { address: 'bob@example.test' }]);
  const store = lmtp({ port: dovecot.port });
  const pm = postmaster({ mailbox: 'admin@example.test', domains: ['example.test'] });
  const resolver = dns.resolver({ timeout: 2000 });
  // A heavy score for every message: spamTag would reject it were it not for the role rule.
  const heavy = defineMilter({ name: 'heavy', async eom(ctx) { ctx.score.add(50, 'TEST_HEAVY'); } });
  const gw = await startGateway({
    delivery: verifyWithMaps(store, [pm]),
    verifyRecipients: true,
    milters: [relayControl({ localDomains: ['example.test'] }), pm, dnsbl({ resolver, zones: ['bl.example=127.0.0.2'] }), heavy, spamTag({ requiredScore: 5, rejectScore: 20 })],
  });
  try {
    const c = await ehlo(gw.port);
    const r = await send(c, 'spammer@listed.test', ['bob@example.test', 'Postmaster', 'ABUSE@example.test', 'nosuchuser@example.test'], message('please unblock me'));
    assert.match(r.rcpt[0]!.text, /^554 5\.7\.1 Service unavailable; client \[127\.0\.0\.1\] blocked using bl\.example/);
    assert.equal(r.rcpt[1]!.code, 250, 'bare Postmaster');
    assert.equal(r.rcpt[2]!.code, 250, 'abuse@ our domain');
    assert.match(r.rcpt[3]!.text, /^554 /, 'other recipients of a listed client stay refused');
    assert.equal(r.data?.code, 250, 'not rejected as spam: every accepted recipient is a role address');
    const got = await dovecot.messages('admin@example.test');
    assert.equal(got.length, 1, 'one copy for the postmaster');
    assert.match(got[0]!.toString(), /X-Spam-Flag: YES/);
    assert.equal((await dovecot.messages('bob@example.test')).length, 0);
    c.end();
    // The same spam to an ordinary user from an unlisted address would be rejected: the rule is only for role mail.
  } finally {
    await gw.close();
    await dovecot.stop();
    resolver.cancel();
    await dns.close();
  }
});

test('isRoleAddress and postmaster() options', () => {
  assert.equal(isRoleAddress('Postmaster'), true);
  assert.equal(isRoleAddress('POSTMASTER@anywhere.test'), true);
  assert.equal(isRoleAddress('abuse@example.test'), true);
  assert.equal(isRoleAddress('abuse'), false, 'only Postmaster may come bare (RFC 5321 4.5.1)');
  assert.equal(isRoleAddress('bob@example.test'), false);
  const pm = postmaster({ mailbox: 'admin@example.test', domains: ['example.test', '.sub.example.test'] });
  assert.equal(pm.has('postmaster@a.sub.example.test'), true);
  assert.equal(pm.has('postmaster@elsewhere.test'), false, 'not our domain: not routed');
  assert.deepEqual(pm.expand('Postmaster'), ['admin@example.test']);
  assert.throws(() => postmaster({ mailbox: 'nobody', domains: ['example.test'] }), (e) => isDovetailError(e, 'DOVETAIL_ERR_INVALID_OPTIONS'));
  assert.throws(() => postmaster({ mailbox: 'a@example.test', domains: [] }), (e) => isDovetailError(e, 'DOVETAIL_ERR_INVALID_OPTIONS'));
});
