/**
 * dkimSign through a running gateway over real SMTP: authenticated (STARTTLS + AUTH with
 * nodemailer, or AUTH in clear text with allowInsecureAuth) and mynetworks clients, RSA 2048
 * and Ed25519 keys made here with node:crypto, their public halves published in a real DNS
 * server on loopback, and every stored message checked with mailauth's verifier (which asks
 * that server). The body canonicalization is also checked against mailauth's own signer on
 * awkward bodies split at every offset.
 */
import { test, after, before } from 'node:test';
import assert from 'node:assert/strict';
import crypto from 'node:crypto';
import { subscribe, unsubscribe } from 'node:diagnostics_channel';
import nodemailer from 'nodemailer';
import { dkimSign as mailauthSign, dkimVerify } from 'mailauth';
import { Channels, defineMilter, type Milter } from '../../lib/index.js';
import { dkimBodyHash, dkimDnsRecord, dkimSign, type DkimCanonicalization, type DkimSignOptions } from '../../milters/dkim-sign.js';
import { spamTag } from '../../milters/spam-tag.js';
import { startDnsServer, type TestDnsServer } from '../helpers/dns-server.js';
import { ehlo, send, split, startGateway, stored, type RawClient } from '../helpers/smtp.js';
import { selfSignedCert } from '../helpers/tls.js';

let dns: TestDnsServer;
const pem = (k: crypto.KeyObject): string => k.export({ type: 'pkcs8', format: 'pem' }) as string;
const rsa = crypto.generateKeyPairSync('rsa', { modulusLength: 2048 });
const ed = crypto.generateKeyPairSync('ed25519');
const other = crypto.generateKeyPairSync('rsa', { modulusLength: 2048 });
const RSA_KEY = { domain: 'example.test', selector: 'rsa2048', privateKey: pem(rsa.privateKey) };
const ED_KEY = { domain: 'example.test', selector: 'ed', privateKey: pem(ed.privateKey) };
const OTHER_KEY = { domain: 'other.test', selector: 'o1', privateKey: pem(other.privateKey) };

// The records, written here from the public keys (not by dkimDnsRecord, which is checked against them).
const RSA_TXT = `v=DKIM1; k=rsa; p=${rsa.publicKey.export({ type: 'spki', format: 'der' }).toString('base64')}`;
// RFC 8463: an Ed25519 p= is the raw 32-byte key, the tail of its SPKI encoding.
const ED_TXT = `v=DKIM1; k=ed25519; p=${ed.publicKey.export({ type: 'spki', format: 'der' }).subarray(-32).toString('base64')}`;

before(async () => {
  dns = await startDnsServer();
  dns.txt('rsa2048._domainkey.example.test', RSA_TXT);
  dns.txt('ed._domainkey.example.test', ED_TXT);
  dns.txt('o1._domainkey.other.test', dkimDnsRecord(OTHER_KEY.privateKey));
});
after(async () => {
  await dns.close();
});

const plain = (user: string, pass: string): string => Buffer.from(`\0${user}\0${pass}`).toString('base64');

function rfc822(from: string, subject = 'hello', body = 'Hello Bob,\r\n\r\nsee you at noon.\r\n', extra = ''): string {
  return (
    `From: ${from}\r\nTo: Bob <bob@dest.test>\r\nCc: carol@dest.test\r\nSubject: ${subject}\r\n` +
    `Date: Mon, 01 Jan 2024 10:00:00 +0000\r\nMessage-ID: <${crypto.randomUUID()}@example.test>\r\n` +
    `MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n${extra}\r\n${body}`
  );
}

/** A gateway with dkimSign last (after `before`), AUTH allowed in clear text for user alice. */
async function gatewayWith(options: Partial<DkimSignOptions> = {}, before: readonly Milter[] = [], afterSign: readonly Milter[] = []) {
  return startGateway({
    allowInsecureAuth: true,
    authenticate: async ({ username, password }) => username === 'alice' && password === 's3cret',
    milters: [...before, dkimSign({ keys: [RSA_KEY, ED_KEY, OTHER_KEY], ...options }), ...afterSign],
  });
}

