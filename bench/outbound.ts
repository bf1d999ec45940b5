/**
 * The outbound benchmark: throughput through the durable queue into an SMTP sink, dovetail
 * next to Postfix 3.7 doing the same job, in one run, interleaved round by round (each round
 * runs both systems once, the first one alternating) so machine noise falls on both alike.
 *
 *   client (smtp-source) ──SMTP──▶ system ──queue (fsync)──▶ its smtp client ──SMTP──▶ sink (smtp-sink)
 *
 * - dovetail: `createGateway({ delivery: routes({ '*': smtp({ relayhost: '[127.0.0.1]:SINK',
 *   tls: 'none' }) }), queue: createQueue({ dir, transport: <the same routes>, backoff:
 *   { min: 1000, max: 4000 }, scanInterval: 50, concurrency: N }) })`, run in a child process
 *   of its own (this file with `--gateway-child`) so that its CPU and memory are its own.
 * - Postfix: started here as root in a private directory (test/helpers/postfix.ts), smtpd on
 *   loopback accepting for any domain from mynetworks 127.0.0.0/8, `relayhost =
 *   [127.0.0.1]:SINK`, `default_transport = smtp`, `smtp_tls_security_level = none`,
 *   `smtpd_peername_lookup = no` (as the gateway's resolveClientNames: false); everything
 *   else Postfix's defaults (fsync of queue files, slow-start destination concurrency up to
 *   20, connection cache on demand, in_flow_delay 1s, logging to a file through postlogd).
 * - The client is Postfix's `smtp-source` for both: `-s SESSIONS -m MESSAGES -l SIZE -d`, so
 *   each session keeps its connection for all its messages (no pipelining: smtp-source does
 *   not pipeline). The greeting cost (smtp-server holds the gateway's greeting 100 ms) is
 *   measured apart with a probe connection and reported in its own column.
 * - The sink is Postfix's `smtp-sink -c` (one per system, the same kind), which counts the
 *   messages it received; the bench reads its running counter.
 *
 * Per round and system: accepted msg/s (MESSAGES over the time until smtp-source exited,
 * i.e. had a 250 for every message), delivered msg/s (MESSAGES over the time until the sink
 * had them all), CPU ms per message of the system's whole process tree (utime + stime +
 * cutime + cstime from /proc/<pid>/stat over the master/child and all its descendants, from
 * the start of the round until its queue is empty), and peak memory (the tree's summed RSS,
 * and summed PSS, sampled every 100 and 500 ms). The table gives medians with the min–max
 * over rounds and the dovetail ÷ Postfix ratio taken round by round. Below it, per system:
 * how far delivery lagged behind acceptance, messages per connection to the sink, how busy
 * the busiest single thread was (dovetail: its event loop), the CPU of the client, sink and
 * bench (the same for both), and the machine's busy time that none of them accounts for
 * ("other load": other workloads on a shared machine, plus kernel threads) with the
 * hypervisor's steal, so that a disturbed round can be recognised.
 *
 *   node dist/bench/outbound.js [--rounds 3] [--messages 2000] [--sessions 20] [--size 1000]
 *     [--concurrency 20] [--warmup 1] [--systems dovetail,postfix] [--profile DIR] [--json]
 *
 * It needs root and the postfix package (postfix, smtp-source, smtp-sink). Everything it
 * starts (sinks, Postfix, the gateway child) is stopped at the end, on error, on SIGINT or
 * SIGTERM, and by the watchdog (`--timeout`, seconds). It does not tune the machine.
 */
import { lifecycle } from './lifecycle.js';
import { fork, spawn, spawnSync } from 'node:child_process';
import diagnostics_channel from 'node:diagnostics_channel';
import fs from 'node:fs';
import fsp from 'node:fs/promises';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { performance } from 'node:perf_hooks';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { Channels, QueueChannels } from '../lib/index.js';
import { outboundGateway } from './outbound-gateway.js';
import { requireBinary, startPostfix, type Postfix } from '../test/helpers/postfix.js';
import { fsType, machineCpuMs, mib, procCpuMs, stopChild, threadCpuMs, treeCpuMs, treeMemory } from './proc.js';
import { startSink as startSinkProcess, type Sink } from './sink.js';
import { intArg, spread, type Spread } from './stats.js';

