/**
 * relayControl through a running gateway over real SMTP: who may relay (client networks,
 * IPv4-mapped and IPv6 clients, SMTP AUTH), the local and relay domains, and every address
 * trick that once opened relays, each as a transcript of RCPT replies. Where smtp-server
 * refuses a syntax before the milter sees it (501), that refusal is what is asserted; the
 * milter's own handling of those forms (as Postfix would pass them to a served milter) is
 * checked on resolveDestination and on the handler at the end.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import net from 'node:net';
import { relayControl, resolveDestination, canonicalDomain } from '../../milters/relay-control.js';
import type { MessageContext } from '../../lib/index.js';
import { ehlo, message, RawClient, send, startGateway, stored } from '../helpers/smtp.js';

const DENIED = (a: string): string => `554 5.7.1 <${a}>: Relay access denied`;
const OK = '250 2.1.5 Accepted';
const BAD = '501 5.1.3 Error: Bad recipient address syntax';

const domains = { localDomains: ['relay.example', 'Bücher.example'], relayDomains: ['relayed.example', '.sub.example'] };

/** MAIL FROM then one RCPT per address on an open session: each RCPT's reply line. */
async function rcpts(c: RawClient, to: readonly string[], mailArgs = ''): Promise<string[]> {
  const m = await c.cmd(`MAIL FROM:<a@sender.test>${mailArgs}`);
  assert.equal(m.code, 250, m.text);
  const out: string[] = [];
  // RawClient reads latin1; replies quoting a UTF-8 address are UTF-8.
  for (const t of to) out.push(Buffer.from((await c.cmd(`RCPT TO:<${t}>`)).text, 'latin1').toString('utf8'));
  await c.cmd('RSET');
  return out;
}

/** Asserts a transcript: each [address, expected reply] pair, in one session. */
async function transcript(port: number, cases: readonly (readonly [string, string])[], mailArgs = '', host?: string): Promise<void> {
  const c = host ? await RawClient.connect(port, host) : await RawClient.connect(port);
  await c.reply();
  await c.cmd('EHLO client.example.test');
  try {
    const got = await rcpts(
      c,
      cases.map(([a]) => a),
      mailArgs,
    );
    assert.deepEqual(
      cases.map(([a], i) => `RCPT TO:<${a}> -> ${got[i]}`),
      cases.map(([a, want]) => `RCPT TO:<${a}> -> ${want}`),
    );
  } finally {
    c.end();
  }
}

test('an untrusted client: local and relay domains accepted, everything else 554 5.7.1 Relay access denied; refused RCPTs get no mail', async () => {
  const gw = await startGateway({ milters: [relayControl(domains)] });
  try {
    await transcript(gw.port, [
      ['bob@relay.example', OK],
      ['carol@relayed.example', OK],
      ['mallory@other.example', DENIED('mallory@other.example')],
      ['x@relay.example.other.example', DENIED('x@relay.example.other.example')],
      ['x@notrelay.example', DENIED('x@notrelay.example')],
      ['postmaster', OK], // RFC 5321 4.1.1.3: the domainless postmaster is ours
    ]);
    const c = await ehlo(gw.port);
    const r = await send(c, 'a@sender.test', ['bob@relay.example', 'mallory@other.example'], message());
    assert.equal(r.rcpt[1]?.text, DENIED('mallory@other.example'));
    assert.match(r.data!.text, /^250 /);
    assert.equal((await stored(gw.root, 'bob@relay.example')).length, 1);
    assert.equal((await stored(gw.root, 'mallory@other.example')).length, 0);
    c.end();
  } finally {
    await gw.close();
  }
});

test('percent hack, bang paths and source routes never open the relay (Postfix resolve.c semantics)', async () => {
  const gw = await startGateway({ milters: [relayControl(domains)] });
  try {
    await transcript(gw.port, [
      // Percent hack: after the local domain is stripped, user%other.example is user@other.example.
      ['user%other.example@relay.example', DENIED('user%other.example@relay.example')],
      ['user%other.example%relay.example@relay.example', DENIED('user%other.example%relay.example@relay.example')],
      // ... which is fine when it lands back on a local domain (Postfix: final delivery).
      ['user%relay.example@relay.example', OK],
      // Via a relay domain the local part is "routed": refused (allow_untrusted_routing = no).
      ['user%other.example@relayed.example', DENIED('user%other.example@relayed.example')],
      // Bang paths: other.example!user is user@other.example (swap_bangpath).
      ['other.example!user@relay.example', DENIED('other.example!user@relay.example')],
      ['a.example!b.example!user@relay.example', DENIED('a.example!b.example!user@relay.example')],
      ['other!user@relayed.example', DENIED('other!user@relayed.example')],
      // Source routes: smtp-server drops the route (RFC 5321 4.1.2); the destination is what is left.
      ['@relay.example:user@other.example', DENIED('user@other.example')],
      ['@relay.example,@relayed.example:user@other.example', DENIED('user@other.example')],
      ['@other.example:user@relay.example', OK],
    ]);
  } finally {
    await gw.close();
  }
});

