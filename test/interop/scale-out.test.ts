/**
 * Scale-out acceptance: two gateway processes (test/fixtures/scale-gateway.ts) share one
 * real redis-server, behind a real HAProxy (send-proxy-v2 and send-proxy) and behind
 * connections that write their own PROXY header from the trusted 127.0.0.1 (so a test can
 * pick the node and the client address).
 *
 * - the milters, the Received header and the limits see the real client, from PROXY v1,
 *   v2 (HAProxy) and XCLIENT / XFORWARD, not 127.0.0.1;
 * - a client over its rate limit on node A is limited on node B;
 * - a greylisted triplet retried through the other node after the delay passes;
 * - an untrusted PROXY header is refused (closed, DOVETAIL_ERR_PROXY_UNTRUSTED), an
 *   untrusted XCLIENT gets 550 5.7.0, a trusted peer's garbage header closes the connection;
 * - Redis stopped, then hung (SIGSTOP), mid-run: node A (onStoreError 'open') keeps
 *   accepting, node B ('closed') answers 4xx; every 250 has its message in the mailstore;
 *   and the same under load (6 concurrent senders through HAProxy, Redis stopped and started
 *   while they run).
 */
import assert from 'node:assert/strict';
import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { after, before, describe, it } from 'node:test';
import { fileURLToPath } from 'node:url';
import { encodeProxyHeader } from '../../lib/index.js';
import { startChild, type Child } from '../helpers/child.js';
import { startHaproxy, type Haproxy } from '../helpers/haproxy.js';
import { startRedis, type RedisPeer } from '../helpers/redis.js';
import { RawClient } from '../helpers/smtp.js';
import { waitFor } from '../helpers/wait.js';

const FIXTURE = path.join(path.dirname(fileURLToPath(import.meta.url)), '..', 'fixtures', 'scale-gateway.js');

interface Node {
  readonly child: Child;
  readonly proxyPort: number;
  readonly xclientPort: number;
}

let base: string;
let redis: RedisPeer;
let a: Node;
let b: Node;
let v2: Haproxy;
let v1: Haproxy;

async function startNode(onStoreError: 'open' | 'closed'): Promise<Node> {
  const child = await startChild(FIXTURE, [JSON.stringify({ base, redisPort: redis.port, onStoreError, greylistDelay: 1000, messagesPerClient: 3 })]);
  const listening = child.events.find((e) => e['event'] === 'listening')!;
  return { child, proxyPort: listening['proxyPort'] as number, xclientPort: listening['xclientPort'] as number };
}

/** Connects to a node's PROXY listener from 127.0.0.1 (trusted) and speaks as `client`. */
async function viaProxy(node: Node, client: string, version: 1 | 2 = 2): Promise<RawClient> {
  const c = await RawClient.connect(node.proxyPort);
  c.write(encodeProxyHeader(version, { source: { address: client, port: 40000 }, destination: { address: '127.0.0.1', port: node.proxyPort } }));
  return c;
}

/** A whole transaction; returns each reply's code (the last is DATA's final reply, or the refusal). */
async function send(c: RawClient, rcpt: string, subject: string, helo = 'client.example.test'): Promise<number[]> {
  const codes: number[] = [];
  const greeting = await c.reply();
  codes.push(greeting.code);
  if (greeting.code !== 220) return codes;
  codes.push((await c.cmd(`EHLO ${helo}`)).code);
  const mail = await c.cmd('MAIL FROM:<sender@example.org>');
  codes.push(mail.code);
  if (mail.code !== 250) return codes;
  const r = await c.cmd(`RCPT TO:<${rcpt}>`);
  codes.push(r.code);
  if (r.code !== 250) return codes;
  codes.push((await c.data(`Subject: ${subject}\r\nFrom: sender@example.org\r\n\r\nbody ${subject}\r\n`)).code);
  return codes;
}

/** Every stored message, as text. */
async function stored(): Promise<string[]> {
  const out: string[] = [];
  const walk = async (dir: string): Promise<void> => {
    for (const e of await fs.readdir(dir, { withFileTypes: true }).catch(() => [])) {
      const p = path.join(dir, e.name);
      if (e.isDirectory()) await walk(p);
      else if (path.basename(dir) === 'new' || path.basename(dir) === 'cur') out.push(await fs.readFile(p, 'latin1'));
    }
  };
  await walk(path.join(base, 'mail'));
  return out;
}

const events = (n: Node, event: string): Record<string, unknown>[] => n.child.events.filter((e) => e['event'] === event);
const clientsSeen = (n: Node, stage: string): string[] => events(n, 'milter').filter((e) => e['stage'] === stage).map((e) => (e['client'] as { address: string }).address);

