/**
 * The `dovetail` command line (bin/dovetail.ts is a thin shim over main()). Commands:
 * `start`, `check-config`, `milter serve`, `queue list|show|retry|delete|flush`; see
 * docs/cli.md. Arguments are parsed with node:util parseArgs (strict: an unknown flag is a
 * usage error).
 *
 * Exit codes: 0 done; 1 failed (bad config, queue locked, no such entry, a start-up error);
 * 2 usage (unknown command or flag, a missing argument).
 *
 * Signals under `start`: SIGTERM / SIGINT drain and stop (a second one exits at once, 1);
 * SIGHUP reloads the config (./server.ts says what a reload changes).
 */
import { existsSync, readFileSync } from 'node:fs';
import path from 'node:path';
import { parseArgs, type ParseArgsConfig } from 'node:util';
import type { Logger } from 'pino';
import type { Logging } from '../observe/index.js';
import type { QueueEntry } from '../delivery/queue.js';
import type { Milter } from '../milter/types.js';
import type { RunningServer } from './server.js';
import type { ControlReply, ControlRequest } from './control.js';
import type { LoadedConfig } from './load.js';
import { DEFAULT_CONFIG_FILES, findConfigFile, pathsOf } from './paths.js';
import type { CheckedConfig, ConfigProblem } from './schema.js';
// The rest (config loading, the gateway, the milters, logging) is imported by the commands
// that need it, so `--help` and usage errors start fast.

/** One line per problem (as schema.ts formatProblems, without loading zod). */
const formatProblems = (problems: readonly ConfigProblem[]): string => problems.map((p) => `${p.path}: ${p.message}`).join('\n');

/** Where a command writes; the process's streams unless a test gives others. */
export interface Io {
  readonly out: (text: string) => void;
  readonly err: (text: string) => void;
}

const processIo: Io = { out: (t) => process.stdout.write(t), err: (t) => process.stderr.write(t) };

/** Thrown for a usage error (exit 2). */
class UsageError extends Error {}
/** Thrown for a failure already explained (exit 1); for a bad config, with its problems. */
class Failure extends Error {
  constructor(
    message = '',
    readonly problems: readonly ConfigProblem[] = [],
  ) {
    super(message);
  }
}

const USAGE = {
  main: `Usage: dovetail <command> [options]

Commands:
  start [-c file]                 run the gateway from a config file
  check-config [-c file]          check a config file; print every problem
  milter serve <file> --listen <socket>
                                  serve a milter module over the milter protocol
  queue list|show|retry|delete|flush [-c file]
                                  look at and act on the queue

Options:
  -h, --help                      help (also after any command)
  -v, --version                   the version

Config files: ${DEFAULT_CONFIG_FILES.join(', ')} in the current directory, or -c <file>.
See docs/cli.md.
`,
  start: `Usage: dovetail start [-c file] [--workers N]

Loads and checks the config, starts the gateway (and its queue, the embedded store, the
control socket, metrics if configured) and logs where it listens, as JSON lines on stdout
(or log.file).

Options:
  -c, --config <file>   the config (.ts, .js, .mjs, .json). Default: ./dovetail.config.{ts,js,mjs,json}
  -w, --workers <N>     one gateway process per core: N workers serve SMTP on the shared
                        listeners, this process delivers the queue (docs/cluster.md)
  -h, --help            this help

Signals: SIGTERM/SIGINT drain and stop (again: stop at once); SIGHUP reloads the config
(milters, maps, certificates, authenticate; for new connections); with --workers, SIGUSR2
restarts the workers one at a time.
Exit: 0 stopped; 1 bad config or start-up failure; 2 usage.
`,
  'check-config': `Usage: dovetail check-config [-c file]

Checks the config file (types, fields, files it names, milters it builds) without starting
anything. Prints "ok" and exits 0, or prints every problem ("path: what") and exits 1.

Options:
  -c, --config <file>   the config. Default: ./dovetail.config.{ts,js,mjs,json}
  -h, --help            this help
`,
  milter: `Usage: dovetail milter serve <file> --listen <socket>

Serves the milter a module exports (export "milter", else the default export: a Milter, or
a function returning one) over the Sendmail milter protocol, for Postfix (smtpd_milters)
or Sendmail (INPUT_MAIL_FILTER).

Options:
  -l, --listen <socket>  inet:host:port, inet:port@host or unix:/path (required)
  -h, --help             this help

SIGTERM/SIGINT stop it (sessions in flight finish first).
`,
  queue: `Usage: dovetail queue <subcommand> [options]

Subcommands:
  list [--json]          every entry: id, age, size, sender; each recipient with status and last reply
  show <id> [--json]     one entry in full
  retry [<id>]           attempt one entry now (without id: every entry, as flush)
  delete <id>            remove an entry, without a DSN (postsuper -d)
  flush                  attempt every entry now (postqueue -f)

Talks to the running gateway over its control socket (control.socket, default
<queue.dir>/control.sock); when none is running, locks the queue directory and works on it.

Options:
  -c, --config <file>   the config. Default: ./dovetail.config.{ts,js,mjs,json}
      --json            JSON output (list, show)
  -h, --help            this help
Exit: 0 done; 1 failed (no such entry, locked by a process that does not answer); 2 usage.
`,
} as const;