test('quoted local parts, trailing dots, IP literals, case: refused by smtp-server or by the milter', async () => {
  const gw = await startGateway({ milters: [relayControl(domains)] });
  try {
    await transcript(gw.port, [
      // A quoted "@" makes three @-parts: smtp-server refuses the syntax before any milter.
      ['"user@other.example"@relay.example', BAD],
      ['"user%other.example"@relay.example', DENIED('"user%other.example"@relay.example')],
      ['user@other.example@relay.example', BAD],
      // Trailing dots: smtp-server refuses them (Postfix strips one and decides on the rest).
      ['user@other.example.', BAD],
      ['user@relay.example.', BAD],
      // IP literals: only the address the client reached is ours; never a relay destination.
      ['user@[192.0.2.1]', DENIED('user@[192.0.2.1]')],
      ['user@[IPv6:2001:db8::1]', DENIED('user@[IPv6:2001:db8::1]')],
      ['user@[127.0.0.1]', OK],
      ['user@[999.0.0.1]', BAD],
      // Case never matters for the decision; the reply quotes the address as given.
      ['BOB@RELAY.EXAMPLE', OK],
      ['Bob@Relayed.Example', OK],
      ['Mallory@Other.Example', DENIED('Mallory@Other.Example')],
      ['USER%OTHER.EXAMPLE@RELAY.EXAMPLE', DENIED('USER%OTHER.EXAMPLE@RELAY.EXAMPLE')],
    ]);
  } finally {
    await gw.close();
  }
});

test('IDN and UTF-8 domains are compared in A-label form; look-alike spellings are not ours', async () => {
  const gw = await startGateway({ milters: [relayControl(domains)] });
  try {
    // smtp-server turns an A-label into its U-label; the milter compares in A-label form.
    await transcript(gw.port, [
      ['user@xn--bcher-kva.example', OK],
      ['user@XN--BCHER-KVA.EXAMPLE', OK],
      ['user@xn--bcher-kva.other.example', DENIED('user@bücher.other.example')],
    ]);
    await transcript(
      gw.port,
      [
        ['user@bücher.example', OK],
        ['user@BÜCHER.example', OK],
        ['用户@bücher.example', OK],
        ['user@bücher-other.example', DENIED('user@bücher-other.example')],
        // Full-width letters map to relay.example under IDNA, but that is not how the domain
        // is spelt: not ours.
        ['user@ｒｅｌａｙ.example', DENIED('user@ｒｅｌａｙ.example')],
        // An ideographic full stop is a label separator to smtp-server's punycode step: the
        // envelope (and so the milter and the delivery alike) gets user@relay.example.
        ['user@relay。example', OK],
        ['user@other。example', DENIED('user@other.example')],
        ['user%other.example@bücher.example', DENIED('user%other.example@bücher.example')],
        // Odd characters: a percent sign or bang in the domain is not a domain (smtp-server: 501).
        ['user@other.example%relay.example', BAD],
        ['user@other!relay.example', BAD],
        ['user@relay.example\u200b', '501 5.1.3 Error: Bad recipient address syntax'],
      ],
      ' SMTPUTF8',
    );
  } finally {
    await gw.close();
  }
});

test('subdomains: `.sub.example` matches subdomains only; parentDomainMatchesSubdomains extends plain entries', async () => {
  let gw = await startGateway({ milters: [relayControl(domains)] });
  try {
    await transcript(gw.port, [
      ['a@x.sub.example', OK],
      ['a@y.x.sub.example', OK],
      ['a@sub.example', DENIED('a@sub.example')],
      ['a@mx.relay.example', DENIED('a@mx.relay.example')],
      ['a@evilrelay.example', DENIED('a@evilrelay.example')],
    ]);
  } finally {
    await gw.close();
  }
  gw = await startGateway({ milters: [relayControl({ ...domains, parentDomainMatchesSubdomains: true })] });
  try {
    await transcript(gw.port, [
      ['a@mx.relay.example', OK],
      ['a@relay.example', OK],
      ['a@evilrelay.example', DENIED('a@evilrelay.example')],
      ['a@relay.example.evil.example', DENIED('a@relay.example.evil.example')],
    ]);
  } finally {
    await gw.close();
  }
});

