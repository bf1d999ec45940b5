/**
 * rateLimit, greylist and redisAnvil against a real redis-server (test/helpers/redis.ts),
 * each with two in-process gateways sharing it (two nodes), over real sockets:
 * - redisAnvil: connections at once and messages per client counted across both gateways;
 *   a closed connection gives its slot back;
 * - rateLimit: per authenticated user, per sender domain (recipients), the null sender not
 *   counted; the refusal at the right stage;
 * - greylist: exemptions (network, AUTH, postmaster), auto-allow after N passes, a retry
 *   after the retry window starts over, IPv6 clients by /64;
 * - a hung Redis (SIGSTOP) with ioredis' default offline queue: every answer comes within
 *   commandTimeout, open accepts, closed says 451 4.3.0;
 * - option checks.
 */
import assert from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';
import { Redis } from 'ioredis';
import { DovetailError, redisAnvil, smtpReply, type Milter } from '../../lib/index.js';
import { greylist, rateLimit, type GreylistDecision } from '../../milters/index.js';
import { startRedis, type RedisPeer } from '../helpers/redis.js';
import { RawClient, startGateway, type TestGateway } from '../helpers/smtp.js';
import { waitFor } from '../helpers/wait.js';

let peer: RedisPeer;
let redis: Redis;
const open: TestGateway[] = [];

before(async () => {
  peer = await startRedis();
  redis = new Redis({ host: '127.0.0.1', port: peer.port, lazyConnect: true, retryStrategy: () => 100 });
  redis.on('error', () => undefined);
  await redis.connect();
});

after(async () => {
  for (const g of open) await g.close();
  redis?.disconnect();
  await peer?.close();
});

async function gateways(make: () => Parameters<typeof startGateway>[0]): Promise<[TestGateway, TestGateway]> {
  const a = await startGateway(make());
  const b = await startGateway(make());
  open.push(a, b);
  return [a, b];
}

async function session(port: number, from = '127.0.0.1'): Promise<RawClient> {
  const c = await RawClient.connect(port, { localAddress: from });
  const g = await c.reply();
  assert.equal(g.code, 220, g.text);
  assert.equal((await c.cmd('EHLO client.example')).code, 250);
  return c;
}

describe('redisAnvil: per-client limits shared by two gateways', () => {
  it('connections at once: the third from one address is refused on either node; a closed one frees its slot', async () => {
    const [a, b] = await gateways(() => ({ anvil: redisAnvil({ redis, prefix: 'anvil1:', maxConnections: 2 }) }));
    const c1 = await session(a.port, '127.0.0.7');
    const c2 = await session(b.port, '127.0.0.7');
    for (const port of [a.port, b.port]) {
      const c3 = await RawClient.connect(port, { localAddress: '127.0.0.7' });
      const r = await c3.reply();
      assert.equal(r.code, 421);
      assert.match(r.text, /^421 4\.7\.0 mx\.test Error: too many connections from 127\.0\.0\.7/);
      c3.close();
    }
    // Another address is not affected.
    (await session(a.port, '127.0.0.8')).close();
    await c1.cmd('QUIT');
    c1.close();
    await waitFor('the slot to be given back', async () => {
      const c = await RawClient.connect(b.port, { localAddress: '127.0.0.7' });
      const r = await c.reply();
      c.close();
      return r.code === 220;
    });
    c2.close();
  });

  it('connection rate across nodes; a lease left by a node that died expires', async () => {
    const [a, b] = await gateways(() => ({ anvil: redisAnvil({ redis, prefix: 'anvil3:', maxConnections: 0, connectionRate: 2, window: 60_000 }) }));
    const greetings: number[] = [];
    for (const port of [a.port, b.port, a.port]) {
      const c = await RawClient.connect(port, { localAddress: '127.0.0.11' });
      greetings.push((await c.reply()).code);
      c.close();
    }
    assert.deepEqual(greetings, [220, 220, 421]);
    // A node that holds a connection and dies: its lease (300 ms here) runs out, the slot comes back.
    const dead = redisAnvil({ redis, prefix: 'anvil4:', maxConnections: 1, lease: 300 });
    const held = await dead.connect('192.0.2.44');
    assert.equal(held.ok, true);
    assert.deepEqual(await dead.connect('192.0.2.44'), { ok: false, why: 'count' });
    // (no release: the node is gone)
    await waitFor('the lease to run out', async () => (await dead.connect('192.0.2.44')).ok, 10_000);
  });

  it('messages per client: counted across nodes (450 4.7.1 at MAIL FROM)', async () => {
    const [a, b] = await gateways(() => ({ anvil: redisAnvil({ redis, prefix: 'anvil2:', messageRate: 2, window: 60_000 }) }));
    const codes: number[] = [];
    for (const port of [a.port, b.port, a.port]) {
      const c = await session(port, '127.0.0.9');
      codes.push((await c.cmd('MAIL FROM:<s@example.org>')).code);
      c.close();
    }
    assert.deepEqual(codes, [250, 250, 450]);
  });
});

