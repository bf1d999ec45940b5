/**
 * From a checked config (./schema.ts) to the objects the library runs: milter instances,
 * transports, the route table, certificates, the authenticate function, the queue's and the
 * control socket's paths. Relative paths are resolved against the config file's directory.
 *
 * Split in two: what a reload replaces (`buildReloadable`: milters, maps and key files read
 * again, certificates, authenticate) and what only a restart changes (listeners, delivery,
 * queue, limits). Problems are collected with the config path they belong to
 * (`milters[2]: …`), not thrown one at a time.
 *
 * Does not start anything: ./server.ts starts the store, the queue and the gateway.
 */
import { mkdir, readFile } from 'node:fs/promises';
import path from 'node:path';
import { DovetailError } from '../errors.js';
import type { Milter } from '../milter/types.js';
import type { Transport } from '../delivery/types.js';
import { validateMilter } from '../milter/define.js';
import { connectMilter, type ConnectMilterOptions } from '../milter/protocol/client.js';
import { parseSocketSpec } from '../milter/protocol/socket.js';
import { lmtp, type LmtpOptions } from '../delivery/lmtp.js';
import { maildir, type MaildirOptions } from '../delivery/maildir.js';
import { smtp, type SmtpOptions } from '../delivery/smtp.js';
import { routes } from '../delivery/routes.js';
import { dovecotAuth } from '../auth/dovecot.js';
import type { AuthRequest } from '../auth/types.js';
import type { GatewayOptions, ListenOptions } from '../smtp/options.js';
import * as bundled from '../../milters/index.js';
import { defaultResolver } from '../../milters/dns.js';
import { importFresh } from './load.js';
import { formatPath, type CheckedConfig, type ConfigProblem, type MilterConfig, type RouteConfig } from './schema.js';
import { readTable } from './tables.js';
import type { RedisClient } from '../store/redis.js';
import { redisAnvil } from '../store/redis-anvil.js';

export { pathsOf } from './paths.js';

/** A problem found while building: the config path and what went wrong. */
export class BuildError extends Error {
  constructor(readonly problems: readonly ConfigProblem[]) {
    super(problems.map((p) => `${p.path}: ${p.message}`).join('\n'));
    this.name = 'BuildError';
  }
}

/** What a reload replaces. */
export interface Reloadable {
  readonly milters: readonly Milter[];
  /** Per listener (in `listen` order): its own chain, or undefined for `milters`. */
  readonly listenerMilters: readonly (readonly Milter[] | undefined)[];
  readonly tls: { readonly key: Buffer; readonly cert: Buffer } | undefined;
  readonly authenticate: ((request: AuthRequest) => Promise<boolean>) | undefined;
  /** Ends what these objects hold open (Dovecot auth connections). */
  close(): Promise<void>;
}

type Problems = ConfigProblem[];

/**
 * The Redis clients the config names, one per URL for the life of the process (a reload
 * reuses it, so counts and connections carry on). ioredis is imported only when a config
 * names `redis`. Commands fail at once while Redis is away (no offline queue, no retries:
 * each part's onStoreError decides), and the client keeps reconnecting every second.
 */
const redisClients = new Map<string, RedisClient>();

/** The config's Redis client (made on first use); undefined without `redis`. With `connect: false` (check-config) it never connects. */
export async function redisFor(config: CheckedConfig, options: { readonly connect?: boolean; readonly onError?: (err: Error) => void } = {}): Promise<RedisClient | undefined> {
  const url = config.redis?.url;
  if (!url) return undefined;
  const key = `${options.connect === false ? 'lazy' : 'live'} ${url}`;
  let client = redisClients.get(key);
  if (!client) {
    const { Redis } = await import('ioredis');
    const c = new Redis(url, { lazyConnect: options.connect === false, enableOfflineQueue: false, maxRetriesPerRequest: 0, retryStrategy: () => 1000 });
    c.on('error', (err: Error) => options.onError?.(err));
    client = c;
    redisClients.set(key, client);
  }
  return client;
}