async function login(port: number): Promise<RawClient> {
  const c = await ehlo(port);
  const r = await c.cmd(`AUTH PLAIN ${plain('alice', 's3cret')}`);
  assert.equal(r.code, 235, r.text);
  return c;
}

/** mailauth's verdicts on a message, asking the loopback DNS server. */
async function verify(message: Buffer | string) {
  const resolver = dns.resolver();
  const r = await dkimVerify(message, { resolver: (name, type) => resolver.resolve(name, type) as Promise<string[][] | string[]> });
  return r.results.map((x) => ({ result: x.status.result, d: x.signingDomain, s: x.selector, a: x.algo, comment: x.status.comment }));
}

/** The unfolded header lines of a stored message, without what the Maildir adds. */
function headerLines(m: Buffer): string[] {
  return split(m)
    .headers.replace(/\r\n[ \t]+/g, ' ')
    .split('\r\n')
    .filter((l) => l && !/^(Return-Path|Delivered-To):/.test(l));
}

const signatures = (m: Buffer): string[] => headerLines(m).filter((l) => l.startsWith('DKIM-Signature:'));
const tag = (sig: string, name: string): string | undefined => new RegExp(`[; ]${name}=([^;]*)`).exec(sig)?.[1]?.replace(/\s+/g, '');

async function only(root: string, rcpt = 'bob@dest.test'): Promise<Buffer> {
  const all = await stored(root, rcpt);
  assert.equal(all.length, 1, 'one message stored');
  return all[0]!;
}

test('dkimDnsRecord gives the records an operator publishes (SPKI for RSA, the raw key for Ed25519)', () => {
  assert.equal(dkimDnsRecord(RSA_KEY.privateKey), RSA_TXT);
  assert.equal(dkimDnsRecord(ED_KEY.privateKey), ED_TXT);
});

test('authenticated over STARTTLS (nodemailer): signed with the RSA and the Ed25519 key; both verify; From is oversigned', async () => {
  const gw = await startGateway({
    tls: selfSignedCert(),
    authenticate: async ({ username, password }) => username === 'alice' && password === 's3cret',
    milters: [dkimSign({ keys: [RSA_KEY, ED_KEY] })],
  });
  const t = nodemailer.createTransport({ host: '127.0.0.1', port: gw.port, secure: false, requireTLS: true, tls: { rejectUnauthorized: false }, auth: { user: 'alice', pass: 's3cret' } });
  try {
    const info = await t.sendMail({ envelope: { from: 'alice@example.test', to: ['bob@dest.test'] }, raw: rfc822('Alice <alice@example.test>', 'submitted') });
    assert.match(info.response, /^250 /);
    const m = await only(gw.root);
    const lines = headerLines(m);
    // Both signatures first, in key order, then our Received.
    assert.match(lines[0]!, /^DKIM-Signature: v=1; a=rsa-sha256; c=relaxed\/relaxed; d=example\.test; s=rsa2048; t=\d+; h=/);
    assert.match(lines[1]!, /^DKIM-Signature: v=1; a=ed25519-sha256; c=relaxed\/relaxed; d=example\.test; s=ed; t=\d+; h=/);
    assert.match(lines[2]!, /^Received: from /);
    const h = tag(lines[0]!, 'h')!;
    assert.equal(h, 'From:From:To:Cc:Subject:Date:Message-ID:MIME-Version:Content-Type', 'every default field present, From once more');
    assert.equal(tag(lines[0]!, 'bh'), tag(lines[1]!, 'bh'), 'one body hash for both');
    assert.deepEqual(await verify(m), [
      { result: 'pass', d: 'example.test', s: 'rsa2048', a: 'rsa-sha256', comment: undefined },
      { result: 'pass', d: 'example.test', s: 'ed', a: 'ed25519-sha256', comment: undefined },
    ]);
    // Oversigning: a From added later breaks both signatures.
    const text = m.toString('latin1');
    const forged = text.replace(/\r\nFrom: /, '\r\nFrom: Mallory <mallory@example.test>\r\nFrom: ');
    assert.ok((await verify(Buffer.from(forged, 'latin1'))).every((r) => r.result !== 'pass'));
    // And a changed body breaks them too.
    assert.ok((await verify(Buffer.from(text.replace('see you at noon', 'see you at one'), 'latin1'))).every((r) => r.result !== 'pass'));
    assert.ok(dns.count('rsa2048._domainkey.example.test', 'TXT') >= 1 && dns.count('ed._domainkey.example.test', 'TXT') >= 1, 'keys fetched from DNS');
  } finally {
    t.close();
    await gw.close();
  }
});

