/**
 * mailAuth through a running gateway over real SMTP. Keys are generated here, messages are
 * signed with mailauth's dkimSign (and sealed with sealMessage for ARC), and the keys, SPF
 * and DMARC records are published in a real DNS server on loopback that the test starts.
 * The gateway's clients come from 127.0.0.1, so the SPF records are written for it.
 */
import { test, after, before } from 'node:test';
import assert from 'node:assert/strict';
import crypto from 'node:crypto';
import { authenticate, dkimSign, sealMessage } from 'mailauth';
import { defineMilter, type ScoreEntry } from '../../lib/index.js';
import { mailAuth, publicKeyCache, type MailAuthOptions } from '../../milters/mail-auth.js';
import { startDnsServer, type TestDnsServer } from '../helpers/dns-server.js';
import { ehlo, send, split, startGateway, stored } from '../helpers/smtp.js';

let dns: TestDnsServer;
const keys = new Map<string, string>();

/** Generates an RSA 2048 key, publishes it at <selector>._domainkey.<domain>, keeps the private half. */
function publishKey(domain: string, selector: string): void {
  const { publicKey, privateKey } = crypto.generateKeyPairSync('rsa', { modulusLength: 2048 });
  const p = publicKey.export({ type: 'spki', format: 'der' }).toString('base64');
  dns.txt(`${selector}._domainkey.${domain}`, `v=DKIM1; k=rsa; p=${p}`);
  keys.set(`${selector}._domainkey.${domain}`, privateKey.export({ type: 'pkcs8', format: 'pem' }) as string);
}

before(async () => {
  dns = await startDnsServer();
  // example.test: SPF passes for 127.0.0.1, DKIM key, DMARC p=reject.
  dns.txt('example.test', 'v=spf1 ip4:127.0.0.1 -all');
  publishKey('example.test', 'sel');
  dns.txt('_dmarc.example.test', 'v=DMARC1; p=reject');
  // quar.test: DMARC p=quarantine, SPF for someone else.
  dns.txt('quar.test', 'v=spf1 ip4:192.0.2.0/24 -all');
  dns.txt('_dmarc.quar.test', 'v=DMARC1; p=quarantine');
  // SPF outcomes for 127.0.0.1.
  dns.txt('fail.test', 'v=spf1 ip4:192.0.2.1 -all');
  dns.txt('softfail.test', 'v=spf1 ip4:192.0.2.1 ~all');
  dns.txt('neutral.test', 'v=spf1 ?all');
  dns.behave('broken.test', { fail: 'servfail' });
  // A forwarder (mailing list) that seals ARC.
  dns.txt('lists.test', 'v=spf1 ip4:127.0.0.1 -all');
  publishKey('lists.test', 'arc');
});
after(async () => {
  await dns.close();
});

function rfc822(from: string, subject: string, body = 'Hello Bob,\r\n\r\nsee you at noon.\r\n', extra = ''): string {
  return (
    `From: ${from}\r\nTo: Bob <bob@dest.test>\r\nSubject: ${subject}\r\n` +
    `Date: Mon, 01 Jan 2024 10:00:00 +0000\r\nMessage-ID: <${crypto.randomUUID()}@example.test>\r\n${extra}\r\n${body}`
  );
}

async function sign(message: string, domain = 'example.test', selector = 'sel'): Promise<string> {
  const key = { signingDomain: domain, selector, privateKey: keys.get(`${selector}._domainkey.${domain}`)! };
  // mailauth 7 signs what `signatureData` lists (its typings also ask for the fields at the top).
  const r = await dkimSign(message, { ...key, signatureData: [key] });
  assert.deepEqual(r.errors, []);
  assert.match(r.signatures, /^DKIM-Signature: /);
  return r.signatures + message;
}

async function gatewayWith(options: MailAuthOptions = {}) {
  const seen: ScoreEntry[][] = [];
  const probe = defineMilter({ name: 'probe', async eom(ctx) { seen.push([...ctx.score.entries]); } });
  const gw = await startGateway({ milters: [mailAuth({ resolver: dns.resolver(), ...options }), probe] });
  return { gw, seen };
}