/** Ends every Redis client made by {@link redisFor}. */
export function closeRedisClients(): void {
  for (const c of redisClients.values()) c.disconnect();
  redisClients.clear();
}
const msg = (err: unknown): string => (err instanceof DovetailError || err instanceof Error ? err.message : String(err));

/** The listeners as the gateway takes them (without milters: those come from buildReloadable). */
export function listenOptions(config: CheckedConfig): ListenOptions[] {
  return (config.listen ?? [{ port: 2525 }]).map((l) => ({
    host: l.host ?? '127.0.0.1',
    port: l.port,
    ...(l.name !== undefined ? { name: l.name } : {}),
    ...(l.tls !== undefined ? { tls: l.tls } : {}),
    ...(l.submission !== undefined ? { submission: l.submission } : {}),
    ...(l.auth !== undefined ? { auth: l.auth } : {}),
    ...(l.proxyProtocol !== undefined ? { proxyProtocol: l.proxyProtocol } : {}),
    ...(l.xclient !== undefined ? { xclient: l.xclient } : {}),
    ...(l.xforward !== undefined ? { xforward: l.xforward } : {}),
  }));
}

/** Reads a map: inline, or a Postfix-style table file. */
async function mapOf(entry: { map?: Record<string, string | string[]> | undefined; file?: string | undefined }, dir: string, multi: boolean): Promise<Record<string, string | string[]>> {
  if (entry.map && entry.file) throw new Error('give either map or file, not both');
  if (entry.map) return entry.map;
  if (!entry.file) throw new Error('needs a map or a file');
  return readTable(path.resolve(dir, entry.file), multi);
}

/** One milter from its config form. */
async function buildMilter(entry: MilterConfig, dir: string, redis: RedisClient | undefined): Promise<Milter> {
  if ('connect' in entry && typeof entry.connect === 'string') {
    const { connect, ...rest } = entry as { connect: string } & ConnectMilterOptions;
    return connectMilter(connect, rest);
  }
  if ('module' in entry && typeof entry.module === 'string') {
    const e = entry as { module: string; export?: string; options?: unknown };
    const mod = await importFresh(path.resolve(dir, e.module));
    const value = e.export !== undefined ? mod[e.export] : (mod['milter'] ?? mod['default']);
    if (value === undefined) throw new Error(`${e.module} has no ${e.export ?? 'milter or default'} export`);
    const milter = typeof value === 'function' ? await (value as (o: unknown) => unknown)(e.options) : value;
    validateMilter(milter as Milter);
    return milter as Milter;
  }
  if ('use' in entry && typeof entry.use === 'string') {
    const { use, ...o } = entry as { use: string } & Record<string, unknown>;
    const dns = (d: unknown): { resolver: ReturnType<typeof defaultResolver> } | Record<string, never> =>
      d ? { resolver: defaultResolver(d as { servers?: string[]; timeout?: number; tries?: number }) } : {};
    switch (use) {
      case 'sizeLimit':
        return bundled.sizeLimit(o as never);
      case 'relayControl':
        return bundled.relayControl(o as never);
      case 'dnsbl': {
        const { dns: d, ...rest } = o;
        return bundled.dnsbl({ ...rest, ...dns(d) } as never);
      }
      case 'mailAuth': {
        const { dns: d, ...rest } = o;
        return bundled.mailAuth({ ...rest, ...dns(d) } as never);
      }
      case 'spamTag':
        return bundled.spamTag(o as never);
      case 'dkimSign': {
        const keys = await Promise.all(
          (o['keys'] as { domain: string; selector: string; privateKey: string }[]).map(async (k) => ({ ...k, privateKey: await readFile(path.resolve(dir, k.privateKey)) })),
        );
        return bundled.dkimSign({ ...o, keys } as never);
      }
      case 'aliases':
        // aliases reads its own file format (/etc/aliases); give it the path.
        return bundled.aliases((o['file'] !== undefined ? { ...o, file: path.resolve(dir, o['file'] as string) } : o) as never);
      case 'virtual': {
        const { map: _m, file: _f, ...rest } = o;
        return bundled.virtual({ ...rest, map: await mapOf(o as never, dir, true) } as never);
      }
      case 'senderLogin': {
        const { map: _m, file: _f, ...rest } = o;
        return bundled.senderLogin({ ...rest, map: await mapOf(o as never, dir, true) } as never);
      }
      case 'relocated': {
        const { map: _m, file: _f, ...rest } = o;
        const map = await mapOf(o as never, dir, false);
        return bundled.relocated({ ...rest, map: Object.fromEntries(Object.entries(map).map(([k, v]) => [k, Array.isArray(v) ? v.join(' ') : v])) } as never);
      }
      case 'postmaster':
        return bundled.postmaster(o as never);
      case 'masquerade':
        return bundled.masquerade(o as never);
      case 'rateLimit':
      case 'greylist':
        if (!redis) throw new Error(`${use} keeps its counts in Redis: set the top-level redis { url }`);
        return use === 'rateLimit' ? bundled.rateLimit({ ...o, redis } as never) : bundled.greylist({ ...o, redis } as never);
      default:
        throw new Error(`no bundled milter ${JSON.stringify(use)}`);
    }
  }
  // A Milter object (TS/JS configs).
  validateMilter(entry as Milter);
  return entry as Milter;
}