test('mynetworks: an unauthenticated client in it is signed; outside it (and not authenticated) nothing is signed', async () => {
  const inside = await gatewayWith({ mynetworks: ['192.0.2.0/24', '127.0.0.0/8'] });
  const outside = await gatewayWith({ mynetworks: ['192.0.2.0/24', '::ffff:198.51.100.0/120', '2001:db8::/32'] });
  try {
    let c = await ehlo(inside.port);
    assert.equal((await send(c, 'app@example.test', ['bob@dest.test'], rfc822('App <app@example.test>', 'from mynetworks'))).data?.code, 250);
    c.end();
    const m = await only(inside.root);
    assert.equal(signatures(m).length, 2);
    assert.deepEqual((await verify(m)).map((r) => [r.s, r.result]), [['rsa2048', 'pass'], ['ed', 'pass']]);

    c = await ehlo(outside.port);
    const msg = rfc822('App <app@example.test>', 'from outside');
    assert.equal((await send(c, 'app@example.test', ['bob@dest.test'], msg)).data?.code, 250);
    c.end();
    const n = await only(outside.root);
    assert.deepEqual(signatures(n), []);
    assert.ok(n.toString('utf8').endsWith(msg), 'delivered as sent');
  } finally {
    await inside.close();
    await outside.close();
  }
});

test('the key is chosen by the From domain: no key, no signature; a subdomain uses its parent key unless subdomains: false', async () => {
  const gw = await gatewayWith();
  const exact = await gatewayWith({ subdomains: false });
  try {
    const c = await login(gw.port);
    // other.test has one key: one signature, d=other.test.
    assert.equal((await send(c, 'alice@other.test', ['bob@dest.test'], rfc822('alice@other.test', 'other'))).data?.code, 250);
    // nokey.test has none.
    assert.equal((await send(c, 'alice@nokey.test', ['carol@dest.test'], rfc822('Alice <alice@nokey.test>', 'no key'))).data?.code, 250);
    // A subdomain: signed with the parent's keys.
    assert.equal((await send(c, 'alice@mail.example.test', ['dave@dest.test'], rfc822('"Alice, at work" <alice@Mail.Example.TEST> (office)', 'sub'))).data?.code, 250);
    // Two From fields: not signed (RFC 5322 allows one).
    assert.equal((await send(c, 'alice@example.test', ['erin@dest.test'], rfc822('alice@example.test', 'two', undefined, 'From: bob@example.test\r\n'))).data?.code, 250);
    // The envelope sender does not matter, the From: field does.
    assert.equal((await send(c, 'bounce@nokey.test', ['frank@dest.test'], rfc822('Alice <alice@example.test>', 'envelope'))).data?.code, 250);
    c.end();

    const o = await only(gw.root);
    assert.deepEqual((await verify(o)).map((r) => [r.d, r.s, r.result]), [['other.test', 'o1', 'pass']]);
    assert.deepEqual(signatures(await only(gw.root, 'carol@dest.test')), []);
    const sub = await only(gw.root, 'dave@dest.test');
    assert.deepEqual((await verify(sub)).map((r) => [r.d, r.result]), [['example.test', 'pass'], ['example.test', 'pass']]);
    assert.deepEqual(signatures(await only(gw.root, 'erin@dest.test')), []);
    assert.equal(signatures(await only(gw.root, 'frank@dest.test')).length, 2);

    const e = await login(exact.port);
    assert.equal((await send(e, 'alice@mail.example.test', ['dave@dest.test'], rfc822('alice@mail.example.test', 'sub'))).data?.code, 250);
    e.end();
    assert.deepEqual(signatures(await only(exact.root, 'dave@dest.test')), []);
  } finally {
    await gw.close();
    await exact.close();
  }
});

