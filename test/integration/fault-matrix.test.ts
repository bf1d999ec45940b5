/**
 * The fault matrix (hardening issue): a table of faults, each run over real sockets with
 * counted outcomes. For every fault, N single-recipient messages go through a gateway with
 * a durable queue (short backoff) to lmtp() and the embedded LMTP store
 * (createLmtpServer), each to its own mailbox `m<i>@example.test`, on a fresh connection
 * (5 clients at a time, all 20 at once where the fault is a delay).
 * Then the invariant is checked per message:
 *
 *   - answered 2xx: stored in the mailstore, or in the queue, or reported by a DSN (lost = 0);
 *   - answered 4xx/5xx, or not answered (the client or the gateway cut the session): not
 *     stored and not queued. With one recipient per message there is no partial delivery,
 *     so the only stored copy a non-2xx answer may leave is one whose final LMTP reply was
 *     never read (docs/architecture.md "Mixed delivery results": duplicates, never loss);
 *     none of the faults below cuts after the store's final dot, so none is allowed here.
 *
 * Each fault prints a ledger with t.diagnostic(): sent / 2xx / 4xx / 5xx / none / stored /
 * queued / dsn / lost. The last case SIGKILLs a gateway child process
 * (test/fixtures/queue-gateway.ts) mid-DATA and after its 250s, then restarts it: every
 * acknowledged message is delivered, the one cut mid-DATA is nowhere.
 */
import assert from 'node:assert/strict';
import fs from 'node:fs/promises';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { after, before, describe, it, type TestContext } from 'node:test';
import { fileURLToPath } from 'node:url';
import type { Milter } from '../../lib/index.js';
import { lmtp, type LmtpTransport } from '../../lib/delivery/lmtp.js';
import { createLmtpServer, type LmtpServer } from '../../lib/delivery/lmtp-server.js';
import { createQueue, type DeliveryQueue } from '../../lib/delivery/queue.js';
import { decodeCommand, encodeFrame, encodeReply, FrameDecoder, SMFIF_ALL, type MilterCommand, type MilterReply } from '../../lib/milter/protocol/index.js';
import { connectMilter } from '../../lib/milter/protocol/client.js';
import { dnsbl } from '../../milters/dnsbl.js';
import { startChild, type Child } from '../helpers/child.js';
import { startDnsServer, type TestDnsServer } from '../helpers/dns-server.js';
import { ehlo, message, RawClient, send, startGateway, stored, type TestGateway } from '../helpers/smtp.js';
import { waitFor } from '../helpers/wait.js';

const N = 20;
const FIXTURE = fileURLToPath(new URL('../fixtures/queue-gateway.js', import.meta.url));

let base: string;
let dns: TestDnsServer;
const resolvers: { cancel(): void }[] = [];
before(async () => {
  base = await fs.mkdtemp(path.join(os.tmpdir(), 'dovetail-fault-matrix-'));
  dns = await startDnsServer();
});
after(async () => {
  for (const r of resolvers) r.cancel();
  await dns.close();
  await fs.rm(base, { recursive: true, force: true });
});

// ---- the pieces ---------------------------------------------------------------------------

/** A free port with nothing listening on it. */
async function deadPort(): Promise<number> {
  const srv = net.createServer();
  await new Promise<void>((r) => srv.listen(0, '127.0.0.1', r));
  const port = (srv.address() as net.AddressInfo).port;
  await new Promise<void>((r) => srv.close(() => r()));
  return port;
}

interface Closable {
  port: number;
  close(): Promise<void>;
}

type ProxyMode =
  | { kind: 'pass' }
  /** Every reply chunk from the store is held this long before it reaches lmtp(). */
  | { kind: 'slow'; delay: number }
  /** Every `every`-th transaction (counted at its 354) is cut after `afterBytes` message bytes. */
  | { kind: 'cut-in-data'; every: number; afterBytes: number };