async function buildChain(entries: readonly MilterConfig[], dir: string, at: PropertyKey[], problems: Problems, redis: RedisClient | undefined): Promise<Milter[]> {
  const out: Milter[] = [];
  for (const [i, entry] of entries.entries()) {
    try {
      out.push(await buildMilter(entry, dir, redis));
    } catch (err) {
      problems.push({ path: formatPath([...at, i]), message: msg(err) });
    }
  }
  return out;
}

/**
 * Builds what a reload replaces: new milter instances (maps and key files read again,
 * `module` milters imported again), the certificate files, authenticate.
 *
 * @throws BuildError naming each part that could not be built.
 */
export async function buildReloadable(config: CheckedConfig, dir: string, redis?: RedisClient): Promise<Reloadable> {
  const problems: Problems = [];
  const milters = await buildChain(config.milters ?? [], dir, ['milters'], problems, redis);
  const listenerMilters: (Milter[] | undefined)[] = [];
  for (const [i, l] of (config.listen ?? []).entries()) {
    listenerMilters.push(l.milters === undefined ? undefined : await buildChain(l.milters, dir, ['listen', i, 'milters'], problems, redis));
  }
  if (config.listen === undefined) listenerMilters.push(undefined);
  let tls: Reloadable['tls'];
  if (config.tls) {
    try {
      tls = { key: await readFile(path.resolve(dir, config.tls.key)), cert: await readFile(path.resolve(dir, config.tls.cert)) };
      // A key and certificate that do not parse are a config error, not a failed handshake later.
      (await import('node:tls')).createSecureContext(tls);
    } catch (err) {
      problems.push({ path: 'tls', message: msg(err) });
    }
  }
  let authenticate: Reloadable['authenticate'];
  let closeAuth: (() => Promise<void>) | undefined;
  const a = config.authenticate;
  if (typeof a === 'function') authenticate = a;
  else if (a) {
    try {
      const spec = a.dovecot.startsWith('/') ? ({ kind: 'unix', path: a.dovecot } as const) : parseSocketSpec(a.dovecot);
      const auth = dovecotAuth({
        ...(spec.kind === 'unix' ? { path: spec.path } : { host: spec.host ?? '127.0.0.1', port: spec.port }),
        ...(a.service !== undefined ? { service: a.service } : {}),
        ...(a.timeout !== undefined ? { timeout: a.timeout } : {}),
        ...(a.maxConnections !== undefined ? { maxConnections: a.maxConnections } : {}),
      });
      authenticate = auth;
      closeAuth = () => auth.close();
    } catch (err) {
      problems.push({ path: 'authenticate.dovecot', message: msg(err) });
    }
  }
  if (problems.length) {
    await closeAuth?.();
    throw new BuildError(problems);
  }
  return {
    milters,
    listenerMilters,
    tls,
    authenticate,
    async close() {
      await closeAuth?.();
    },
  };
}

