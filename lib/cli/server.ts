/**
 * `dovetail start` without the process around it: startServer(config) starts the embedded
 * store (if configured), the queue (locked), the gateway and the control socket, and
 * returns something closable and reloadable.
 *
 * With workers (`dovetail start --workers N`, docs/cluster.md) the same function runs in
 * two roles: the primary (`workers`) starts the store, the delivering queue (locked), the
 * control socket and metrics, then the worker pool, and serves no SMTP; each worker
 * (`worker`) runs the gateway with a queue that only writes and hands its entries to the
 * primary, reaches the primary's store at the address the primary passes down, and
 * answers the primary's metrics requests (served aggregated by the primary).
 *
 * Reload (SIGHUP): the config is checked and built again; milters, maps, certificates and
 * authenticate are replaced for new connections (Gateway.reconfigure); a change to anything
 * else (listeners, delivery, queue, limits, logging, metrics, control) is logged as needing a
 * restart and not applied. A config that does not check or build keeps the old one.
 *
 * Does not: handle signals or print (./main.ts does), or fork.
 */
import { mkdir } from 'node:fs/promises';
import path from 'node:path';
import type { Logger } from 'pino';
import { createGateway } from '../smtp/gateway.js';
import type { Gateway } from '../smtp/options.js';
import { createQueue, type DeliveryQueue, type QueueOptions } from '../delivery/queue.js';
import { createLmtpServer, type LmtpServer } from '../delivery/lmtp-server.js';
import { maildir } from '../delivery/maildir.js';
import type { Transport } from '../delivery/types.js';
import { parseSocketSpec } from '../milter/protocol/socket.js';
import { enableMetrics, serveMetrics, type Metrics, type MetricsServer } from '../observe/index.js';
import { buildDelivery, buildReloadable, closeRedisClients, listenOptions, pathsOf, redisFor, staticGatewayOptions, BuildError, type Reloadable, type StoreAddress } from './build.js';
import { serveControl, type ControlServer } from './control.js';
import { AggregatorRegistry, Registry } from 'prom-client';
import { startWorkerPool, type WorkerChannel, type WorkerPool } from '../cluster.js';
import type { CheckedConfig, ConfigProblem } from './schema.js';

/** A running server (what `dovetail start` runs). */
export interface RunningServer {
  /** The gateway (none in the primary of a worker pool). */
  readonly gateway: Gateway | undefined;
  /** The worker pool (in its primary). */
  readonly pool: WorkerPool | undefined;
  readonly queue: DeliveryQueue;
  /** The gateway's bound addresses. */
  readonly addresses: readonly { host: string; port: number }[];
  /** The embedded store's address, when there is one. */
  readonly store: StoreAddress | undefined;
  readonly controlSocket: string;
  /** The metrics server's port, when metrics are served. */
  readonly metricsPort: number | undefined;
  /**
   * Applies a new config to new connections (see the file header). Resolves with what was
   * not applied; never rejects for a bad config (it keeps the old one and says why).
   */
  reload(config: CheckedConfig | undefined, problems?: readonly ConfigProblem[]): Promise<ReloadOutcome>;
  /** Drains and stops everything, in order: control socket, gateway (and queue), store, metrics. */
  close(): Promise<void>;
}

export interface ReloadOutcome {
  readonly applied: boolean;
  /** Config problems that kept the old config. */
  readonly problems: readonly ConfigProblem[];
  /** Top-level fields that changed but need a restart. */
  readonly needRestart: readonly string[];
}

export interface StartOptions {
  /** The directory relative paths are resolved against (the config file's). */
  readonly dir: string;
  readonly logger: Logger;
  /** Run as the primary of this many workers (in the primary process). */
  readonly workers?: number;
  /** Run as a worker of a pool (in a cluster worker). */
  readonly worker?: WorkerChannel;
}