function parse(args: readonly string[], options: ParseArgsConfig['options'], usage: string): { values: Record<string, string | boolean | undefined>; positionals: string[] } {
  try {
    const r = parseArgs({ args: [...args], options: { ...options, help: { type: 'boolean', short: 'h' } }, allowPositionals: true, strict: true });
    return { values: r.values as Record<string, string | boolean | undefined>, positionals: r.positionals };
  } catch (err) {
    throw new UsageError(`${(err as Error).message}\n\n${usage}`);
  }
}

const configOption = { config: { type: 'string', short: 'c' } } as const;

async function loadOrFail(given: string | undefined, io: Io): Promise<LoadedConfig & { config: CheckedConfig }> {
  const file = findConfigFile(given);
  if (!file) {
    io.err(`dovetail: no config file: give -c <file>, or put one of ${DEFAULT_CONFIG_FILES.join(', ')} here\n`);
    throw new Failure();
  }
  const { loadConfig } = await import('./load.js');
  const loaded = await loadConfig(file);
  if (!loaded.config || loaded.problems.length) {
    io.err(`${file}: ${loaded.problems.length} problem${loaded.problems.length === 1 ? '' : 's'}\n${formatProblems(loaded.problems)}\n`);
    throw new Failure('', loaded.problems);
  }
  return loaded as LoadedConfig & { config: CheckedConfig };
}

// ---- check-config ---------------------------------------------------------------------------

async function checkConfigCommand(args: readonly string[], io: Io): Promise<number> {
  const { values, positionals } = parse(args, configOption, USAGE['check-config']);
  if (values['help']) return io.out(USAGE['check-config']), 0;
  if (positionals.length) throw new UsageError(`unexpected argument ${positionals[0]}\n\n${USAGE['check-config']}`);
  const loaded = await loadOrFail(values['config'] as string | undefined, io);
  const { buildDelivery, buildReloadable, staticGatewayOptions, redisFor, closeRedisClients, BuildError } = await import('./build.js');
  // Build what can be built without starting anything: milters, files, routes (a Redis
  // client is made but never connects).
  const problems = [];
  try {
    const redis = await redisFor(loaded.config, { connect: false });
    staticGatewayOptions(loaded.config, loaded.dir, redis);
    await (await buildReloadable(loaded.config, loaded.dir, redis)).close();
  } catch (err) {
    if (!(err instanceof BuildError)) throw err;
    problems.push(...err.problems);
  } finally {
    closeRedisClients();
  }
  try {
    const t = await buildDelivery(loaded.config, loaded.dir, loaded.config.delivery.store ? { host: '127.0.0.1', port: 24 } : undefined, loaded.config.hostname);
    await t.close?.();
  } catch (err) {
    if (!(err instanceof BuildError)) throw err;
    problems.push(...err.problems);
  }
  if (problems.length) {
    io.err(`${loaded.file}: ${problems.length} problem${problems.length === 1 ? '' : 's'}\n${formatProblems(problems)}\n`);
    return 1;
  }
  io.out(`${loaded.file}: ok\n`);
  return 0;
}

