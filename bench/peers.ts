/**
 * The peers benchmark: dovetail next to the systems people would otherwise run — a bare
 * smtp-server, smtp-server hand-wired to nodemailer's LMTP pool, Haraka, Postfix — each in
 * its own process tree, measured in one run, interleaved round by round (each round runs
 * every target once, the first one rotating) so machine noise falls on all of them alike.
 *
 *   load (bench/load.ts, a worker of this process) ──SMTP──▶ system ──LMTP──▶ smtp-sink -L (one per system)
 *
 * Targets (`--only a,b` picks some; docs/benchmarks.md describes each):
 * - inbound, delivering over LMTP into a fresh `smtp-sink -L`: `smtp-server` (drains DATA,
 *   no delivery), `smtp-server+lmtp`, `dovetail`, `dovetail+quickstart`, `dovetail+mx` (the
 *   five bundled milters, message not DKIM-signed), `dovetail+quickstart-workers` (the quick
 *   start's chain as one worker process per core), `dovetail+mx-dkim` (the same, message
 *   signed with a key published on the bench's loopback DNS server, so mailAuth verifies
 *   it), `haraka` (Haraka 3.3.4 from bench/haraka: rcpt_to.in_host_list + queue/lmtp),
 *   `postfix` (smtpd → queue → lmtp).
 * - into a real mailstore: `dovetail>dovecot`, `postfix>dovecot` deliver over LMTP into a
 *   Dovecot of their own (test/helpers/dovecot.ts, Maildir) instead of the sink.
 * - outbound through a queue into an SMTP `smtp-sink`: `dovetail-outbound`, `postfix-outbound`
 *   (bench/outbound.ts's configuration).
 * - a milter behind Postfix: `postfix+serve-milter` (our serveMilter) and `postfix+libmilter`
 *   (python3-milter on the C libmilter), each adding one header at eom; the CPU is Postfix's
 *   tree plus the filter's process, and the bytes the filter read per message are counted.
 * - large messages: `dovetail-large`, `haraka-large`: N connections at once, one 10 MB
 *   message each; what matters is the peak RSS.
 *
 * Measured per target and round: accepted msg/s (the load generator's wall time until the
 * last 250), delivered msg/s (until the sink had them all), per-message latency MAIL→250
 * (p50/p99), CPU ms per message of the system's whole process tree (utime + stime + reaped
 * children, /proc, from the first MAIL until the sink had every message and the system's
 * queue was empty), and the tree's peak summed RSS (sampled every 100 ms; for one-process
 * systems also the kernel's VmHWM). Connections are opened before and closed after each
 * measured window, so connect, greeting (smtp-server holds it 100 ms) and EHLO are not in
 * it; connect→220 is reported apart. Ratios (dovetail ÷ peer) are taken round by round.
 *
 *   node dist/bench/peers.js [--smoke | --full] [--only a,b] [--rounds N] [--warmup N]
 *     [--connections N] [--messages N] [--size BYTES] [--large-count N] [--large-size BYTES]
 *     [--out FILE] [--no-docs] [--timeout S]
 *
 * Writes bench/results/peers-<profile>-<time>.json, prints a Markdown table, and (except
 * with --smoke or --no-docs) writes the table and an SVG chart into docs/benchmarks.md
 * between `<!-- peers:begin -->` and `<!-- peers:end -->` (the chart: docs/benchmarks-peers.svg).
 *
 * It needs root and the Debian packages postfix, dovecot-lmtpd and python3-milter (scripts/install-peers.sh),
 * and installs Haraka into bench/haraka/node_modules with npm when it is missing. Everything
 * it starts is stopped at the end, on error, on SIGINT/SIGTERM and by the watchdog.
 * It does not tune the machine, and it does not charge Dovecot's CPU to anyone.
 */
