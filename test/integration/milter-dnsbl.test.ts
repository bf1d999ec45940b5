/**
 * dnsbl through a running gateway over real SMTP, with the lists served by a real DNS
 * server on loopback (test/helpers/dns-server.ts). The gateway's clients come from
 * 127.0.0.1: some tests list 1.0.0.127 in the zones (the default client address), the
 * others give the milter another address with the `clientAddress` option.
 */
import { test, after, before } from 'node:test';
import assert from 'node:assert/strict';
import type { Resolver } from 'node:dns/promises';
import { defineMilter, type ScoreEntry } from '../../lib/index.js';
import { compileFilter, dnsbl, parseSite, type DnsblOptions } from '../../milters/dnsbl.js';
import { startDnsServer, type TestDnsServer } from '../helpers/dns-server.js';
import { ehlo, message, RawClient, send, split, startGateway, stored } from '../helpers/smtp.js';

let dns: TestDnsServer;
const resolvers: Resolver[] = [];
before(async () => {
  dns = await startDnsServer();
});
after(async () => {
  // Queries the milter gave up on (its own timeout) are still open in c-ares: end them.
  for (const r of resolvers) r.cancel();
  await dns.close();
});

/** A milter after dnsbl that records the score entries it sees at end of message. */
function probe(): { milter: ReturnType<typeof defineMilter>; seen: ScoreEntry[][] } {
  const seen: ScoreEntry[][] = [];
  return { seen, milter: defineMilter({ name: 'probe', async eom(ctx) { seen.push([...ctx.score.entries]); } }) };
}

/** A gateway with dnsbl (resolver pointed at the loopback DNS server) and a probe. */
async function gatewayWith(options: DnsblOptions, resolverTimeout = 1000) {
  const p = probe();
  const resolver = dns.resolver({ timeout: resolverTimeout });
  resolvers.push(resolver);
  const gw = await startGateway({ milters: [dnsbl({ resolver, ...options }), p.milter] });
  return { gw, seen: p.seen };
}

async function waitFor(cond: () => boolean, ms = 5000): Promise<void> {
  const end = Date.now() + ms;
  while (!cond()) {
    if (Date.now() > end) throw new Error('condition not met in time');
    await new Promise((r) => setTimeout(r, 10));
  }
}

test('a listed client (127.0.0.1 as 1.0.0.127.<zone>): lookup at connect, 554 naming the list at every RCPT, nothing stored', async () => {
  dns.a('1.0.0.127.zen-a.example', '127.0.0.2');
  dns.behave('1.0.0.127.zen-a.example', { delay: 1000 });
  const { gw } = await gatewayWith({ zones: ['zen-a.example=127.0.0.[2..11]'] }, 5000);
  try {
    const t0 = Date.now();
    const c = await RawClient.connect(gw.port);
    assert.equal((await c.reply()).code, 220);
    assert.ok(Date.now() - t0 < 800, 'the greeting does not wait for the lists');
    // The query went out at connect, before HELO or MAIL.
    await waitFor(() => dns.count('1.0.0.127.zen-a.example', 'A') === 1);
    assert.equal((await c.cmd('EHLO client.example.test')).code, 250);
    const r = await send(c, 'alice@sender.test', ['bob@example.test', 'carol@example.test'], message());
    assert.equal(r.mail.code, 250, 'MAIL is accepted: the reject is delayed to RCPT');
    assert.deepEqual(
      r.rcpt.map((x) => x.text),
      [
        '554 5.7.1 Service unavailable; client [127.0.0.1] blocked using zen-a.example',
        '554 5.7.1 Service unavailable; client [127.0.0.1] blocked using zen-a.example',
      ],
    );
    assert.equal(r.data, undefined);
    assert.deepEqual(await stored(gw.root, 'bob@example.test'), []);
    assert.equal(dns.count('1.0.0.127.zen-a.example'), 1, 'one query for the whole session');
    c.end();
  } finally {
    await gw.close();
  }
});