// ---- start ----------------------------------------------------------------------------------

/** Runs `dovetail start`: resolves with the exit code once stopped by a signal. */
async function startCommand(args: readonly string[], io: Io): Promise<number> {
  const { values, positionals } = parse(args, { ...configOption, workers: { type: 'string', short: 'w' } }, USAGE.start);
  if (values['help']) return io.out(USAGE.start), 0;
  if (positionals.length) throw new UsageError(`unexpected argument ${positionals[0]}\n\n${USAGE.start}`);
  let workers: number | undefined;
  if (values['workers'] !== undefined) {
    workers = Number(values['workers']);
    if (!/^\d+$/.test(String(values['workers'])) || !Number.isSafeInteger(workers) || workers < 1 || workers > 256) {
      throw new UsageError(`--workers: expected an integer 1..256, got ${JSON.stringify(values['workers'])}\n\n${USAGE.start}`);
    }
  }
  // A worker process runs this same command line (node:cluster forks it): it serves SMTP
  // and takes its orders from the primary.
  const { default: cluster } = await import('node:cluster');
  const channel = workers !== undefined && cluster.isWorker ? (await import('../cluster.js')).workerChannel() : undefined;
  if (channel) workers = undefined;
  let loaded: LoadedConfig & { config: CheckedConfig };
  try {
    loaded = await loadOrFail(values['config'] as string | undefined, io);
  } catch (err) {
    // Printed on stderr already; also a log line, where the operator's log collector looks.
    if (err instanceof Failure) {
      const { enableLogging } = await import('../observe/index.js');
      const logging = enableLogging({});
      logging.logger.error({ event: 'config-invalid', args, problems: err.problems }, `not started: ${err.problems.length ? formatProblems(err.problems).replace(/\n/g, '; ') : 'no config file'}`);
      logging.close();
    }
    throw err;
  }
  const [{ enableLogging }, { startServer }, { BuildError }] = await Promise.all([import('../observe/index.js'), import('./server.js'), import('./build.js')]);
  const log = loaded.config.log;
  const logging: Logging = enableLogging({ level: log?.level ?? 'info', destination: log?.file ? path.resolve(loaded.dir, log.file) : 1 });
  const logger: Logger = logging.logger;
  // A SIGHUP while starting must not kill the process (Node's default): say it comes too early.
  const early = (): void => void logger.warn({ event: 'reload-too-early' }, 'SIGHUP while starting: not reloaded');
  // SIGTERM/SIGINT while starting: stop (draining) as soon as it has started.
  let stopWhenStarted: NodeJS.Signals | undefined;
  const earlyStop = (signal: NodeJS.Signals): void => {
    if (stopWhenStarted) process.exit(1);
    stopWhenStarted = signal;
  };
  process.on('SIGHUP', early);
  process.on('SIGTERM', earlyStop);
  process.on('SIGINT', earlyStop);
  const offEarly = (): void => {
    process.off('SIGHUP', early);
    process.off('SIGTERM', earlyStop);
    process.off('SIGINT', earlyStop);
  };
  let server: RunningServer;
  try {
    server = await startServer(loaded.config, { dir: loaded.dir, logger, ...(workers !== undefined ? { workers } : {}), ...(channel ? { worker: channel } : {}) });
  } catch (err) {
    offEarly();
    if (err instanceof BuildError) {
      logger.error({ event: 'config-invalid', file: loaded.file, problems: err.problems }, `${loaded.file}: ${err.message.replace(/\n/g, '; ')}`);
      io.err(`${loaded.file}: ${err.problems.length} problem${err.problems.length === 1 ? '' : 's'}\n${err.message}\n`);
    } else {
      logger.error({ event: 'start-failed', err }, `cannot start: ${(err as Error).message}`);
      io.err(`dovetail: cannot start: ${(err as Error).message}\n`);
    }
    logging.close();
    return 1;
  }
  logger.info(
    {
      event: channel ? 'worker-listening' : 'listening',
      ...(channel ? { slot: channel.slot } : {}),
      ...(workers !== undefined ? { workers, pids: server.pool?.pids() } : {}),
      config: loaded.file,
      listen: server.addresses,
      store: server.store,
      control: server.controlSocket,
      metrics: server.metricsPort,
      pid: process.pid,
    },
    `dovetail listening on ${server.addresses.map((a) => `${a.host}:${a.port}`).join(', ')}`,
  );

  let stopped!: (code: number) => void;
  const finished = new Promise<number>((r) => (stopped = r));
  return new Promise<number>((resolve) => {
    let stopping = false;
    let reloading: Promise<void> | undefined;
    let again = false;
    const reload = async (): Promise<void> => {
      const { loadConfig } = await import('./load.js');
      const next = await loadConfig(loaded.file);
      const outcome = await server.reload(next.config, next.problems);
      if (!outcome.applied) {
        logger.error({ event: 'reload-failed', file: loaded.file, problems: outcome.problems }, `reload: the config has problems, keeping the old one: ${formatProblems(outcome.problems).replace(/\n/g, '; ')}`);
        return;
      }
      if (outcome.needRestart.length) {
        logger.warn({ event: 'reload-needs-restart', fields: outcome.needRestart }, `reload: changes to ${outcome.needRestart.join(', ')} need a restart; not applied`);
      }
      logger.info({ event: 'reloaded', file: loaded.file }, 'reloaded: milters, maps, certificates and authenticate apply to new connections');
    };
    const onHup = (): void => {
      if (stopping) return;
      if (reloading) {
        again = true;
        return;
      }
      logger.info({ event: 'reload', signal: 'SIGHUP' }, 'SIGHUP: reloading the config');
      reloading = (async () => {
        do {
          again = false;
          await reload().catch((err: unknown) => logger.error({ event: 'reload-failed', err }, `reload failed: ${(err as Error).message}`));
        } while (again);
        reloading = undefined;
      })();
    };
    const onStop = (signal: NodeJS.Signals): void => {
      if (stopping) {
        logger.warn({ event: 'stop-now', signal }, `${signal} again: exiting now`);
        logging.close();
        process.exit(1);
      }
      stopping = true;
      logger.info({ event: 'stopping', signal }, `${signal}: finishing messages in flight, then stopping`);
      void (async () => {
        await reloading;
        let code = 0;
        try {
          await server.close();
        } catch (err) {
          logger.error({ event: 'stop-failed', err }, `stopping: ${(err as Error).message}`);
          code = 1;
        }
        logger.info({ event: 'stopped' }, 'stopped');
        process.off('SIGHUP', onSignalHup);
        process.off('SIGTERM', onStop);
        process.off('SIGINT', onStop);
        process.off('SIGUSR2', onRestart);
        logging.close();
        stopped(code);
        resolve(code);
      })();
    };
    // A worker reloads and drains when the primary says so; a SIGHUP sent to the whole
    // process group (a terminal) is the primary's to act on.
    const onSignalHup = channel ? (): void => undefined : onHup;
    const onRestart = (): void => {
      const pool = server.pool;
      if (!pool || stopping) return;
      logger.info({ event: 'rolling-restart', signal: 'SIGUSR2' }, 'SIGUSR2: restarting the workers one at a time');
      void pool.rollingRestart().then(
        () => logger.info({ event: 'rolling-restart-done', pids: pool.pids() }, 'workers restarted'),
        (err: unknown) => logger.error({ event: 'rolling-restart-failed', err }, `rolling restart: ${(err as Error).message}`),
      );
    };
    channel?.onReload(onHup);
    channel?.onDrain(
      () =>
        new Promise<void>((done) => {
          onStop('SIGTERM');
          void finished.then(() => done());
        }),
    );
    process.on('SIGHUP', onSignalHup);
    process.on('SIGTERM', onStop);
    process.on('SIGINT', onStop);
    if (server.pool) process.on('SIGUSR2', onRestart);
    offEarly();
    channel?.ready();
    if (stopWhenStarted) onStop(stopWhenStarted);
  });
}