describe('rateLimit', () => {
  it('per authenticated user and per sender domain (recipients), across nodes; the null sender is not counted by domain', async () => {
    const limit = (): Milter => rateLimit({ redis, prefix: 'rl1:', user: { messages: 2 }, senderDomain: { recipients: 3 } });
    const [a, b] = await gateways(() => ({ milters: [limit()], authenticate: async () => true, allowInsecureAuth: true }));
    // User: 2 messages, wherever they log in from.
    const mail: number[] = [];
    for (const [port, from] of [
      [a.port, '127.0.0.21'],
      [b.port, '127.0.0.22'],
      [a.port, '127.0.0.23'],
    ] as const) {
      const c = await session(port, from);
      assert.equal((await c.authPlain('alice', 'pw')).code, 235);
      mail.push((await c.cmd('MAIL FROM:<alice@users.example>')).code);
      c.close();
    }
    assert.deepEqual(mail, [250, 250, 450]);
    // Sender domain: 3 recipients in all, then 450 4.7.1 at RCPT for that recipient only.
    const rcpt: number[] = [];
    const c = await session(a.port, '127.0.0.24');
    assert.equal((await c.cmd('MAIL FROM:<x@bulk.example>')).code, 250);
    rcpt.push((await c.cmd('RCPT TO:<r1@example.test>')).code, (await c.cmd('RCPT TO:<r2@example.test>')).code);
    c.close();
    const d = await session(b.port, '127.0.0.25');
    assert.equal((await d.cmd('MAIL FROM:<y@BULK.example>')).code, 250);
    rcpt.push((await d.cmd('RCPT TO:<r3@example.test>')).code);
    const over = await d.cmd('RCPT TO:<r4@example.test>');
    rcpt.push(over.code);
    assert.match(over.text, /^450 4\.7\.1 Error: too much mail from bulk\.example/);
    // The null sender has no domain to count.
    assert.equal((await d.cmd('RSET')).code, 250);
    assert.equal((await d.cmd('MAIL FROM:<>')).code, 250);
    assert.equal((await d.cmd('RCPT TO:<r5@example.test>')).code, 250);
    d.close();
    assert.deepEqual(rcpt, [250, 250, 250, 450]);
  });
});

describe('greylist', () => {
  it('exempt: listed networks, authenticated clients, postmaster; others are greylisted', async () => {
    const decisions: GreylistDecision[] = [];
    const [a] = await gateways(() => ({
      milters: [greylist({ redis, prefix: 'gl1:', exempt: ['127.0.0.40/30'], onDecision: (d) => decisions.push(d) })],
      authenticate: async () => true,
      allowInsecureAuth: true,
    }));
    const rcpt = async (from: string, to: string, auth = false): Promise<string> => {
      const c = await session(a.port, from);
      if (auth) assert.equal((await c.authPlain('bob', 'pw')).code, 235);
      await c.cmd('MAIL FROM:<s@example.org>');
      const r = await c.cmd(`RCPT TO:<${to}>`);
      c.close();
      return r.text;
    };
    assert.match(await rcpt('127.0.0.41', 'u@example.test'), /^250 /);
    assert.match(await rcpt('127.0.0.50', 'u@example.test', true), /^250 /);
    assert.match(await rcpt('127.0.0.50', 'postmaster@example.test'), /^250 /);
    assert.match(await rcpt('127.0.0.50', 'Postmaster'), /^250 /);
    assert.match(await rcpt('127.0.0.50', 'u@example.test'), /^450 4\.2\.0 Greylisted, please try again in \d+ seconds/);
    assert.deepEqual(decisions, ['exempt', 'exempt', 'exempt', 'exempt', 'greylisted']);
  });

  it('auto-allow after N passed triplets; a retry after the retry window starts over; IPv6 by /64', async () => {
    const decisions: string[] = [];
    const make = (): Parameters<typeof startGateway>[0] => ({
      listen: [{ host: '::1', port: 0 }],
      milters: [greylist({ redis, prefix: 'gl2:', delay: 200, retryWindow: 1500, autoAllowAfter: 2, onDecision: (d, ctx) => decisions.push(`${d} ${ctx.client.address}`) })],
    });
    const [a, b] = await gateways(make);
    const rcpt = async (port: number, from: string, to: string): Promise<number> => {
      const c = await RawClient.connect(port, { host: '::1', localAddress: from });
      await c.reply();
      await c.cmd('EHLO v6.example');
      await c.cmd('MAIL FROM:<s@example.org>');
      const code = (await c.cmd(`RCPT TO:<${to}>`)).code;
      c.close();
      return code;
    };
    // Loopback ::1 is the only IPv6 source here; the /64 key is the same for any host of that net.
    for (const to of ['one@example.test', 'two@example.test']) {
      assert.equal(await rcpt(a.port, '::1', to), 450);
      await waitFor(`${to} to pass on node B`, async () => (await rcpt(b.port, '::1', to)) === 250, 10_000);
    }
    // Two passes: the /64 is now auto-allowed for a new triplet, on either node.
    assert.equal(await rcpt(a.port, '::1', 'three@example.test'), 250);
    assert.ok(decisions.includes('auto-allowed ::1'), decisions.join(', '));
    const keys = await redis.keys('gl2:gl:c:*');
    assert.deepEqual(keys, ['gl2:gl:c:0:0:0:0:0:0:0:0/64']);

    // Retry window: a triplet retried only after it is refused again (a fresh gateway with a fresh prefix, no auto-allow).
    const [c] = await gateways(() => ({ milters: [greylist({ redis, prefix: 'gl3:', delay: 200, retryWindow: 600, autoAllowAfter: 0 })] }));
    const once = async (): Promise<number> => {
      const s = await session(c.port, '127.0.0.60');
      await s.cmd('MAIL FROM:<s@example.org>');
      const code = (await s.cmd('RCPT TO:<late@example.test>')).code;
      s.close();
      return code;
    };
    assert.equal(await once(), 450);
    // Wait until Redis has forgotten the first attempt (its key lives for retryWindow), then retry: greylisted anew.
    await waitFor('the first attempt to age out', async () => (await redis.keys('gl3:gl:t:*')).length === 0, 10_000);
    assert.equal(await once(), 450);
  });
});