test('signingDomain picks another policy: a third-party From signed with our domain', async () => {
  const seen: (string | undefined)[] = [];
  const gw = await gatewayWith({
    signingDomain: (ctx, from) => {
      seen.push(from);
      return ctx.auth?.user === 'alice' ? 'Example.Test' : undefined;
    },
  });
  try {
    const c = await login(gw.port);
    assert.equal((await send(c, 'alice@example.test', ['bob@dest.test'], rfc822('Alice <alice@gmail.test>', 'on behalf'))).data?.code, 250);
    // Mailboxes of two domains: the policy is asked, without a From domain.
    assert.equal((await send(c, 'alice@example.test', ['carol@dest.test'], rfc822('alice@a.test, bob@b.test', 'two domains'))).data?.code, 250);
    // No From at all: never signed, the policy is not asked.
    assert.equal((await send(c, 'alice@example.test', ['dave@dest.test'], rfc822('x', 'no from').replace(/^From: x\r\n/, ''))).data?.code, 250);
    c.end();
    const m = await only(gw.root);
    assert.deepEqual(seen, ['gmail.test', undefined]);
    assert.equal(signatures(await only(gw.root, 'carol@dest.test')).length, 2);
    const noFrom = await only(gw.root, 'dave@dest.test');
    assert.ok(!/^From:/m.test(noFrom.toString()), 'the message had no From');
    assert.deepEqual(signatures(noFrom), []);
    assert.deepEqual((await verify(m)).map((r) => [r.d, r.result]), [['example.test', 'pass'], ['example.test', 'pass']]);
  } finally {
    await gw.close();
  }
});

test('it signs the message as the milters before it left it: spamTag headers and Subject tag, a changed Subject, a new body', async () => {
  const scorer = defineMilter({
    name: 'scorer',
    async eom(ctx) {
      ctx.score.add(7, 'TEST_RULE');
      ctx.message.changeHeader('Subject', 1, 'rewritten subject');
      ctx.message.addHeader('Reply-To', 'help@example.test');
      ctx.message.replaceBody('The body\nas a milter\nreplaced it.  \n\n\n');
    },
  });
  const editorAfter = defineMilter({
    name: 'late-editor',
    async eom(ctx) {
      ctx.message.changeHeader('Subject', 1, 'changed after signing');
    },
  });
  const gw = await gatewayWith({}, [scorer, spamTag({ requiredScore: 5, subjectTag: '[SPAM]' })]);
  const late = await gatewayWith({}, [], [editorAfter]);
  try {
    let c = await login(gw.port);
    assert.equal((await send(c, 'alice@example.test', ['bob@dest.test'], rfc822('alice@example.test', 'original'))).data?.code, 250);
    c.end();
    const m = await only(gw.root);
    const lines = headerLines(m);
    assert.ok(lines.includes('Subject: [SPAM] rewritten subject'), lines.join('\n'));
    assert.ok(lines.some((l) => l.startsWith('X-Spam-Status: Yes, score=7.0')));
    assert.match(split(m).body.toString(), /^The body\r\nas a milter\r\nreplaced it\./);
    const sig = signatures(m)[0]!;
    assert.match(tag(sig, 'h')!, /Subject:.*Reply-To/, 'the Reply-To a milter added is signed');
    assert.deepEqual((await verify(m)).map((r) => r.result), ['pass', 'pass']);

    // The reason it must be last: an edit after it breaks the signature.
    c = await login(late.port);
    assert.equal((await send(c, 'alice@example.test', ['bob@dest.test'], rfc822('alice@example.test', 'original'))).data?.code, 250);
    c.end();
    const n = await only(late.root);
    assert.ok(headerLines(n).includes('Subject: changed after signing'));
    assert.deepEqual((await verify(n)).map((r) => r.result), ['fail', 'fail']);
  } finally {
    await gw.close();
    await late.close();
  }
});