// ---- milter serve ---------------------------------------------------------------------------

async function milterCommand(args: readonly string[], io: Io): Promise<number> {
  const { values, positionals } = parse(args, { listen: { type: 'string', short: 'l' } }, USAGE.milter);
  if (values['help']) return io.out(USAGE.milter), 0;
  const [sub, file, ...extra] = positionals;
  if (sub !== 'serve') throw new UsageError(`${sub === undefined ? 'missing subcommand' : `unknown subcommand ${sub}`}\n\n${USAGE.milter}`);
  if (!file) throw new UsageError(`milter serve needs a module file\n\n${USAGE.milter}`);
  if (extra.length) throw new UsageError(`unexpected argument ${extra[0]}\n\n${USAGE.milter}`);
  const listen = values['listen'] as string | undefined;
  if (!listen) throw new UsageError(`milter serve needs --listen <socket>\n\n${USAGE.milter}`);
  const abs = path.resolve(file);
  const [{ enableLogging }, define, { serveMilter }] = await Promise.all([import('../observe/index.js'), import('../milter/define.js'), import('../milter/protocol/server.js')]);
  const validateMilter: (m: unknown) => asserts m is Milter = define.validateMilter;
  let milter: Milter;
  try {
    const mod = await (await import('./load.js')).importFresh(abs);
    let value = mod['milter'] ?? mod['default'];
    if (typeof value === 'function') value = await (value as () => unknown)();
    if (value === undefined) throw new Error('exports no milter (export default defineMilter({ … }), or export const milter)');
    validateMilter(value as Milter);
    milter = value as Milter;
  } catch (err) {
    io.err(`dovetail: ${file}: ${(err as Error).message.split('\n')[0]}\n`);
    return 1;
  }
  const logging = enableLogging({});
  const logger = logging.logger;
  let server: Awaited<ReturnType<typeof serveMilter>>;
  try {
    server = await serveMilter(milter, { listen });
  } catch (err) {
    io.err(`dovetail: cannot serve on ${listen}: ${(err as Error).message}\n`);
    logging.close();
    return 1;
  }
  const where = server.address;
  logger.info({ event: 'milter-listening', milter: milter.name, listen: where, port: server.port, pid: process.pid }, `serving milter ${milter.name} on ${where}`);
  return new Promise<number>((resolve) => {
    let stopping = false;
    const onStop = (signal: NodeJS.Signals): void => {
      if (stopping) process.exit(1);
      stopping = true;
      logger.info({ event: 'stopping', signal }, `${signal}: stopping`);
      server.close().then(
        () => {
          logger.info({ event: 'stopped' }, 'stopped');
          process.off('SIGTERM', onStop);
          process.off('SIGINT', onStop);
          process.off('SIGHUP', onHup);
          logging.close();
          resolve(0);
        },
        () => resolve(1),
      );
    };
    const onHup = (): void => logger.warn({ event: 'reload-unsupported' }, 'SIGHUP: milter serve does not reload; restart it to load the module again');
    process.on('SIGTERM', onStop);
    process.on('SIGINT', onStop);
    process.on('SIGHUP', onHup);
  });
}

