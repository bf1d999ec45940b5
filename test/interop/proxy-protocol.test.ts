/**
 * The PROXY protocol on a gateway listener, in process, over real sockets:
 * - a real HAProxy terminating TLS (`bind … ssl`, `send-proxy-v2-ssl`): the milters see the
 *   client's address and the TLS facts HAProxy passed on (ctx.tls, the macros, Received);
 * - a v2 header with an IPv6 client, and a v2 LOCAL header (HAProxy's health checks): the
 *   connection's own address stands;
 * - a trusted peer that sends nothing is dropped after proxyProtocol.timeout, one that sends
 *   an over-long header at once; an untrusted peer on the same listener is an ordinary client;
 * - option checks.
 */
import assert from 'node:assert/strict';
import diagnostics_channel from 'node:diagnostics_channel';
import net from 'node:net';
import { after, describe, it } from 'node:test';
import { Channels, createGateway, defineMilter, DovetailError, encodeProxyHeader, maildir, reject, type SessionContext } from '../../lib/index.js';
import { PROXY_V2_SIGNATURE } from '../../lib/smtp/proxy.js';
import { relayControl, dnsbl } from '../../milters/index.js';
import { startDnsServer } from '../helpers/dns-server.js';
import { startHaproxy } from '../helpers/haproxy.js';
import { RawClient, startGateway, stored, type TestGateway } from '../helpers/smtp.js';
import { selfSignedCert } from '../helpers/tls.js';
import { waitFor } from '../helpers/wait.js';

const seen: { stage: string; address: string; port: number; tls: SessionContext['tls']; macros: Record<string, string> }[] = [];
const recorder = defineMilter({
  name: 'recorder',
  async connect(ctx) {
    seen.push({ stage: 'connect', address: ctx.client.address, port: ctx.client.port, tls: ctx.tls, macros: { ...ctx.macros } });
  },
  async mail(ctx) {
    seen.push({ stage: 'mail', address: ctx.client.address, port: ctx.client.port, tls: ctx.tls, macros: { ...ctx.macros } });
  },
});

const errors: { code?: string; message?: string }[] = [];
const onError = (m: unknown): void => void errors.push((m as { error: { code?: string; message?: string } }).error);
diagnostics_channel.subscribe(Channels.error, onError);

const gateways: TestGateway[] = [];
after(async () => {
  diagnostics_channel.unsubscribe(Channels.error, onError);
  for (const g of gateways) await g.close();
});

async function proxied(timeout?: number): Promise<TestGateway> {
  const g = await startGateway({
    listen: { host: '127.0.0.1', port: 0, proxyProtocol: { trusted: ['127.0.0.1/32', '::1'], ...(timeout ? { timeout } : {}) } },
    milters: [recorder],
  });
  gateways.push(g);
  return g;
}