/** The stored message's header lines (unfolded), without the Return-Path and Delivered-To the Maildir adds. */
function headerLines(m: Buffer): string[] {
  return split(m)
    .headers.replace(/\r\n[ \t]+/g, ' ')
    .split('\r\n')
    .filter((l) => l && !l.startsWith('Return-Path:') && !l.startsWith('Delivered-To:'));
}

test('a signed message from an SPF-passing client: Authentication-Results first, then Received-SPF; score entries', async () => {
  const { gw, seen } = await gatewayWith();
  try {
    const c = await ehlo(gw.port, 'client.example.test');
    const before = dns.count('example.test', 'TXT');
    const r = await send(c, 'alice@example.test', ['bob@dest.test'], await sign(rfc822('Alice <alice@example.test>', 'signed')));
    assert.equal(r.data?.code, 250);
    c.end();
    assert.equal(dns.count('example.test', 'TXT') - before, 1, 'SPF at MAIL and at end of message share one lookup');
    const [m] = await stored(gw.root, 'bob@dest.test');
    const lines = headerLines(m!);
    assert.match(lines[0]!, /^Authentication-Results: mx\.test; spf=pass [^;]*smtp\.mailfrom=alice@example\.test[^;]*; dkim=pass header\.i=@example\.test header\.s=sel header\.a=rsa-sha256 [^;]*; dmarc=pass [^;]*header\.from=example\.test[^;]*; arc=none$/);
    assert.match(lines[1]!, /^Received-SPF: pass \(.*\) client-ip=127\.0\.0\.1; envelope-from="alice@example\.test"; helo=client\.example\.test;$/);
    assert.match(lines[2]!, /^Received: from client\.example\.test/);
    assert.deepEqual(
      seen[0]!.map((e) => [e.reason, e.points]),
      [
        ['SPF_PASS', -0.2],
        ['DKIM_VALID', -0.2],
        ['DKIM_VALID_AU', -0.2],
        ['DMARC_PASS', -0.5],
      ],
    );
  } finally {
    await gw.close();
  }
});