const SENDER = 'a@example.test';
const RECIPIENT = 'b@remote.test';
const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

// ================================================================ the gateway child

/** Messages between the bench and its gateway child. */
type ToChild = { readonly type: 'stats' } | { readonly type: 'stop' };
type FromChild =
  | { readonly type: 'listening'; readonly port: number }
  | { readonly type: 'stats'; readonly pool: unknown; readonly attempts: number; readonly notDelivered: number; readonly errors: number; readonly vmHwmKiB: number }
  | { readonly type: 'closed' };

async function gatewayChild(argv: string[]): Promise<void> {
  const { values } = parseArgs({
    args: argv,
    options: { 'sink-port': { type: 'string' }, 'queue-dir': { type: 'string' }, concurrency: { type: 'string' } },
    strict: true,
  });
  const send = (m: FromChild): void => void process.send?.(m);
  const { gateway, transport: out } = outboundGateway({ sinkPort: Number(values['sink-port']), queueDir: values['queue-dir']!, concurrency: Number(values.concurrency) });
  // Counted, not printed: a deferral (backoff 1 s) or an error would distort the figures.
  let attempts = 0;
  let notDelivered = 0;
  let errors = 0;
  diagnostics_channel.subscribe(QueueChannels.attempt, (m) => {
    attempts++;
    for (const r of (m as { results: { status: string }[] }).results) if (r.status !== 'delivered') notDelivered++;
  });
  diagnostics_channel.subscribe(Channels.error, () => errors++);
  const [addr] = await gateway.listen();
  process.on('disconnect', () => process.exit(1)); // the bench is gone: do not linger
  process.on('message', (m: ToChild) => {
    if (m.type === 'stats') {
      const hwm = /VmHWM:\s+(\d+)/.exec(fs.readFileSync('/proc/self/status', 'utf8'));
      send({ type: 'stats', pool: out.stats(), attempts, notDelivered, errors, vmHwmKiB: Number(hwm?.[1] ?? 0) });
    } else if (m.type === 'stop') {
      void gateway.close().finally(() => {
        send({ type: 'closed' });
        process.exit(0);
      });
    }
  });
  send({ type: 'listening', port: addr!.port });
}

if (process.argv[2] === '--gateway-child') {
  await gatewayChild(process.argv.slice(3));
} else {
  await benchMain();
}

// ================================================================ the bench

