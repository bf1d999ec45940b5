/**
 * The gateway benchmark: bare smtp-server, the gateway without milters, the gateway with a
 * few in-process milters, the gateway storing into a real Maildir with fsync, and the
 * gateway with the default MX chain (the five bundled milters of examples/mx-gateway.ts), measured
 * in one run, interleaved round by round (each round runs every target once, the starting
 * target rotating) so machine noise falls on all of them alike. Every number is also given
 * as a ratio to bare smtp-server in the same round, as a median with its min–max spread;
 * the `gateway+…` targets also as a ratio to the plain gateway in the same round.
 *
 * Connections are opened once per target and reused (smtp-server delays each greeting by
 * 100 ms); connect+greeting and EHLO are reported apart. Per message: latency from MAIL to
 * the final 250 (MAIL/RCPT/DATA pipelined). Per round: messages per second over the wall
 * time, and the servers' event-loop busy time per message (ELU of this thread, where all
 * the servers run; the load generator runs in a worker, bench/load.ts).
 *
 *   node dist/bench/gateway.js [--rounds 10] [--messages 400] [--concurrency 8]
 *     [--size 4096] [--large] [--large-size 1048576] [--large-messages 6]
 *     [--warmup 2] [--rcpts 1] [--targets a,b] [--maildir-dir DIR] [--json]
 *
 * Everything runs on 127.0.0.1 with bounded loops; a watchdog (`--timeout`, seconds) ends
 * the process if anything hangs. It does not tune the machine, pin CPUs, or run GC between
 * rounds; the spread is there to show how much that matters.
 */
import os from 'node:os';
import path from 'node:path';
import { performance, type EventLoopUtilization } from 'node:perf_hooks';
import { parseArgs } from 'node:util';
import type { OpenResult, RunResult } from './load.js';
import { Load } from './load-client.js';
import { fsType } from './proc.js';
import { buildMessage, wireData } from './message.js';
import { concat, intArg, percentile, spread, type Spread } from './stats.js';
import { BASELINE, GATEWAY, TARGETS, startTarget, type Target, type TargetName } from './targets.js';
import { enableLogging, enableMetrics } from '../lib/observe/index.js';

// ---------------------------------------------------------------- options

const OPTIONS = {
  rounds: { type: 'string', default: '10' },
  messages: { type: 'string', default: '400' },
  concurrency: { type: 'string', default: '8' },
  size: { type: 'string', default: '4096' },
  large: { type: 'boolean', default: false },
  'large-size': { type: 'string', default: String(1024 * 1024) },
  'large-messages': { type: 'string', default: '6' },
  warmup: { type: 'string', default: '2' },
  rcpts: { type: 'string', default: '1' },
  targets: { type: 'string', default: TARGETS.join(',') },
  'maildir-dir': { type: 'string' },
  timeout: { type: 'string', default: '600' },
  json: { type: 'boolean', default: false },
  observe: { type: 'boolean', default: false },
  help: { type: 'boolean', short: 'h', default: false },
} as const;

function parse(): ReturnType<typeof parseArgs<{ options: typeof OPTIONS; strict: true }>>['values'] {
  try {
    return parseArgs({ options: OPTIONS, strict: true }).values;
  } catch (err) {
    process.stderr.write(`${err instanceof Error ? err.message : String(err)} (see --help)\n`);
    process.exit(64);
  }
}
const args = parse();

if (args.help) {
  process.stdout.write(
    [
      'usage: node dist/bench/gateway.js [options]',
      '  --rounds N          measured rounds (default 10)',
      '  --messages N        messages per connection per round (default 400)',
      '  --concurrency N     client connections per target (default 8)',
      '  --size BYTES        message size (default 4096)',
      '  --large             also run a 1 MiB phase (--large-size, --large-messages, default 6)',
      '  --warmup N          unmeasured rounds first (default 2)',
      '  --rcpts N           recipients per message (default 1)',
      `  --targets LIST      comma-separated subset of ${TARGETS.join(',')} (ratios need ${BASELINE})`,
      '  --maildir-dir DIR   where the maildir target writes (default os.tmpdir())',
      '  --timeout SECONDS   watchdog for the whole run (default 600)',
      '  --json              machine-readable output only',
      '  --observe           enableLogging (to /dev/null) and enableMetrics for the whole run (compare its ratios with a run without)',
      '',
    ].join('\n'),
  );
  process.exit(0);
}