test('every canonicalization verifies, with awkward headers and bodies (white space, trailing empty lines, 8-bit bytes, no body, a large body)', async () => {
  const bodies: Buffer[] = [
    Buffer.from('Hello  \t there \r\n\r\n \t \r\nx\t\r\n\r\n\r\n'),
    Buffer.from(''),
    Buffer.from('\r\n\r\n\r\n'),
    Buffer.from('caf\xe9 \xff\r\n', 'latin1'),
    Buffer.from(Array.from({ length: 6000 }, (_, i) => `${'x'.repeat(i % 97)}${' \t'.repeat(i % 5)}line ${i}${i % 7 === 0 ? '   ' : ''}\r\n${i % 11 === 0 ? '\r\n' : ''}`).join('') + '\r\n\r\n'),
  ];
  for (const canonicalization of ['relaxed/relaxed', 'relaxed/simple', 'simple/relaxed', 'simple/simple'] as DkimCanonicalization[]) {
    const gw = await gatewayWith({ canonicalization, mynetworks: ['127.0.0.1'] });
    try {
      const c = await ehlo(gw.port);
      for (const body of bodies) {
        const head = Buffer.from(
          'From:Alice <alice@example.test>\r\nTo:   bob@dest.test  \r\nSubject: caf\xe9\t \r\n  folded  line \r\n' +
            'subject: second\r\nDate: Mon, 01 Jan 2024 10:00:00 +0000\r\n\r\n',
          'latin1',
        );
        assert.equal((await send(c, 'alice@example.test', ['bob@dest.test'], Buffer.concat([head, body]))).data?.code, 250);
      }
      c.end();
      const all = await stored(gw.root, 'bob@dest.test');
      assert.equal(all.length, bodies.length);
      for (const m of all) {
        const sig = signatures(m)[0]!;
        assert.ok(sig.includes(`c=${canonicalization};`), sig);
        assert.equal(tag(sig, 'h'), 'From:From:To:Subject:Subject:Date');
        const results = await verify(m);
        assert.deepEqual(results.map((r) => r.result), ['pass', 'pass'], `${canonicalization}: ${JSON.stringify(results)} ${m.length} bytes`);
      }
    } finally {
      await gw.close();
    }
  }
});

test('the body hash equals mailauth signer\'s bh= for awkward bodies split at every offset', async () => {
  const bodies = [
    '',
    '\r\n',
    '\r\n\r\n',
    'a',
    'a\r\n',
    ' \t ',
    'a \t\r\n \r\n\t\r\n',
    'a  b\t\tc \r\n\r\nd\r\n\r\n\r\n',
    '  lead\r\n\r\n\r\ntrail  ',
    'x \r\n\r\n  \r\ny\t\r\n \r\n',
    '\xe9\xff \xa0 z\r\n',
    'p  \t q\t  r \t \t s   \t\r\n',
  ];
  const key = { signingDomain: 'example.test', selector: 'x', privateKey: RSA_KEY.privateKey };
  for (const body of bodies) {
    const bytes = Buffer.from(body, 'latin1');
    for (const canon of ['relaxed', 'simple'] as const) {
      const r = await mailauthSign(Buffer.concat([Buffer.from('From: a@example.test\r\n\r\n'), bytes]), { ...key, canonicalization: `relaxed/${canon}`, signatureData: [{ ...key, canonicalization: `relaxed/${canon}` }] });
      const expected = /bh=([^;]+);/.exec(r.signatures.replace(/\r\n\s+/g, ''))?.[1];
      assert.ok(expected, r.signatures);
      assert.equal(dkimBodyHash([bytes], canon), expected, `${canon} ${JSON.stringify(body)}`);
      for (let i = 0; i <= bytes.length; i++) {
        for (let j = i; j <= bytes.length; j++) {
          const parts = [bytes.subarray(0, i), bytes.subarray(i, j), bytes.subarray(j)];
          assert.equal(dkimBodyHash(parts, canon), expected, `${canon} ${JSON.stringify(body)} split at ${i},${j}`);
        }
      }
    }
  }
});