describe('a hung Redis never hangs SMTP', () => {
  it('SIGSTOP with the default offline queue: open answers 250, closed 451 4.3.0, both within the command timeout', async () => {
    // ioredis' defaults (offline queue on, 20 retries): only our commandTimeout bounds the wait.
    const client = new Redis({ host: '127.0.0.1', port: peer.port, lazyConnect: true });
    client.on('error', () => undefined);
    await client.connect();
    try {
      const [openGw] = await gateways(() => ({ milters: [rateLimit({ redis: client, prefix: 'hung:', client: { messages: 100 }, commandTimeout: 200, onStoreError: 'open' })] }));
      const [closedGw] = await gateways(() => ({ milters: [rateLimit({ redis: client, prefix: 'hung:', client: { messages: 100 }, commandTimeout: 200, onStoreError: 'closed' })] }));
      const o = await session(openGw.port);
      const c = await session(closedGw.port);
      peer.pause();
      try {
        // The replies come (RawClient.reply gives up after 10 s: a hang would fail here).
        assert.equal((await o.cmd('MAIL FROM:<s@example.org>', 10_000)).code, 250);
        const r = await c.cmd('MAIL FROM:<s@example.org>', 10_000);
        assert.match(r.text, /^451 4\.3\.0 Error: temporary failure of a shared store, try again later/);
      } finally {
        peer.resume();
      }
      o.close();
      c.close();
      // Back: the closed gateway accepts again.
      await waitFor('the closed gateway to accept again', async () => {
        const s = await session(closedGw.port);
        const code = (await s.cmd('MAIL FROM:<s@example.org>')).code;
        s.close();
        return code === 250;
      });
    } finally {
      client.disconnect();
    }
  });
});

describe('option checks', () => {
  it('refuse what cannot work, with the field named', () => {
    const bad = (f: () => unknown, re: RegExp): void => assert.throws(f, (e: unknown) => e instanceof DovetailError && e.code === 'DOVETAIL_ERR_INVALID_OPTIONS' && re.test(e.message));
    bad(() => rateLimit({ redis }), /at least one limit/);
    bad(() => rateLimit({ redis, client: { messages: -1 } }), /client\.messages/);
    bad(() => rateLimit({ redis, client: { messages: 1 }, reply: smtpReply(550, '5.7.1', 'no') }), /4xx/);
    bad(() => rateLimit({ redis: {} as Redis, client: { messages: 1 } }), /ioredis client/);
    bad(() => greylist({ redis, delay: 5000, retryWindow: 1000 }), /retryWindow/);
    bad(() => greylist({ redis, ipv4Prefix: 33 }), /ipv4Prefix/);
    bad(() => greylist({ redis, onStoreError: 'maybe' as 'open' }), /onStoreError/);
    bad(() => redisAnvil({ redis, exempt: ['nonsense'] }), /exempt/);
    bad(() => redisAnvil({ redis, commandTimeout: 0 }), /commandTimeout/);
  });
});