const int = intArg;

const opts = {
  rounds: int('rounds', args.rounds, 1),
  messages: int('messages', args.messages, 1),
  concurrency: int('concurrency', args.concurrency, 1),
  size: int('size', args.size, 1),
  large: args.large,
  largeSize: int('large-size', args['large-size'], 1),
  largeMessages: int('large-messages', args['large-messages'], 1),
  warmup: int('warmup', args.warmup, 0),
  rcpts: int('rcpts', args.rcpts, 1),
  timeoutS: int('timeout', args.timeout, 1),
  json: args.json,
  maildirDir: args['maildir-dir'],
  observe: args.observe,
};
const targetNames = (args.targets ?? '').split(',').filter(Boolean) as TargetName[];
for (const t of targetNames) {
  if (!(TARGETS as readonly string[]).includes(t)) {
    process.stderr.write(`unknown target ${t} (targets: ${TARGETS.join(', ')})\n`);
    process.exit(64);
  }
}
// Without the baseline (e.g. `--targets gateway` for a CPU profile of the gateway alone) no ratios are given.
const withBaseline = targetNames.includes(BASELINE);
const withGateway = targetNames.includes(GATEWAY);

// A hang anywhere ends the run rather than the machine's patience.
const watchdog = setTimeout(() => {
  process.stderr.write(`bench: watchdog: not done after ${opts.timeoutS} s, giving up\n`);
  process.exit(2);
}, opts.timeoutS * 1000);
watchdog.unref();

const log = (line: string): void => {
  if (!opts.json) process.stderr.write(line + '\n');
};

// ---------------------------------------------------------------- measuring

interface RoundSample {
  readonly round: number;
  readonly messages: number;
  readonly elapsedMs: number;
  readonly msgsPerSec: number;
  readonly p50: number;
  readonly p99: number;
  /** This thread's (the servers') busy time per message, µs. */
  readonly serverUsPerMsg: number;
  readonly serverElu: number;
  readonly clientElu: number;
  readonly latencies: Float64Array;
}

interface TargetSummary {
  readonly name: TargetName;
  readonly description: string;
  readonly msgsPerSec: Spread;
  /** Throughput / baseline throughput, per round. */
  readonly throughputRatio: Spread;
  /** Latencies pooled over every measured round, ms. */
  readonly p50: number;
  readonly p99: number;
  /** p50 / baseline p50, per round. */
  readonly p50Ratio: Spread;
  readonly serverUsPerMsg: Spread;
  /** Server busy µs per message / baseline's, per round. */
  readonly costRatio: Spread;
  /** The same three against the plain gateway, per round (NaN without it). */
  readonly gatewayThroughputRatio: Spread;
  readonly gatewayP50Ratio: Spread;
  readonly gatewayCostRatio: Spread;
  /** Server busy µs per message minus the plain gateway's, per round. */
  readonly gatewayExtraUs: Spread;
  /** DNS queries per measured message, for targets whose milters use DNS. */
  readonly dnsQueriesPerMsg?: number;
  readonly clientElu: Spread;
  readonly rounds: Omit<RoundSample, 'latencies'>[];
}

interface Phase {
  readonly size: number;
  /** The bytes actually sent (a target's prepareMessage, e.g. DKIM signing, may change the size). */
  readonly sentSize: number;
  readonly connections: number;
  readonly messagesPerConnection: number;
  readonly rounds: number;
  readonly targets: TargetSummary[];
}