/** `host:port` / `inet:host:port` / `unix:/path` as lmtp() options. */
function lmtpTarget(value: string | Record<string, unknown>): LmtpOptions {
  if (typeof value !== 'string') return value as LmtpOptions;
  const spec = parseSocketSpec(/^(inet6?|unix|local):/i.test(value) ? value : `inet:${value}`);
  return spec.kind === 'unix' ? { path: spec.path } : { host: spec.host ?? '127.0.0.1', port: spec.port };
}

/** Where the embedded store listens, once started (for `{ store: true }` routes). */
export type StoreAddress = { readonly host: string; readonly port: number } | { readonly path: string };

/**
 * Builds the delivery transport: the route table, or the one transport, or the embedded
 * store. With `createDirs`, Maildir roots are created (mode 0700). Transports are created once per distinct config (two domains routed to the same
 * `lmtp` share one pool).
 *
 * @throws BuildError naming each route that could not be built.
 */
export async function buildDelivery(
  config: CheckedConfig,
  dir: string,
  store: StoreAddress | undefined,
  hostname: string | undefined,
  options: { readonly createDirs?: boolean } = {},
): Promise<Transport> {
  const d = config.delivery;
  const problems: Problems = [];
  const made = new Map<string, Transport>();
  const one = async (route: RouteConfig, at: PropertyKey[]): Promise<Transport | undefined> => {
    if ('deliver' in route && typeof route.deliver === 'function') return route as Transport;
    const key = JSON.stringify(route);
    const existing = made.get(key);
    if (existing) return existing;
    let t: Transport | undefined;
    try {
      if ('lmtp' in route) t = lmtp(lmtpTarget(route.lmtp as string | Record<string, unknown>));
      else if ('maildir' in route) {
        const m = route.maildir;
        const o = (typeof m === 'string' ? { root: m } : m) as MaildirOptions;
        const root = path.resolve(dir, o.root);
        // maildir() never creates its root; a server started from a config does (check-config does not).
        if (options.createDirs) await mkdir(root, { recursive: true, mode: 0o700 });
        t = maildir({ ...o, root });
      } else if ('smtp' in route) {
        const s = route.smtp === true ? {} : (route.smtp as Record<string, unknown>);
        const { dns, auth, tls, ...rest } = s as { dns?: { servers?: string[]; timeout?: number; tries?: number }; auth?: { user: string; pass?: string; passFile?: string }; tls?: unknown };
        let authOption: SmtpOptions['auth'] | undefined;
        if (auth) {
          if ((auth.pass === undefined) === (auth.passFile === undefined)) throw new Error('auth needs pass or passFile (one of them)');
          authOption = { user: auth.user, pass: auth.pass ?? (await readFile(path.resolve(dir, auth.passFile!), 'utf8')).trim() };
        }
        let tlsOption: SmtpOptions['tls'] | undefined;
        if (typeof tls === 'string') tlsOption = tls as SmtpOptions['tls'];
        else if (tls && typeof tls === 'object') {
          const t2 = tls as { level: string; ca?: string; servername?: string };
          tlsOption = { level: t2.level, ...(t2.ca ? { ca: await readFile(path.resolve(dir, t2.ca)) } : {}), ...(t2.servername ? { servername: t2.servername } : {}) } as SmtpOptions['tls'];
        }
        t = smtp({
          ...(hostname !== undefined ? { hostname } : {}),
          ...(rest as SmtpOptions),
          ...(authOption ? { auth: authOption } : {}),
          ...(tlsOption !== undefined ? { tls: tlsOption } : {}),
          ...(dns ? { resolver: defaultResolver(dns) } : {}),
        });
      } else if ('store' in route) {
        if (!store) throw new Error('routes to the embedded store, but delivery.store is not set');
        t = lmtp({ ...store });
      }
    } catch (err) {
      problems.push({ path: formatPath(at), message: msg(err) });
      return undefined;
    }
    if (t) made.set(key, t);
    return t;
  };
  let transport: Transport | undefined;
  if (d.routes) {
    const table: Record<string, Transport> = {};
    for (const [domain, route] of Object.entries(d.routes)) {
      const t = await one(route, ['delivery', 'routes', domain]);
      if (t) table[domain] = t;
    }
    if (!problems.length) {
      try {
        transport = routes(table);
      } catch (err) {
        problems.push({ path: 'delivery.routes', message: msg(err) });
      }
    }
  } else if (d.transport) transport = d.transport;
  else if (d.lmtp !== undefined) transport = await one({ lmtp: d.lmtp } as RouteConfig, ['delivery', 'lmtp']);
  else if (d.maildir !== undefined) transport = await one({ maildir: d.maildir } as RouteConfig, ['delivery', 'maildir']);
  else if (d.smtp !== undefined) transport = await one({ smtp: d.smtp } as RouteConfig, ['delivery', 'smtp']);
  else transport = await one({ store: true }, ['delivery', 'store']);
  if (problems.length || !transport) {
    await Promise.all([...made.values()].map((t) => t.close?.().catch(() => undefined)));
    throw new BuildError(problems.length ? problems : [{ path: 'delivery', message: 'no transport' }]);
  }
  return transport;
}