test('a failure to sign takes the default action: tempfail (the client retries), or accept (delivered unsigned); reported on dovetail:milter:error', async () => {
  const errors: { milter: string; stage: string; action: string }[] = [];
  const on = (m: unknown): void => {
    errors.push(m as { milter: string; stage: string; action: string });
  };
  subscribe(Channels.milterError, on);
  const boom = (): string => {
    throw new Error('key store unavailable');
  };
  const strict = await gatewayWith({ signingDomain: boom });
  const lax = await gatewayWith({ signingDomain: boom, defaultAction: 'accept' });
  try {
    let c = await login(strict.port);
    const r = await send(c, 'alice@example.test', ['bob@dest.test'], rfc822('alice@example.test'));
    assert.equal(r.data?.text, '451 4.7.1 Service unavailable - try again later');
    c.end();
    assert.deepEqual(await stored(strict.root, 'bob@dest.test'), []);

    c = await login(lax.port);
    assert.equal((await send(c, 'alice@example.test', ['bob@dest.test'], rfc822('alice@example.test'))).data?.code, 250);
    c.end();
    assert.deepEqual(signatures(await only(lax.root)), []);
    assert.deepEqual(
      errors.map((e) => [e.milter, e.stage, e.action]),
      [
        ['dkim-sign', 'eom', 'tempfail'],
        ['dkim-sign', 'eom', 'accept'],
      ],
    );
  } finally {
    unsubscribe(Channels.milterError, on);
    await strict.close();
    await lax.close();
  }
});

test('bad options are refused when the milter is made', () => {
  const code = { code: 'DOVETAIL_ERR_INVALID_OPTIONS' };
  const ec = pem(crypto.generateKeyPairSync('ec', { namedCurve: 'prime256v1' }).privateKey);
  const small = pem(crypto.generateKeyPairSync('rsa', { modulusLength: 768 }).privateKey);
  const cases: [string, unknown][] = [
    ['no keys', { keys: [] }],
    ['keys missing', {}],
    ['not PEM', { keys: [{ ...RSA_KEY, privateKey: 'not a key' }] }],
    ['truncated PEM', { keys: [{ ...RSA_KEY, privateKey: RSA_KEY.privateKey.slice(0, 200) }] }],
    ['a public key', { keys: [{ ...RSA_KEY, privateKey: rsa.publicKey.export({ type: 'spki', format: 'pem' }) }] }],
    ['an EC key', { keys: [{ ...RSA_KEY, privateKey: ec }] }],
    ['RSA under 1024 bits', { keys: [{ ...RSA_KEY, privateKey: small }] }],
    ['bad domain', { keys: [{ ...RSA_KEY, domain: 'exa mple.test' }] }],
    ['bad selector', { keys: [{ ...RSA_KEY, selector: 'a;b' }] }],
    ['the same selector twice', { keys: [RSA_KEY, { ...ED_KEY, selector: 'RSA2048' }] }],
    ['bad mynetworks', { keys: [RSA_KEY], mynetworks: ['10.0.0.0/33'] }],
    ['headers without From', { keys: [RSA_KEY], headers: ['To', 'Subject'], oversign: [] }],
    ['a bad header name', { keys: [RSA_KEY], headers: ['From', 'Sub ject'] }],
    ['bad canonicalization', { keys: [RSA_KEY], canonicalization: 'relaxed' }],
    ['bad signatureTtl', { keys: [RSA_KEY], signatureTtl: -1 }],
    ['signingDomain not a function', { keys: [RSA_KEY], signingDomain: 'example.test' }],
  ];
  for (const [what, options] of cases) assert.throws(() => dkimSign(options as DkimSignOptions), code, what);
  // Oversigning alone makes From signed.
  assert.ok(dkimSign({ keys: [RSA_KEY], headers: ['Subject'], oversign: ['From'] }));
  // PKCS#1 RSA and an IDN domain are fine.
  assert.ok(dkimSign({ keys: [{ domain: 'bücher.test', selector: 's1', privateKey: rsa.privateKey.export({ type: 'pkcs1', format: 'pem' }) as string }] }));
});

test('signatureTtl adds x=; the clock is an option', async () => {
  const gw = await gatewayWith({ signatureTtl: 86_400, now: () => Date.UTC(2030, 0, 1) });
  try {
    const c = await login(gw.port);
    assert.equal((await send(c, 'alice@example.test', ['bob@dest.test'], rfc822('alice@example.test'))).data?.code, 250);
    c.end();
    const sig = signatures(await only(gw.root))[0]!;
    const t = Date.UTC(2030, 0, 1) / 1000;
    assert.equal(tag(sig, 't'), String(t));
    assert.equal(tag(sig, 'x'), String(t + 86_400));
  } finally {
    await gw.close();
  }
});