async function runPhase(load: Load, targets: Target[], size: number, messages: number): Promise<Phase> {
  let msg = buildMessage(size);
  // Once, before the rounds: every target gets the same bytes (signed for gateway+mx-chain).
  for (const t of targets) if (t.prepareMessage) msg = await t.prepareMessage(msg);
  if (msg.length !== size) log(`  message prepared by ${targets.filter((t) => t.prepareMessage).map((t) => t.name).join(', ')}: ${msg.length} bytes`);
  await load.call({ op: 'message', data: wireData(msg), size: msg.length, recipients: opts.rcpts });
  const dnsAt = new Map<TargetName, number>();
  const samples = new Map<TargetName, RoundSample[]>(targets.map((t) => [t.name, []]));
  const total = opts.warmup + opts.rounds;
  // Generous per-run deadline: 20 ms a message per connection (a slow fsync disk), at least 30 s.
  const timeoutMs = Math.max(30_000, messages * 20 + (size / 1e6) * 2_000 * messages);
  for (let r = 0; r < total; r++) {
    const warm = r < opts.warmup;
    if (r === opts.warmup) for (const t of targets) if (t.dnsQueries) dnsAt.set(t.name, await t.dnsQueries());
    // Interleaved: every target once per round; the first one rotates so none always follows the disk.
    const order = targets.map((_, i) => targets[(i + r) % targets.length]!);
    const line: string[] = [];
    for (const t of order) {
      const elu0: EventLoopUtilization = performance.eventLoopUtilization();
      const res = await load.call<RunResult>({ op: 'run', target: t.name, messages, timeoutMs });
      const elu = performance.eventLoopUtilization(elu0);
      const n = res.latencies.length;
      const sample: RoundSample = {
        round: r - opts.warmup,
        messages: n,
        elapsedMs: res.elapsedMs,
        msgsPerSec: (n / res.elapsedMs) * 1000,
        p50: percentile(res.latencies, 50),
        p99: percentile(res.latencies, 99),
        serverUsPerMsg: (elu.active * 1000) / n,
        serverElu: elu.utilization,
        clientElu: res.clientElu,
        latencies: res.latencies,
      };
      if (!warm) samples.get(t.name)!.push(sample);
      line.push(`${t.name} ${Math.round(sample.msgsPerSec)}/s`);
    }
    log(`  ${warm ? 'warm-up' : `round ${r - opts.warmup + 1}/${opts.rounds}`}: ${line.join(', ')}`);
  }

  const dnsPerMsg = new Map<TargetName, number>();
  for (const t of targets) {
    const before = dnsAt.get(t.name);
    if (t.dnsQueries && before !== undefined) dnsPerMsg.set(t.name, ((await t.dnsQueries()) - before) / (opts.rounds * opts.concurrency * messages));
  }
  const base = samples.get(BASELINE);
  const perRound = (s: RoundSample[], f: (x: RoundSample, b: RoundSample) => number): number[] =>
    base ? s.map((x, i) => f(x, base[i]!)) : [];
  const gw = samples.get(GATEWAY);
  const perGatewayRound = (s: RoundSample[], f: (x: RoundSample, b: RoundSample) => number): number[] =>
    gw ? s.map((x, i) => f(x, gw[i]!)) : [];
  const summaries = targets.map((t): TargetSummary => {
    const s = samples.get(t.name)!;
    const dns = dnsPerMsg.get(t.name);
    const all = concat(s.map((x) => x.latencies));
    return {
      name: t.name,
      description: t.description,
      msgsPerSec: spread(s.map((x) => x.msgsPerSec)),
      throughputRatio: spread(perRound(s, (x, b) => x.msgsPerSec / b.msgsPerSec)),
      p50: percentile(all, 50),
      p99: percentile(all, 99),
      p50Ratio: spread(perRound(s, (x, b) => x.p50 / b.p50)),
      serverUsPerMsg: spread(s.map((x) => x.serverUsPerMsg)),
      costRatio: spread(perRound(s, (x, b) => x.serverUsPerMsg / b.serverUsPerMsg)),
      gatewayThroughputRatio: spread(perGatewayRound(s, (x, b) => x.msgsPerSec / b.msgsPerSec)),
      gatewayP50Ratio: spread(perGatewayRound(s, (x, b) => x.p50 / b.p50)),
      gatewayCostRatio: spread(perGatewayRound(s, (x, b) => x.serverUsPerMsg / b.serverUsPerMsg)),
      gatewayExtraUs: spread(perGatewayRound(s, (x, b) => x.serverUsPerMsg - b.serverUsPerMsg)),
      ...(dns !== undefined ? { dnsQueriesPerMsg: dns } : {}),
      clientElu: spread(s.map((x) => x.clientElu)),
      rounds: s.map(({ latencies: _l, ...rest }) => rest),
    };
  });
  return { size, sentSize: msg.length, connections: opts.concurrency, messagesPerConnection: messages, rounds: opts.rounds, targets: summaries };
}