test('postscreen weights: block list, allow list with a negative weight, filters, threshold, score entries and header', async () => {
  const zones = ['zen-b.example=127.0.0.[2..11]*3', 'list.dnswl-b.example=127.0.[0..255].[1..3]*-5', 'weak-b.example*1'];
  dns.a('1.2.0.192.zen-b.example', '127.0.0.2'); // listed: 3 ≥ 3
  dns.a('2.2.0.192.zen-b.example', '127.0.0.4'); // listed, but allow-listed: 3 - 5
  dns.a('2.2.0.192.list.dnswl-b.example', '127.0.10.2');
  dns.a('3.2.0.192.zen-b.example', '127.0.0.20'); // outside the filter: no hit
  dns.a('4.2.0.192.weak-b.example', '127.0.0.2'); // weight 1 < 3: scored, not refused
  dns.a('5.2.0.192.zen-b.example', '127.0.0.10');
  dns.a('5.2.0.192.weak-b.example', '127.0.0.2'); // 3 + 1: refused, the reply names the heavier list
  let client = '';
  const { gw, seen } = await gatewayWith({ zones, threshold: 3, clientAddress: () => client });
  try {
    const run = async (address: string) => {
      client = address;
      const c = await ehlo(gw.port);
      const r = await send(c, 'alice@sender.test', ['bob@example.test'], message(address));
      c.end();
      return r;
    };
    let r = await run('192.0.2.1');
    assert.equal(r.rcpt[0]?.text, '554 5.7.1 Service unavailable; client [192.0.2.1] blocked using zen-b.example');

    r = await run('192.0.2.2');
    assert.equal(r.rcpt[0]?.code, 250, 'the allow list outweighs the block list');
    assert.equal(r.data?.code, 250);
    assert.deepEqual(
      seen.at(-1)!.map((e) => [e.points, e.reason, e.milter]),
      [
        [3, 'DNSBL_ZEN_B', 'dnsbl'],
        [-5, 'DNSWL_B', 'dnsbl'],
      ],
    );
    assert.equal(seen.at(-1)![0]!.detail, 'client [192.0.2.2] listed by zen-b.example (127.0.0.4)');
    const [m] = await stored(gw.root, 'bob@example.test');
    const { headers } = split(m!);
    assert.match(headers, /\r\nX-Dovetail-DNSBL: client \[192\.0\.2\.2\] listed by zen-b\.example \(127\.0\.0\.4\), weight 3\r\n/);
    assert.match(headers, /\r\nX-Dovetail-DNSBL: client \[192\.0\.2\.2\] listed by list\.dnswl-b\.example \(127\.0\.10\.2\), weight -5\r\n/);

    r = await run('192.0.2.3');
    assert.equal(r.data?.code, 250, 'an answer outside the filter is no listing');
    assert.deepEqual(seen.at(-1), []);

    r = await run('192.0.2.4');
    assert.equal(r.data?.code, 250, 'under the threshold');
    assert.deepEqual(seen.at(-1)!.map((e) => [e.points, e.reason]), [[1, 'DNSBL_WEAK_B']]);

    r = await run('192.0.2.5');
    assert.equal(r.rcpt[0]?.text, '554 5.7.1 Service unavailable; client [192.0.2.5] blocked using zen-b.example');

    r = await run('192.0.2.99');
    assert.equal(r.data?.code, 250, 'listed nowhere');
    assert.equal((await stored(gw.root, 'bob@example.test')).length, 4);
  } finally {
    await gw.close();
  }
});

