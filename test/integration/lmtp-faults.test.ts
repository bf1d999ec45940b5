/**
 * LMTP faults with counted outcomes: a client sends through the gateway to lmtp() and a
 * store that is down, dies mid-DATA, hangs, dies between final replies, or answers one
 * recipient 452 and another 250. For each: what the client was told, how many recipients
 * were reported delivered, and what the store holds. The invariant checked everywhere:
 * every recipient reported `delivered` (2xx) is stored; a recipient whose final reply was
 * not read is `deferred`, never `delivered`. No queue is configured (the gateway answers a
 * mixed result with the worst reply, so the client retries: duplicates, never loss).
 */
import assert from 'node:assert/strict';
import { subscribe, unsubscribe } from 'node:diagnostics_channel';
import fs from 'node:fs/promises';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { after, before, describe, it } from 'node:test';
import { Channels } from '../../lib/diagnostics.js';
import { lmtp } from '../../lib/delivery/lmtp.js';
import { createLmtpServer, type LmtpServer } from '../../lib/delivery/lmtp-server.js';
import type { RecipientResult } from '../../lib/delivery/types.js';
import { ehlo, message, send, startGateway, stored, type Reply } from '../helpers/smtp.js';

let base: string;
before(async () => {
  base = await fs.mkdtemp(path.join(os.tmpdir(), 'dovetail-lmtp-faults-'));
});
after(async () => {
  await fs.rm(base, { recursive: true, force: true });
});

async function store(): Promise<LmtpServer & { root: string; port: number }> {
  const root = await fs.mkdtemp(path.join(base, 'store-'));
  const s = await createLmtpServer({ root, listen: { host: '127.0.0.1', port: 0 } });
  return Object.assign(s, { root, port: 'port' in s.address ? s.address.port : 0 });
}

/** Results the gateway got from its transport, per message (from the message channel). */
function recordResults(): { results: RecipientResult[][]; stop(): void } {
  const results: RecipientResult[][] = [];
  const on = (m: unknown): void => {
    results.push((m as { results: RecipientResult[] }).results);
  };
  subscribe(Channels.message, on);
  return { results, stop: () => unsubscribe(Channels.message, on) };
}

type ProxyMode =
  | { kind: 'pass' }
  /** Kill both sockets once this many message bytes went to the store after its 354. */
  | { kind: 'cut-in-data'; afterBytes: number }
  /** After the final dot, pass this many reply lines to the client, then kill both sockets. */
  | { kind: 'cut-in-finals'; afterReplies: number }
  /** After the 354, pass nothing more from the client to the store (the store waits for the dot forever). */
  | { kind: 'hang-before-dot' }
  /** After the final dot, pass nothing more from the store to the client (the store stored it). */
  | { kind: 'hang-after-dot' };

/** A TCP proxy in front of a real store that fails on purpose, in one of the modes above. */
async function proxy(targetPort: number, mode: ProxyMode): Promise<{ port: number; close(): Promise<void> }> {
  const sockets = new Set<net.Socket>();
  const srv = net.createServer((client) => {
    const upstream = net.connect(targetPort, '127.0.0.1');
    sockets.add(client);
    sockets.add(upstream);
    let inData = false;
    let dataBytes = 0;
    let afterDot = false;
    let repliesAfterDot = 0;
    let tail = '';
    const kill = (): void => {
      client.destroy();
      upstream.destroy();
    };
    client.on('error', kill);
    upstream.on('error', kill);
    client.on('close', kill);
    upstream.on('close', kill);
    upstream.on('data', (d: Buffer) => {
      const text = d.toString('latin1');
      if (!afterDot && /(^|\n)354 /.test(text)) inData = true;
      if (afterDot && mode.kind === 'hang-after-dot') return;
      if (afterDot && mode.kind === 'cut-in-finals') {
        const lines = text.split('\r\n').filter(Boolean);
        const room = mode.afterReplies - repliesAfterDot;
        const pass = lines.slice(0, Math.max(0, room));
        repliesAfterDot += pass.length;
        if (pass.length) client.write(pass.map((l) => l + '\r\n').join(''));
        if (repliesAfterDot >= mode.afterReplies) kill();
        return;
      }
      client.write(d);
    });
    client.on('data', (d: Buffer) => {
      if (inData && !afterDot) {
        tail = (tail + d.toString('latin1')).slice(-5);
        if (mode.kind === 'hang-before-dot') return;
        dataBytes += d.length;
        if (mode.kind === 'cut-in-data' && dataBytes >= mode.afterBytes) {
          kill();
          return;
        }
        if (tail.endsWith('\r\n.\r\n')) afterDot = true;
      }
      upstream.write(d);
    });
  });
  await new Promise<void>((r) => srv.listen(0, '127.0.0.1', r));
  return {
    port: (srv.address() as net.AddressInfo).port,
    async close() {
      for (const s of sockets) s.destroy();
      await new Promise<void>((r) => srv.close(() => r()));
    },
  };
}