test('mynetworks: a listed client network relays anywhere, an unlisted one does not', async () => {
  let gw = await startGateway({ milters: [relayControl({ ...domains, mynetworks: ['192.0.2.0/24', '127.0.0.0/8'] })] });
  try {
    await transcript(gw.port, [
      ['mallory@other.example', OK],
      ['user%other.example@relay.example', OK],
    ]);
  } finally {
    await gw.close();
  }
  gw = await startGateway({ milters: [relayControl({ ...domains, mynetworks: ['192.0.2.0/24', '::1/128', '127.0.0.2/32'] })] });
  try {
    await transcript(gw.port, [['mallory@other.example', DENIED('mallory@other.example')]]);
  } finally {
    await gw.close();
  }
});

async function canListen(host: string): Promise<boolean> {
  const s = net.createServer();
  return new Promise((resolve) => {
    s.once('error', () => resolve(false));
    s.listen(0, host, () => s.close(() => resolve(true)));
  });
}

test('IPv6 and IPv4-mapped clients match IPv6 and IPv4 networks', async (t) => {
  if (!(await canListen('::'))) return t.skip('no IPv6 on this host');
  // A dual-stack listener: a client on 127.0.0.1 arrives as ::ffff:127.0.0.1 on the socket.
  for (const [mynetworks, want] of [
    [['127.0.0.0/8'], OK],
    [['::ffff:127.0.0.0/104'], OK],
    [['::1/128'], DENIED('mallory@other.example')],
  ] as const) {
    const gw = await startGateway({ listen: { host: '::', port: 0 }, milters: [relayControl({ ...domains, mynetworks })] });
    try {
      await transcript(gw.port, [['mallory@other.example', want]]);
    } finally {
      await gw.close();
    }
  }
  if (!(await canListen('::1'))) return;
  for (const [mynetworks, want] of [
    [['::1/128'], OK],
    [['::/0'], OK],
    [['127.0.0.0/8', '0.0.0.0/0'], DENIED('mallory@other.example')],
  ] as const) {
    const gw = await startGateway({ listen: { host: '::1', port: 0 }, milters: [relayControl({ ...domains, mynetworks })] });
    try {
      await transcript(gw.port, [['mallory@other.example', want]], '', '::1');
    } finally {
      await gw.close();
    }
  }
});

test('an authenticated session relays; a failed or absent AUTH does not; permitAuthenticated: false turns it off', async () => {
  const authenticate = async ({ username, password }: { username: string; password: string }): Promise<boolean> =>
    username === 'alice' && password === 'secret';
  const plain = (u: string, p: string): string => Buffer.from(`\0${u}\0${p}`).toString('base64');
  for (const permitAuthenticated of [true, false]) {
    const gw = await startGateway({ authenticate, allowInsecureAuth: true, milters: [relayControl({ ...domains, permitAuthenticated })] });
    try {
      let c = await ehlo(gw.port);
      assert.equal((await c.cmd(`AUTH PLAIN ${plain('alice', 'wrong')}`)).code, 535);
      assert.deepEqual(await rcpts(c, ['mallory@other.example']), [DENIED('mallory@other.example')]);
      c.end();
      c = await ehlo(gw.port);
      assert.equal((await c.cmd(`AUTH PLAIN ${plain('alice', 'secret')}`)).code, 235);
      assert.deepEqual(await rcpts(c, ['mallory@other.example', 'bob@relay.example']), [
        permitAuthenticated ? OK : DENIED('mallory@other.example'),
        OK,
      ]);
      c.end();
    } finally {
      await gw.close();
    }
  }
});