/** A TCP proxy in front of the store that misbehaves on purpose. */
async function proxy(targetPort: number, mode: ProxyMode): Promise<Closable> {
  const sockets = new Set<net.Socket>();
  let transactions = 0;
  const srv = net.createServer((client) => {
    const upstream = net.connect(targetPort, '127.0.0.1');
    sockets.add(client);
    sockets.add(upstream);
    let cutAt = -1;
    let dataBytes = 0;
    const kill = (): void => {
      client.destroy();
      upstream.destroy();
    };
    for (const s of [client, upstream]) {
      s.on('error', kill);
      s.on('close', () => {
        sockets.delete(s);
        kill();
      });
    }
    upstream.on('data', (d: Buffer) => {
      if (/(^|\n)354 /.test(d.toString('latin1'))) {
        transactions++;
        dataBytes = 0;
        cutAt = mode.kind === 'cut-in-data' && transactions % mode.every === 0 ? mode.afterBytes : -1;
      }
      if (mode.kind === 'slow') setTimeout(() => client.destroyed || client.write(d), mode.delay);
      else client.write(d);
    });
    client.on('data', (d: Buffer) => {
      if (cutAt >= 0) {
        dataBytes += d.length;
        if (dataBytes >= cutAt) {
          kill();
          return;
        }
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

interface FakeConn {
  readonly index: number;
  reply(r: MilterReply): void;
  raw(b: Buffer): void;
}

/**
 * A raw-socket milter peer (as in protocol-client.test.ts): answers OPTNEG with every action,
 * `continue` wherever a reply is due, unless `on` answered (or chose not to). One filter
 * connection per SMTP session, so `index` is the message number here.
 */
async function fakeFilter(on: (cmd: MilterCommand, c: FakeConn) => boolean): Promise<Closable> {
  let n = 0;
  const sockets = new Set<net.Socket>();
  const server = net.createServer((socket) => {
    sockets.add(socket);
    socket.on('close', () => sockets.delete(socket));
    socket.on('error', () => undefined);
    const decoder = new FrameDecoder();
    const c: FakeConn = {
      index: n++,
      reply: (r) => void (socket.destroyed || socket.write(encodeReply(r))),
      raw: (b) => void (socket.destroyed || socket.write(b)),
    };
    socket.on('data', (chunk) => {
      let frames;
      try {
        frames = decoder.push(chunk);
      } catch {
        socket.destroy();
        return;
      }
      for (const f of frames) {
        const cmd = decodeCommand(f);
        if (cmd.type === 'optneg') {
          c.reply({ type: 'optneg', version: 6, actions: SMFIF_ALL, protocol: 0, macros: [] });
          continue;
        }
        if (on(cmd, c)) continue;
        if (cmd.type === 'macro' || cmd.type === 'abort' || cmd.type === 'quit' || cmd.type === 'quitNc') continue;
        c.reply({ type: 'continue' });
      }
    });
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', () => r()));
  return {
    port: (server.address() as net.AddressInfo).port,
    close: () =>
      new Promise<void>((r) => {
        for (const s of sockets) s.destroy();
        server.close(() => r());
      }),
  };
}

/** The outcome of one message: the code of the reply that ended it, 0 when none came. */
async function attempt(port: number, i: number, opts: { resetMidData?: boolean | undefined } = {}): Promise<number> {
  let c: RawClient | undefined;
  try {
    c = await RawClient.connect(port);
    c.socket.setNoDelay(true);
    const greeting = await c.reply();
    if (greeting.code !== 220) return greeting.code;
    const h = await c.cmd('EHLO client.example.test');
    if (h.code !== 250) return h.code;
    const content = message(`fault ${i}`, `Message ${i}.\r\n${'x'.repeat(70)}\r\n`.repeat(40));
    if (opts.resetMidData) {
      assert.equal((await c.cmd('MAIL FROM:<alice@sender.test>')).code, 250);
      assert.equal((await c.cmd(`RCPT TO:<m${i}@example.test>`)).code, 250);
      assert.equal((await c.cmd('DATA')).code, 354);
      c.write(content.slice(0, content.length >> 1));
      await new Promise((r) => setTimeout(r, 20));
      c.socket.resetAndDestroy();
      return 0;
    }
    const r = await send(c, 'alice@sender.test', [`m${i}@example.test`], content);
    if (r.mail.code !== 250) return r.mail.code;
    if (r.data === undefined) return r.rcpt[0]!.code;
    return r.data.code;
  } catch {
    return 0;
  } finally {
    c?.socket.destroy();
  }
}

interface Ledger {
  sent: number;
  '2xx': number;
  '4xx': number;
  '5xx': number;
  none: number;
  stored: number;
  queued: number;
  dsn: number;
  lost: number;
}

function ledgerLine(name: string, l: Ledger): string {
  return `${name}: ${Object.entries(l).map(([k, v]) => `${k}=${v}`).join(' ')}`;
}

/** Every fault's ledger, for the summary at the end. */
const ledgers: string[] = [];

interface Fault {
  readonly name: string;
  /** Sets the fault up; returns the gateway options it needs and what to close afterwards. */
  setup(storePort: number): Promise<{ lmtpPort: number; milters?: Milter[]; close?: () => Promise<void> }>;
  /** Per message: reset the client connection in the middle of DATA. */
  readonly reset?: (i: number) => boolean;
  /** What the replies must be: counts of 2xx (the rest 4xx, 5xx or none as given). */
  readonly expect: Partial<Record<'2xx' | '4xx' | '5xx' | 'none', number>>;
  /** Clients sending at the same time (default 5). */
  readonly lanes?: number;
}

const odd = (i: number): boolean => i % 2 === 1;
const half = Math.floor(N / 2);

const faults: Fault[] = [
  { name: 'no fault', setup: async (p) => ({ lmtpPort: p }), expect: { '2xx': N } },
  { name: 'mailstore down', setup: async () => ({ lmtpPort: await deadPort() }), expect: { '4xx': N } },
  {
    name: 'mailstore slow (every reply held 40 ms)',
    lanes: N,
    setup: async (p) => {
      const px = await proxy(p, { kind: 'slow', delay: 40 });
      return { lmtpPort: px.port, close: px.close };
    },
    expect: { '2xx': N },
  },
  {
    name: 'mailstore reset mid-DATA (every 3rd transaction)',
    setup: async (p) => {
      const px = await proxy(p, { kind: 'cut-in-data', every: 3, afterBytes: 200 });
      return { lmtpPort: px.port, close: px.close };
    },
    expect: { '2xx': N - Math.floor(N / 3), '4xx': Math.floor(N / 3) },
  },
  {
    name: 'milter down (tempfail)',
    setup: async (p) => ({ lmtpPort: p, milters: [connectMilter(`inet:127.0.0.1:${await deadPort()}`, { name: 'down', connectTimeout: 500 })] }),
    expect: { '4xx': N },
  },
  {
    name: 'milter slow at end of message (odd messages over contentTimeout)',
    lanes: N,
    setup: async (p) => {
      const f = await fakeFilter((cmd, c) => {
        if (cmd.type !== 'bodyEob' || !odd(c.index)) return false;
        setTimeout(() => c.reply({ type: 'continue' }), 2500);
        return true;
      });
      // 1 s: far above what a prompt reply takes on a loaded CI machine, far below 2.5 s.
      return { lmtpPort: p, milters: [connectMilter(`inet:127.0.0.1:${f.port}`, { name: 'slow', contentTimeout: 1000 })], close: f.close };
    },
    expect: { '2xx': N - half, '4xx': half },
  },
  {
    name: 'milter garbage (odd messages: an unknown reply at MAIL)',
    setup: async (p) => {
      const f = await fakeFilter((cmd, c) => {
        if (cmd.type !== 'mail' || !odd(c.index)) return false;
        c.raw(encodeFrame('Z', Buffer.from('junk')));
        return true;
      });
      return { lmtpPort: p, milters: [connectMilter(`inet:127.0.0.1:${f.port}`, { name: 'garbage' })], close: f.close };
    },
    expect: { '2xx': N - half, '4xx': half },
  },
  {
    name: 'milter edit flood (odd messages: 1500 addHeader)',
    setup: async (p) => {
      const f = await fakeFilter((cmd, c) => {
        if (cmd.type !== 'bodyEob' || !odd(c.index)) return false;
        for (let k = 0; k < 1500; k++) c.reply({ type: 'addHeader', name: 'X-Many', value: String(k) });
        c.reply({ type: 'continue' });
        return true;
      });
      return { lmtpPort: p, milters: [connectMilter(`inet:127.0.0.1:${f.port}`, { name: 'flood' })], close: f.close };
    },
    expect: { '2xx': N - half, '4xx': half },
  },
  {
    name: 'dnsbl: DNS timeout and SERVFAIL (default: not a reject)',
    lanes: N,
    setup: async (p) => {
      dns.behave('1.0.0.127.servfail-m.example', { fail: 'servfail' });
      dns.behave('1.0.0.127.timeout-m.example', { fail: 'timeout' });
      const resolver = dns.resolver({ timeout: 5000 });
      resolvers.push(resolver);
      return { lmtpPort: p, milters: [dnsbl({ resolver, zones: ['servfail-m.example', 'timeout-m.example'], timeout: 300, cache: false })] };
    },
    expect: { '2xx': N },
  },
  {
    name: 'client reset mid-DATA (odd messages)',
    setup: async (p) => ({ lmtpPort: p }),
    reset: odd,
    expect: { '2xx': N - half, none: half },
  },
];

async function runFault(t: TestContext, fault: Fault): Promise<void> {
  const dir = await fs.mkdtemp(path.join(base, 'case-'));
  const root = path.join(dir, 'store');
  await fs.mkdir(root);
  const store: LmtpServer = await createLmtpServer({ root, listen: { host: '127.0.0.1', port: 0 }, fsync: false });
  const storePort = 'port' in store.address ? store.address.port : 0;
  const f = await fault.setup(storePort);
  const transport: LmtpTransport = lmtp({ port: f.lmtpPort, timeouts: { connect: 2000 } });
  const queue: DeliveryQueue = createQueue({ dir: path.join(dir, 'queue'), transport, hostname: 'mx.test', backoff: { min: 100, max: 400 }, scanInterval: 50 });
  await queue.start();
  let gw: TestGateway | undefined;
  try {
    gw = await startGateway({ delivery: transport, queue, milters: f.milters ?? [] });
    const port = gw.port;
    // `lanes` clients at a time, each message on its own connection (the greeting takes
    // ~100 ms: one after the other, 20 messages would take 2 s per fault).
    const codes: number[] = [];
    let next = 0;
    const lane = async (): Promise<void> => {
      while (next < N) {
        const i = next++;
        codes[i] = await attempt(port, i, { resetMidData: fault.reset?.(i) });
      }
    };
    await Promise.all(Array.from({ length: fault.lanes ?? 5 }, lane));
    // A reset session ends on the gateway's side a little later; a cut LMTP transaction
    // would be seen by the store at once. Neither may leave a copy: give them time to (not) appear.
    await new Promise((r) => setTimeout(r, 200));

    const entries = await queue.list();
    const inQueue = (addr: string): boolean => entries.some((e) => e.kind === 'message' && e.recipients.some((r) => r.address === addr && r.status === 'deferred'));
    const dsns = entries.filter((e) => e.kind === 'dsn');
    const ledger: Ledger = { sent: N, '2xx': 0, '4xx': 0, '5xx': 0, none: 0, stored: 0, queued: 0, dsn: dsns.length, lost: 0 };
    const wrong: string[] = [];
    for (let i = 0; i < N; i++) {
      const addr = `m${i}@example.test`;
      const code = codes[i]!;
      const copies = (await stored(root, addr)).length;
      const queued = inQueue(addr);
      const cls = code === 0 ? 'none' : code >= 500 ? '5xx' : code >= 400 ? '4xx' : '2xx';
      ledger[cls]++;
      if (copies) ledger.stored++;
      if (queued) ledger.queued++;
      if (cls === '2xx' && copies === 0 && !queued) {
        ledger.lost++;
        wrong.push(`#${i}: answered ${code}, neither stored nor queued`);
      }
      if (cls === '2xx' && copies > 1) wrong.push(`#${i}: stored ${copies} times`);
      if (cls !== '2xx' && (copies || queued)) wrong.push(`#${i}: answered ${code || 'nothing'} but ${copies ? 'stored' : 'queued'}`);
    }
    const line = ledgerLine(fault.name, ledger);
    t.diagnostic(line);
    ledgers.push(line);
    assert.deepEqual(wrong, [], line);
    assert.equal(ledger.lost, 0);
    assert.equal(ledger.dsn, 0, 'single recipients: nothing is mixed, so no DSN');
    for (const [k, v] of Object.entries(fault.expect)) assert.equal(ledger[k as keyof Ledger], v, `${k}: ${line}`);
    assert.equal(ledger['2xx'] + ledger['4xx'] + ledger['5xx'] + ledger.none, N);
  } finally {
    await gw?.close();
    await queue.close();
    await transport.close();
    await f.close?.();
    await store.close();
  }
}

describe('fault matrix: every message answered 2xx is stored, queued or in a DSN; nothing else is', { timeout: 120_000 }, () => {
  for (const fault of faults) it(fault.name, (t) => runFault(t, fault));

  it('gateway SIGKILLed mid-DATA and after its 250s: after restart every acknowledged message is delivered, the cut one is nowhere', async (t) => {
    const dir = await fs.mkdtemp(path.join(base, 'kill-'));
    const mail = path.join(dir, 'mail');
    await fs.mkdir(mail);
    // While the flag exists the fixture defers `later@…`: odd messages (bob + later) are
    // mixed, answered 250 and half queued; even ones go to bob only and are stored at once.
    await fs.writeFile(path.join(dir, 'flag'), 'defer later@\n');
    const children: Child[] = [];
    try {
      const first = await startChild(FIXTURE, [dir]);
      children.push(first);
      const c = await ehlo(first.port);
      const codes: number[] = [];
      for (let i = 0; i < N; i++) {
        const to = odd(i) ? [`k${i}@example.test`, 'later@example.test'] : [`k${i}@example.test`];
        const r = await send(c, 'alice@sender.test', to, message(`kill ${i}`));
        codes.push(r.data?.code ?? 0);
      }
      c.end();
      assert.deepEqual(codes, Array(N).fill(250));
      // One more, cut by the kill in the middle of its DATA.
      const cut = await ehlo(first.port);
      assert.equal((await cut.cmd('MAIL FROM:<alice@sender.test>')).code, 250);
      assert.equal((await cut.cmd('RCPT TO:<cut@example.test>')).code, 250);
      assert.equal((await cut.cmd('DATA')).code, 354);
      cut.write(message('cut mid-DATA', 'half a message\r\n'.repeat(200)).slice(0, 1500));
      await new Promise((r) => setTimeout(r, 50));
      first.process.kill('SIGKILL');
      assert.equal(await first.exited, 'SIGKILL');
      await cut.waitClosed();

      await fs.rm(path.join(dir, 'flag'));
      const second = await startChild(FIXTURE, [dir]);
      children.push(second);
      const laterWanted = half;
      await waitFor('the queued recipients after restart', async () => (await stored(mail, 'later@example.test')).length >= laterWanted);
      await waitFor('the queue to empty', async () => (await fs.readdir(path.join(dir, 'queue', 'active'))).length === 0);
      let storedCount = 0;
      let lost = 0;
      for (let i = 0; i < N; i++) {
        const n = (await stored(mail, `k${i}@example.test`)).length;
        assert.equal(n, 1, `k${i} exactly once`);
        storedCount += n;
      }
      const later = (await stored(mail, 'later@example.test')).map((m) => /Subject: kill (\d+)/.exec(m.toString('latin1'))?.[1]);
      for (let i = 1; i < N; i += 2) if (!later.includes(String(i))) lost++;
      assert.equal(lost, 0);
      assert.equal((await stored(mail, 'cut@example.test')).length, 0, 'the message cut mid-DATA is not delivered');
      const line = ledgerLine('gateway SIGKILLed mid-DATA and after 250', {
        sent: N + 1,
        '2xx': codes.filter((x) => x === 250).length,
        '4xx': 0,
        '5xx': 0,
        none: 1,
        stored: storedCount + later.length,
        queued: 0,
        dsn: 0,
        lost,
      });
      t.diagnostic(`${line} (recipients stored after restart; ${half} were queued at the kill)`);
      ledgers.push(line);
      second.process.kill('SIGTERM');
      assert.equal(await second.exited, 0);
    } finally {
      for (const ch of children) if (ch.process.exitCode === null && ch.process.signalCode === null) ch.process.kill('SIGKILL');
      await Promise.all(children.map((ch) => ch.exited));
    }
  });

  it('summary', (t) => {
    for (const l of ledgers) t.diagnostic(l);
  });
});