describe('scale-out: two gateway processes, one Redis, HAProxy', { timeout: 180_000 }, () => {
  before(async () => {
    base = await fs.mkdtemp(path.join(os.tmpdir(), 'dovetail-scale-'));
    await fs.mkdir(path.join(base, 'mail'));
    redis = await startRedis();
    a = await startNode('open');
    b = await startNode('closed');
    v2 = await startHaproxy([a.proxyPort, b.proxyPort], 'send-proxy-v2');
    v1 = await startHaproxy([a.proxyPort, b.proxyPort], 'send-proxy');
  });

  after(async () => {
    await v1?.stop();
    await v2?.stop();
    for (const n of [a, b]) {
      if (!n) continue;
      n.child.process.kill('SIGTERM');
      await n.child.exited;
    }
    await redis?.close();
    await fs.rm(base, { recursive: true, force: true });
  });

  it('the milters and the Received header see the client HAProxy names (PROXY v2 and v1), not 127.0.0.1', async () => {
    for (const [haproxy, client, tag] of [
      [v2, '127.0.0.9', 'v2'],
      [v2, '127.0.0.10', 'v2-second'],
      [v1, '127.0.0.11', 'v1'],
      [v1, '127.0.0.12', 'v1-second'],
    ] as const) {
      const c = await RawClient.connect(haproxy.port, { localAddress: client });
      // postmaster is exempt from greylisting: this test is about the address only.
      const codes = await send(c, 'postmaster@example.test', `proxy-${tag}`);
      c.close();
      assert.deepEqual(codes, [220, 250, 250, 250, 250], `${tag}: ${codes.join(' ')}\n${haproxy.log()}`);
      const seen = [...clientsSeen(a, 'mail'), ...clientsSeen(b, 'mail')];
      assert.ok(seen.includes(client), `${tag}: the milters saw ${seen.join(', ')}`);
      const msg = (await stored()).find((m) => m.includes(`Subject: proxy-${tag}`));
      assert.ok(msg, `${tag}: message stored`);
      assert.match(msg!, new RegExp(`^Received: from client\\.example\\.test \\(unknown \\[${client.replace(/\./g, '\\.')}\\]\\)`, 'm'));
    }
    // Round robin: each node got some of them.
    assert.ok(clientsSeen(a, 'mail').length > 0 && clientsSeen(b, 'mail').length > 0, 'both nodes were used');
    for (const n of [a, b]) assert.ok(!clientsSeen(n, 'connect').includes('127.0.0.1'), 'no session was attributed to the proxy');
  });

  it('a client over its rate limit on node A is limited on node B (3 messages per minute, shared in Redis)', async () => {
    const client = '192.0.2.33';
    const codes: number[] = [];
    for (const node of [a, a, a, b]) {
      const c = await viaProxy(node, client);
      assert.equal((await c.reply()).code, 220);
      await c.cmd('EHLO limited.example');
      codes.push((await c.cmd('MAIL FROM:<bulk@example.org>')).code);
      c.close();
    }
    assert.deepEqual(codes, [250, 250, 250, 450]);
    // And on A again, and for another client not at all.
    const again = await viaProxy(a, client);
    await again.reply();
    await again.cmd('EHLO limited.example');
    const r = await again.cmd('MAIL FROM:<bulk@example.org>');
    assert.equal(r.code, 450);
    assert.match(r.text, /450 4\.7\.1 .*192\.0\.2\.33/);
    again.close();
    const other = await viaProxy(b, '192.0.2.34');
    await other.reply();
    await other.cmd('EHLO other.example');
    assert.equal((await other.cmd('MAIL FROM:<x@example.org>')).code, 250);
    other.close();
  });

  it('a greylisted triplet retried through the other node after the delay passes', async () => {
    const client = '198.51.100.7';
    const first = await viaProxy(a, client);
    const codes = await send(first, 'alice@example.test', 'greylisted-once');
    first.close();
    assert.deepEqual(codes, [220, 250, 250, 450]);
    assert.deepEqual(events(a, 'greylist').filter((e) => e['client'] === client).map((e) => e['decision']), ['greylisted']);
    // Other hosts of the same /24 (each under its own rate limit) retry through node B:
    // refused until the delay (1 s) has passed, then accepted.
    let host = 8;
    const final = await waitFor(
      'the retry through node B to pass greylisting',
      async () => {
        const c = await viaProxy(b, `198.51.100.${host++}`);
        const got = await send(c, 'alice@example.test', 'greylisted-once');
        c.close();
        return got[3] === 250 ? got : undefined;
      },
      15_000,
    );
    assert.deepEqual(final, [220, 250, 250, 250, 250]);
    assert.ok(events(b, 'greylist').some((e) => e['decision'] === 'passed'));
    assert.equal((await stored()).filter((m) => m.includes('Subject: greylisted-once')).length, 1);
  });

  it('XCLIENT and XFORWARD from the trusted front: the milters see the forwarded client and HELO', async () => {
    const c = await RawClient.connect(a.xclientPort);
    assert.equal((await c.reply()).code, 220);
    const ehlo = await c.cmd('EHLO front.example');
    assert.match(ehlo.text, /XCLIENT/);
    assert.match(ehlo.text, /XFORWARD/);
    const x = await c.cmd('XCLIENT ADDR=203.0.113.5 NAME=[UNAVAILABLE] HELO=real-client.example');
    assert.equal(x.code, 220, x.text);
    assert.equal((await c.cmd('EHLO front.example')).code, 250);
    assert.equal((await c.cmd('MAIL FROM:<s@example.org>')).code, 250);
    assert.equal((await c.cmd('RCPT TO:<postmaster@example.test>')).code, 250);
    assert.equal((await c.data('Subject: xclient\r\n\r\nhi\r\n')).code, 250);
    c.close();
    const mail = events(a, 'milter').filter((e) => e['stage'] === 'mail' && (e['client'] as { address: string }).address === '203.0.113.5');
    assert.equal(mail.length, 1);
    assert.equal(mail[0]!['helo'], 'real-client.example');
    assert.equal(mail[0]!['clientAddr'], '203.0.113.5');
    assert.ok(events(a, 'milter').some((e) => e['stage'] === 'connect' && (e['client'] as { address: string }).address === '203.0.113.5'), 'a connect stage ran for the forwarded client');
    const msg = (await stored()).find((m) => m.includes('Subject: xclient'));
    assert.match(msg!, /^Received: from real-client\.example \(unknown \[203\.0\.113\.5\]\)/m);

    // XFORWARD (Postfix smtp_send_xforward_command): per transaction, no new greeting.
    const f = await RawClient.connect(b.xclientPort);
    await f.reply();
    await f.cmd('EHLO filter.example');
    assert.equal((await f.cmd('XFORWARD ADDR=203.0.113.6 NAME=mail.sender.example HELO=sender-helo.example')).code, 250);
    assert.equal((await f.cmd('MAIL FROM:<s@example.org>')).code, 250);
    f.close();
    const fw = events(b, 'milter').find((e) => e['stage'] === 'mail' && (e['client'] as { address: string }).address === '203.0.113.6');
    assert.ok(fw, 'the milters saw the XFORWARD client');
    assert.equal((fw['client'] as { hostname: string }).hostname, 'mail.sender.example');
    assert.equal(fw['helo'], 'sender-helo.example');
  });

  it('untrusted: a PROXY header from another address is refused and logged; XCLIENT gets 550 5.7.0; a trusted peer’s garbage header closes', async () => {
    for (const version of [1, 2] as const) {
      const before = events(a, 'error').length;
      const c = await RawClient.connect(a.proxyPort, { localAddress: '127.0.0.5' });
      c.write(encodeProxyHeader(version, { source: { address: '192.0.2.99', port: 1234 }, destination: { address: '127.0.0.1', port: 25 } }));
      await c.waitClosed();
      await waitFor('the untrusted PROXY error', () => events(a, 'error').slice(before).find((e) => e['code'] === 'DOVETAIL_ERR_PROXY_UNTRUSTED'));
      assert.ok(!clientsSeen(a, 'mail').includes('192.0.2.99'));
    }
    const x = await RawClient.connect(a.xclientPort, { localAddress: '127.0.0.5' });
    await x.reply();
    const ehlo = await x.cmd('EHLO someone.example');
    assert.doesNotMatch(ehlo.text, /XCLIENT/);
    const r = await x.cmd('XCLIENT ADDR=192.0.2.98');
    assert.equal(r.code, 550);
    assert.match(r.text, /^550 5\.7\.0 /);
    assert.equal((await x.cmd('XFORWARD ADDR=192.0.2.98')).code, 550);
    assert.equal((await x.cmd('MAIL FROM:<s@example.org>')).code, 250);
    x.close();
    assert.ok(clientsSeen(a, 'mail').includes('127.0.0.5') && !clientsSeen(a, 'mail').includes('192.0.2.98'));
    const garbage = await RawClient.connect(a.proxyPort);
    const before = events(a, 'error').length;
    garbage.write('EHLO i-am-not-a-proxy\r\n');
    await garbage.waitClosed();
    await waitFor('the PROXY protocol error', () => events(a, 'error').slice(before).find((e) => e['code'] === 'DOVETAIL_ERR_PROXY_PROTOCOL'));
  });

  it('Redis stopped, then hung, mid-run: open keeps accepting, closed says 4xx; every 250 is stored', async () => {
    const accepted: string[] = [];
    let n = 0;
    const round = async (node: Node): Promise<number[]> => {
      const subject = `run-${++n}`;
      const c = await viaProxy(node, `10.9.${n >> 8}.${n & 255}`);
      const codes = await send(c, 'postmaster@example.test', subject).catch(() => [0]);
      c.close();
      if (codes.at(-1) === 250 && codes.length === 5) accepted.push(subject);
      return codes;
    };
    for (let i = 0; i < 4; i++) {
      assert.deepEqual(await round(a), [220, 250, 250, 250, 250]);
      assert.deepEqual(await round(b), [220, 250, 250, 250, 250]);
    }
    await redis.stop();
    const downA: number[][] = [];
    const downB: number[][] = [];
    for (let i = 0; i < 4; i++) {
      downA.push(await round(a));
      downB.push(await round(b));
    }
    for (const codes of downA) assert.deepEqual(codes, [220, 250, 250, 250, 250], 'fail open: accepted while Redis is down');
    for (const codes of downB) {
      // Fail closed: redisAnvil refuses the connection (421 4.3.0), or a milter says 451 4.3.0.
      const last = codes.at(-1)!;
      assert.ok(last === 421 || last === 451, `fail closed: ${codes.join(' ')}`);
    }
    assert.ok(events(a, 'error').some((e) => e['code'] === 'DOVETAIL_ERR_STORE_UNAVAILABLE'), 'the store failure is reported');

    await redis.start();
    // Both nodes reconnect on their own; B accepts again.
    await waitFor('node B to accept again', async () => ((await round(b)).at(-1) === 250 ? true : undefined), 20_000);

    // A hung Redis (SIGSTOP): answers bounded by commandTimeout (300 ms here), never a hang.
    redis.pause();
    try {
      for (let i = 0; i < 3; i++) {
        assert.deepEqual(await round(a), [220, 250, 250, 250, 250]);
        const codes = await round(b);
        assert.ok([421, 451].includes(codes.at(-1)!), `hung, fail closed: ${codes.join(' ')}`);
      }
    } finally {
      redis.resume();
    }

    // Nothing acknowledged is lost: every 250 has its message, exactly once.
    const all = await stored();
    for (const s of accepted) assert.equal(all.filter((m) => m.includes(`Subject: ${s}\r\n`)).length, 1, `${s} stored once`);
    const runs = all.filter((m) => /Subject: run-\d+\r\n/.test(m)).length;
    assert.equal(runs, accepted.length, 'no message stored that was not acknowledged');
  });

  it('under load: 6 concurrent senders through HAProxy while Redis is stopped and started again; every 250 stored once, nothing else', async () => {
    const accepted = new Set<string>();
    const refused: number[] = [];
    let sent = 0;
    let stopped = false;
    let restarted = false;
    const total = 120;
    const sender = async (id: number): Promise<void> => {
      for (let i = 0; sent < total; i++) {
        const subject = `load-${id}-${i}`;
        sent++;
        // A client address per message: the rate limit (3 per client per minute) stays out of it.
        const c = await RawClient.connect(v2.port, { localAddress: `127.1.${id}.${i + 1}` });
        const codes = await send(c, 'postmaster@example.test', subject).catch(() => [0]);
        c.close();
        if (codes.length === 5 && codes[4] === 250) accepted.add(subject);
        else refused.push(codes.at(-1)!);
        // Stop Redis once a quarter of the messages were accepted, start it at three quarters.
        if (!stopped && accepted.size >= total / 4) {
          stopped = true;
          await redis.stop();
        } else if (stopped && !restarted && sent >= (total * 3) / 4) {
          restarted = true;
          await redis.start();
        }
      }
    };
    await Promise.all([1, 2, 3, 4, 5, 6].map(sender));
    assert.ok(stopped && restarted);
    // Node A fails open, node B closed: while Redis was away, round robin sent half to each.
    assert.ok(refused.length > 0, 'the closed node refused some while Redis was down');
    assert.ok(refused.every((code) => code === 421 || code === 451), `refusals: ${refused.join(' ')}`);
    assert.ok(accepted.size > total / 2, `accepted ${accepted.size} of ${total}`);
    const all = await stored();
    const load = all.filter((m) => /Subject: load-\d+-\d+\r\n/.test(m));
    for (const s of accepted) assert.equal(load.filter((m) => m.includes(`Subject: ${s}\r\n`)).length, 1, `${s} stored once`);
    assert.equal(load.length, accepted.size, 'nothing stored that was not acknowledged');
  });
});