/** The gateway options that only a restart changes (limits and such), from the config. */
export function staticGatewayOptions(config: CheckedConfig, dir: string, redis?: RedisClient): Omit<GatewayOptions, 'delivery'> {
  const { clientLimits, ...l } = config.limits ?? {};
  let limits: Pick<GatewayOptions, 'clientLimits' | 'anvil'> = {};
  if (clientLimits !== undefined) {
    if (clientLimits === false) limits = { clientLimits: false };
    else {
      const { store, lease, prefix, commandTimeout, onStoreError, ...counts } = clientLimits;
      if (store === 'redis') {
        if (!redis) throw new BuildError([{ path: 'limits.clientLimits.store', message: 'clientLimits in Redis: set the top-level redis { url }' }]);
        limits = {
          anvil: redisAnvil({
            redis,
            ...counts,
            ...(lease !== undefined ? { lease } : {}),
            ...(prefix !== undefined ? { prefix } : {}),
            ...(commandTimeout !== undefined ? { commandTimeout } : {}),
            ...(onStoreError !== undefined ? { onStoreError } : {}),
          } as Parameters<typeof redisAnvil>[0]),
        };
      } else limits = { clientLimits: counts as GatewayOptions['clientLimits'] & object };
    }
  }
  return {
    ...(config.hostname !== undefined ? { hostname: config.hostname } : {}),
    ...(l as Omit<GatewayOptions, 'delivery'>),
    ...limits,
    ...(config.banner !== undefined ? { banner: config.banner } : {}),
    ...(config.allowInsecureAuth !== undefined ? { allowInsecureAuth: config.allowInsecureAuth } : {}),
    ...(config.resolveClientNames !== undefined ? { resolveClientNames: config.resolveClientNames } : {}),
    ...(config.bareLineEndings !== undefined ? { bareLineEndings: config.bareLineEndings } : {}),
    ...(config.delivery.verifyRecipients !== undefined ? { verifyRecipients: config.delivery.verifyRecipients } : {}),
    ...(config.spool ? { spool: { ...config.spool, ...(config.spool.dir ? { dir: path.resolve(dir, config.spool.dir) } : {}) } } : {}),
  };
}
