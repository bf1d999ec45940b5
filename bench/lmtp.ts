/**
 * The LMTP delivery benchmark: gateway → lmtp() throughput into the embedded store
 * (createLmtpServer → maildir(), fsync on) and into a real Dovecot LMTP (started here in a
 * private directory, as the interop test does), in the same run, interleaved round by round
 * with two references: the gateway with the null transport (the ceiling, no delivery) and
 * the gateway with maildir() directly (the same disk work without LMTP in between).
 *
 * The load generator is bench/load.ts in a worker: C SMTP connections per target, opened
 * once and reused, each message a pipelined MAIL/RCPT/DATA group; the gateway's lmtp()
 * pool (default 4 connections) carries the C client connections' messages. Per target:
 * messages/s (median [min–max] over rounds), the same round's ratio to the null gateway,
 * p50/p99 latency MAIL → final 250, and the LMTP pool's counters.
 *
 *   node dist/bench/lmtp.js [--rounds 5] [--messages 200] [--concurrency 8] [--size 4096]
 *     [--rcpts 1] [--max-connections 4] [--no-dovecot] [--json]
 *
 * It needs Dovecot (dovecot-core, dovecot-lmtpd) unless --no-dovecot. It does not tune the
 * machine; Dovecot runs with its defaults plus mail_save_crlf (fsync as Dovecot does it:
 * fsync_mode=optimized).
 */
import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { parseArgs } from 'node:util';
import { Worker } from 'node:worker_threads';
import { createGateway, maildir } from '../lib/index.js';
import { lmtp, type LmtpTransport } from '../lib/delivery/lmtp.js';
import { createLmtpServer } from '../lib/delivery/lmtp-server.js';
import { startDovecot, type Dovecot } from '../test/helpers/dovecot.js';
import type { OpenResult, Request, RunResult } from './load.js';
import { buildMessage, wireData } from './message.js';
import { nullTransport } from './null-transport.js';
import { percentile, spread, type Spread } from './stats.js';

const { values: args } = parseArgs({
  options: {
    rounds: { type: 'string', default: '5' },
    messages: { type: 'string', default: '200' },
    concurrency: { type: 'string', default: '8' },
    size: { type: 'string', default: '4096' },
    rcpts: { type: 'string', default: '1' },
    'max-connections': { type: 'string', default: '4' },
    warmup: { type: 'string', default: '1' },
    'no-dovecot': { type: 'boolean', default: false },
    json: { type: 'boolean', default: false },
  },
  strict: true,
});
const num = (v: string | undefined, min: number): number => {
  const n = Number(v);
  if (!Number.isSafeInteger(n) || n < min) throw new Error(`bad number ${v}`);
  return n;
};
const opts = {
  rounds: num(args.rounds, 1),
  messages: num(args.messages, 1),
  concurrency: num(args.concurrency, 1),
  size: num(args.size, 1),
  rcpts: num(args.rcpts, 1),
  maxConnections: num(args['max-connections'], 1),
  warmup: num(args.warmup, 0),
  dovecot: !args['no-dovecot'],
};
const log = (s: string): void => {
  if (!args.json) process.stderr.write(s + '\n');
};

const watchdog = setTimeout(() => {
  process.stderr.write('bench/lmtp: watchdog: not done after 600 s\n');
  process.exit(2);
}, 600_000);
watchdog.unref();

class Load {
  private next = 0;
  private readonly waiting = new Map<number, { resolve: (v: unknown) => void; reject: (e: Error) => void }>();
  readonly worker = new Worker(new URL('./load.js', import.meta.url));
  constructor() {
    this.worker.on('message', (m: { id: number; ok: boolean; result?: unknown; error?: string }) => {
      const w = this.waiting.get(m.id);
      this.waiting.delete(m.id);
      if (m.ok) w?.resolve(m.result);
      else w?.reject(new Error(m.error));
    });
  }
  call<R>(req: Request): Promise<R> {
    const id = this.next++;
    return new Promise<R>((resolve, reject) => {
      this.waiting.set(id, { resolve: resolve as (v: unknown) => void, reject });
      this.worker.postMessage({ ...req, id });
    });
  }
}

interface Target {
  readonly name: string;
  readonly description: string;
  readonly port: number;
  readonly transport?: LmtpTransport;
  close(): Promise<void>;
}

const common = { hostname: 'mx.bench.test', listen: { host: '127.0.0.1', port: 0 }, resolveClientNames: false, quarantine: nullTransport('q') } as const;

async function gatewayTarget(name: string, description: string, delivery: Parameters<typeof createGateway>[0]['delivery'], cleanup: () => Promise<void>): Promise<Target> {
  const gw = createGateway({ ...common, delivery });
  const [addr] = await gw.listen();
  return {
    name,
    description,
    port: addr!.port,
    ...(delivery.name === 'lmtp' ? { transport: delivery as LmtpTransport } : {}),
    async close() {
      await gw.close();
      await cleanup();
    },
  };
}