test('IPv6 clients are looked up by their reversed nibbles; IPv4-mapped ones as IPv4', async () => {
  const nibbles = '1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2';
  dns.a(`${nibbles}.zen-c.example`, '127.0.0.3');
  dns.a('7.2.0.192.zen-c.example', '127.0.0.3');
  let client = '2001:db8::1';
  const { gw } = await gatewayWith({ zones: [{ zone: 'zen-c.example', weight: 1 }], clientAddress: () => client });
  try {
    let c = await ehlo(gw.port);
    let r = await send(c, 'alice@sender.test', ['bob@example.test'], message());
    assert.equal(r.rcpt[0]?.text, '554 5.7.1 Service unavailable; client [2001:db8::1] blocked using zen-c.example');
    assert.equal(dns.count(`${nibbles}.zen-c.example`, 'A'), 1);
    c.end();
    client = '::ffff:192.0.2.7';
    c = await ehlo(gw.port);
    r = await send(c, 'alice@sender.test', ['bob@example.test'], message());
    assert.equal(r.rcpt[0]?.code, 554);
    assert.equal(dns.count('7.2.0.192.zen-c.example', 'A'), 1);
    c.end();
  } finally {
    await gw.close();
  }
});

test('RHSBL: the sender domain (at MAIL) and the HELO name, with Postfix replies naming the list', async () => {
  dns.a('bad-sender.example.dbl-d.example', '127.0.1.2');
  dns.a('bad-helo.example.dbl-d.example', '127.0.1.2');
  dns.a('weird.example.dbl-d.example', '127.0.0.1'); // outside the filter
  const { gw, seen } = await gatewayWith({
    rhsbl: [
      { zone: 'dbl-d.example', target: 'sender', filter: '127.0.1.[2..99]', weight: 2 },
      { zone: 'dbl-d.example', target: 'helo', filter: '127.0.1.[2..99]', weight: 2, reason: 'HELO_IN_DBL' },
    ],
  });
  try {
    let c = await ehlo(gw.port, 'good.example');
    let r = await send(c, 'alice@bad-sender.example', ['bob@example.test'], message());
    assert.equal(r.mail.code, 250);
    assert.equal(r.rcpt[0]?.text, '554 5.7.1 Service unavailable; Sender address [alice@bad-sender.example] blocked using dbl-d.example');
    // The next message of the session, from another sender, is checked afresh.
    assert.equal((await c.cmd('RSET')).code, 250);
    r = await send(c, 'alice@weird.example', ['bob@example.test'], message());
    assert.equal(r.data?.code, 250);
    r = await send(c, '', ['bob@example.test'], message());
    assert.equal(r.data?.code, 250, 'the null sender has no domain to look up');
    c.end();

    c = await ehlo(gw.port, 'bad-helo.example');
    r = await send(c, 'alice@good.example', ['bob@example.test'], message());
    assert.equal(r.rcpt[0]?.text, '554 5.7.1 Service unavailable; Helo command [bad-helo.example] blocked using dbl-d.example');
    assert.equal((await c.cmd('RSET')).code, 250);
    assert.equal((await c.cmd('EHLO [192.0.2.1]')).code, 250);
    r = await send(c, 'alice@good.example', ['bob@example.test'], message());
    assert.equal(r.data?.code, 250, 'an address literal HELO is not looked up; the old HELO no longer counts');
    c.end();
    assert.equal(dns.count('bad-helo.example.dbl-d.example', 'A'), 1);
    assert.deepEqual(seen.flat().map((e) => e.reason), []);
  } finally {
    await gw.close();
  }
});