// ---- queue ----------------------------------------------------------------------------------

function age(from: string | Date, now = Date.now()): string {
  const s = Math.max(0, Math.round((now - new Date(from).getTime()) / 1000));
  if (s < 120) return `${s}s`;
  if (s < 7200) return `${Math.round(s / 60)}m`;
  if (s < 172_800) return `${Math.round(s / 3600)}h`;
  return `${Math.round(s / 86_400)}d`;
}

const replyText = (r: { code: number; enhanced?: string; lines: readonly string[] } | undefined): string =>
  r ? `${r.code} ${r.enhanced ? `${r.enhanced} ` : ''}${r.lines.join(' ')}` : '-';

/** postqueue -p style: one block per entry. */
function formatEntries(entries: readonly QueueEntry[]): string {
  if (entries.length === 0) return 'Mail queue is empty\n';
  let out = `${'ID'.padEnd(22)} ${'AGE'.padStart(5)} ${'SIZE'.padStart(9)}  SENDER\n`;
  for (const e of entries) {
    const flags = `${e.kind === 'dsn' ? ` (DSN of ${e.of ?? '?'})` : ''}${e.inFlight ? ' (in flight)' : ''}`;
    out += `${e.queueId.padEnd(22)} ${age(e.arrival).padStart(5)} ${String(e.size).padStart(9)}  <${e.sender.address}>${flags}\n`;
    for (const r of e.recipients) {
      out += `${' '.repeat(40)}<${r.address}> ${r.status}${r.attempts ? `, ${r.attempts} attempt${r.attempts === 1 ? '' : 's'}` : ''}${r.lastReply ? `: ${replyText(r.lastReply)}` : ''}\n`;
    }
  }
  return out + `-- ${entries.length} entr${entries.length === 1 ? 'y' : 'ies'}, ${entries.reduce((n, e) => n + e.size, 0)} bytes\n`;
}