test('rejectCode 550, and bad options fail at start-up', async () => {
  const gw = await startGateway({ milters: [relayControl({ ...domains, rejectCode: 550 })] });
  try {
    await transcript(gw.port, [['m@other.example', '550 5.7.1 <m@other.example>: Relay access denied']]);
  } finally {
    await gw.close();
  }
  assert.throws(() => relayControl({ mynetworks: ['192.0.2.0/33'] }), { code: 'DOVETAIL_ERR_INVALID_OPTIONS' });
  assert.throws(() => relayControl({ mynetworks: ['not-an-ip'] }), { code: 'DOVETAIL_ERR_INVALID_OPTIONS' });
  assert.throws(() => relayControl({ localDomains: ['exa mple.com'] }), { code: 'DOVETAIL_ERR_INVALID_OPTIONS' });
  assert.throws(() => relayControl({ localAddresses: ['300.1.1.1'] }), { code: 'DOVETAIL_ERR_INVALID_OPTIONS' });
});

test('forms smtp-server never passes on, as a served milter would get them from Postfix: resolved like Postfix', async () => {
  const opts = {
    isLocalDomain: (d: string) => d === 'relay.example',
    isRelayDomain: (d: string) => d === 'relayed.example',
    isLocalAddress: (ip: string) => ip === '192.0.2.10',
    percentHack: true,
    bangPath: true,
  };
  const r = (a: string): string => {
    const x = resolveDestination(a, opts);
    return `${x.class}${x.routed ? '+routed' : ''}`;
  };
  // Quoted local part with "@": Postfix resolves dequoted (resolve_dequoted = yes).
  assert.equal(r('"user@other.example"@relay.example'), 'remote');
  assert.equal(r('"user@relay.example"@relay.example'), 'local');
  assert.equal(r('"user@other.example"@relayed.example'), 'relay+routed');
  // Trailing dots: one is stripped (resolve.c), the decision is on the rest.
  assert.equal(r('user@relay.example.'), 'local');
  assert.equal(r('user@other.example.'), 'remote');
  assert.equal(r('user@other.example..'), 'remote');
  // Raw source routes: dropped, as Postfix's canonical rewrite does.
  assert.equal(r('@relay.example:user@other.example'), 'remote');
  assert.equal(r('@other.example:user@relay.example'), 'local');
  // Domainless addresses are ours; their routing operators still count.
  assert.equal(r('postmaster'), 'local');
  assert.equal(r('other.example!user'), 'remote');
  assert.equal(r('user%other.example'), 'remote');
  assert.equal(r('user@[192.0.2.10]'), 'local');
  assert.equal(r('user@[::ffff:192.0.2.10]'), 'local');
  assert.equal(r('user@[192.0.2.11]'), 'remote');
  // With the percent hack and bang paths off, those are plain local parts (Postfix likewise).
  assert.equal(resolveDestination('user%other.example@relay.example', { ...opts, percentHack: false }).class, 'local');
  assert.equal(resolveDestination('other!user@relay.example', { ...opts, bangPath: false }).class, 'local');
  assert.equal(canonicalDomain('0x7f.1'), undefined);
  assert.equal(canonicalDomain('relay\u3002example'), undefined, 'a served milter gets the raw spelling: not ours');
  assert.equal(canonicalDomain('ｒｅｌａｙ.example'), undefined);
  assert.equal(canonicalDomain('XN--BCHER-KVA.example'), 'xn--bcher-kva.example');
  assert.equal(canonicalDomain('Bücher.Example.'), 'xn--bcher-kva.example');

  // The handler itself, with the context a served milter would get.
  const m = relayControl(domains);
  const ctx = (address: string) =>
    ({ client: { address, port: 1, hostname: '[x]', family: 'ipv6' }, server: { hostname: 'mx', address: '192.0.2.10', port: 25 }, auth: undefined }) as unknown as MessageContext;
  const verdict = (client: string, rcpt: string) => m.rcpt?.(ctx(client), { address: rcpt, args: {} });
  assert.equal((await verdict('203.0.113.5', '"user@other.example"@relay.example'))?.type, 'reject');
  assert.equal((await verdict('203.0.113.5', 'user@relay.example.')) ?? 'continue', 'continue');
  assert.equal((await verdict('203.0.113.5', 'user@[192.0.2.10]')) ?? 'continue', 'continue');
  const mn = relayControl({ ...domains, mynetworks: ['198.51.100.0/24'] });
  const v = await mn.rcpt?.(ctx('::ffff:198.51.100.7'), { address: 'x@other.example', args: {} });
  assert.equal(v ?? 'continue', 'continue', 'an IPv4-mapped client address matches an IPv4 network');
});