// ---------------------------------------------------------------- facts about the machine


const mb = (n: number): number => Math.round((n / 1024 / 1024) * 10) / 10;

// ---------------------------------------------------------------- output

const f0 = (n: number): string => (Number.isNaN(n) ? '–' : Math.round(n).toLocaleString('en-US'));
const f2 = (n: number): string => (Number.isNaN(n) ? '–' : n.toFixed(2));
const range = (s: Spread, f: (n: number) => string): string => (Number.isNaN(s.median) ? '–' : `${f(s.median)} [${f(s.min)}–${f(s.max)}]`);

function table(rows: string[][]): string {
  const widths = rows[0]!.map((_, c) => Math.max(...rows.map((r) => (r[c] ?? '').length)));
  return rows.map((r) => r.map((cell, c) => (c === 0 ? cell.padEnd(widths[c]!) : cell.padStart(widths[c]!))).join('  ')).join('\n');
}

function printPhase(p: Phase): void {
  const out = process.stdout;
  const sent = p.sentSize !== p.size ? ` (${p.sentSize.toLocaleString('en-US')} bytes as sent, DKIM-signed)` : '';
  out.write(`\n## ${p.size.toLocaleString('en-US')}-byte message${sent}: ${p.connections} connections × ${p.messagesPerConnection} messages × ${p.rounds} rounds\n\n`);
  const rows = [
    ['target', 'msgs/s [min–max]', `×${BASELINE} [min–max]`, 'p50 ms', 'p99 ms', `p50 ×${BASELINE}`, 'server µs/msg', `cost ×${BASELINE}`, 'client ELU'],
  ];
  for (const t of p.targets) {
    rows.push([
      t.name,
      range(t.msgsPerSec, f0),
      range(t.throughputRatio, f2),
      f2(t.p50),
      f2(t.p99),
      f2(t.p50Ratio.median),
      f0(t.serverUsPerMsg.median),
      range(t.costRatio, f2),
      f2(t.clientElu.median),
    ]);
  }
  out.write(table(rows) + '\n');
  const added = p.targets.filter((t) => t.name !== GATEWAY && t.name.startsWith(`${GATEWAY}+`));
  if (withGateway && added.length) {
    out.write(`\nagainst the plain ${GATEWAY} (same round):\n\n`);
    const g = [['target', `msgs/s ×${GATEWAY} [min–max]`, `p50 ×${GATEWAY}`, `cost ×${GATEWAY} [min–max]`, 'extra server µs/msg [min–max]', 'DNS queries/msg']];
    for (const t of added) {
      g.push([
        t.name,
        range(t.gatewayThroughputRatio, f2),
        f2(t.gatewayP50Ratio.median),
        range(t.gatewayCostRatio, f2),
        range(t.gatewayExtraUs, f0),
        t.dnsQueriesPerMsg === undefined ? '' : f2(t.dnsQueriesPerMsg),
      ]);
    }
    out.write(table(g) + '\n');
  }
  const busy = p.targets.filter((t) => t.clientElu.median > 0.9).map((t) => t.name);
  if (busy.length) out.write(`note: the load generator was >90% busy for ${busy.join(', ')}: those numbers are client-bound.\n`);
}

// ---------------------------------------------------------------- main