function formatEntry(e: QueueEntry): string {
  const d = (x: Date | string | undefined): string => (x ? new Date(x).toISOString() : '-');
  let out = `id:            ${e.queueId}\nkind:          ${e.kind}${e.of ? ` (of ${e.of})` : ''}\nsender:        <${e.sender.address}>\narrival:       ${d(e.arrival)} (${age(e.arrival)} ago)\nsize:          ${e.size}\nattempts:      ${e.attempts}\nlast attempt:  ${d(e.lastAttempt)}\nnext attempt:  ${d(e.nextAttempt)}\nlast reply:    ${replyText(e.lastReply)}\nin flight:     ${e.inFlight ? 'yes' : 'no'}\nrecipients:\n`;
  for (const r of e.recipients) {
    out += `  <${r.address}> ${r.status}${r.expired ? ' (expired)' : ''}, ${r.attempts} attempt${r.attempts === 1 ? '' : 's'}, next ${d(r.nextAttempt)}, last reply ${replyText(r.lastReply)}\n`;
  }
  return out;
}

/** Sends a request to the running gateway, or (none running) does it on the locked directory. */
async function queueRequest(loaded: LoadedConfig & { config: CheckedConfig }, req: ControlRequest): Promise<ControlReply> {
  const paths = pathsOf(loaded.config, loaded.dir);
  const { controlRequest, handleRequest } = await import('./control.js');
  // retry and flush wait for the attempts (bounded by the transports' own timeouts).
  const timeout = req.cmd === 'retry' || req.cmd === 'flush' ? 15 * 60_000 : 60_000;
  try {
    return await controlRequest(paths.controlSocket, req, timeout);
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    if (code !== 'ENOENT' && code !== 'ECONNREFUSED') throw err;
  }
  const { createQueue, queueLockHolder } = await import('../delivery/queue.js');
  const holder = await queueLockHolder(paths.queueDir);
  if (holder !== undefined) {
    throw new Failure(`the queue ${paths.queueDir} is locked by process ${holder}, whose control socket ${paths.controlSocket} does not answer`);
  }
  // No queue directory yet: nothing queued (and nothing created by looking).
  if (!existsSync(paths.queueDir)) {
    if (req.cmd === 'list') return { ok: true, entries: [] };
    if (req.cmd === 'flush') return { ok: true, attempted: 0 };
    if (req.cmd === 'status') return { ok: false, error: 'no gateway is running' };
    return { ok: false, error: `no queue entry ${req.id ?? ''}`.trim() };
  }
  // No gateway: work on the directory under its lock. Only retry/flush deliver.
  const delivers = req.cmd === 'retry' || req.cmd === 'flush';
  const delivery = delivers ? await (await import('./server.js')).openDelivery(loaded.config, loaded.dir) : undefined;
  const idle = { name: 'none', async deliver(): Promise<never> { throw new Error('no delivery here'); } };
  const { dir: _d, ...q } = (loaded.config.queue ?? {}) as Record<string, unknown>;
  const queue = createQueue({ ...(q as object), dir: paths.queueDir, transport: delivery?.transport ?? idle, lock: true });
  try {
    return await handleRequest(queue, req);
  } finally {
    await queue.close();
    await delivery?.close();
  }
}