/** A free port with nothing listening on it. */
async function deadPort(): Promise<number> {
  const srv = net.createServer();
  await new Promise<void>((r) => srv.listen(0, '127.0.0.1', r));
  const port = (srv.address() as net.AddressInfo).port;
  await new Promise<void>((r) => srv.close(() => r()));
  return port;
}

/** Every recipient the transport reported delivered is in the store (at least once). */
async function assertDeliveredAreStored(root: string, results: RecipientResult[][]): Promise<void> {
  for (const msg of results) {
    for (const r of msg) if (r.status === 'delivered') assert.ok((await stored(root, r.recipient)).length >= 1, `${r.recipient} reported delivered but not stored`);
  }
}

const count = (results: RecipientResult[][], status: string): number => results.flat().filter((r) => r.status === status).length;

describe('LMTP faults, counted', () => {
  it('store down before the session: every message told 451 4.4.1 at end of DATA, nothing stored, nothing delivered', async () => {
    const port = await deadPort();
    const rec = recordResults();
    const gw = await startGateway({ delivery: lmtp({ port }), verifyRecipients: true });
    try {
      const c = await ehlo(gw.port);
      const told: Reply[] = [];
      for (let i = 0; i < 3; i++) {
        const r = await send(c, 'a@sender.test', ['bob@example.test', 'carol@example.test'], message(`down ${i}`));
        // Verification is advisory: an unreachable store does not refuse recipients.
        assert.deepEqual(r.rcpt.map((x) => x.code), [250, 250]);
        told.push(r.data!);
      }
      c.end();
      assert.deepEqual(told.map((r) => r.code), [451, 451, 451]);
      assert.match(told[0]!.text, /^451 4\.4\.1 LMTP 127\.0\.0\.1:\d+: cannot connect \(ECONNREFUSED\); delivery deferred$/);
      assert.equal(count(rec.results, 'delivered'), 0);
      assert.equal(count(rec.results, 'deferred'), 6);
    } finally {
      rec.stop();
      await gw.close();
    }
  });

  it('store dying mid-DATA: told 451 4.4.2, nothing stored; the next message gets a fresh connection and is stored', async () => {
    const s = await store();
    const p = await proxy(s.port, { kind: 'cut-in-data', afterBytes: 64 * 1024 });
    const t = lmtp({ port: p.port });
    const rec = recordResults();
    const gw = await startGateway({ delivery: t });
    try {
      const c = await ehlo(gw.port);
      const big = message('big', ('x'.repeat(998) + '\r\n').repeat(1024));
      const r = await send(c, 'a@sender.test', ['bob@example.test', 'carol@example.test'], big);
      assert.equal(r.data?.code, 451, r.data?.text);
      assert.match(r.data!.text, /^451 4\.4\.2 LMTP 127\.0\.0\.1:\d+: connection lost (while sending the message|while waiting for the final reply); delivery deferred$/);
      assert.equal((await stored(s.root, 'bob@example.test')).length, 0);
      assert.equal((await stored(s.root, 'carol@example.test')).length, 0);
      // A small message passes the same proxy (cut only after 64 KiB).
      const ok = await send(c, 'a@sender.test', ['bob@example.test'], message('small'));
      assert.equal(ok.data?.code, 250);
      c.end();
      assert.equal((await stored(s.root, 'bob@example.test')).length, 1);
      assert.equal(count(rec.results, 'delivered'), 1);
      assert.equal(count(rec.results, 'deferred'), 2);
      assert.equal(t.stats().opened, 2, 'the dead connection was not reused');
      await assertDeliveredAreStored(s.root, rec.results);
    } finally {
      rec.stop();
      await gw.close();
      await p.close();
      await s.close();
    }
  });

  it('store dying between final replies: the first recipient delivered, the second deferred (never delivered); client told 451', async () => {
    const s = await store();
    const p = await proxy(s.port, { kind: 'cut-in-finals', afterReplies: 1 });
    const rec = recordResults();
    const gw = await startGateway({ delivery: lmtp({ port: p.port }) });
    try {
      const c = await ehlo(gw.port);
      const r = await send(c, 'a@sender.test', ['bob@example.test', 'carol@example.test'], message());
      c.end();
      assert.match(r.data!.text, /^451 4\.4\.2 .*connection lost while waiting for the final reply/);
      const [res] = rec.results;
      assert.deepEqual(res?.map((x) => x.status), ['delivered', 'deferred']);
      assert.equal(res?.[0]?.reply.code, 250);
      // The store did store carol too (it answered after storing): the client's retry makes a duplicate, not a loss.
      assert.equal((await stored(s.root, 'bob@example.test')).length, 1);
      assert.equal((await stored(s.root, 'carol@example.test')).length, 1);
      await assertDeliveredAreStored(s.root, rec.results);
    } finally {
      rec.stop();
      await gw.close();
      await p.close();
      await s.close();
    }
  });

  it('store hanging before the final dot: the final-reply timeout fires, told 451 4.4.2, nothing stored', async () => {
    const s = await store();
    const p = await proxy(s.port, { kind: 'hang-before-dot' });
    const rec = recordResults();
    const gw = await startGateway({ delivery: lmtp({ port: p.port, timeouts: { final: 400 } }) });
    try {
      const c = await ehlo(gw.port);
      const t0 = Date.now();
      const r = await send(c, 'a@sender.test', ['bob@example.test', 'carol@example.test'], message());
      const took = Date.now() - t0;
      c.end();
      assert.match(r.data!.text, /^451 4\.4\.2 LMTP 127\.0\.0\.1:\d+: timed out while waiting for the final reply; delivery deferred$/);
      assert.ok(took >= 350 && took < 5000, `took ${took} ms`);
      assert.equal(count(rec.results, 'delivered'), 0);
      assert.equal(count(rec.results, 'deferred'), 2);
      assert.equal((await stored(s.root, 'bob@example.test')).length, 0);
    } finally {
      rec.stop();
      await gw.close();
      await p.close();
      await s.close();
    }
  });

  it('store hanging after the final dot (it stored): told 451 4.4.2, nothing claimed delivered (a retry duplicates, never loses)', async () => {
    const s = await store();
    const p = await proxy(s.port, { kind: 'hang-after-dot' });
    const rec = recordResults();
    const gw = await startGateway({ delivery: lmtp({ port: p.port, timeouts: { final: 400 } }) });
    try {
      const c = await ehlo(gw.port);
      const r = await send(c, 'a@sender.test', ['bob@example.test'], message());
      c.end();
      assert.equal(r.data?.code, 451);
      assert.equal(count(rec.results, 'delivered'), 0);
      assert.equal((await stored(s.root, 'bob@example.test')).length, 1);
    } finally {
      rec.stop();
      await gw.close();
      await p.close();
      await s.close();
    }
  });

  it('store that accepts TCP but never greets: verification gives up in time (RCPT 250), the greeting timeout fires, told 451 4.4.1', async () => {
    const silent = net.createServer(() => undefined);
    const held = new Set<net.Socket>();
    silent.on('connection', (sock) => held.add(sock));
    await new Promise<void>((r) => silent.listen(0, '127.0.0.1', r));
    const gw = await startGateway({
      delivery: lmtp({ port: (silent.address() as net.AddressInfo).port, timeouts: { greeting: 300, verify: 200 } }),
      verifyRecipients: true,
    });
    try {
      const c = await ehlo(gw.port);
      assert.equal((await c.cmd('MAIL FROM:<a@sender.test>')).code, 250);
      const t0 = Date.now();
      assert.equal((await c.cmd('RCPT TO:<bob@example.test>')).code, 250, 'verification is advisory');
      assert.ok(Date.now() - t0 < 2000, `RCPT took ${Date.now() - t0} ms`);
      const r = { data: await c.data(message()) };
      c.end();
      assert.match(r.data!.text, /^451 4\.4\.1 LMTP 127\.0\.0\.1:\d+: timed out while waiting for the greeting; delivery deferred$/);
    } finally {
      await gw.close();
      for (const s of held) s.destroy();
      await new Promise<void>((r) => silent.close(() => r()));
    }
  });

  it('one recipient 452, another 250: the gateway (no queue) answers 452; the client retries; every 2xx recipient stored', async () => {
    // A scripted store: carol gets 452 4.2.2 on the first transaction only; it keeps what it accepted.
    const kept: { rcpt: string; data: string }[] = [];
    let transactions = 0;
    const srv = net.createServer((sock) => {
      let buf = '';
      let data: string | undefined;
      let rcpts: string[] = [];
      sock.write('220 scripted LMTP\r\n');
      sock.on('error', () => undefined);
      sock.on('data', (d: Buffer) => {
        buf += d.toString('latin1');
        for (;;) {
          if (data !== undefined) {
            const end = buf.indexOf('\r\n.\r\n');
            if (end < 0) return;
            data = buf.slice(0, end + 2).replace(/^\.\./gm, '.');
            buf = buf.slice(end + 5);
            transactions++;
            const out = rcpts.map((r) => {
              if (r === 'carol@example.test' && transactions === 1) return `452 4.2.2 <${r}> Mailbox temporarily full\r\n`;
              kept.push({ rcpt: r, data: data! });
              return `250 2.0.0 <${r}> Saved\r\n`;
            });
            sock.write(out.join(''));
            data = undefined;
            rcpts = [];
            continue;
          }
          const nl = buf.indexOf('\r\n');
          if (nl < 0) return;
          const line = buf.slice(0, nl);
          buf = buf.slice(nl + 2);
          if (line.startsWith('LHLO')) sock.write('250-scripted\r\n250-PIPELINING\r\n250-ENHANCEDSTATUSCODES\r\n250 8BITMIME\r\n');
          else if (line.startsWith('RCPT TO:<')) {
            rcpts.push(line.slice(9, line.indexOf('>')));
            sock.write('250 2.1.5 OK\r\n');
          } else if (line === 'DATA') {
            data = '';
            sock.write('354 OK\r\n');
          } else if (line === 'QUIT') sock.end('221 2.0.0 Bye\r\n');
          else sock.write('250 2.0.0 OK\r\n');
        }
      });
    });
    await new Promise<void>((r) => srv.listen(0, '127.0.0.1', r));
    const rec = recordResults();
    const gw = await startGateway({ delivery: lmtp({ port: (srv.address() as net.AddressInfo).port }) });
    try {
      const c = await ehlo(gw.port);
      const content = message('mixed');
      const first = await send(c, 'a@sender.test', ['bob@example.test', 'carol@example.test'], content);
      assert.equal(first.data?.text, '452 4.2.2 <carol@example.test> Mailbox temporarily full');
      const retry = await send(c, 'a@sender.test', ['bob@example.test', 'carol@example.test'], content);
      assert.equal(retry.data?.code, 250);
      c.end();
      assert.deepEqual(rec.results.map((m) => m.map((r) => `${r.recipient}:${r.status}:${r.reply.code}`)), [
        ['bob@example.test:delivered:250', 'carol@example.test:deferred:452'],
        ['bob@example.test:delivered:250', 'carol@example.test:delivered:250'],
      ]);
      // Counted: bob stored twice (the duplicate of a retried mixed result), carol once; nothing lost.
      assert.equal(kept.filter((k) => k.rcpt === 'bob@example.test').length, 2);
      assert.equal(kept.filter((k) => k.rcpt === 'carol@example.test').length, 1);
      for (const k of kept) assert.ok(k.data.endsWith(content), 'the body arrived intact');
    } finally {
      rec.stop();
      await gw.close();
      await new Promise<void>((r) => srv.close(() => r()));
    }
  });
});