/** The environment variable the primary passes its embedded store's address down in. */
const STORE_ENV = 'DOVETAIL_STORE_ADDRESS';
/** How long a worker leaving the pool lets its clients finish their sessions. */
const WORKER_SESSION_WAIT = 60_000;

/** Serves the primary's metrics together with every worker's, aggregated (prom-client's cluster aggregation). */
class PoolRegistry extends Registry {
  constructor(
    private readonly own: Registry,
    private readonly pool: WorkerPool,
  ) {
    super();
  }

  override async metrics(): Promise<string> {
    const answers = await this.pool.ask('metrics');
    const workers = answers.filter((a): a is Parameters<typeof AggregatorRegistry.aggregate>[0][number] => Array.isArray(a));
    return AggregatorRegistry.aggregate([await this.own.getMetricsAsJSON(), ...workers]).metrics();
  }
}

/**
 * A value as text for comparing two configs: objects given by a TS/JS config (transports,
 * functions) by identity, never walked (they may be large or circular).
 */
function fingerprintOf(value: unknown): string {
  const ids = new Map<object, number>();
  const idOf = (o: object): string => {
    if (!ids.has(o)) ids.set(o, ids.size + 1);
    return `#${ids.get(o)}`;
  };
  return JSON.stringify(value, (_k, x: unknown) => {
    if (typeof x === 'function') return `[function ${idOf(x)}]`;
    if (x !== null && typeof x === 'object' && !Array.isArray(x) && Object.getPrototypeOf(x) !== Object.prototype) return `[object ${idOf(x)}]`;
    return x;
  }) ?? 'undefined';
}

/** The parts of a config that only a restart changes, as JSON (milters left out: they reload). */
function restartOnly(config: CheckedConfig): Record<string, string> {
  const listen = (config.listen ?? []).map(({ milters: _m, ...l }) => l);
  const { milters: _m, tls: _t, authenticate: _a, listen: _l, ...rest } = config;
  // tls and authenticate reload, but turning them on or off needs a restart.
  const out: Record<string, string> = { listen: JSON.stringify(listen), tls: String(config.tls !== undefined), authenticate: String(config.authenticate !== undefined) };
  for (const [k, v] of Object.entries(rest)) out[k] = fingerprintOf(v);
  return out;
}

/** The embedded store's listen option from the config. */
function storeListen(listen: unknown): { host?: string; port: number } | { path: string } {
  if (listen === undefined) return { host: '127.0.0.1', port: 0 };
  if (typeof listen === 'string') {
    const spec = parseSocketSpec(/^(inet6?|unix|local):/i.test(listen) ? listen : `inet:${listen}`);
    return spec.kind === 'unix' ? { path: spec.path } : { host: spec.host ?? '127.0.0.1', port: spec.port };
  }
  return listen as { host?: string; port: number } | { path: string };
}

/**
 * Starts the embedded store (when `delivery.store` is set) and builds the delivery transport.
 * Also what `dovetail queue retry` uses when no gateway is running.
 */
export async function openDelivery(config: CheckedConfig, dir: string): Promise<{ transport: Transport; store: LmtpServer | undefined; close(): Promise<void> }> {
  let store: LmtpServer | undefined;
  const s = config.delivery.store;
  if (s) {
    const root = path.resolve(dir, s.root);
    await mkdir(root, { recursive: true, mode: 0o700 });
    const { root: _r, listen, ...rest } = s;
    store = await createLmtpServer({ ...rest, root, listen: storeListen(listen), ...(rest.hostname === undefined && config.hostname ? { hostname: config.hostname } : {}) } as Parameters<typeof createLmtpServer>[0]);
  }
  try {
    const transport = await buildDelivery(config, dir, store?.address, config.hostname, { createDirs: true });
    return {
      transport,
      store,
      async close() {
        await transport.close?.();
        await store?.close();
      },
    };
  } catch (err) {
    await store?.close();
    throw err;
  }
}