describe('PROXY protocol listener', () => {
  it('HAProxy terminating TLS with send-proxy-v2-ssl: the client address and its TLS reach the milters and Received', async () => {
    const g = await proxied();
    const haproxy = await startHaproxy([g.port], 'send-proxy-v2-ssl', { tls: selfSignedCert('mx.test') });
    try {
      const c = await RawClient.connect(haproxy.port, { implicitTls: true, localAddress: '127.0.0.77' });
      assert.equal((await c.reply()).code, 220, haproxy.log());
      assert.equal((await c.cmd('EHLO tls-client.example')).code, 250);
      assert.equal((await c.cmd('MAIL FROM:<s@example.org>')).code, 250);
      assert.equal((await c.cmd('RCPT TO:<bob@example.test>')).code, 250);
      assert.equal((await c.data('Subject: via haproxy tls\r\n\r\nhi\r\n')).code, 250);
      c.close();
    } finally {
      await haproxy.stop();
    }
    const mail = seen.find((s) => s.stage === 'mail' && s.address === '127.0.0.77');
    assert.ok(mail, JSON.stringify(seen));
    assert.match(mail.tls?.version ?? '', /^TLSv1\.[23]$/);
    assert.ok(mail.tls!.cipher.length > 3 && mail.tls!.bits >= 128, JSON.stringify(mail.tls));
    assert.equal(mail.macros['{client_addr}'], '127.0.0.77');
    assert.equal(mail.macros['{tls_version}'], mail.tls!.version);
    const [msg] = await stored(g.root, 'bob@example.test');
    assert.match(msg!.toString('latin1'), /^Received: from tls-client\.example \(unknown \[127\.0\.0\.77\]\)\r\n\t\(using TLSv1\.[23] with cipher /m);
  });

  it('submission behind HAProxy terminating TLS (465): AUTH is offered and counts as encrypted; ESMTPSA; direct plain clients get 538', async () => {
    const requests: { tls: boolean; address: string }[] = [];
    const g = await startGateway({
      listen: { host: '127.0.0.1', port: 0, tls: 'none', submission: true, proxyProtocol: { trusted: ['127.0.0.1'] } },
      authenticate: async (r) => {
        requests.push({ tls: r.client.tls, address: r.client.address });
        return r.password === 'secret';
      },
      milters: [recorder],
    });
    gateways.push(g);
    const haproxy = await startHaproxy([g.port], 'send-proxy-v2-ssl', { tls: selfSignedCert('mx.test') });
    try {
      const c = await RawClient.connect(haproxy.port, { implicitTls: true, localAddress: '127.0.0.79' });
      assert.equal((await c.reply()).code, 220);
      assert.match((await c.cmd('EHLO roaming.example')).text, /AUTH PLAIN LOGIN/);
      assert.equal((await c.authPlain('carol', 'secret')).code, 235);
      assert.equal((await c.cmd('MAIL FROM:<carol@example.test>')).code, 250);
      assert.equal((await c.cmd('RCPT TO:<dave@example.test>')).code, 250);
      assert.equal((await c.data('Subject: submitted\r\n\r\nhi\r\n')).code, 250);
      c.close();
    } finally {
      await haproxy.stop();
    }
    assert.deepEqual(requests, [{ tls: true, address: '127.0.0.79' }]);
    const [msg] = await stored(g.root, 'dave@example.test');
    assert.match(msg!.toString('latin1'), /by mx\.test \(dovetail\) with ESMTPSA id /);
    // A client reaching the listener directly, in plain text, is not trusted for TLS.
    const direct = await RawClient.connect(g.port, { localAddress: '127.0.0.80' });
    await direct.reply();
    assert.doesNotMatch((await direct.cmd('EHLO plain.example')).text, /AUTH/);
    assert.match((await direct.authPlain('carol', 'secret')).text, /^538 5\.7\.11 /);
    direct.close();
    assert.equal(requests.length, 1);
  });

  it('implicit TLS on the gateway behind HAProxy in TCP passthrough (send-proxy-v2): the header, then our own TLS', async () => {
    const g = await startGateway({
      listen: { host: '127.0.0.1', port: 0, tls: 'implicit', proxyProtocol: { trusted: ['127.0.0.1'] } },
      tls: selfSignedCert('mx.test'),
      milters: [recorder],
    });
    gateways.push(g);
    const haproxy = await startHaproxy([g.port], 'send-proxy-v2');
    try {
      for (let i = 0; i < 5; i++) {
        const c = await RawClient.connect(haproxy.port, { implicitTls: true, localAddress: `127.0.0.${90 + i}` });
        assert.equal((await c.reply()).code, 220);
        await c.cmd('EHLO tls.example');
        assert.equal((await c.cmd('MAIL FROM:<s@example.org>')).code, 250);
        c.close();
        const mail = seen.find((s) => s.stage === 'mail' && s.address === `127.0.0.${90 + i}`);
        assert.ok(mail?.tls, JSON.stringify(mail));
      }
    } finally {
      await haproxy.stop();
    }
  });

  it('v2 with an IPv6 client; v2 LOCAL (a health check) keeps the connection’s own address', async () => {
    const g = await proxied();
    const c = await RawClient.connect(g.port);
    c.write(encodeProxyHeader(2, { source: { address: '2001:db8::25', port: 5555 }, destination: { address: '2001:db8::1', port: 25 } }));
    assert.equal((await c.reply()).code, 220);
    await c.cmd('EHLO v6.example');
    assert.equal((await c.cmd('MAIL FROM:<s@example.org>')).code, 250);
    c.close();
    assert.ok(seen.some((s) => s.stage === 'mail' && s.address === '2001:db8::25' && s.port === 5555 && s.macros['{client_addr}'] === '2001:db8::25'));
    const local = await RawClient.connect(g.port);
    local.write(encodeProxyHeader(2, 'local'));
    assert.equal((await local.reply()).code, 220);
    assert.equal((await local.cmd('QUIT')).code, 221);
    local.close();
    assert.ok(seen.some((s) => s.stage === 'connect' && s.address === '127.0.0.1'));
  });

  it('a trusted peer that says nothing is dropped after the timeout; an over-long header at once; logged', async () => {
    const g = await proxied(300);
    const before = errors.length;
    const silent = await RawClient.connect(g.port);
    await silent.waitClosed(10_000);
    assert.equal(silent.closed, true);
    const long = await RawClient.connect(g.port);
    long.write(`PROXY TCP4 ${'9'.repeat(200)}\r\n`);
    await long.waitClosed(10_000);
    await waitFor('two PROXY protocol errors', () => errors.slice(before).filter((e) => e.code === 'DOVETAIL_ERR_PROXY_PROTOCOL').length >= 2);
    const msgs = errors.slice(before).map((e) => e.message ?? '');
    assert.ok(msgs.some((m) => /no PROXY header in time/.test(m)) && msgs.some((m) => /longer than 107 bytes/.test(m)), msgs.join('\n'));
  });

  it('HAProxy health checks with check-send-proxy (v2 LOCAL, then close) are not errors', async () => {
    const g = await proxied();
    const before = errors.length;
    // A second backend that only counts the checks HAProxy makes (same interval as the gateway's).
    const checks: Buffer[] = [];
    const counter = net.createServer((s) => {
      const got: Buffer[] = [];
      s.on('data', (d) => got.push(d));
      s.on('close', () => checks.push(Buffer.concat(got)));
      s.on('error', () => undefined);
    });
    await new Promise<void>((resolve) => counter.listen(0, '127.0.0.1', resolve));
    const haproxy = await startHaproxy([g.port, (counter.address() as net.AddressInfo).port], 'send-proxy-v2', { check: true });
    try {
      await waitFor('three health checks', () => checks.length >= 3, 15_000, () => haproxy.log());
    } finally {
      await haproxy.stop();
      counter.close();
    }
    // What HAProxy sent: a v2 LOCAL header (0x20), nothing else.
    assert.ok(checks.every((c) => c.subarray(0, 13).equals(Buffer.concat([PROXY_V2_SIGNATURE, Buffer.from([0x20])]))), checks.map((c) => c.toString('hex')).join('\n'));
    assert.deepEqual(errors.slice(before).filter((e) => e.code === 'DOVETAIL_ERR_PROXY_PROTOCOL'), []);
  });

  it('a PROXY header sent to a listener without proxyProtocol is refused and reported (v1 and v2)', async () => {
    const g = await startGateway({ milters: [recorder] });
    gateways.push(g);
    for (const version of [1, 2] as const) {
      const before = errors.length;
      const c = await RawClient.connect(g.port);
      c.write(encodeProxyHeader(version, { source: { address: '192.0.2.123', port: 1 }, destination: { address: '127.0.0.1', port: 25 } }));
      assert.match((await c.reply()).text, /^421 4\.7\.0 mx\.test Error: PROXY protocol header from an untrusted source/);
      await c.waitClosed();
      await waitFor('the PROXY_UNTRUSTED report', () => errors.slice(before).find((e) => e.code === 'DOVETAIL_ERR_PROXY_UNTRUSTED' && /without proxyProtocol/.test(e.message ?? '')));
    }
    // After the greeting too: a v1 line is refused with 421 and the connection closes.
    const late = await RawClient.connect(g.port);
    assert.equal((await late.reply()).code, 220);
    const r = await late.cmd('PROXY TCP4 192.0.2.124 127.0.0.1 1 25');
    assert.match(r.text, /^421 4\.7\.0 mx\.test Error: PROXY protocol header from an untrusted source/);
    await late.waitClosed();
    assert.ok(!seen.some((s) => s.address === '192.0.2.123' || s.address === '192.0.2.124'));
  });

  it('an untrusted peer on the same listener is an ordinary client', async () => {
    const g = await proxied();
    const c = await RawClient.connect(g.port, { localAddress: '127.0.0.78' });
    assert.equal((await c.reply()).code, 220);
    await c.cmd('EHLO direct.example');
    assert.equal((await c.cmd('MAIL FROM:<s@example.org>')).code, 250);
    c.close();
    assert.ok(seen.some((s) => s.stage === 'mail' && s.address === '127.0.0.78'));
  });

  it('option checks name the field', () => {
    const make = (listen: object): unknown => createGateway({ delivery: maildir({ root: '/nonexistent' }), listen: { port: 0, ...listen } });
    for (const [listen, re] of [
      [{ proxyProtocol: { trusted: ['not-an-address'] } }, /proxyProtocol\.trusted/],
      [{ proxyProtocol: {} }, /proxyProtocol\.trusted must be a list/],
      [{ proxyProtocol: { trusted: [], timeout: 0 } }, /proxyProtocol\.timeout/],
      [{ xclient: { trusted: ['10.0.0.0/33'] } }, /xclient\.trusted/],
      [{ xforward: { trusted: 'x' } }, /xforward\.trusted/],
    ] as const) {
      assert.throws(() => make(listen), (e: unknown) => e instanceof DovetailError && e.code === 'DOVETAIL_ERR_INVALID_OPTIONS' && re.test(e.message), JSON.stringify(listen));
    }
  });
});

describe('XCLIENT in process', () => {
  it('LOGIN= makes the forwarded client authenticated; a connect-stage refusal of the forwarded client is the reply to MAIL', async () => {
    const auths: (string | undefined)[] = [];
    const g = await startGateway({
      listen: { host: '127.0.0.1', port: 0, xclient: { trusted: ['127.0.0.0/8'] } },
      milters: [
        defineMilter({
          name: 'blocklist',
          async connect(ctx) {
            if (ctx.client.address === '192.0.2.66') return reject(554, '5.7.1', 'blocked client');
            return undefined;
          },
          async mail(ctx) {
            auths.push(ctx.auth ? `${ctx.auth.method}:${ctx.auth.user}` : undefined);
          },
        }),
      ],
    });
    gateways.push(g);
    const c = await RawClient.connect(g.port);
    await c.reply();
    await c.cmd('EHLO front.example');
    assert.equal((await c.cmd('XCLIENT ADDR=192.0.2.65 LOGIN=alice')).code, 220);
    await c.cmd('EHLO front.example');
    assert.equal((await c.cmd('MAIL FROM:<alice@example.org>')).code, 250);
    c.close();
    assert.deepEqual(auths, ['XCLIENT:alice']);
    const d = await RawClient.connect(g.port);
    await d.reply();
    await d.cmd('EHLO front.example');
    assert.equal((await d.cmd('XCLIENT ADDR=192.0.2.66')).code, 220);
    await d.cmd('EHLO front.example');
    const r = await d.cmd('MAIL FROM:<x@example.org>');
    assert.match(r.text, /^554 5\.7\.1 blocked client/);
    d.close();
    // After XCLIENT ADDR the session belongs to the forwarded client: no second XCLIENT.
    const e = await RawClient.connect(g.port);
    await e.reply();
    await e.cmd('EHLO front.example');
    assert.equal((await e.cmd('XCLIENT ADDR=192.0.2.67')).code, 220);
    assert.equal((await e.cmd('XCLIENT ADDR=192.0.2.68')).code, 550);
    e.close();
  });
});

describe('the PROXY-named client is the client for every check', () => {
  it('relayControl (mynetworks), dnsbl, the per-client limit and the connect channel see it, not the proxy', async () => {
    const dns = await startDnsServer();
    dns.a('99.2.0.192.bl.example', '127.0.0.2');
    const resolver = dns.resolver({ timeout: 2000 });
    const connects: string[] = [];
    const onConnect = (m: unknown): void => void connects.push((m as { client: { address: string } }).client.address);
    diagnostics_channel.subscribe(Channels.connect, onConnect);
    try {
      const g = await startGateway({
        listen: { host: '127.0.0.1', port: 0, proxyProtocol: { trusted: ['127.0.0.1'] } },
        milters: [relayControl({ mynetworks: ['192.0.2.0/28'], localDomains: ['example.test'] }), dnsbl({ resolver, zones: ['bl.example'] })],
        clientLimits: { maxConnections: 1 },
      });
      gateways.push(g);
      const as = async (client: string, rcpt: string): Promise<string> => {
        const c = await RawClient.connect(g.port);
        c.write(encodeProxyHeader(2, { source: { address: client, port: 1000 }, destination: { address: '127.0.0.1', port: 25 } }));
        const greeting = await c.reply();
        if (greeting.code !== 220) {
          c.close();
          return greeting.text;
        }
        await c.cmd('EHLO c.example');
        await c.cmd('MAIL FROM:<s@example.org>');
        const r = await c.cmd(`RCPT TO:<${rcpt}>`);
        c.close();
        await c.waitClosed().catch(() => undefined);
        return r.text;
      };
      // In mynetworks: may relay. Outside: may not. Listed: refused by dnsbl, naming the client.
      assert.match(await as('192.0.2.5', 'far@elsewhere.example'), /^250 /);
      assert.match(await as('198.51.100.1', 'far@elsewhere.example'), /^554 5\.7\.1 .*Relay access denied/);
      assert.match(await as('192.0.2.99', 'u@example.test'), /^554 5\.7\.1 .*192\.0\.2\.99.*bl\.example/);
      // The limit (1 connection per client) counts the named client: two clients through one proxy address both get in.
      const one = await RawClient.connect(g.port);
      one.write(encodeProxyHeader(1, { source: { address: '203.0.113.1', port: 1 }, destination: { address: '127.0.0.1', port: 25 } }));
      assert.equal((await one.reply()).code, 220);
      const two = await RawClient.connect(g.port);
      two.write(encodeProxyHeader(1, { source: { address: '203.0.113.2', port: 1 }, destination: { address: '127.0.0.1', port: 25 } }));
      assert.equal((await two.reply()).code, 220);
      const again = await RawClient.connect(g.port);
      again.write(encodeProxyHeader(1, { source: { address: '203.0.113.1', port: 2 }, destination: { address: '127.0.0.1', port: 25 } }));
      assert.match((await again.reply()).text, /^421 4\.7\.0 mx\.test Error: too many connections from 203\.0\.113\.1/);
      for (const c of [one, two, again]) c.close();
      for (const a of ['192.0.2.5', '198.51.100.1', '192.0.2.99', '203.0.113.1', '203.0.113.2']) assert.ok(connects.includes(a), `connect channel: ${connects.join(', ')}`);
      assert.ok(!connects.includes('127.0.0.1'));
    } finally {
      diagnostics_channel.unsubscribe(Channels.connect, onConnect);
      resolver.cancel();
      await dns.close();
    }
  });
});