test('DNS failures: by default not a reject, noted in a header (a forged one is dropped); per-zone timeout; 127.255.255.x is a failure', async () => {
  dns.behave('1.0.0.127.broken-e.example', { fail: 'servfail' });
  dns.behave('1.0.0.127.slow-e.example', { fail: 'timeout' });
  dns.a('1.0.0.127.err-e.example', '127.255.255.254');
  // The resolver would wait 8 s for the silent list; the milter's own timeout is 400 ms.
  const { gw, seen } = await gatewayWith({ zones: ['broken-e.example', 'slow-e.example', 'err-e.example'], timeout: 400 }, 8000);
  try {
    const c = await ehlo(gw.port);
    assert.equal((await c.cmd('MAIL FROM:<alice@sender.test>')).code, 250);
    const t0 = Date.now();
    assert.equal((await c.cmd('RCPT TO:<bob@example.test>')).code, 250);
    assert.ok(Date.now() - t0 < 3000, 'the per-zone timeout bounds the wait');
    assert.equal((await c.data(message('x', 'hi\r\n', 'X-Dovetail-DNSBL: client is clean, trust me\r\n'))).code, 250);
    c.end();
    const [m] = await stored(gw.root, 'bob@example.test');
    const { headers } = split(m!);
    const notes = headers.split('\r\n').filter((l) => l.startsWith('X-Dovetail-DNSBL:'));
    assert.deepEqual(notes, [
      'X-Dovetail-DNSBL: temporary failure looking up broken-e.example',
      'X-Dovetail-DNSBL: temporary failure looking up slow-e.example',
      'X-Dovetail-DNSBL: temporary failure looking up err-e.example',
    ]);
    assert.deepEqual(seen.at(-1), []);
  } finally {
    await gw.close();
  }
});

test("onFailure: 'tempfail' answers 451 when a failed list could change the verdict, and only then", async () => {
  dns.behave('9.2.0.192.bl-f.example', { fail: 'servfail' });
  dns.behave('9.2.0.192.wl-f.example', { fail: 'servfail' });
  dns.a('8.2.0.192.bl-f.example', '127.0.0.2');
  dns.behave('8.2.0.192.wl-f.example', { fail: 'servfail' });
  let client = '192.0.2.9';
  const { gw } = await gatewayWith({
    zones: ['bl-f.example*2', 'wl-f.example*-3', 'other-f.example*2'],
    threshold: 2,
    onFailure: 'tempfail',
    clientAddress: () => client,
  });
  try {
    let c = await ehlo(gw.port);
    let r = await send(c, 'alice@sender.test', ['bob@example.test'], message());
    assert.equal(r.rcpt[0]?.text, '451 4.7.1 Service unavailable; temporary failure looking up bl-f.example, wl-f.example');
    c.end();
    // Listed by bl-f; the allow list that failed could have saved it: 451, not 554.
    client = '192.0.2.8';
    c = await ehlo(gw.port);
    r = await send(c, 'alice@sender.test', ['bob@example.test'], message());
    assert.equal(r.rcpt[0]?.code, 451);
    c.end();
    // Only the allow list fails, nothing is listed: the failure cannot matter.
    dns.behave('9.2.0.192.bl-f.example', undefined);
    client = '192.0.2.9';
    c = await ehlo(gw.port);
    r = await send(c, 'alice@sender.test', ['bob@example.test'], message());
    assert.equal(r.rcpt[0]?.code, 250);
    assert.equal(r.data?.code, 250);
    c.end();
  } finally {
    await gw.close();
  }
});

test('all zones are queried in parallel', async () => {
  for (const z of ['p1-g.example', 'p2-g.example', 'p3-g.example']) {
    dns.a(`1.0.0.127.${z}`, '127.0.0.2');
    dns.behave(`1.0.0.127.${z}`, { delay: 700 });
  }
  const { gw } = await gatewayWith({ zones: ['p1-g.example*0.1', 'p2-g.example*0.1', 'p3-g.example*0.1'] });
  try {
    const t0 = Date.now();
    const c = await ehlo(gw.port);
    const r = await send(c, 'alice@sender.test', ['bob@example.test'], message());
    const took = Date.now() - t0;
    assert.equal(r.data?.code, 250);
    assert.ok(took < 1800, `three 700 ms lists answered in ${took} ms`);
    c.end();
  } finally {
    await gw.close();
  }
});