import { fork, spawn, spawnSync, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import fsp from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { performance } from 'node:perf_hooks';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { startDovecot } from '../test/helpers/dovecot.js';
import { startPostfix, requireBinary } from '../test/helpers/postfix.js';
import { PYTHON, REFERENCE_FILTER, requirePythonMilter } from '../test/helpers/libmilter.js';
import { freePort, waitForPort } from '../test/helpers/ports.js';
import type { OpenResult, RunResult } from './load.js';
import { Load } from './load-client.js';
import { buildMessage, wireData } from './message.js';
import { startMxChainFixture, withoutDkimSignatures, type MxChainFixture } from './mx-chain.js';
import type { SystemKind } from './peers-system.js';
import { bytesRead, fsType, mib, peakRss, stopChild, treeCpuMs, treeMemory, machineCpuMs, procCpuMs } from './proc.js';
import { lifecycle } from './lifecycle.js';
import { startSink, type Sink } from './sink.js';
import { concat, intArg, percentile, spread, type Spread } from './stats.js';

const HERE = path.dirname(fileURLToPath(import.meta.url)); // dist/bench
const REPO = path.resolve(HERE, '../..');
const HARAKA_DIR = path.join(REPO, 'bench/haraka');
const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

// ================================================================ targets

export const TARGET_NAMES = [
  'smtp-server',
  'smtp-server+lmtp',
  'dovetail',
  'dovetail+quickstart',
  'dovetail+quickstart-workers',
  'dovetail+mx',
  'dovetail+mx-dkim',
  'haraka',
  'postfix',
  'dovetail>dovecot',
  'postfix>dovecot',
  'dovetail-outbound',
  'postfix-outbound',
  'postfix+serve-milter',
  'postfix+libmilter',
  'dovetail-large',
  'haraka-large',
] as const;
export type TargetName = (typeof TARGET_NAMES)[number];
type Group = 'inbound' | 'dovecot' | 'outbound' | 'milter' | 'large';
type MessageKind = 'plain' | 'unsigned' | 'signed' | 'large';

interface TargetDef {
  readonly group: Group;
  readonly message: MessageKind;
  readonly description: string;
}

const TARGETS: Record<TargetName, TargetDef> = {
  'smtp-server': { group: 'inbound', message: 'plain', description: 'bare smtp-server, onData drains DATA, no delivery (the floor)' },
  'smtp-server+lmtp': { group: 'inbound', message: 'plain', description: 'smtp-server + nodemailer LMTP pool (pool: true, lmtp: true), hand-wired, 250 after the LMTP 250' },
  dovetail: { group: 'inbound', message: 'plain', description: 'createGateway(), no milters, lmtp() to the sink' },
  'dovetail+quickstart': { group: 'inbound', message: 'plain', description: "the quick start's chain (sizeLimit, relayControl, stamp, spamTag), lmtp()" },
  'dovetail+quickstart-workers': { group: 'inbound', message: 'plain', description: 'the same chain, one worker process per core (startWorkerPool; node:cluster shares the port)' },
  'dovetail+mx': { group: 'inbound', message: 'unsigned', description: 'the five bundled milters (examples/mx-gateway.ts), DNS on loopback, message not DKIM-signed, lmtp()' },
  'dovetail+mx-dkim': { group: 'inbound', message: 'signed', description: 'the same, message DKIM-signed (rsa-2048, key in the loopback DNS): mailAuth verifies it' },
  haraka: { group: 'inbound', message: 'plain', description: 'Haraka (one process): rcpt_to.in_host_list + queue/lmtp (its outbound queue, on disk)' },
  postfix: { group: 'inbound', message: 'plain', description: 'Postfix smtpd → queue → lmtp (defaults; smtpd_peername_lookup = no)' },
  'dovetail>dovecot': { group: 'dovecot', message: 'plain', description: 'createGateway(), no milters, lmtp() into a real Dovecot LMTP (Maildir; its CPU is not counted)' },
  'postfix>dovecot': { group: 'dovecot', message: 'plain', description: 'Postfix smtpd → queue → lmtp into a real Dovecot LMTP (Maildir; its CPU is not counted)' },
  'dovetail-outbound': { group: 'outbound', message: 'plain', description: 'createGateway() + createQueue() → smtp() relayhost to an SMTP smtp-sink (as bench/outbound.ts)' },
  'postfix-outbound': { group: 'outbound', message: 'plain', description: 'Postfix smtpd → queue → smtp relayhost to an SMTP smtp-sink (as bench/outbound.ts)' },
  'postfix+serve-milter': { group: 'milter', message: 'plain', description: 'Postfix with smtpd_milters → serveMilter() filter (RCPT continue, eom addHeader), lmtp to the sink' },
  'postfix+libmilter': { group: 'milter', message: 'plain', description: 'Postfix with smtpd_milters → python3-milter (C libmilter) filter doing the same, lmtp to the sink' },
  'dovetail-large': { group: 'large', message: 'large', description: 'createGateway(), no milters, lmtp(); per-client connection limit off' },
  'haraka-large': { group: 'large', message: 'large', description: 'Haraka as above' },
};

/** Ratios reported, a ÷ b, round by round. */
const PAIRS: readonly (readonly [TargetName, TargetName])[] = [
  ['dovetail', 'smtp-server'],
  ['dovetail', 'smtp-server+lmtp'],
  ['dovetail', 'haraka'],
  ['dovetail', 'postfix'],
  ['dovetail+quickstart', 'haraka'],
  ['dovetail+quickstart', 'postfix'],
  ['dovetail+quickstart-workers', 'dovetail+quickstart'],
  ['dovetail+mx', 'postfix'],
  ['dovetail+mx-dkim', 'dovetail+mx'],
  ['dovetail>dovecot', 'postfix>dovecot'],
  ['dovetail-outbound', 'postfix-outbound'],
  ['postfix+serve-milter', 'postfix+libmilter'],
  ['dovetail-large', 'haraka-large'],
];

// ================================================================ options

const PROFILES = {
  smoke: { rounds: 1, warmup: 0, connections: 2, messages: 3, largeCount: 2 },
  quick: { rounds: 3, warmup: 1, connections: 20, messages: 25, largeCount: 200 },
  full: { rounds: 5, warmup: 1, connections: 20, messages: 250, largeCount: 1000 },
} as const;

const OPTIONS = {
  peers: { type: 'boolean', default: false }, // `npm run bench -- --peers` (bench/run.ts) passes it on
  smoke: { type: 'boolean', default: false },
  full: { type: 'boolean', default: false },
  only: { type: 'string' },
  rounds: { type: 'string' },
  warmup: { type: 'string' },
  connections: { type: 'string' },
  messages: { type: 'string' },
  size: { type: 'string', default: '4096' },
  'large-count': { type: 'string' },
  'large-size': { type: 'string', default: String(10 * 1000 * 1000) },
  out: { type: 'string' },
  'no-docs': { type: 'boolean', default: false },
  note: { type: 'string' },
  report: { type: 'string' },
  timeout: { type: 'string' },
  help: { type: 'boolean', short: 'h', default: false },
} as const;

const USAGE = [
  'usage: npm run bench -- --peers [options]   (node dist/bench/peers.js; as root, needs postfix and python3-milter)',
  '  (default)            the quick profile: 20 connections × 25 messages, 1 warm-up + 3 rounds, 200 large messages',
  '  --full               20 × 250 messages, 1 + 5 rounds, 1000 large messages',
  '  --smoke              2 × 3 messages, 1 round, 2 large messages (the smoke test); no docs written',
  `  --only LIST          comma-separated targets: ${TARGET_NAMES.join(', ')}`,
  '  --rounds N, --warmup N, --connections N, --messages N (per connection)   override the profile',
  '  --size BYTES         message size (default 4096)',
  '  --large-count N      concurrent large messages; --large-size BYTES (default 10 000 000)',
  '  --out FILE           the JSON (default bench/results/peers-<profile>-<time>.json)',
  '  --no-docs            do not touch docs/benchmarks.md',
  '  --note TEXT          a sentence put above the tables (e.g. "provisional: a shared machine")',
  '  --report FILE        run nothing: write the docs from a JSON an earlier run wrote (with --note)',
  '  --timeout S          watchdog for the whole run (default 1800; --full 7200)',
  '',
].join('\n');

function parse(): ReturnType<typeof parseArgs<{ options: typeof OPTIONS; strict: true }>>['values'] {
  try {
    return parseArgs({ options: OPTIONS, strict: true }).values;
  } catch (err) {
    process.stderr.write(`${err instanceof Error ? err.message : String(err)}\n${USAGE}`);
    process.exit(64);
  }
}

// ================================================================ measuring

interface Sample {
  readonly round: number;
  readonly messages: number;
  readonly acceptedPerSec: number;
  readonly deliveredPerSec: number;
  readonly p50: number;
  readonly p99: number;
  readonly cpuMsPerMsg: number;
  readonly sysMsPerMsg: number;
  /** Peak of the tree's summed RSS over the window, bytes (and VmHWM of the root for one-process systems). */
  readonly peakRss: number;
  readonly procs: number;
  /** Bytes the milter filter process read per message (Postfix + filter targets). */
  readonly filterBytesPerMsg?: number;
  /** Machine busy time not accounted for by the system or the bench, ms per message. */
  readonly otherMsPerMsg: number;
  readonly greetingMs: number;
  readonly clientElu: number;
  readonly latencies: Float64Array;
}

interface System {
  readonly name: TargetName;
  readonly label: string;
  readonly port: number;
  readonly sink: Sink;
  /** The processes whose trees are measured (for Postfix + milter: the master and the filter). */
  readonly roots: readonly number[];
  /** One-process systems: its pid (VmHWM is read). */
  readonly single?: number;
  readonly filterPid?: number;
  /** False for the bare smtp-server: it delivers nothing, so "delivered" is "accepted". */
  readonly delivers: boolean;
  /** Files still queued (systems with a queue). */
  queued?(): Promise<number>;
}

/** Things started, newest last; stopped newest first. An entry leaves once stopped. */
async function countFiles(dir: string): Promise<number> {
  let n = 0;
  let entries: fs.Dirent[];
  try {
    entries = await fsp.readdir(dir, { withFileTypes: true });
  } catch {
    return 0;
  }
  for (const e of entries) n += e.isDirectory() ? await countFiles(path.join(dir, e.name)) : 1;
  return n;
}

function version(cmd: string, args: readonly string[], re: RegExp): string {
  const r = spawnSync(cmd, args, { encoding: 'utf8' });
  const m = re.exec(`${r.stdout ?? ''}${r.stderr ?? ''}`);
  return m?.[1] ?? 'not installed';
}

/** Runs npm in bench/haraka when Haraka is not installed there; resolves with its version. */
export async function ensureHaraka(log: (s: string) => void): Promise<string> {
  const pkg = path.join(HARAKA_DIR, 'node_modules/Haraka/package.json');
  if (!fs.existsSync(pkg)) {
    const lock = fs.existsSync(path.join(HARAKA_DIR, 'package-lock.json'));
    log(`haraka: not installed in ${HARAKA_DIR}; running npm ${lock ? 'ci' : 'install'} there (once)`);
    const npm = process.platform === 'win32' ? 'npm.cmd' : 'npm';
    const code = await new Promise<number | null>((resolve) => {
      const c = spawn(npm, [lock ? 'ci' : 'install', '--no-audit', '--no-fund', '--loglevel=error'], { cwd: HARAKA_DIR, stdio: ['ignore', 'inherit', 'inherit'] });
      c.on('exit', resolve);
      c.on('error', () => resolve(-1));
    });
    if (code !== 0 || !fs.existsSync(pkg)) throw new Error(`npm ${lock ? 'ci' : 'install'} in ${HARAKA_DIR} failed (${code}); Haraka targets need it (the npm registry)`);
  }
  return (JSON.parse(fs.readFileSync(pkg, 'utf8')) as { version: string }).version;
}

// ================================================================ main

/** Runs the harness with the process's command line (what `npm run bench -- --peers` does). */
export async function runPeers(): Promise<void> {
  const args = parse();
  if (args.help) {
    process.stdout.write(USAGE);
    return;
  }
  if (args.report !== undefined) {
    const saved = JSON.parse(await fsp.readFile(args.report, 'utf8')) as Result;
    const result = { ...saved, ...(args.note !== undefined ? { note: args.note } : {}), ratios: computeRatios(saved.targets) };
    process.stdout.write(markdown(result) + '\n');
    await writeReport(result, (line) => void process.stderr.write(line + '\n'));
    return;
  }
  const profileName = args.smoke ? 'smoke' : args.full ? 'full' : 'quick';
  const profile = PROFILES[profileName];
  const opts = {
    profile: profileName,
    rounds: args.rounds !== undefined ? intArg('rounds', args.rounds, 1) : profile.rounds,
    warmup: args.warmup !== undefined ? intArg('warmup', args.warmup, 0) : profile.warmup,
    connections: args.connections !== undefined ? intArg('connections', args.connections, 1) : profile.connections,
    messages: args.messages !== undefined ? intArg('messages', args.messages, 1) : profile.messages,
    size: intArg('size', args.size, 1),
    largeCount: args['large-count'] !== undefined ? intArg('large-count', args['large-count'], 1) : profile.largeCount,
    largeSize: intArg('large-size', args['large-size'], 1),
    timeoutS: args.timeout !== undefined ? intArg('timeout', args.timeout, 1) : args.full ? 7200 : 1800,
  };
  const names = (args.only ? args.only.split(',').filter(Boolean) : [...TARGET_NAMES]) as TargetName[];
  for (const n of names) {
    if (!(TARGET_NAMES as readonly string[]).includes(n)) {
      process.stderr.write(`unknown target ${n} (targets: ${TARGET_NAMES.join(', ')})\n`);
      process.exit(64);
    }
  }
  const writeDocs = !args.smoke && !args['no-docs'];
  const tty = process.stderr.isTTY;
  const log = (line: string): void => void process.stderr.write(`${tty ? '\r\x1b[K' : ''}${line}\n`);
  /** The one-line progress display (on a terminal; elsewhere nothing until a round ends, unless BENCH_VERBOSE is set). */
  const progress = (line: string): void => {
    if (tty) process.stderr.write(`\r\x1b[K${line.slice(0, (process.stderr.columns || 120) - 1)}`);
    else if (line && process.env['BENCH_VERBOSE']) process.stderr.write(`${line}\n`);
  };

  if (process.getuid?.() !== 0) throw new Error('bench/peers needs root (Postfix in a private directory, smtp-sink -u postfix)');
  const installHint = 'install the peers with scripts/install-peers.sh (Debian: postfix, python3-milter)';
  for (const bin of ['postfix', 'postconf', 'smtp-sink']) requireBinary(bin, installHint);
  if (names.includes('postfix+libmilter')) requirePythonMilter();

  // ---------------------------------------------------------------- cleanup, whatever happens

  const { track, forget, stopOne, stopAll, stopping, remaining } = lifecycle(log, opts.timeoutS);

  // ---------------------------------------------------------------- facts

  const needsHaraka = names.some((n) => n.startsWith('haraka'));
  const harakaVersion = needsHaraka ? await ensureHaraka(log) : (() => {
    try {
      return (JSON.parse(fs.readFileSync(path.join(HARAKA_DIR, 'node_modules/Haraka/package.json'), 'utf8')) as { version: string }).version;
    } catch {
      return 'not installed';
    }
  })();
  const machine = {
    cpus: os.availableParallelism(),
    cpuModel: os.cpus()[0]?.model ?? 'unknown',
    memoryGiB: Math.round(os.totalmem() / 1024 ** 3),
    kernel: os.release(),
    node: process.version,
    postfix: spawnSync('postconf', ['-dh', 'mail_version'], { encoding: 'utf8' }).stdout?.trim() || 'unknown',
    haraka: harakaVersion,
    dovecot: version('dovecot', ['--version'], /^(\S+)/),
    libmilter: version('dpkg-query', ['-W', '-f=${Version}', 'python3-milter'], /^(\S+)/),
    tmp: `${os.tmpdir()} (${fsType(os.tmpdir())})`,
  };

  // ---------------------------------------------------------------- starting systems

  let fixture: MxChainFixture | undefined;
  const dnsServer = async (): Promise<string> => {
    fixture ??= await startMxChainFixture();
    return fixture.server;
  };

  async function sinkFor(name: string, lmtpSink: boolean): Promise<Sink> {
    const sink = await startSink({ name, lmtp: lmtpSink });
    track({ name: `smtp-sink (${name})`, stop: () => sink.stop(), kill: () => sink.kill() });
    return sink;
  }

  /**
   * Dovecot LMTP (test/helpers/dovecot.ts) as the "sink": its count is the files in bob's
   * Maildir/new, polled. Its own CPU is charged to nobody (pid 0): it is the same store for both.
   */
  async function dovecotStore(name: string): Promise<Sink> {
    const dc = await startDovecot([{ address: 'bob@example.test' }]);
    /** Synchronous last resort: SIGKILL to the master (base_dir/master.pid), whose children follow. */
    const kill = (): void => {
      try {
        process.kill(Number(fs.readFileSync(path.join(dc.dir, 'run', 'master.pid'), 'utf8').trim()), 'SIGKILL');
      } catch {
        /* gone */
      }
    };
    track({ name: `dovecot (${name})`, stop: () => dc.stop(), kill });
    const newDir = path.join(dc.maildir('bob@example.test'), 'new');
    const count = (): number => {
      try {
        return fs.readdirSync(newDir).length;
      } catch {
        return 0;
      }
    };
    return {
      port: dc.port,
      pid: 0,
      messages: count,
      sessions: () => 0,
      async waitFor(n, timeoutMs) {
        const by = performance.now() + timeoutMs;
        for (;;) {
          if (count() >= n) return performance.now();
          if (performance.now() > by) throw new Error(`dovecot for ${name}: ${count()} of ${n} messages after ${timeoutMs} ms`);
          await sleep(10);
        }
      },
      stop: () => dc.stop(),
      kill,
    };
  }

  async function nodeSystem(name: TargetName, kind: SystemKind, sink: Sink, extra: string[] = [], queueDir?: string): Promise<System> {
    const child = fork(path.join(HERE, 'peers-system.js'), [kind, '--lmtp-port', String(sink.port), '--sink-port', String(sink.port), ...extra], {
      stdio: ['ignore', 'inherit', 'inherit', 'ipc'],
    });
    child.on('error', () => undefined); // EPIPE on a send to a child that is gone: its exit is what counts
    const pid = child.pid!;
    track({
      name,
      async stop() {
        if (child.exitCode === null && child.signalCode === null && child.connected) child.send({ type: 'stop' });
        await stopChild(child, 'SIGTERM', 10_000);
        if (queueDir) await fsp.rm(queueDir, { recursive: true, force: true });
      },
      kill: () => process.kill(pid, 'SIGKILL'),
    });
    const port = await listening(child, name);
    return {
      name,
      label: `${name} (node ${process.version})`,
      port,
      sink,
      roots: [pid],
      single: pid,
      delivers: kind !== 'smtp-server',
      ...(queueDir ? { queued: async () => (await countFiles(path.join(queueDir, 'active'))) + (await countFiles(path.join(queueDir, 'tmp'))) } : {}),
    };
  }

  function listening(child: ChildProcess, name: string): Promise<number> {
    return new Promise<number>((resolve, reject) => {
      const t = setTimeout(() => reject(new Error(`${name}: not listening after 30 s`)), 30_000);
      child.once('message', (m: { type: string; port?: number }) => {
        clearTimeout(t);
        if (m.type === 'listening' && m.port) resolve(m.port);
        else reject(new Error(`${name}: unexpected ${m.type}`));
      });
      child.once('exit', (code) => {
        clearTimeout(t);
        reject(new Error(`${name} exited with ${code} before listening`));
      });
    });
  }

  async function postfixSystem(name: TargetName, sink: Sink, main: Record<string, string>, milter?: { spec: string; pid: number }): Promise<System> {
    let pf: Awaited<ReturnType<typeof startPostfix>> | undefined;
    const entry = track({
      name,
      stop: async () => pf?.stop(),
      kill() {
        if (pf) spawnSync('postfix', ['-c', pf.configDir, 'abort'], { timeout: 10_000 });
      },
    });
    try {
      pf = await startPostfix({ ...(milter ? { milter: milter.spec } : {}), ...(main['relayhost'] ? {} : { lmtpPort: sink.port }), main: { smtpd_peername_lookup: 'no', ...main } });
    } catch (err) {
      forget(entry);
      throw err;
    }
    const master = Number((await fsp.readFile(path.join(pf.queueDir, 'pid', 'master.pid'), 'utf8')).trim());
    if (!(master > 0)) throw new Error(`${name}: no master pid`);
    const qdirs = ['maildrop', 'incoming', 'active', 'deferred', 'hold'].map((d) => path.join(pf!.queueDir, d));
    return {
      name,
      label: `${name} (Postfix ${machine.postfix})`,
      port: pf.smtpPort,
      sink,
      roots: milter ? [master, milter.pid] : [master],
      delivers: true,
      ...(milter ? { filterPid: milter.pid } : {}),
      queued: async () => {
        let n = 0;
        for (const d of qdirs) n += await countFiles(d);
        return n;
      },
    };
  }

  async function harakaSystem(name: TargetName, sink: Sink): Promise<System> {
    const dir = await fsp.mkdtemp(path.join(os.tmpdir(), 'dovetail-bench-haraka-'));
    // Haraka's own default config (what `haraka -i DIR` installs), then ours over it.
    await fsp.cp(path.join(HARAKA_DIR, 'node_modules/Haraka/config'), path.join(dir, 'config'), { recursive: true });
    await fsp.cp(path.join(HARAKA_DIR, 'config'), path.join(dir, 'config'), { recursive: true });
    const port = await freePort();
    await fsp.writeFile(path.join(dir, 'config/smtp.ini'), `[main]\nlisten=127.0.0.1:${port}\nnodes=0\ninactivity_timeout=300\n`);
    await fsp.writeFile(path.join(dir, 'config/lmtp.ini'), `[main]\nhost=127.0.0.1\nport=${sink.port}\n`);
    const bin = path.join(HARAKA_DIR, 'node_modules/Haraka/bin/haraka');
    const child = spawn(process.execPath, [bin, '-c', dir], { cwd: dir, stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    const keep = (d: Buffer): void => void (out = (out + d.toString()).slice(-8000));
    child.stdout!.on('data', keep);
    child.stderr!.on('data', keep);
    const pid = child.pid!;
    track({
      name,
      async stop() {
        await stopChild(child, 'SIGTERM', 0);
        await fsp.rm(dir, { recursive: true, force: true });
      },
      kill: () => process.kill(pid, 'SIGKILL'),
    });
    await waitForPort(port, 30_000, child, name, async () => out);
    return {
      name,
      label: `${name} (Haraka ${harakaVersion})`,
      port,
      sink,
      roots: [pid],
      single: pid,
      delivers: true,
      queued: () => countFiles(path.join(dir, 'queue')),
    };
  }

  async function libmilterFilter(): Promise<{ spec: string; pid: number }> {
    const port = await freePort();
    const child = spawn(PYTHON, [REFERENCE_FILTER, String(port), 'minimal'], { stdio: ['ignore', 'ignore', 'pipe'] });
    let err = '';
    child.stderr!.on('data', (d: Buffer) => void (err = (err + d.toString()).slice(-4000)));
    const pid = child.pid!;
    track({ name: 'libmilter filter', stop: () => stopChild(child, 'SIGTERM'), kill: () => process.kill(pid, 'SIGKILL') });
    await waitForPort(port, 15_000, child, 'libmilter filter', async () => err);
    return { spec: `inet:127.0.0.1:${port}`, pid };
  }

  async function serveMilterFilter(): Promise<{ spec: string; pid: number }> {
    const child = fork(path.join(HERE, 'peers-system.js'), ['milter'], { stdio: ['ignore', 'inherit', 'inherit', 'ipc'] });
    child.on('error', () => undefined);
    const pid = child.pid!;
    track({
      name: 'serveMilter filter',
      async stop() {
        if (child.exitCode === null && child.signalCode === null && child.connected) child.send({ type: 'stop' });
        await stopChild(child, 'SIGTERM', 10_000);
      },
      kill: () => process.kill(pid, 'SIGKILL'),
    });
    const port = await listening(child, 'serveMilter filter');
    return { spec: `inet:127.0.0.1:${port}`, pid };
  }

  async function startSystem(name: TargetName): Promise<System> {
    switch (name) {
      case 'smtp-server':
      case 'smtp-server+lmtp':
      case 'dovetail':
      case 'dovetail+quickstart':
      case 'dovetail+quickstart-workers':
        return nodeSystem(name, name, await sinkFor(name, true));
      case 'dovetail+mx':
      case 'dovetail+mx-dkim':
        return nodeSystem(name, 'dovetail+mx', await sinkFor(name, true), ['--dns', await dnsServer()]);
      case 'dovetail-large':
        return nodeSystem(name, 'dovetail', await sinkFor(name, true), ['--large']);
      case 'dovetail-outbound': {
        const q = await fsp.mkdtemp(path.join(os.tmpdir(), 'dovetail-bench-peers-q-'));
        return nodeSystem(name, 'dovetail-outbound', await sinkFor(name, false), ['--queue-dir', q, '--concurrency', '20'], q);
      }
      case 'haraka':
      case 'haraka-large':
        return harakaSystem(name, await sinkFor(name, true));
      case 'postfix':
        return postfixSystem(name, await sinkFor(name, true), {});
      case 'dovetail>dovecot':
        return nodeSystem(name, 'dovetail', await dovecotStore(name));
      case 'postfix>dovecot':
        return postfixSystem(name, await dovecotStore(name), {});
      case 'postfix-outbound': {
        const sink = await sinkFor(name, false);
        return postfixSystem(name, sink, {
          relayhost: `[127.0.0.1]:${sink.port}`,
          default_transport: 'smtp',
          relay_domains: '',
          smtp_tls_security_level: 'none',
        });
      }
      case 'postfix+serve-milter':
        return postfixSystem(name, await sinkFor(name, true), {}, await serveMilterFilter());
      case 'postfix+libmilter':
        return postfixSystem(name, await sinkFor(name, true), {}, await libmilterFilter());
    }
  }

  // ---------------------------------------------------------------- one measured window

  const load = new Load();
  track({ name: 'load generator', stop: async () => void (await load.worker.terminate()), kill: () => void load.worker.terminate() });
  const messages = new Map<MessageKind, { data: Uint8Array; size: number }>();
  async function messageFor(kind: MessageKind): Promise<{ data: Uint8Array; size: number }> {
    let m = messages.get(kind);
    if (!m) {
      let raw = buildMessage(kind === 'large' ? opts.largeSize : opts.size);
      if (kind === 'unsigned') raw = withoutDkimSignatures(raw);
      if (kind === 'signed') {
        await dnsServer();
        raw = await fixture!.sign(raw);
      }
      m = { data: wireData(raw), size: raw.length };
      messages.set(kind, m);
    }
    return m;
  }

  async function measure(sys: System, round: number): Promise<Sample> {
    const def = TARGETS[sys.name];
    const large = def.group === 'large';
    const conns = large ? opts.largeCount : opts.connections;
    const perConn = large ? 1 : opts.messages;
    const M = conns * perConn;
    const msg = await messageFor(def.message);
    await load.call({ op: 'message', data: msg.data, size: msg.size, recipients: 1 });
    const opened = await load.call<OpenResult>({ op: 'open', target: sys.name, port: sys.port, connections: conns });
    const deadline = Math.max(120_000, M * 50 + (large ? M * 2_000 : 0));
    const before = sys.sink.messages();
    const delivered = sys.delivers ? sys.sink.waitFor(before + M, deadline) : undefined;
    delivered?.catch(() => undefined); // awaited below; not unhandled if the run fails first
    let peak = 0;
    let procs = 0;
    const sample = (): void => {
      const m = treeMemory(sys.roots, false);
      peak = Math.max(peak, m.rss);
      procs = Math.max(procs, m.procs);
    };
    const sampler = setInterval(sample, 100);
    try {
      const m0 = machineCpuMs();
      const own0 = procCpuMs(process.pid) + procCpuMs(sys.sink.pid);
      const cpu0 = treeCpuMs(sys.roots);
      const read0 = sys.filterPid ? bytesRead(sys.filterPid) : 0;
      const t0 = performance.now();
      const res = await load.call<RunResult>({ op: 'run', target: sys.name, messages: perConn, timeoutMs: deadline });
      const done = delivered ? await delivered : t0 + res.elapsedMs;
      const drainBy = performance.now() + 30_000;
      while (sys.queued && (await sys.queued()) > 0) {
        if (performance.now() > drainBy) throw new Error(`${sys.name}: queue not empty 30 s after the sink had every message`);
        await sleep(10);
      }
      await sleep(100); // a last log line, a process being reaped
      sample();
      const cpu1 = treeCpuMs(sys.roots);
      const read1 = sys.filterPid ? bytesRead(sys.filterPid) : 0;
      const own1 = procCpuMs(process.pid) + procCpuMs(sys.sink.pid);
      const m1 = machineCpuMs();
      const treeMs = cpu1.user + cpu1.sys - cpu0.user - cpu0.sys;
      return {
        round,
        messages: M,
        acceptedPerSec: (M / res.elapsedMs) * 1000,
        deliveredPerSec: (M / (done - t0)) * 1000,
        p50: percentile(res.latencies, 50),
        p99: percentile(res.latencies, 99),
        cpuMsPerMsg: treeMs / M,
        sysMsPerMsg: (cpu1.sys - cpu0.sys) / M,
        peakRss: Math.max(peak, sys.single ? peakRss(sys.single) : 0),
        procs,
        ...(sys.filterPid ? { filterBytesPerMsg: (read1 - read0) / M } : {}),
        otherMsPerMsg: (m1.busy - m0.busy - treeMs - (own1 - own0)) / M,
        greetingMs: spread(opened.greetingMs).median,
        clientElu: res.clientElu,
        latencies: res.latencies,
      };
    } finally {
      clearInterval(sampler);
      await load.call({ op: 'close', target: sys.name }).catch(() => undefined);
    }
  }

  // ---------------------------------------------------------------- the run

  log(`bench/peers (${opts.profile}): ${machine.cpus} CPUs (${machine.cpuModel}), ${machine.memoryGiB} GiB, node ${machine.node}, Postfix ${machine.postfix}, Haraka ${machine.haraka}; ` +
    `${opts.connections} connections × ${opts.messages} messages of ${opts.size} bytes, large: ${opts.largeCount} × ${opts.largeSize} bytes; ${opts.warmup} warm-up + ${opts.rounds} rounds; targets: ${names.join(', ')}`);
  const systems: System[] = [];
  const samples = new Map<TargetName, Sample[]>();
  const failures = new Map<TargetName, string>();
  let failed: unknown;
  try {
    for (const n of names) {
      progress(`starting ${n} …`);
      systems.push(await startSystem(n));
      samples.set(n, []);
    }
    const total = opts.warmup + opts.rounds;
    for (let r = 0; r < total; r++) {
      const warm = r < opts.warmup;
      const tag = warm ? `warm-up ${r + 1}/${opts.warmup}` : `round ${r - opts.warmup + 1}/${opts.rounds}`;
      // Large messages are not warmed up (they take long and the JIT has warmed up on the rest).
      const active = systems.filter((s) => !failures.has(s.name) && !(warm && TARGETS[s.name].group === 'large'));
      const order = active.map((_, i) => active[(i + r) % active.length]!);
      const line: string[] = [];
      for (const [i, s] of order.entries()) {
        if (stopping()) throw new Error('stopping');
        progress(`${tag} · ${s.name} (${i + 1}/${order.length}) · ${line.slice(-2).join(' · ')}`);
        let x: Sample;
        try {
          x = await measure(s, r - opts.warmup);
        } catch (err) {
          // One system failing (a peer's timeout under load, say) is a result: it is reported, stopped, and left out of later rounds.
          const why = err instanceof Error ? err.message : String(err);
          failures.set(s.name, why);
          line.push(`${s.name} FAILED`);
          log(`  ${s.name} failed: ${why}; left out from now on`);
          const entry = remaining().find((e) => e.name === s.name);
          if (entry) await stopOne(entry);
          continue;
        }
        if (!warm) samples.get(s.name)!.push(x);
        line.push(`${s.name} ${Math.round(x.acceptedPerSec)}/s ${x.cpuMsPerMsg.toFixed(2)} ms/msg ${mib(x.peakRss)} MiB`);
      }
      log(`  ${tag}: ${line.join('; ')}`);
    }
  } catch (err) {
    failed = err;
  } finally {
    progress('stopping …');
    await stopAll();
    await fixture?.close().catch(() => undefined);
    progress('');
  }
  if (failed) {
    process.stderr.write(`bench failed: ${failed instanceof Error ? (failed.stack ?? failed.message) : String(failed)}\n`);
    process.exitCode = 1;
    return;
  }

  // ---------------------------------------------------------------- results

  const summary = systems.map((s) => {
    const x = samples.get(s.name)!;
    const all = concat(x.map((r) => r.latencies));
    const def = TARGETS[s.name];
    const fb = x.map((r) => r.filterBytesPerMsg).filter((v): v is number => v !== undefined);
    const failure = failures.get(s.name);
    return {
      name: s.name,
      group: def.group,
      ...(failure !== undefined ? { failed: failure } : {}),
      label: s.label,
      description: def.description,
      messagesPerRound: x[0]?.messages ?? 0,
      messageBytes: messages.get(def.message)?.size ?? 0,
      acceptedPerSec: spread(x.map((r) => r.acceptedPerSec)),
      deliveredPerSec: spread(x.map((r) => r.deliveredPerSec)),
      p50Ms: percentile(all, 50),
      p99Ms: percentile(all, 99),
      cpuMsPerMsg: spread(x.map((r) => r.cpuMsPerMsg)),
      sysMsPerMsg: spread(x.map((r) => r.sysMsPerMsg)),
      peakRssMiB: x.length ? mib(Math.max(...x.map((r) => r.peakRss))) : NaN,
      peakProcs: x.length ? Math.max(...x.map((r) => r.procs)) : NaN,
      ...(fb.length ? { filterBytesPerMsg: spread(fb) } : {}),
      greetingMs: spread(x.map((r) => r.greetingMs)),
      otherMsPerMsg: spread(x.map((r) => r.otherMsPerMsg)),
      clientElu: spread(x.map((r) => r.clientElu)),
      rounds: x.map(({ latencies: _l, ...rest }) => rest),
    };
  });
  const ratios = computeRatios(summary);
  const when = new Date().toISOString();
  const result = { when, profile: opts.profile, ...(args.note !== undefined ? { note: args.note } : {}), machine, options: opts, targets: summary, ratios };
  const outFile = args.out ?? path.join(REPO, 'bench/results', `peers-${opts.profile}-${when.replace(/[:.]/g, '-')}.json`);
  await fsp.mkdir(path.dirname(outFile), { recursive: true });
  await fsp.writeFile(outFile, JSON.stringify(result, null, 2) + '\n');
  const md = markdown(result);
  process.stdout.write(md + '\n');
  log(`bench/peers: JSON in ${outFile}`);
  if (writeDocs) await writeReport(result, log);
}

/** Writes docs/benchmarks-peers.svg and the Markdown between the markers in docs/benchmarks.md. */
async function writeReport(result: Result, log: (s: string) => void): Promise<void> {
  const md = markdown(result);
  await fsp.writeFile(path.join(REPO, 'docs/benchmarks-peers.svg'), svg(result));
  const doc = path.join(REPO, 'docs/benchmarks.md');
  const text = await fsp.readFile(doc, 'utf8');
  const BEGIN = '<!-- peers:begin -->';
  const END = '<!-- peers:end -->';
  const block = `${BEGIN}\n<!-- written by bench/peers.ts (${result.profile} profile, ${result.when}); do not edit by hand -->\n\n${md}\n\n![accepted msg/s and CPU ms per message, median with min–max over rounds](benchmarks-peers.svg)\n\n${END}`;
  const i = text.indexOf(BEGIN);
  const j = text.indexOf(END);
  const next = i >= 0 && j > i ? text.slice(0, i) + block + text.slice(j + END.length) : `${text.trimEnd()}\n\n## Against the peers (bench/peers.ts)\n\n${block}\n`;
  await fsp.writeFile(doc, next);
  log(`bench/peers: docs/benchmarks.md and docs/benchmarks-peers.svg updated`);
}

// ================================================================ ratios

/** What a round keeps in the JSON (the ratios are computed from these, so --report can redo them). */
interface RoundFigures {
  readonly round: number;
  readonly acceptedPerSec: number;
  readonly deliveredPerSec: number;
  readonly cpuMsPerMsg: number;
  readonly peakRss: number;
  readonly p50: number;
}

export interface Ratio {
  readonly a: string;
  readonly b: string;
  readonly acceptedPerSec: Spread;
  readonly deliveredPerSec: Spread;
  readonly cpuMsPerMsg: Spread;
  readonly peakRss: Spread;
  readonly p50: Spread;
}

/** a ÷ b for every pair in PAIRS, round by round over the rounds both have (a system that failed has fewer). */
export function computeRatios(targets: readonly { readonly name: string; readonly rounds: readonly RoundFigures[] }[]): Ratio[] {
  const byName = new Map(targets.map((t) => [t.name, t.rounds]));
  const out: Ratio[] = [];
  for (const [a, b] of PAIRS) {
    const rb = new Map((byName.get(b) ?? []).map((x) => [x.round, x]));
    const ra = (byName.get(a) ?? []).filter((x) => rb.has(x.round));
    if (!ra.length) continue;
    const per = (f: (x: RoundFigures) => number): Spread => spread(ra.map((x) => f(x) / f(rb.get(x.round)!)));
    out.push({
      a,
      b,
      acceptedPerSec: per((x) => x.acceptedPerSec),
      deliveredPerSec: per((x) => x.deliveredPerSec),
      cpuMsPerMsg: per((x) => x.cpuMsPerMsg),
      peakRss: per((x) => x.peakRss),
      p50: per((x) => x.p50),
    });
  }
  return out;
}

// ================================================================ output

type Result = {
  when: string;
  profile: string;
  note?: string;
  machine: Record<string, string | number>;
  options: { connections: number; messages: number; size: number; largeCount: number; largeSize: number; rounds: number; warmup: number };
  targets: {
    name: string;
    group: Group;
    failed?: string;
    description: string;
    messagesPerRound: number;
    messageBytes: number;
    acceptedPerSec: Spread;
    deliveredPerSec: Spread;
    p50Ms: number;
    p99Ms: number;
    cpuMsPerMsg: Spread;
    sysMsPerMsg: Spread;
    peakRssMiB: number;
    peakProcs: number;
    filterBytesPerMsg?: Spread;
    greetingMs: Spread;
    otherMsPerMsg: Spread;
    rounds: RoundFigures[];
  }[];
  ratios: Ratio[];
};

const f0 = (n: number): string => (Number.isFinite(n) ? Math.round(n).toLocaleString('en-US') : '–');
const f2 = (n: number): string => (Number.isFinite(n) ? n.toFixed(2) : '–');
const range = (s: Spread, f: (n: number) => string): string => (Number.isFinite(s.median) ? `${f(s.median)} [${f(s.min)}–${f(s.max)}]` : '–');
const mdTable = (rows: string[][]): string => [rows[0]!, rows[0]!.map(() => '---'), ...rows.slice(1)].map((r) => `| ${r.join(' | ')} |`).join('\n');

const GROUP_TITLES: Record<Group, string> = {
  inbound: 'Inbound, delivering over LMTP into smtp-sink -L',
  dovecot: 'Inbound into a real mailstore: Dovecot LMTP writing Maildir',
  outbound: 'Outbound through a queue into smtp-sink (SMTP)',
  milter: 'A milter behind Postfix (one header added at eom)',
  large: 'Large messages: every message on its own connection, all at once',
};

export function markdown(r: Result): string {
  const m = r.machine;
  const o = r.options;
  const out: string[] = [];
  if (r.note) out.push(`**${r.note}**\n`);
  out.push(
    `Run ${r.when} (${r.profile} profile): ${m['cpus']} CPUs (${m['cpuModel']}), ${m['memoryGiB']} GiB RAM, Linux ${m['kernel']}; node ${m['node']}, Postfix ${m['postfix']}, Haraka ${m['haraka']}, Dovecot ${m['dovecot']}, python3-milter ${m['libmilter']}. ` +
      `Load: bench/load.ts, ${o.connections} connections × ${o.messages} messages of ${o.size.toLocaleString('en-US')} bytes per target per round (pipelined MAIL/RCPT/DATA, connections opened before the window); ` +
      `large: ${o.largeCount} × ${o.largeSize.toLocaleString('en-US')} bytes; ${o.warmup} warm-up + ${o.rounds} measured rounds, order rotating.`,
  );
  for (const g of ['inbound', 'dovecot', 'outbound', 'milter', 'large'] as const) {
    const ts = r.targets.filter((t) => t.group === g);
    if (!ts.length) continue;
    out.push(`\n**${GROUP_TITLES[g]}**\n`);
    const head = ['target', 'accepted msg/s [min–max]', 'delivered msg/s', 'p50 / p99 ms', 'CPU ms/msg [min–max]', 'peak RSS MiB', 'connect→220 ms'];
    if (g === 'milter') head.push('bytes/msg read by the filter');
    const rows = [head];
    for (const t of ts) {
      if (t.failed !== undefined && !Number.isFinite(t.acceptedPerSec.median)) {
        rows.push([`\`${t.name}\``, `failed: ${t.failed.replace(/\|/g, '/').slice(0, 200)}`, ...head.slice(2).map(() => '–')]);
        continue;
      }
      const row = [`\`${t.name}\``, range(t.acceptedPerSec, f0), f0(t.deliveredPerSec.median), `${f2(t.p50Ms)} / ${f2(t.p99Ms)}`, range(t.cpuMsPerMsg, f2), String(t.peakRssMiB), f0(t.greetingMs.median)];
      if (g === 'milter') row.push(t.filterBytesPerMsg ? f0(t.filterBytesPerMsg.median) : '–');
      rows.push(row);
    }
    out.push(mdTable(rows));
  }
  const failed = r.targets.filter((t) => t.failed !== undefined);
  if (failed.length) {
    out.push(`\n**Failed** (the system was stopped and left out of the rounds after):\n`);
    for (const t of failed) out.push(`- \`${t.name}\`: ${t.failed!.replace(/\s+/g, ' ').slice(0, 300)}`);
  }
  if (r.ratios.length) {
    out.push(`\n**Ratios, taken round by round (median [min–max])**\n`);
    const rows = [['a ÷ b', 'accepted msg/s', 'delivered msg/s', 'CPU ms/msg', 'peak RSS', 'p50 latency']];
    for (const x of r.ratios.filter((x) => Number.isFinite(x.acceptedPerSec.median))) {
      rows.push([`\`${x.a}\` ÷ \`${x.b}\``, range(x.acceptedPerSec, f2), range(x.deliveredPerSec, f2), range(x.cpuMsPerMsg, f2), range(x.peakRss, f2), range(x.p50, f2)]);
    }
    out.push(mdTable(rows));
  }
  out.push(
    `\nCPU: utime+stime (with reaped children) of the system's whole process tree (Postfix: master and every daemon; with a milter: plus the filter process) from the first MAIL until the sink had every message and the queue was empty, ÷ messages. ` +
      `Peak RSS: the tree's summed RSS sampled every 100 ms (shared pages counted once per process), or the process's VmHWM when larger (one-process systems). ` +
      `Bytes read by the filter: its rchar (/proc/<pid>/io) over the window ÷ messages. ` +
      `connect→220: median over the round's connections, outside the measured window (smtp-server holds its greeting 100 ms).`,
  );
  return out.join('\n');
}

const esc = (s: string): string => s.replace(/&/g, '&amp;').replace(/</g, '&lt;').replace(/>/g, '&gt;');

/**
 * Two panels of horizontal bars (accepted msg/s, CPU ms/msg), median with a min–max whisker,
 * one row per target; the large-message targets are left out (their figure is the RSS, and
 * their CPU per 10 MB message would flatten every other bar).
 */
export function svg(r: Result): string {
  const ts = r.targets.filter((t) => t.group !== 'large');
  const rowH = 22;
  const labelW = 190;
  const panelW = 300;
  const gap = 40;
  const top = 40;
  const H = top + ts.length * rowH + 30;
  const W = labelW + 2 * panelW + gap + 20;
  const parts: string[] = [];
  parts.push(`<svg xmlns="http://www.w3.org/2000/svg" width="${W}" height="${H}" viewBox="0 0 ${W} ${H}" font-family="sans-serif" font-size="12">`);
  parts.push(`<rect width="${W}" height="${H}" fill="#fff"/>`);
  const panels: { title: string; x0: number; get: (t: Result['targets'][number]) => Spread; fmt: (n: number) => string; color: string }[] = [
    { title: 'accepted msg/s (higher is better)', x0: labelW, get: (t) => t.acceptedPerSec, fmt: f0, color: '#4a7bd0' },
    { title: 'CPU ms per message, whole process tree (lower is better)', x0: labelW + panelW + gap, get: (t) => t.cpuMsPerMsg, fmt: f2, color: '#d0824a' },
  ];
  for (const p of panels) {
    const max = Math.max(1e-9, ...ts.map((t) => (Number.isFinite(p.get(t).max) ? p.get(t).max : 0)));
    const scale = (panelW - 60) / max;
    parts.push(`<text x="${p.x0}" y="20" font-weight="bold">${esc(p.title)}</text>`);
    ts.forEach((t, i) => {
      const s = p.get(t);
      const y = top + i * rowH;
      if (!Number.isFinite(s.median)) return;
      parts.push(`<rect x="${p.x0}" y="${y + 3}" width="${(s.median * scale).toFixed(1)}" height="${rowH - 8}" fill="${p.color}"/>`);
      parts.push(`<line x1="${(p.x0 + s.min * scale).toFixed(1)}" x2="${(p.x0 + s.max * scale).toFixed(1)}" y1="${y + rowH / 2 - 1}" y2="${y + rowH / 2 - 1}" stroke="#222"/>`);
      parts.push(`<text x="${(p.x0 + Math.max(s.max, s.median) * scale + 4).toFixed(1)}" y="${y + rowH / 2 + 3}">${esc(p.fmt(s.median))}</text>`);
    });
  }
  ts.forEach((t, i) => parts.push(`<text x="${labelW - 8}" y="${top + i * rowH + rowH / 2 + 3}" text-anchor="end">${esc(t.name)}</text>`));
  parts.push(`<text x="${labelW}" y="${H - 8}" fill="#555">${esc(`${r.profile} profile, ${r.when}; ${r.machine['cpus']} CPUs ${r.machine['cpuModel']}; bars: median, line: min–max over rounds`)}</text>`);
  parts.push('</svg>');
  return parts.join('\n') + '\n';
}

if (process.argv[1] && path.resolve(process.argv[1]) === fileURLToPath(import.meta.url)) {
  try {
    await runPeers();
  } catch (err) {
    process.stderr.write(`bench failed: ${err instanceof Error ? err.message : String(err)}\n`);
    process.exitCode = 1;
  }
}