async function main(): Promise<void> {
  const rssBefore = process.memoryUsage();
  const machine = {
    cpus: os.availableParallelism(),
    cpuModel: os.cpus()[0]?.model ?? 'unknown',
    memoryGiB: Math.round(os.totalmem() / 1024 ** 3),
    node: process.version,
    platform: `${process.platform} ${process.arch}`,
    maildirFs: fsType(opts.maildirDir ?? os.tmpdir()),
    maildirDir: path.resolve(opts.maildirDir ?? os.tmpdir()),
  };
  log(`bench: ${machine.cpus} CPUs (${machine.cpuModel}), node ${machine.node}; targets ${targetNames.join(', ')}`);
  if (!withBaseline) log(`bench: ${BASELINE} not among the targets: no ratios`);

  // Logs and metrics are process-wide subscribers: they weigh on every gateway target of the run.
  const observing = opts.observe ? { logging: enableLogging({ destination: '/dev/null', sync: false }), metrics: enableMetrics() } : undefined;
  if (observing) log('bench: logging (pino to /dev/null) and metrics (prom-client) enabled');
  const targets: Target[] = [];
  const load = new Load();
  let failed: unknown;
  const greeting: Record<string, { greetingMs: Spread; ehloMs: Spread }> = {};
  const phases: Phase[] = [];
  try {
    for (const name of targetNames) targets.push(await startTarget(name, opts.maildirDir ? { maildirParent: opts.maildirDir } : {}));
    for (const t of targets) {
      const r = await load.call<OpenResult>({ op: 'open', target: t.name, port: t.port, connections: opts.concurrency });
      greeting[t.name] = { greetingMs: spread(r.greetingMs), ehloMs: spread(r.ehloMs) };
    }
    log(`phase: ${opts.size}-byte messages`);
    phases.push(await runPhase(load, targets, opts.size, opts.messages));
    if (opts.large) {
      log(`phase: ${opts.largeSize}-byte messages`);
      phases.push(await runPhase(load, targets, opts.largeSize, opts.largeMessages));
    }
  } catch (err) {
    failed = err;
  } finally {
    await load.call({ op: 'close' }).catch(() => undefined);
    await load.worker.terminate();
    for (const t of targets) await t.close().catch((err: unknown) => (failed ??= err));
    observing?.logging.close();
    observing?.metrics.close();
  }
  if (failed) {
    process.stderr.write(`bench failed: ${failed instanceof Error ? failed.message : String(failed)}\n`);
    process.exitCode = 1;
    return;
  }
  const rssAfter = process.memoryUsage();
  const memory = {
    rssBeforeMiB: mb(rssBefore.rss),
    rssAfterMiB: mb(rssAfter.rss),
    maxRssMiB: Math.round((process.resourceUsage().maxRSS / 1024) * 10) / 10,
    heapUsedAfterMiB: mb(rssAfter.heapUsed),
  };

  if (opts.json) {
    process.stdout.write(JSON.stringify({ machine, options: opts, targets: targetNames, greeting, phases, memory }, null, 2) + '\n');
    return;
  }
  const out = process.stdout;
  out.write(`# dovetail gateway bench\n\n`);
  out.write(`machine: ${machine.cpus} CPUs (${machine.cpuModel}), ${machine.memoryGiB} GiB, node ${machine.node}, ${machine.platform}\n`);
  out.write(`maildir target writes to ${machine.maildirDir} (${machine.maildirFs}), fsync on\n`);
  out.write(`recipients per message: ${opts.rcpts}; warm-up rounds: ${opts.warmup}; order rotates each round\n`);
  out.write(`\n## connect + greeting (once per connection, excluded from the rounds)\n\n`);
  const g = [['target', 'connect→220 ms [min–max]', 'EHLO ms [min–max]']];
  for (const t of targets) {
    const x = greeting[t.name]!;
    g.push([t.name, range(x.greetingMs, f2), range(x.ehloMs, f2)]);
  }
  out.write(table(g) + '\n');
  for (const p of phases) printPhase(p);
  out.write(
    `\nmsgs/s: wall-clock throughput per round (median [min–max] over rounds); ×${BASELINE}: the same round's ratio to ${BASELINE};\n` +
      `p50/p99: MAIL→final 250 latency, pooled over rounds; server µs/msg: busy time of the servers' event loop per message.\n`,
  );
  out.write(
    `\nRSS: ${memory.rssBeforeMiB} MiB before, ${memory.rssAfterMiB} MiB after, ${memory.maxRssMiB} MiB peak (process, load-generator worker included); heap used after: ${memory.heapUsedAfterMiB} MiB\n`,
  );
}

await main();