test("the cache keeps answers for their TTL and 'not listed' for negativeTtl, on the injected clock; failures are not cached", async () => {
  let now = 1_000_000;
  dns.a('1.0.0.127.ttl-h.example', '127.0.0.2', 60);
  dns.behave('1.0.0.127.fail-h.example', { fail: 'servfail' });
  const { gw, seen } = await gatewayWith({
    zones: ['ttl-h.example*0.5', 'nx-h.example', 'fail-h.example'],
    cache: { negativeTtl: 5_000 },
    clock: () => now,
  });
  const session = async () => {
    const c = await ehlo(gw.port);
    const r = await send(c, 'alice@sender.test', ['bob@example.test'], message());
    assert.equal(r.data?.code, 250);
    c.end();
  };
  try {
    await session();
    await session();
    assert.equal(dns.count('1.0.0.127.ttl-h.example'), 1, 'a listing is cached');
    assert.equal(dns.count('1.0.0.127.nx-h.example'), 1, 'NXDOMAIN is cached');
    assert.equal(dns.count('1.0.0.127.fail-h.example'), 2, 'a SERVFAIL is not');
    now += 5_001;
    await session();
    assert.equal(dns.count('1.0.0.127.ttl-h.example'), 1, 'still within the 60 s TTL');
    assert.equal(dns.count('1.0.0.127.nx-h.example'), 2, 'the negative entry expired');
    // The list drops the client; the cache keeps the listing until the TTL runs out.
    dns.remove('1.0.0.127.ttl-h.example');
    now += 50_000;
    await session();
    assert.equal(seen.at(-1)?.[0]?.reason, 'DNSBL_TTL_H');
    now += 10_000;
    await session();
    assert.equal(dns.count('1.0.0.127.ttl-h.example'), 2, 'asked again after 60 s');
    assert.deepEqual(seen.at(-1), [], 'and no longer listed');
  } finally {
    await gw.close();
  }
});

test('the exempt option skips the check (default: authenticated sessions)', async () => {
  dns.a('1.0.0.127.zen-i.example', '127.0.0.2');
  const { gw } = await gatewayWith({ zones: ['zen-i.example'], exempt: (ctx) => ctx.envelope.sender.address.endsWith('@trusted.test') });
  try {
    const c = await ehlo(gw.port);
    let r = await send(c, 'alice@trusted.test', ['bob@example.test'], message());
    assert.equal(r.data?.code, 250);
    assert.equal((await c.cmd('RSET')).code, 250);
    r = await send(c, 'alice@sender.test', ['bob@example.test'], message());
    assert.equal(r.rcpt[0]?.code, 554);
    c.end();
  } finally {
    await gw.close();
  }
});

test('postscreen_dnsbl_sites syntax and option checks', () => {
  assert.deepEqual(parseSite('zen.example=127.0.0.[2..11]*3'), { zone: 'zen.example', weight: 3, filter: '127.0.0.[2..11]' });
  assert.deepEqual(parseSite('list.dnswl.example=127.0.[0..255].[1..3]*-5'), { zone: 'list.dnswl.example', weight: -5, filter: '127.0.[0..255].[1..3]' });
  assert.deepEqual(parseSite('bl.example'), { zone: 'bl.example' });
  const f = compileFilter('127.0.[0..2;9].[1;3..4]');
  assert.ok(f('127.0.9.3'));
  assert.ok(f('127.0.1.1'));
  assert.ok(!f('127.0.3.1'));
  assert.ok(!f('127.0.0.2'));
  assert.ok(!f('127.0.0'));
  const invalid = { code: 'DOVETAIL_ERR_INVALID_OPTIONS' };
  assert.throws(() => dnsbl({ zones: ['zen.example=127.0.0'] }), invalid);
  assert.throws(() => dnsbl({ zones: ['zen.example=127.0.0.[5..2]'] }), invalid);
  assert.throws(() => dnsbl({ zones: ['zen.example*x'] }), invalid);
  assert.throws(() => dnsbl({ zones: ['not a zone'] }), invalid);
  assert.throws(() => dnsbl({}), invalid);
  assert.throws(() => dnsbl({ rhsbl: [{ zone: 'dbl.example', target: 'client' as 'sender' }] }), invalid);
});