test('a tampered body fails DKIM; with SPF unaligned DMARC fails and p=reject is enforced with 550 5.7.1', async () => {
  const { gw, seen } = await gatewayWith({ enforceDmarc: true });
  const { gw: lax, seen: laxSeen } = await gatewayWith();
  try {
    const signed = await sign(rfc822('Alice <alice@example.test>', 'tampered'));
    const tampered = signed.replace('see you at noon.', 'send me your password.');
    // The envelope sender is a bounce domain with no SPF record: SPF does not align.
    let c = await ehlo(gw.port);
    let r = await send(c, 'bounce@bounces.test', ['bob@dest.test'], tampered);
    assert.equal(r.data?.text, '550 5.7.1 Rejected by DMARC policy for example.test');
    assert.deepEqual(await stored(gw.root, 'bob@dest.test'), []);
    assert.deepEqual(
      seen.length,
      0,
      'the probe after mailAuth never saw the message',
    );
    c.end();

    // Without enforcement the message is delivered, with the failures reported and scored.
    c = await ehlo(lax.port);
    r = await send(c, 'bounce@bounces.test', ['bob@dest.test'], tampered);
    assert.equal(r.data?.code, 250);
    c.end();
    const [m] = await stored(lax.root, 'bob@dest.test');
    const ar = headerLines(m!)[0]!;
    assert.match(ar, /^Authentication-Results: mx\.test; spf=none [^;]*; dkim=fail \(body hash did not verify\) header\.i=@example\.test[^;]*; dmarc=fail \(p=REJECT[^;]*header\.from=example\.test/);
    assert.deepEqual(
      laxSeen[0]!.map((e) => e.reason),
      ['DKIM_INVALID', 'DMARC_FAIL_REJECT'],
    );
  } finally {
    await gw.close();
    await lax.close();
  }
});

test('DMARC p=quarantine is enforced as a quarantine verdict', async () => {
  const { gw } = await gatewayWith({ enforceDmarc: true });
  try {
    const c = await ehlo(gw.port);
    const r = await send(c, 'carol@quar.test', ['bob@dest.test'], rfc822('Carol <carol@quar.test>', 'unsigned'));
    assert.equal(r.data?.code, 250);
    c.end();
    assert.deepEqual(await stored(gw.root, 'bob@dest.test'), []);
    const [q] = await stored(gw.quarantineRoot, 'bob@dest.test');
    assert.ok(q, 'quarantined');
    const lines = headerLines(q);
    assert.ok(lines.includes('X-Dovetail-Quarantine: DMARC policy of quar.test: quarantine'), lines.join('\n'));
    assert.ok(lines.some((l) => /^Authentication-Results: mx\.test; spf=fail .*; dkim=none.*; dmarc=fail \(p=QUARANTINE/.test(l)));
  } finally {
    await gw.close();
  }
});

test('SPF at MAIL: fail is refused with 550 5.7.23 when asked; softfail, neutral and (unrefused) fail are reported and scored', async () => {
  const { gw } = await gatewayWith({ rejectSpfFail: true, tempfailSpfError: true });
  const { gw: lax, seen } = await gatewayWith();
  try {
    let c = await ehlo(gw.port);
    assert.equal((await c.cmd('MAIL FROM:<mallory@fail.test>')).text, '550 5.7.23 SPF validation failed');
    assert.equal((await c.cmd('MAIL FROM:<someone@broken.test>')).text, '451 4.7.24 SPF validation error');
    const r = await send(c, 'sam@softfail.test', ['bob@dest.test'], rfc822('Sam <sam@softfail.test>', 'soft'));
    assert.equal(r.data?.code, 250, 'softfail is not refused');
    c.end();
    const [soft] = await stored(gw.root, 'bob@dest.test');
    assert.match(headerLines(soft!)[0]!, /^Authentication-Results: mx\.test; spf=softfail /);
    assert.match(headerLines(soft!)[1]!, /^Received-SPF: softfail /);

    c = await ehlo(lax.port);
    for (const from of ['mallory@fail.test', 'nina@neutral.test', 'someone@broken.test']) {
      const x = await send(c, from, ['bob@dest.test'], rfc822(`<${from}>`, from));
      assert.equal(x.data?.code, 250, from);
    }
    c.end();
    // By subject: stored() sorts Maildir names, which do not sort by arrival within a second.
    const all = (await stored(lax.root, 'bob@dest.test')).map((m) => headerLines(m));
    const ar = (from: string) => all.find((h) => h.includes(`Subject: ${from}`))?.[0] ?? '';
    assert.match(ar('mallory@fail.test'), /^Authentication-Results: mx\.test; spf=fail .*smtp\.mailfrom=mallory@fail\.test/);
    assert.match(ar('nina@neutral.test'), /^Authentication-Results: mx\.test; spf=neutral /);
    assert.match(ar('someone@broken.test'), /^Authentication-Results: mx\.test; spf=temperror /);
    assert.deepEqual(
      seen.map((s) => s.map((e) => e.reason)),
      [['SPF_FAIL'], [], []],
      'neutral and temperror score 0 by default: no entry',
    );
  } finally {
    await gw.close();
    await lax.close();
  }
});

test('Authentication-Results under our authserv-id that came with the message are removed; others are kept', async () => {
  const { gw } = await gatewayWith({ authservId: 'auth.mx.test', scores: { DKIM_VALID: -1 } });
  try {
    const c = await ehlo(gw.port);
    const forged =
      'Authentication-Results: auth.mx.test; dkim=pass header.d=paypal.test\r\n' +
      'Authentication-Results: upstream.test; spf=pass smtp.mailfrom=example.test\r\n' +
      'Authentication-Results: AUTH.MX.TEST (forged); dmarc=pass\r\n';
    const r = await send(c, 'alice@example.test', ['bob@dest.test'], rfc822('Alice <alice@example.test>', 'forged', undefined, forged));
    assert.equal(r.data?.code, 250);
    c.end();
    const [m] = await stored(gw.root, 'bob@dest.test');
    const ars = headerLines(m!).filter((l) => l.startsWith('Authentication-Results:'));
    assert.equal(ars.length, 2, ars.join('\n'));
    assert.match(ars[0]!, /^Authentication-Results: auth\.mx\.test; spf=pass/);
    assert.equal(ars[1], 'Authentication-Results: upstream.test; spf=pass smtp.mailfrom=example.test');
  } finally {
    await gw.close();
  }
});

test('ARC: a list re-writes the body (DKIM breaks) and seals; arc=pass; a trusted sealer overrides DMARC p=reject', async () => {
  const { gw, seen } = await gatewayWith({ enforceDmarc: true, trustedArcSealers: ['lists.test'] });
  const { gw: strict } = await gatewayWith({ enforceDmarc: true });
  try {
    const original = await sign(rfc822('Alice <alice@example.test>', '[list] hello'));
    const modified = original.replace('see you at noon.\r\n', 'see you at noon.\r\n--\r\nlist footer\r\n');
    const seal = await sealMessage(modified, {
      signingDomain: 'lists.test',
      selector: 'arc',
      privateKey: keys.get('arc._domainkey.lists.test')!,
      authResults: 'mx.lists.test; dkim=pass header.i=@example.test; spf=pass smtp.mailfrom=example.test; dmarc=pass header.from=example.test',
      cv: 'none',
    });
    const sealed = seal.toString() + modified;
    let c = await ehlo(gw.port, 'mx.lists.test');
    let r = await send(c, 'list-bounces@lists.test', ['bob@dest.test'], sealed);
    assert.equal(r.data?.code, 250, 'the trusted seal overrides p=reject');
    c.end();
    const [m] = await stored(gw.root, 'bob@dest.test');
    const ar = headerLines(m!)[0]!;
    assert.match(ar, /dkim=fail \(body hash did not verify\)/);
    assert.match(ar, /dmarc=fail /);
    assert.match(ar, /; arc=pass \(i=1 spf=pass dkim=pass dkdomain=example\.test/);
    assert.deepEqual(
      seen[0]!.map((e) => [e.reason, e.detail]),
      [
        ['SPF_PASS', 'mx.test: domain of list-bounces@lists.test designates 127.0.0.1 as permitted sender'],
        ['DKIM_INVALID', 'example.test: body hash did not verify'],
        ['DMARC_FAIL_REJECT', 'example.test p=reject'],
        ['ARC_PASS', 'i=1 sealed by lists.test'],
      ],
    );

    c = await ehlo(strict.port, 'mx.lists.test');
    r = await send(c, 'list-bounces@lists.test', ['bob@dest.test'], sealed);
    assert.equal(r.data?.text, '550 5.7.1 Rejected by DMARC policy for example.test', 'an untrusted seal does not');
    c.end();
  } finally {
    await gw.close();
    await strict.close();
  }
});

test('the DNS cache: a second message from the same domain asks DNS nothing again; failures are not kept; dnsCache:false asks every time', async () => {
  let { gw } = await gatewayWith();
  try {
    const c = await ehlo(gw.port, 'client.example.test');
    const first = { spf: dns.count('example.test', 'TXT'), key: dns.count('sel._domainkey.example.test', 'TXT'), dmarc: dns.count('_dmarc.example.test', 'TXT') };
    for (let i = 0; i < 2; i++) {
      const r = await send(c, 'alice@example.test', ['bob@dest.test'], await sign(rfc822('Alice <alice@example.test>', `cached ${i}`)));
      assert.equal(r.data?.code, 250);
    }
    assert.equal(dns.count('example.test', 'TXT') - first.spf, 1, 'SPF record asked once for two messages');
    assert.equal(dns.count('sel._domainkey.example.test', 'TXT') - first.key, 1, 'DKIM key asked once');
    assert.equal(dns.count('_dmarc.example.test', 'TXT') - first.dmarc, 1, 'DMARC policy asked once');
    // A SERVFAIL is not kept: each message asks again.
    const broken = dns.count('broken.test', 'TXT');
    for (let i = 0; i < 2; i++) await send(c, 'x@broken.test', ['bob@dest.test'], rfc822('X <x@broken.test>', `broken ${i}`));
    assert.ok(dns.count('broken.test', 'TXT') - broken >= 2, 'a failure is asked again');
    c.end();
  } finally {
    await gw.close();
  }
  ({ gw } = await gatewayWith({ dnsCache: false }));
  try {
    const c = await ehlo(gw.port, 'client.example.test');
    const before = dns.count('sel._domainkey.example.test', 'TXT');
    for (let i = 0; i < 2; i++) await send(c, 'alice@example.test', ['bob@dest.test'], await sign(rfc822('Alice <alice@example.test>', `uncached ${i}`)));
    assert.equal(dns.count('sel._domainkey.example.test', 'TXT') - before, 2);
    c.end();
  } finally {
    await gw.close();
  }
});

test('option checks', () => {
  const invalid = { code: 'DOVETAIL_ERR_INVALID_OPTIONS' };
  assert.throws(() => mailAuth({ scores: { NOPE: 1 } as never }), invalid);
  assert.throws(() => mailAuth({ scores: { SPF_FAIL: Number.NaN } }), invalid);
  assert.throws(() => mailAuth({ authservId: 'bad id;' }), invalid);
  assert.throws(() => mailAuth({ dnsTimeout: 0 }), invalid);
});

test('the same DKIM, DMARC and ARC results as mailauth authenticate() over the whole message, signed or not', async () => {
  // A probe before mailAuth runs authenticate() on the message mailAuth is about to see and
  // records what the old implementation wrote after the SPF part, and the rules it scored.
  const expected: { ar: string; rules: string[] }[] = [];
  const oracle = defineMilter({
    name: 'oracle',
    async eom(ctx) {
      const sender = ctx.envelope.sender.address;
      const r = await authenticate(ctx.message.stream(), {
        ip: ctx.client.address,
        ...(ctx.helo !== undefined ? { helo: ctx.helo } : {}),
        ...(sender ? { sender } : ctx.helo !== undefined ? { sender: `postmaster@${ctx.helo}` } : {}),
        mta: 'mx.test',
        resolver: async (name: string, rrtype: string) => (await dns.resolver().resolve(name, rrtype)) as string[][],
        disableBimi: true,
      });
      const dkim = r.dkim.results.map((x) =>
        x.status.result === 'neutral' && x.status.comment === 'body hash did not verify' ? { ...x, status: { ...x.status, result: 'fail' as const }, info: x.info.replace(/^dkim=neutral/, 'dkim=fail') } : x,
      );
      const parts = dkim.map((x) => x.info);
      if (r.dmarc) parts.push(r.dmarc.info);
      if (r.arc) parts.push(r.arc.info || `arc=${r.arc.status.result}`);
      const rules: string[] = [];
      const passing = dkim.filter((x) => x.status.result === 'pass');
      if (passing.length) {
        rules.push('DKIM_VALID');
        if (passing.some((x) => x.status.aligned)) rules.push('DKIM_VALID_AU');
      } else if (dkim.some((x) => x.status.result === 'fail')) rules.push('DKIM_INVALID');
      if (r.dmarc && r.dmarc.status.result === 'pass') rules.push('DMARC_PASS');
      if (r.dmarc && r.dmarc.status.result === 'fail') rules.push(r.dmarc.policy === 'reject' ? 'DMARC_FAIL_REJECT' : r.dmarc.policy === 'quarantine' ? 'DMARC_FAIL_QUARANTINE' : 'DMARC_FAIL_NONE');
      if (r.arc && r.arc.status.result === 'pass') rules.push('ARC_PASS');
      if (r.arc && r.arc.status.result === 'fail') rules.push('ARC_FAIL');
      expected.push({ ar: parts.join('; '), rules });
    },
  });
  const seen: ScoreEntry[][] = [];
  const probe = defineMilter({ name: 'probe', async eom(ctx) { seen.push([...ctx.score.entries]); } });
  const gw = await startGateway({ milters: [oracle, mailAuth({ resolver: dns.resolver() }), probe] });
  try {
    const signed = await sign(rfc822('Alice <alice@example.test>', 'd1'));
    const listed = (await sign(rfc822('Alice <alice@example.test>', 'd8 list'))).replace('see you at noon.\r\n', 'see you at noon.\r\n--\r\nfooter\r\n');
    const seal = await sealMessage(listed, {
      signingDomain: 'lists.test',
      selector: 'arc',
      privateKey: keys.get('arc._domainkey.lists.test')!,
      authResults: 'mx.lists.test; dkim=pass header.i=@example.test',
      cv: 'none',
    });
    const cases: [string, string, string][] = [
      ['alice@example.test', 'client.example.test', rfc822('Alice <alice@example.test>', 'd0 unsigned')],
      ['alice@example.test', 'client.example.test', signed],
      ['alice@example.test', '[127.0.0.1]', await sign(rfc822('Alice <alice@example.test>', 'd2 ip helo'))],
      ['', 'client.example.test', await sign(rfc822('Alice <alice@example.test>', 'd3 null sender'))],
      ['bounce@bounces.test', 'client.example.test', (await sign(rfc822('Alice <alice@example.test>', 'd4 tampered'))).replace('see you at noon.', 'tampered')],
      ['x@lists.test', 'client.example.test', await sign(rfc822('Alice <alice@example.test>', 'd5 unaligned', undefined), 'lists.test', 'arc')],
      ['carol@quar.test', 'client.example.test', rfc822('Carol <carol@quar.test>, Alice <alice@example.test>', 'd6 two authors')],
      ['carol@quar.test', 'client.example.test', 'Subject: d7 no From\r\n\r\nbody\r\n'],
      ['list-bounces@lists.test', 'mx.lists.test', seal.toString() + listed],
      ['alice@example.test', 'client.example.test', rfc822('Alice <alice@example.test>', 'd9 bad signature', undefined, 'DKIM-Signature: v=1; a=rsa-sha256; d=example.test; s=sel; h=from; bh=AAAA; b=AAAA\r\n')],
    ];
    for (const [from, helo, message] of cases) {
      const c = await ehlo(gw.port, helo);
      const r = await send(c, from, ['bob@dest.test'], message);
      assert.equal(r.data?.code, 250, message.slice(0, 200));
      c.end();
    }
    assert.equal(expected.length, cases.length);
    const all = (await stored(gw.root, 'bob@dest.test')).map((m) => headerLines(m));
    for (let i = 0; i < cases.length; i++) {
      const subject = /(?:^|\n)Subject: ([^\r]*)/.exec(cases[i]![2])![1]!;
      const lines = all.find((h) => h.includes(`Subject: ${subject}`));
      assert.ok(lines, subject);
      const ar = lines[0]!;
      assert.ok(ar.endsWith(expected[i]!.ar), `${subject}:\n${ar}\nexpected to end with\n${expected[i]!.ar}`);
      const rules = seen[i]!.map((e) => e.reason).filter((x) => !x.startsWith('SPF_'));
      assert.deepEqual(rules, expected[i]!.rules, subject);
    }
  } finally {
    await gw.close();
  }
});

test('public keys are parsed once: the key cache hits on the second message signed with the same key', async () => {
  const keysSeen = publicKeyCache({ max: 10 });
  const { gw, seen } = await gatewayWith({ keyCache: keysSeen, dnsCache: false });
  try {
    const c = await ehlo(gw.port, 'client.example.test');
    for (let i = 0; i < 3; i++) {
      const r = await send(c, 'alice@example.test', ['bob@dest.test'], await sign(rfc822('Alice <alice@example.test>', `key ${i}`)));
      assert.equal(r.data?.code, 250);
    }
    assert.deepEqual(keysSeen.stats(), { hits: 2, misses: 1, size: 1 });
    // Another key (the list's) is a miss; an unsigned message does not look at keys at all.
    await send(c, 'x@lists.test', ['bob@dest.test'], await sign(rfc822('X <x@lists.test>', 'key other'), 'lists.test', 'arc'));
    await send(c, 'alice@example.test', ['bob@dest.test'], rfc822('Alice <alice@example.test>', 'key unsigned'));
    assert.deepEqual(keysSeen.stats(), { hits: 2, misses: 2, size: 2 });
    c.end();
    for (const s of seen.slice(0, 3)) assert.ok(s.some((e) => e.reason === 'DKIM_VALID'), 'verified with the cached key');
    // A rotated key (a new record under the same name) is another key: a miss, and it verifies.
    publishKey('example.test', 'rot');
    const c2 = await ehlo(gw.port, 'client.example.test');
    await send(c2, 'alice@example.test', ['bob@dest.test'], await sign(rfc822('Alice <alice@example.test>', 'key rot 1'), 'example.test', 'rot'));
    dns.remove('rot._domainkey.example.test');
    publishKey('example.test', 'rot');
    await send(c2, 'alice@example.test', ['bob@dest.test'], await sign(rfc822('Alice <alice@example.test>', 'key rot 2'), 'example.test', 'rot'));
    c2.end();
    assert.deepEqual(keysSeen.stats(), { hits: 2, misses: 4, size: 4 });
    assert.ok(seen.at(-1)!.some((e) => e.reason === 'DKIM_VALID'), 'the rotated key verifies');
  } finally {
    await gw.close();
  }
});