async function benchMain(): Promise<void> {
  const OPTIONS = {
    rounds: { type: 'string', default: '3' },
    messages: { type: 'string', default: '2000' },
    sessions: { type: 'string', default: '20' },
    size: { type: 'string', default: '1000' },
    concurrency: { type: 'string', default: '20' },
    warmup: { type: 'string', default: '1' },
    systems: { type: 'string', default: 'dovetail,postfix' },
    profile: { type: 'string' },
    timeout: { type: 'string', default: '900' },
    json: { type: 'boolean', default: false },
    help: { type: 'boolean', short: 'h', default: false },
  } as const;
  let args: ReturnType<typeof parseArgs<{ options: typeof OPTIONS; strict: true }>>['values'];
  try {
    args = parseArgs({ options: OPTIONS, strict: true }).values;
  } catch (err) {
    process.stderr.write(`${err instanceof Error ? err.message : String(err)} (see --help)\n`);
    process.exit(64);
  }
  if (args.help) {
    process.stdout.write(
      [
        'usage: node dist/bench/outbound.js [options]   (as root; needs the postfix package)',
        '  --rounds N        measured rounds, each runs every system once (default 3)',
        '  --messages N      messages per system per round (default 2000)',
        '  --sessions N      smtp-source sessions, each reusing its connection (default 20)',
        '  --size BYTES      smtp-source payload per message, headers not included (default 1000)',
        '  --concurrency N   dovetail queue concurrency (default 20, as Postfix default_destination_concurrency_limit)',
        '  --warmup N        unmeasured rounds first (default 1)',
        '  --systems LIST    dovetail,postfix or one of them (ratios need both)',
        '  --profile DIR     run the gateway child with --cpu-prof into DIR',
        '  --timeout S       watchdog for the whole run (default 900)',
        '  --json            machine-readable output only',
        '',
      ].join('\n'),
    );
    return;
  }
  const int = intArg;
  const opts = {
    rounds: int('rounds', args.rounds, 1),
    messages: int('messages', args.messages, 1),
    sessions: int('sessions', args.sessions, 1),
    size: int('size', args.size, 0),
    concurrency: int('concurrency', args.concurrency, 1),
    warmup: int('warmup', args.warmup, 0),
    timeoutS: int('timeout', args.timeout, 1),
  };
  const systemNames = (args.systems ?? '').split(',').filter(Boolean);
  for (const s of systemNames) {
    if (s !== 'dovetail' && s !== 'postfix') {
      process.stderr.write(`unknown system ${s} (dovetail, postfix)\n`);
      process.exit(64);
    }
  }
  const log = (line: string): void => {
    if (!args.json) process.stderr.write(line + '\n');
  };

  // ---------------------------------------------------------------- cleanup, whatever happens

  const { track, forget, stopAll, stopping, remaining, done } = lifecycle<'sink' | 'system' | 'client'>((line) => void process.stderr.write(`${line}\n`), opts.timeoutS);

  // ---------------------------------------------------------------- facts

  const smtpSource = requireBinary('smtp-source', 'Debian package "postfix" (3.7)');
  requireBinary('smtp-sink', 'Debian package "postfix" (3.7)');
  if (process.getuid?.() !== 0) throw new Error('bench/outbound needs root (Postfix in a private directory, smtp-sink -u postfix)');
  const postfixVersion = spawnSync('postconf', ['-dh', 'mail_version'], { encoding: 'utf8' }).stdout?.trim() || 'unknown';
  const machine = {
    cpus: os.availableParallelism(),
    cpuModel: os.cpus()[0]?.model ?? 'unknown',
    memoryGiB: Math.round(os.totalmem() / 1024 ** 3),
    node: process.version,
    postfix: postfixVersion,
    kernel: os.release(),
    tmp: `${os.tmpdir()} (${fsType(os.tmpdir())})`,
  };

  // ---------------------------------------------------------------- the sink (bench/sink.ts), tracked

  async function startSink(name: string): Promise<Sink> {
    const sink = await startSinkProcess({ name });
    track({ name: `smtp-sink (${name})`, kind: 'sink', stop: () => sink.stop(), kill: () => sink.kill() });
    return sink;
  }

  // ---------------------------------------------------------------- the systems

  interface System {
    readonly name: 'dovetail' | 'postfix';
    readonly label: string;
    readonly port: number;
    readonly sink: Sink;
    /** The process whose tree is measured. */
    readonly root: number;
    /** Files still queued. */
    queued(): Promise<number>;
    /** Extra facts for the report, read at the end. */
    facts(): Promise<Record<string, unknown>>;
  }

  const countFiles = async (dir: string): Promise<number> => {
    let n = 0;
    let entries: fs.Dirent[];
    try {
      entries = await fsp.readdir(dir, { withFileTypes: true });
    } catch {
      return 0;
    }
    for (const e of entries) n += e.isDirectory() ? await countFiles(path.join(dir, e.name)) : 1;
    return n;
  };

  async function startDovetail(): Promise<System> {
    const sink = await startSink('dovetail');
    const base = await fsp.mkdtemp(path.join(os.tmpdir(), 'dovetail-bench-outbound-'));
    const queueDir = path.join(base, 'queue');
    const execArgv = args.profile ? ['--cpu-prof', `--cpu-prof-dir=${path.resolve(args.profile)}`] : [];
    const child = fork(fileURLToPath(import.meta.url), ['--gateway-child', '--sink-port', String(sink.port), '--queue-dir', queueDir, '--concurrency', String(opts.concurrency)], {
      stdio: ['ignore', 'inherit', 'inherit', 'ipc'],
      execArgv,
    });
    const pid = child.pid!;
    const ask = <T extends FromChild['type']>(msg: ToChild, type: T, ms: number): Promise<Extract<FromChild, { type: T }>> =>
      new Promise((resolve, reject) => {
        const onMsg = (m: FromChild): void => {
          if (m.type !== type) return;
          cleanup();
          resolve(m as Extract<FromChild, { type: T }>);
        };
        const onExit = (): void => {
          cleanup();
          reject(new Error(`gateway child exited (${child.exitCode ?? child.signalCode}) waiting for ${type}`));
        };
        const timer = setTimeout(() => {
          cleanup();
          reject(new Error(`gateway child: no ${type} within ${ms} ms`));
        }, ms);
        const cleanup = (): void => {
          clearTimeout(timer);
          child.off('message', onMsg);
          child.off('exit', onExit);
        };
        child.on('message', onMsg);
        child.once('exit', onExit);
        if (child.connected) child.send(msg);
      });
    track({
      name: 'dovetail gateway child',
      kind: 'system',
      async stop() {
        if (child.exitCode === null && child.signalCode === null) {
          if (child.connected) await ask({ type: 'stop' }, 'closed', 10_000).catch(() => undefined);
          // It exits by itself after 'closed' (writing its CPU profile with --profile first).
          await stopChild(child, 'SIGTERM', args.profile ? 15_000 : 3_000);
        }
        await fsp.rm(base, { recursive: true, force: true });
      },
      kill() {
        process.kill(pid, 'SIGKILL');
        fs.rmSync(base, { recursive: true, force: true });
      },
    });
    const listening = await new Promise<number>((resolve, reject) => {
      child.once('message', (m: FromChild) => (m.type === 'listening' ? resolve(m.port) : reject(new Error(`unexpected ${m.type}`))));
      child.once('exit', (code) => reject(new Error(`gateway child exited with ${code} before listening`)));
    });
    return {
      name: 'dovetail',
      label: `dovetail (node ${process.version})`,
      port: listening,
      sink,
      root: pid,
      queued: async () => (await countFiles(path.join(queueDir, 'active'))) + (await countFiles(path.join(queueDir, 'tmp'))),
      async facts() {
        const s = await ask({ type: 'stats' }, 'stats', 10_000);
        return { smtpPool: s.pool, queueAttempts: s.attempts, notDelivered: s.notDelivered, errors: s.errors, vmHwmMiB: mib(s.vmHwmKiB * 1024) };
      },
    };
  }

  async function startPostfixSystem(): Promise<System> {
    const sink = await startSink('postfix');
    let postfix: Postfix | undefined;
    let starting: Promise<Postfix> | undefined;
    // Registered before it starts, so that a start cut short by a signal is cleaned up too.
    track({
      name: 'postfix',
      kind: 'system',
      async stop() {
        const p = await starting?.catch(() => undefined); // a failed start stopped itself
        await p?.stop();
      },
      kill() {
        if (!postfix) return;
        spawnSync('postfix', ['-c', postfix.configDir, 'abort'], { timeout: 10_000 });
        fs.rmSync(`${postfix.configDir}.lock`, { recursive: true, force: true });
        fs.rmSync(path.dirname(postfix.queueDir), { recursive: true, force: true });
      },
    });
    starting = startPostfix({
      main: {
        relayhost: `[127.0.0.1]:${sink.port}`,
        default_transport: 'smtp',
        relay_domains: '',
        mynetworks: '127.0.0.0/8',
        smtp_tls_security_level: 'none',
        smtpd_peername_lookup: 'no',
      },
    });
    postfix = await starting;
    const master = Number((await fsp.readFile(path.join(postfix.queueDir, 'pid', 'master.pid'), 'utf8')).trim());
    if (!(master > 0)) throw new Error('postfix: no master pid');
    const qdirs = ['maildrop', 'incoming', 'active', 'deferred', 'hold'].map((d) => path.join(postfix!.queueDir, d));
    const pf = postfix;
    return {
      name: 'postfix',
      label: `Postfix ${postfixVersion}`,
      port: postfix.smtpPort,
      sink,
      root: master,
      queued: async () => {
        let n = 0;
        for (const d of qdirs) n += await countFiles(d);
        return n;
      },
      async facts() {
        const text = await pf.log();
        return {
          deferredLogLines: (text.match(/status=deferred/g) ?? []).length,
          bouncedLogLines: (text.match(/status=bounced/g) ?? []).length,
          warnings: (text.match(/warning:/g) ?? []).length,
          reusedConnections: (text.match(/conn_use=\d+/g) ?? []).length,
        };
      },
    };
  }

  /** ms from connect() to the 220 greeting (QUIT right after). */
  async function greetingMs(port: number): Promise<number> {
    return new Promise((resolve, reject) => {
      const t0 = performance.now();
      const s = net.connect(port, '127.0.0.1');
      let buf = '';
      s.setTimeout(10_000, () => {
        s.destroy();
        reject(new Error(`no greeting on ${port}`));
      });
      s.on('data', (d) => {
        buf += d.toString('latin1');
        if (!buf.includes('\r\n')) return;
        const ms = performance.now() - t0;
        s.end('QUIT\r\n');
        s.destroy();
        if (buf.startsWith('220')) resolve(ms);
        else reject(new Error(`greeting on ${port}: ${buf.trim()}`));
      });
      s.on('error', reject);
    });
  }

  /** Runs smtp-source against the system; resolves with performance.now() at its exit (status 0). */
  function runSource(port: number, timeoutMs: number): Promise<number> {
    return new Promise((resolve, reject) => {
      if (stopping()) return reject(new Error('stopping'));
      const child = spawn(
        smtpSource,
        ['-s', String(opts.sessions), '-m', String(opts.messages), '-l', String(opts.size), '-d', '-M', 'client.bench.test', '-f', SENDER, '-t', RECIPIENT, `127.0.0.1:${port}`],
        { stdio: ['ignore', 'ignore', 'pipe'] },
      );
      let err = '';
      child.stderr!.on('data', (d: Buffer) => (err += d.toString()));
      const pid = child.pid!;
      const entry = track({ name: 'smtp-source', kind: 'client', stop: () => stopChild(child, 'SIGKILL'), kill: () => process.kill(pid, 'SIGKILL') });
      const timer = setTimeout(() => child.kill('SIGKILL'), timeoutMs);
      child.on('exit', (code, signal) => {
        const t = performance.now();
        clearTimeout(timer);
        forget(entry);
        if (code === 0) resolve(t);
        else reject(new Error(`smtp-source to ${port} ended with ${code ?? signal}: ${err.trim().slice(0, 500)}`));
      });
      child.on('error', reject);
    });
  }

  interface Round {
    readonly round: number;
    readonly acceptedPerSec: number;
    readonly deliveredPerSec: number;
    readonly acceptedMs: number;
    readonly deliveredMs: number;
    /** From the start until the queue was empty (the CPU window). */
    readonly drainedMs: number;
    readonly cpuMsPerMsg: number;
    /** The kernel's part of cpuMsPerMsg. */
    readonly sysMsPerMsg: number;
    readonly peakRss: number;
    /** Sampled every 500 ms only (reading smaps_rollup walks the page tables). */
    readonly peakPss: number;
    readonly peakProcs: number;
    /** Messages the sink got beyond the ones sent this round (duplicates). */
    readonly extra: number;
    /** This bench's own CPU (with smtp-source, which it reaps) and the sink's, ms per message. */
    readonly benchMsPerMsg: number;
    /** Machine busy time not accounted for by the system, the bench or the sink, ms per message: other workloads. */
    readonly otherMsPerMsg: number;
    /** Hypervisor steal during the round, ms. */
    readonly stealMs: number;
    /**
     * The busiest single thread's CPU over the round's wall time (until the queue was empty),
     * among threads alive at both ends: for dovetail its event loop; near 1 means one core is
     * what limits it.
     */
    readonly busiestThread: number;
  }

  async function runRound(sys: System, round: number): Promise<Round> {
    const M = opts.messages;
    const deadline = Math.max(60_000, M * 30);
    const before = sys.sink.messages();
    const delivered = sys.sink.waitFor(before + M, deadline);
    delivered.catch(() => undefined); // awaited below; not unhandled if smtp-source fails first
    let peakRss = 0;
    let peakPss = 0;
    let peakProcs = 0;
    let samples = 0;
    const sample = (): void => {
      const m = treeMemory(sys.root, samples++ % 5 === 0);
      peakRss = Math.max(peakRss, m.rss);
      peakPss = Math.max(peakPss, m.pss);
      peakProcs = Math.max(peakProcs, m.procs);
    };
    const sampler = setInterval(sample, 100);
    try {
      const m0 = machineCpuMs();
      const own0 = procCpuMs(process.pid) + procCpuMs(sys.sink.pid);
      const cpu0 = treeCpuMs(sys.root);
      const threads0 = threadCpuMs(sys.root);
      const t0 = performance.now();
      const accepted = await runSource(sys.port, deadline);
      const done = await delivered;
      // The CPU window ends when the queue is empty: the files removed, the state written.
      const drainDeadline = performance.now() + 30_000;
      while ((await sys.queued()) > 0) {
        if (performance.now() > drainDeadline) throw new Error(`${sys.name}: queue not empty 30 s after the sink had every message`);
        await sleep(10);
      }
      const drained = performance.now();
      const threads1 = threadCpuMs(sys.root);
      let busiest = 0;
      for (const [tid, ms] of threads1) busiest = Math.max(busiest, ms - (threads0.get(tid) ?? ms));
      await sleep(100); // a last log line, a process being reaped
      sample();
      const cpu1 = treeCpuMs(sys.root);
      const own1 = procCpuMs(process.pid) + procCpuMs(sys.sink.pid);
      const m1 = machineCpuMs();
      const treeMs = cpu1.user + cpu1.sys - cpu0.user - cpu0.sys;
      await sleep(200);
      return {
        round,
        acceptedPerSec: (M / (accepted - t0)) * 1000,
        deliveredPerSec: (M / (done - t0)) * 1000,
        acceptedMs: accepted - t0,
        deliveredMs: done - t0,
        drainedMs: drained - t0,
        cpuMsPerMsg: treeMs / M,
        sysMsPerMsg: (cpu1.sys - cpu0.sys) / M,
        peakRss,
        peakPss,
        peakProcs,
        extra: sys.sink.messages() - before - M,
        benchMsPerMsg: (own1 - own0) / M,
        otherMsPerMsg: (m1.busy - m0.busy - treeMs - (own1 - own0)) / M,
        stealMs: m1.steal - m0.steal,
        busiestThread: busiest / (drained - t0),
      };
    } finally {
      clearInterval(sampler);
    }
  }

  // ---------------------------------------------------------------- the run

  log(`bench/outbound: ${machine.cpus} CPUs (${machine.cpuModel}), node ${machine.node}, Postfix ${machine.postfix}; ${opts.sessions} sessions × ${opts.messages} messages of ${opts.size} bytes payload, ${opts.warmup} warm-up + ${opts.rounds} rounds`);
  const systems: System[] = [];
  const samples = new Map<string, Round[]>();
  const greeting = new Map<string, Spread>();
  const facts: Record<string, Record<string, unknown>> = {};
  const sinkSessions: Record<string, { sessions: number; messages: number }> = {};
  let failed: unknown;
  try {
    for (const name of systemNames) systems.push(name === 'dovetail' ? await startDovetail() : await startPostfixSystem());
    for (const s of systems) {
      const g: number[] = [];
      for (let i = 0; i < 3; i++) g.push(await greetingMs(s.port));
      greeting.set(s.name, spread(g));
      samples.set(s.name, []);
      log(`  ${s.label}: listening on 127.0.0.1:${s.port}, connect→220 ${spread(g).median.toFixed(1)} ms; sink on ${s.sink.port}`);
    }
    for (let r = 0; r < opts.warmup + opts.rounds; r++) {
      const warm = r < opts.warmup;
      const order = systems.map((_, i) => systems[(i + r) % systems.length]!);
      const line: string[] = [];
      for (const s of order) {
        const x = await runRound(s, r - opts.warmup);
        if (!warm) samples.get(s.name)!.push(x);
        line.push(`${s.name} accepted ${Math.round(x.acceptedPerSec)}/s delivered ${Math.round(x.deliveredPerSec)}/s ${x.cpuMsPerMsg.toFixed(2)} CPU ms/msg (sys ${x.sysMsPerMsg.toFixed(2)}) RSS ${mib(x.peakRss)} MiB PSS ${mib(x.peakPss)} MiB; busiest thread ${Math.round(x.busiestThread * 100)} %, other load ${x.otherMsPerMsg.toFixed(2)} ms/msg, steal ${Math.round(x.stealMs)} ms${x.extra ? ` (${x.extra} extra at the sink!)` : ''}`);
      }
      log(`  ${warm ? 'warm-up' : `round ${r - opts.warmup + 1}/${opts.rounds}`}: ${line.join('; ')}`);
    }
    for (const s of systems) facts[s.name] = await s.facts();
  } catch (err) {
    failed = err;
  } finally {
    // Systems first (their cached connections to the sinks close), then read the sinks, then stop them.
    await stopAll(['client', 'system']);
    await sleep(300);
    for (const s of systems) sinkSessions[s.name] = { sessions: s.sink.sessions(), messages: s.sink.messages() };
    await stopAll();
    if (!failed && remaining().length) failed = new Error(`could not stop ${remaining().map((s) => s.name).join(', ')}`);
  }
  done();
  if (failed) {
    process.stderr.write(`bench failed: ${failed instanceof Error ? (failed.stack ?? failed.message) : String(failed)}\n`);
    process.exitCode = 1;
    return;
  }

  // ---------------------------------------------------------------- the report

  const summary = systems.map((s) => {
    const x = samples.get(s.name)!;
    return {
      name: s.name,
      label: s.label,
      acceptedPerSec: spread(x.map((r) => r.acceptedPerSec)),
      deliveredPerSec: spread(x.map((r) => r.deliveredPerSec)),
      cpuMsPerMsg: spread(x.map((r) => r.cpuMsPerMsg)),
      sysMsPerMsg: spread(x.map((r) => r.sysMsPerMsg)),
      peakRssMiB: mib(Math.max(...x.map((r) => r.peakRss))),
      peakPssMiB: mib(Math.max(...x.map((r) => r.peakPss))),
      peakProcs: Math.max(...x.map((r) => r.peakProcs)),
      greetingMs: greeting.get(s.name)!,
      drainLagMs: spread(x.map((r) => r.drainedMs - r.deliveredMs)),
      deliveryLagMs: spread(x.map((r) => r.deliveredMs - r.acceptedMs)),
      extra: x.reduce((a, r) => a + r.extra, 0),
      benchMsPerMsg: spread(x.map((r) => r.benchMsPerMsg)),
      otherMsPerMsg: spread(x.map((r) => r.otherMsPerMsg)),
      stealMs: spread(x.map((r) => r.stealMs)),
      busiestThread: spread(x.map((r) => r.busiestThread)),
      sink: sinkSessions[s.name],
      facts: facts[s.name],
      rounds: x,
    };
  });
  const d = samples.get('dovetail');
  const p = samples.get('postfix');
  const ratio = (f: (r: Round) => number): Spread => (d && p ? spread(d.map((x, i) => f(x) / f(p[i]!))) : { median: NaN, min: NaN, max: NaN });
  const ratios = {
    acceptedPerSec: ratio((r) => r.acceptedPerSec),
    deliveredPerSec: ratio((r) => r.deliveredPerSec),
    cpuMsPerMsg: ratio((r) => r.cpuMsPerMsg),
    peakRss: ratio((r) => r.peakRss),
    peakPss: ratio((r) => r.peakPss),
  };
  if (args.json) {
    process.stdout.write(JSON.stringify({ machine, options: opts, systems: summary, ratios }, null, 2) + '\n');
    return;
  }
  const f0 = (n: number): string => (Number.isNaN(n) ? '–' : Math.round(n).toLocaleString('en-US'));
  const f2 = (n: number): string => (Number.isNaN(n) ? '–' : n.toFixed(2));
  const range = (s: Spread, f: (n: number) => string): string => (Number.isNaN(s.median) ? '–' : `${f(s.median)} [${f(s.min)}–${f(s.max)}]`);
  const md = (rows: string[][]): string => [rows[0]!, rows[0]!.map(() => '---'), ...rows.slice(1)].map((r) => `| ${r.join(' | ')} |`).join('\n');
  const out = process.stdout;
  out.write(`# Outbound through the queue: dovetail vs Postfix\n\n`);
  out.write(`machine: ${machine.cpus} CPUs (${machine.cpuModel}), ${machine.memoryGiB} GiB, Linux ${machine.kernel}, node ${machine.node}, Postfix ${machine.postfix}; queues in ${machine.tmp}\n`);
  out.write(`load: smtp-source -s ${opts.sessions} -m ${opts.messages} -l ${opts.size} -d (connections reused, no pipelining) per system per round; sink: smtp-sink; dovetail queue concurrency ${opts.concurrency}; ${opts.warmup} warm-up + ${opts.rounds} measured rounds, order alternating\n\n`);
  const rows = [['system', 'accepted msg/s [min–max]', 'delivered msg/s [min–max]', 'CPU ms/msg [min–max]', 'of which kernel', 'peak PSS MiB', 'peak RSS MiB (summed)', 'connect→220 ms']];
  for (const s of summary) {
    rows.push([s.label, range(s.acceptedPerSec, f0), range(s.deliveredPerSec, f0), range(s.cpuMsPerMsg, f2), f2(s.sysMsPerMsg.median), String(s.peakPssMiB), String(s.peakRssMiB), f2(s.greetingMs.median)]);
  }
  if (d && p) rows.push(['dovetail ÷ Postfix', range(ratios.acceptedPerSec, f2), range(ratios.deliveredPerSec, f2), range(ratios.cpuMsPerMsg, f2), '–', range(ratios.peakPss, f2), range(ratios.peakRss, f2), '–']);
  out.write(md(rows) + '\n\n');
  for (const s of summary) {
    const sink = s.sink ? `${s.sink.messages} messages over ${s.sink.sessions} sink connections (${f0(s.sink.messages / Math.max(1, s.sink.sessions))} per connection)` : '';
    out.write(
      `- ${s.label}: sink had all messages ${f0(s.deliveryLagMs.median)} ms after the last 250 (median), queue empty ${f0(s.drainLagMs.median)} ms after that; ${sink}; up to ${s.peakProcs} processes; busiest thread ${Math.round(s.busiestThread.median * 100)} % busy [${Math.round(s.busiestThread.min * 100)}–${Math.round(s.busiestThread.max * 100)}]; ${s.extra} duplicates; client+sink+bench ${f2(s.benchMsPerMsg.median)} CPU ms/msg, other load on the machine ${f2(s.otherMsPerMsg.median)} ms/msg [${f2(s.otherMsPerMsg.min)}–${f2(s.otherMsPerMsg.max)}], steal ${f0(s.stealMs.median)} ms/round; ${JSON.stringify(s.facts)}\n`,
    );
  }
  out.write(
    `\naccepted: messages ÷ time until smtp-source had a 250 for every one (greetings included: each session connects once); delivered: messages ÷ time until the sink had them all;\n` +
      `CPU: utime+stime (+ reaped children) of the whole process tree from the start of the round until its queue was empty, ÷ messages; PSS / RSS: peak over the measured rounds of the tree's summed PSS (sampled every 500 ms; shared pages divided among the processes) and summed RSS (every 100 ms; shared pages counted once per process).\n`,
  );
}