async function queueCommand(args: readonly string[], io: Io): Promise<number> {
  const { values, positionals } = parse(args, { ...configOption, json: { type: 'boolean' } }, USAGE.queue);
  if (values['help']) return io.out(USAGE.queue), 0;
  const [sub, id, ...extra] = positionals;
  const subs = ['list', 'show', 'retry', 'delete', 'flush'];
  if (sub === undefined || !subs.includes(sub)) throw new UsageError(`${sub === undefined ? 'missing subcommand' : `unknown subcommand ${sub}`}\n\n${USAGE.queue}`);
  if ((sub === 'show' || sub === 'delete') && id === undefined) throw new UsageError(`queue ${sub} needs a queue id\n\n${USAGE.queue}`);
  if ((sub === 'list' || sub === 'flush') && id !== undefined) throw new UsageError(`unexpected argument ${id}\n\n${USAGE.queue}`);
  if (extra.length) throw new UsageError(`unexpected argument ${extra[0]}\n\n${USAGE.queue}`);
  const loaded = await loadOrFail(values['config'] as string | undefined, io);
  const cmd = (sub === 'retry' && id === undefined ? 'flush' : sub) as ControlRequest['cmd'];
  let reply: ControlReply;
  try {
    reply = await queueRequest(loaded, { cmd, ...(id !== undefined ? { id } : {}) });
  } catch (err) {
    io.err(`dovetail: queue ${sub}: ${(err as Error).message}\n`);
    return 1;
  }
  if (!reply.ok) {
    io.err(`dovetail: queue ${sub}: ${reply.error}\n`);
    return 1;
  }
  const json = values['json'] === true;
  switch (cmd) {
    case 'list':
      io.out(json ? JSON.stringify(reply.entries ?? [], null, 1) + '\n' : formatEntries(reply.entries ?? []));
      break;
    case 'show':
      io.out(json ? JSON.stringify(reply.entry, null, 1) + '\n' : formatEntry(reply.entry!));
      break;
    case 'retry':
    case 'flush':
      io.out(`${reply.attempted ?? 0} entr${reply.attempted === 1 ? 'y' : 'ies'} attempted\n`);
      break;
    case 'delete':
      io.out(`${id}: deleted\n`);
      break;
    default:
      break;
  }
  return 0;
}

// ---- main -----------------------------------------------------------------------------------

function version(): string {
  try {
    const pkg = JSON.parse(readFileSync(new URL('../../../package.json', import.meta.url), 'utf8')) as { version?: string };
    return pkg.version ?? 'unknown';
  } catch {
    return 'unknown';
  }
}

/**
 * Runs the command line `args` (without `node` and the script) and resolves with the exit
 * code. `start` and `milter serve` resolve once stopped by a signal.
 */
export async function main(args: readonly string[], io: Io = processIo): Promise<number> {
  const [command, ...rest] = args;
  try {
    switch (command) {
      case 'start':
        return await startCommand(rest, io);
      case 'check-config':
        return await checkConfigCommand(rest, io);
      case 'milter':
        return await milterCommand(rest, io);
      case 'queue':
        return await queueCommand(rest, io);
      case 'help':
      case '--help':
      case '-h':
        io.out(USAGE.main);
        return 0;
      case '--version':
      case '-v':
        io.out(`dovetail ${version()}\n`);
        return 0;
      case undefined:
        throw new UsageError(`missing command\n\n${USAGE.main}`);
      default:
        throw new UsageError(`unknown command ${command}\n\n${USAGE.main}`);
    }
  } catch (err) {
    if (err instanceof UsageError) {
      io.err(`dovetail: ${err.message}`);
      return 2;
    }
    if (err instanceof Failure) {
      if (err.message) io.err(`dovetail: ${err.message}\n`);
      return 1;
    }
    io.err(`dovetail: ${(err as Error).stack ?? String(err)}\n`);
    return 1;
  }
}