async function main(): Promise<void> {
  const base = await fs.mkdtemp(path.join(os.tmpdir(), 'dovetail-bench-lmtp-'));
  const targets: Target[] = [];
  let dovecot: Dovecot | undefined;
  const load = new Load();
  try {
    targets.push(await gatewayTarget('gateway+null', 'gateway, null transport (ceiling)', nullTransport(), async () => undefined));
    await fs.mkdir(path.join(base, 'direct'));
    targets.push(await gatewayTarget('gateway+maildir', 'gateway → maildir() directly (fsync)', maildir({ root: path.join(base, 'direct'), hostname: 'mx.bench.test' }), async () => undefined));
    await fs.mkdir(path.join(base, 'embedded'));
    const store = await createLmtpServer({ root: path.join(base, 'embedded'), listen: { host: '127.0.0.1', port: 0 } });
    const storePort = 'port' in store.address ? store.address.port : 0;
    targets.push(
      await gatewayTarget('lmtp→embedded', `gateway → lmtp(maxConnections ${opts.maxConnections}) → createLmtpServer (fsync), same process`, lmtp({ port: storePort, maxConnections: opts.maxConnections }), () => store.close()),
    );
    if (opts.dovecot) {
      const users = Array.from({ length: opts.rcpts }, (_, i) => ({ address: i === 0 ? 'bob@example.test' : `user${i}@example.test` }));
      dovecot = await startDovecot(users);
      targets.push(await gatewayTarget('lmtp→dovecot', `gateway → lmtp(maxConnections ${opts.maxConnections}) → Dovecot ${'2.3'} LMTP (own processes)`, lmtp({ port: dovecot.port, maxConnections: opts.maxConnections }), async () => undefined));
    }
    for (const t of targets) await load.call<OpenResult>({ op: 'open', target: t.name, port: t.port, connections: opts.concurrency });
    const msg = buildMessage(opts.size);
    await load.call({ op: 'message', data: wireData(msg), size: msg.length, recipients: opts.rcpts });

    const samples = new Map<string, { mps: number; lat: Float64Array }[]>(targets.map((t) => [t.name, []]));
    for (let r = 0; r < opts.warmup + opts.rounds; r++) {
      const order = targets.map((_, i) => targets[(i + r) % targets.length]!);
      const line: string[] = [];
      for (const t of order) {
        const res = await load.call<RunResult>({ op: 'run', target: t.name, messages: opts.messages, timeoutMs: 120_000 });
        const mps = (res.latencies.length / res.elapsedMs) * 1000;
        if (r >= opts.warmup) samples.get(t.name)!.push({ mps, lat: res.latencies });
        line.push(`${t.name} ${Math.round(mps)}/s`);
      }
      log(`  ${r < opts.warmup ? 'warm-up' : `round ${r - opts.warmup + 1}/${opts.rounds}`}: ${line.join(', ')}`);
    }
    const ceiling = samples.get('gateway+null')!;
    const rows = targets.map((t) => {
      const s = samples.get(t.name)!;
      const all = Float64Array.from(s.flatMap((x) => [...x.lat]));
      return {
        name: t.name,
        description: t.description,
        msgsPerSec: spread(s.map((x) => x.mps)),
        ratio: spread(s.map((x, i) => x.mps / ceiling[i]!.mps)),
        p50: percentile(all, 50),
        p99: percentile(all, 99),
        pool: t.transport?.stats(),
      };
    });
    if (args.json) {
      process.stdout.write(JSON.stringify({ options: opts, node: process.version, cpus: os.availableParallelism(), rows }, null, 2) + '\n');
      return;
    }
    const f = (s: Spread, d = 0): string => `${s.median.toFixed(d)} [${s.min.toFixed(d)}–${s.max.toFixed(d)}]`;
    const out = process.stdout;
    out.write(`# dovetail LMTP bench\n\n${os.availableParallelism()} CPUs (${os.cpus()[0]?.model ?? '?'}), node ${process.version}; ${opts.concurrency} SMTP connections × ${opts.messages} messages × ${opts.rounds} rounds, ${opts.size}-byte message, ${opts.rcpts} recipient(s)\n\n`);
    const table = [['target', 'msgs/s [min–max]', '×gateway+null', 'p50 ms', 'p99 ms', 'LMTP conns opened / reuses'], ...rows.map((r) => [r.name, f(r.msgsPerSec), f(r.ratio, 2), r.p50.toFixed(2), r.p99.toFixed(2), r.pool ? `${r.pool.opened} / ${r.pool.reused}` : '–'])];
    const widths = table[0]!.map((_, c) => Math.max(...table.map((row) => row[c]!.length)));
    out.write(table.map((row) => row.map((cell, c) => (c === 0 ? cell.padEnd(widths[c]!) : cell.padStart(widths[c]!))).join('  ')).join('\n') + '\n\n');
    for (const r of rows) out.write(`${r.name}: ${r.description}\n`);
  } finally {
    await load.call({ op: 'close' }).catch(() => undefined);
    await load.worker.terminate();
    for (const t of targets) await t.close().catch(() => undefined);
    await dovecot?.stop();
    await fs.rm(base, { recursive: true, force: true });
  }
}

await main();