/** A worker's delivery: the routes it builds itself, and the primary's embedded store at the address passed down. */
async function workerDelivery(config: CheckedConfig, dir: string): Promise<{ transport: Transport; store: LmtpServer | undefined; close(): Promise<void> }> {
  const raw = process.env[STORE_ENV];
  const store = raw ? (JSON.parse(raw) as StoreAddress) : undefined;
  const transport = await buildDelivery(config, dir, store, config.hostname, { createDirs: true });
  return { transport, store: undefined, close: async () => transport.close?.() };
}

/**
 * Starts a server from a checked config.
 *
 * @throws BuildError (a part of the config could not be built, each named by its path),
 * DovetailError `DOVETAIL_ERR_QUEUE_LOCKED` (another live process holds the queue), or the
 * error of a listener that could not bind.
 */
export async function startServer(config: CheckedConfig, options: StartOptions): Promise<RunningServer> {
  const { dir, logger } = options;
  const paths = pathsOf(config, dir);
  const primary = options.workers !== undefined;
  const worker = options.worker;
  if (primary && listenOptions(config).some((l) => l.port === 0)) {
    throw new BuildError([{ path: 'listen', message: 'with --workers every listener needs a fixed port (0 would give each worker its own)' }]);
  }
  const cleanup: (() => Promise<unknown>)[] = [];
  const undo = async (): Promise<void> => {
    for (const f of cleanup.reverse()) await f().catch(() => undefined);
  };
  try {
    // One Redis client for the process (rateLimit, greylist, clientLimits in Redis), reused by reloads.
    const redis = await redisFor(config, { onError: (err) => logger.warn({ event: 'redis-error', err: err.message }, `redis: ${err.message}`) });
    if (redis) cleanup.push(async () => closeRedisClients());
    let current: Reloadable = await buildReloadable(config, dir, redis);
    cleanup.push(() => current.close());
    const q = config.queue ?? {};
    await mkdir(paths.queueDir, { recursive: true, mode: 0o700 });
    const delivery = worker ? await workerDelivery(config, dir) : await openDelivery(config, dir);
    cleanup.push(() => delivery.close());
    const { dir: _d, ...queueOptions } = q as Omit<QueueOptions, 'transport'>;
    const queue = createQueue({
      ...queueOptions,
      ...(queueOptions.hostname === undefined && config.hostname !== undefined ? { hostname: config.hostname } : {}),
      dir: paths.queueDir,
      transport: delivery.transport,
      // A worker's queue only writes (the primary holds the lock and delivers).
      ...(worker ? { deliver: false, onCommitted: worker.queued } : { lock: true }),
    });
    // Take the queue's lock (and recover it) before anything listens.
    await queue.start();
    cleanup.push(() => queue.close());
    await mkdir(paths.quarantine, { recursive: true, mode: 0o700 });
    if (config.spool?.dir) await mkdir(path.resolve(dir, config.spool.dir), { recursive: true, mode: 0o700 });
    const listen = listenOptions(config).map((l, i) => {
      const own = current.listenerMilters[i];
      return own === undefined ? l : { ...l, milters: own };
    });
    let pool: WorkerPool | undefined;
    const gateway = primary ? undefined : createGateway({
      ...staticGatewayOptions(config, dir, redis),
      listen,
      milters: current.milters,
      delivery: delivery.transport,
      queue,
      quarantine: maildir({ root: paths.quarantine, deliveredTo: false }),
      ...(current.tls ? { tls: current.tls } : {}),
      ...(current.authenticate ? { authenticate: current.authenticate } : {}),
    });
    let addresses: readonly { host: string; port: number }[];
    if (gateway) {
      addresses = await gateway.listen();
      // A worker leaving the pool lets its clients finish (the other workers take new ones).
      cleanup.push(() => gateway.close(worker ? { sessions: WORKER_SESSION_WAIT } : {}));
    } else {
      const store = delivery.store?.address;
      const p = startWorkerPool({
        workers: options.workers!,
        onQueued: (id) => void queue.adopt(id).catch((err: unknown) => logger.error({ err, queueId: id }, 'adopting a worker\'s queue entry failed')),
        onEvent: (e) => (e.event === 'worker-exited' && !e.expected ? logger.error : logger.info).call(logger, { ...e }, `${e.event} (slot ${e.slot})`),
        ...(store ? { env: { [STORE_ENV]: JSON.stringify(store) } } : {}),
      });
      pool = p;
      cleanup.push(() => p.close());
      await p.ready();
      addresses = listenOptions(config).map((l) => ({ host: l.host ?? '127.0.0.1', port: l.port }));
    }
    if (!worker) {
      const control: ControlServer = await serveControl(paths.controlSocket, queue, (err) => logger.error({ err }, 'control socket error'));
      cleanup.push(() => control.close());
    }
    let metrics: Metrics | undefined;
    let metricsServer: MetricsServer | undefined;
    if (config.metrics && worker) {
      // A worker's metrics go to the primary, which serves them aggregated.
      const m = enableMetrics({});
      cleanup.push(async () => m.close());
      worker.answer('metrics', () => m.registry.getMetricsAsJSON());
    } else if (config.metrics) {
      metrics = enableMetrics({ queues: [queue] });
      const m = metrics;
      cleanup.push(async () => m.close());
      const l = config.metrics.listen;
      const at = typeof l === 'number' ? { host: '127.0.0.1', port: l } : parseSocketSpec(/^inet6?:/i.test(l) ? l : `inet:${l}`);
      if ('path' in at) throw new BuildError([{ path: 'metrics.listen', message: 'expected "host:port"' }]);
      metricsServer = await serveMetrics({ registry: pool ? new PoolRegistry(metrics.registry, pool) : metrics.registry, host: at.host ?? '127.0.0.1', port: at.port });
      const ms = metricsServer;
      cleanup.push(() => ms.close());
    }
    const running = restartOnly(config);
    const retired = new Map<NodeJS.Timeout, Reloadable>();
    return {
      gateway,
      pool,
      queue,
      addresses,
      store: delivery.store?.address,
      controlSocket: paths.controlSocket,
      metricsPort: metricsServer?.port,
      async reload(next, problems = []) {
        if (!next || problems.length) return { applied: false, problems, needRestart: [] };
        const wanted = restartOnly(next);
        const needRestart = Object.keys({ ...wanted, ...running }).filter((k) => wanted[k] !== running[k]);
        let fresh: Reloadable;
        try {
          fresh = await buildReloadable(next, dir, redis);
        } catch (err) {
          if (err instanceof BuildError) return { applied: false, problems: err.problems, needRestart };
          throw err;
        }
        if (pool) {
          // The primary serves no SMTP: the config checked and built, each worker reloads it.
          await fresh.close();
          pool.reload();
          return { applied: true, problems: [], needRestart };
        }
        try {
          gateway!.reconfigure({
            milters: fresh.milters,
            listeners: listenOptions(config).map((_, i) => ({ milters: fresh.listenerMilters[i] })),
            ...(fresh.tls && current.tls ? { tls: fresh.tls } : {}),
            ...(fresh.authenticate && current.authenticate ? { authenticate: fresh.authenticate } : {}),
          });
        } catch (err) {
          await fresh.close();
          return { applied: false, problems: [{ path: '(reload)', message: (err as Error).message }], needRestart };
        }
        const old = current;
        current = fresh;
        // Connections in flight may still use the old authenticate: end it after they had time.
        const t = setTimeout(() => {
          retired.delete(t);
          void old.close();
        }, config.limits?.closeTimeout ?? 30_000);
        t.unref();
        retired.set(t, old);
        return { applied: true, problems: [], needRestart };
      },
      async close() {
        await undo();
        for (const [t, old] of retired) {
          clearTimeout(t);
          await old.close().catch(() => undefined);
        }
      },
    };
  } catch (err) {
    await undo();
    throw err;
  }
}
