/**
 * The outbound transport: delivers a message to the next hop over SMTP, by MX lookup of each
 * recipient's domain (RFC 5321 section 5) or through a fixed relayhost (a smarthost), the
 * way Postfix's smtp(8) does. It is an outbound transport (`outbound: true`): the gateway
 * queues its recipients durably before it answers the client, and the queue calls it.
 *
 * What one deliver() does:
 * 1. groups the recipients by destination (the relayhost, or each recipient's domain);
 * 2. per destination: resolves the next hop (./nexthop.ts); waits for a slot of that
 *    destination's concurrency limit; tries each address of each host in order, through
 *    that address's connection cache (a ./client.ts pool: connections reused for up to
 *    `maxTransactions` messages, closed after `idleTimeout`), moving on only while no
 *    server was reached (connect, greeting, EHLO, STARTTLS or AUTH failed); the first server
 *    that answers the transaction decides, recipient by recipient, with its reply kept;
 * 3. a destination none of whose servers could be reached is marked dead for
 *    `deadDestinationTime`: its mail is deferred at once, without connecting, until then
 *    (Postfix's dead-destination handling), so one dead destination does not hold up the
 *    others.
 *
 * TLS per Postfix's smtp_tls_security_level (default `may`); AUTH (PLAIN, LOGIN) only
 * over TLS. A wrong password defers, with the server's reply kept for the DSN.
 *
 * It deliberately does not: queue or retry (the DeferredQueue does), convert 8-bit mail for
 * a server without 8BITMIME (fails it, 5.6.3), look up DANE/MTA-STS policies, or bind to a
 * particular source address.
 */
import dns from 'node:dns/promises';
import os from 'node:os';
import { LRUCache } from 'lru-cache';
import { DovetailError, ErrorCodes } from '../errors.js';
import { smtpReply, type SmtpReply } from '../milter/verdict.js';
import { createClientPool, DEFAULT_CLIENT_TIMEOUTS, type ClientPool, type ClientTimeouts, type PoolStats, type TlsLevel } from './client.js';
import { parseRelayhost, resolveNextHop, type Destination, type MxResolver, type NextHopHost } from './nexthop.js';
import { checkInteger, checkTimeouts } from './options.js';
import { domainOf } from './domains.js';
import type { DeliveryEnvelope, MessageSource, RecipientResult, Transport } from './types.js';

/** Time limits per protocol phase, in ms (Postfix's smtp_*_timeout defaults). */
export interface SmtpTimeouts extends Omit<ClientTimeouts, 'hello'> {
  /** The EHLO/HELO reply (and AUTH). Default 300 000 (smtp_helo_timeout). */
  readonly helo: number;
}

const { hello: defaultHelo, ...common } = DEFAULT_CLIENT_TIMEOUTS;
export const DEFAULT_SMTP_TIMEOUTS: SmtpTimeouts = Object.freeze({ ...common, helo: defaultHelo });

/** TLS of the smtp() transport: a level, or a level with what `verify` checks against. */
export type SmtpTlsOptions =
  | TlsLevel
  | {
      readonly level: TlsLevel;
      /** Trusted CA certificate(s), PEM, for `verify`. Default: Node's bundled roots. */
      readonly ca?: string | Buffer | readonly (string | Buffer)[];
      /** Name the certificate must be valid for. Default: the MX host's (or relayhost's) name. */
      readonly servername?: string;
    };

export interface SmtpOptions {
  /**
   * Send everything to this host instead of looking up MX records (Postfix `relayhost`):
   * `[host]:port` or `[host]` without an MX lookup, `host:port` or `host` with one.
   */
  readonly relayhost?: string;
  /** Port of the next hop found by MX lookup, and of a relayhost given without one. Default 25. */
  readonly port?: number;
  /** DNS: anything with node:dns/promises' resolveMx, resolve4 and resolve6. Default: the system's. */
  readonly resolver?: MxResolver;
  /** Our name in EHLO, and an MX name that means us (loop detection). Default os.hostname(). */
  readonly hostname?: string;
  /** Our own IP addresses: an MX host with one of them is us (Postfix inet_interfaces/proxy_interfaces). */
  readonly localAddresses?: readonly string[];
  /** TLS policy (Postfix smtp_tls_security_level). Default `may`. */
  readonly tls?: SmtpTlsOptions;
  /** Credentials for the relayhost (Postfix smtp_sasl_password_maps); sent only over TLS. */
  readonly auth?: { readonly user: string; readonly pass: string };
  /** Deliveries to one destination at once (Postfix default_destination_concurrency_limit). Default 20. */
  readonly destinationConcurrency?: number;
  /** Cached connections per server address (busy + idle). Default: destinationConcurrency. */
  readonly maxConnections?: number;
  /** Messages per connection before it is closed (Postfix smtp_connection_reuse_count_limit). Default 100. */
  readonly maxTransactions?: number;
  /** Close a cached connection idle this long, ms (Postfix smtp_connection_cache_time_limit). Default 2 000. */
  readonly idleTimeout?: number;
  /** NOOP-probe a cached connection idle longer than this before reuse, ms. Default 1 000. */
  readonly probeAfter?: number;
  /** Use PIPELINING when offered. Default true. */
  readonly pipelining?: boolean;
  /** Look up AAAA records too. Default true. */
  readonly ipv6?: boolean;
  /** How long a destination none of whose servers answered is skipped, ms. 0: never skipped. Default 60 000. */
  readonly deadDestinationTime?: number;
  /** Per-phase time limits, ms; those not given keep {@link DEFAULT_SMTP_TIMEOUTS}. */
  readonly timeouts?: Partial<SmtpTimeouts>;
}

/** The smtp() transport. */
export interface SmtpTransport extends Transport {
  readonly outbound: true;
  /** Connection-cache counters summed over every server address, for tests and metrics. */
  stats(): PoolStats & { readonly destinations: number; readonly dead: number };
  close(): Promise<void>;
}

const LEVELS: readonly TlsLevel[] = ['none', 'may', 'encrypt', 'verify'];

/** A counting semaphore per destination; an entry goes away when nothing holds or waits on it. */
class Slots {
  private readonly by = new Map<string, { active: number; waiting: (() => void)[] }>();
  constructor(private readonly limit: number) {}

  async take(key: string): Promise<() => void> {
    let s = this.by.get(key);
    if (!s) this.by.set(key, (s = { active: 0, waiting: [] }));
    const slot = s;
    if (slot.active >= this.limit) await new Promise<void>((resolve) => slot.waiting.push(resolve));
    else slot.active++;
    return () => {
      const next = slot.waiting.shift();
      if (next) next(); // the slot passes on; active stays
      else if (--slot.active === 0) this.by.delete(key);
    };
  }

  get size(): number {
    return this.by.size;
  }
}


/** An address literal `[192.0.2.1]` / `[IPv6:2001:db8::1]` as a destination without MX lookup. */
function literal(domain: string, port: number): Destination | undefined {
  const m = /^\[(?:ipv6:)?([^\]]+)\]$/i.exec(domain);
  return m ? { name: m[1] as string, port, mx: false } : undefined;
}

/**
 * Creates the outbound SMTP transport. See docs/delivery.md for the options, the reply
 * mapping and the TLS policy.
 *
 * @throws DovetailError `DOVETAIL_ERR_INVALID_OPTIONS` when the options are malformed.
 */
export function smtp(options: SmtpOptions = {}): SmtpTransport {
  const bad = (why: string): never => {
    throw new DovetailError(ErrorCodes.INVALID_OPTIONS, `smtp(): ${why}`);
  };
  if (typeof options !== 'object' || options === null) bad('needs an options object');
  checkInteger(bad, 'port', options.port, 1, 65535);
  checkInteger(bad, 'destinationConcurrency', options.destinationConcurrency, 1);
  checkInteger(bad, 'maxConnections', options.maxConnections, 1);
  checkInteger(bad, 'maxTransactions', options.maxTransactions, 1);
  checkInteger(bad, 'idleTimeout', options.idleTimeout, 1);
  checkInteger(bad, 'probeAfter', options.probeAfter, 0);
  checkInteger(bad, 'deadDestinationTime', options.deadDestinationTime, 0);
  checkTimeouts(bad, options.timeouts, DEFAULT_SMTP_TIMEOUTS);
  const port = options.port ?? 25;
  const relay = options.relayhost === undefined ? undefined : parseRelayhost(options.relayhost, port);
  if (options.relayhost !== undefined && !relay) bad(`relayhost ${JSON.stringify(options.relayhost)} is not [host]:port, [host], host:port or host`);
  const hostname = options.hostname ?? os.hostname();
  if (!/^[\x21-\x7e]+$/.test(hostname)) bad('hostname must be printable ASCII without spaces');
  const tlsGiven = options.tls ?? 'may';
  const tls = typeof tlsGiven === 'string' ? { level: tlsGiven } : tlsGiven;
  if (!LEVELS.includes(tls.level)) bad(`tls level must be one of ${LEVELS.join(', ')}`);
  if (options.auth !== undefined && (typeof options.auth.user !== 'string' || typeof options.auth.pass !== 'string')) bad('auth needs user and pass strings');
  if (options.auth !== undefined && tls.level === 'none') bad("auth is sent only over TLS: tls must not be 'none'");
  const resolver: MxResolver = options.resolver ?? dns;
  if (typeof resolver.resolveMx !== 'function' || typeof resolver.resolve4 !== 'function' || typeof resolver.resolve6 !== 'function') {
    bad('resolver needs resolveMx, resolve4 and resolve6');
  }
  const concurrency = options.destinationConcurrency ?? 20;
  const deadTime = options.deadDestinationTime ?? 60_000;
  const T: SmtpTimeouts = { ...DEFAULT_SMTP_TIMEOUTS, ...options.timeouts };
  const { helo: hello, ...rest } = T;
  const resolveOptions = { resolver, selfNames: [hostname], localAddresses: options.localAddresses ?? [], ipv6: options.ipv6 ?? true };

  const slots = new Slots(concurrency);
  /** Destinations none of whose servers answered: until when they are skipped, and why. */
  const dead = new Map<string, { until: number; reply: SmtpReply }>();
  let closed = false;
  const pools = new LRUCache<string, ClientPool>({
    max: 1000,
    dispose: (pool) => void pool.close(),
  });

  function poolFor(host: NextHopHost): ClientPool {
    const key = `${host.name}|${host.address}|${host.port}`;
    let pool = pools.get(key);
    if (!pool) {
      const shown = host.address.includes(':') ? `[${host.address}]` : host.address;
      pool = createClientPool({
        protocol: 'smtp',
        endpoint: { host: host.address, port: host.port },
        label: host.name === host.address ? `SMTP [${host.address}]:${host.port}` : `SMTP ${host.name}[${shown}]:${host.port}`,
        heloName: hostname,
        maxConnections: options.maxConnections ?? concurrency,
        idleTimeout: options.idleTimeout ?? 2_000,
        probeAfter: options.probeAfter ?? 1_000,
        maxTransactions: options.maxTransactions ?? 100,
        pipelining: options.pipelining ?? true,
        // `verify` checks the certificate against the host's name (the MX name, or the relayhost).
        tls: {
          level: tls.level,
          ...(tls.ca !== undefined ? { ca: tls.ca } : {}),
          servername: tls.servername ?? host.name,
        },
        auth: options.auth,
        timeouts: { ...rest, hello },
      });
      pools.set(key, pool);
    }
    return pool;
  }

  const everyone = (envelope: DeliveryEnvelope, status: 'deferred' | 'failed', reply: SmtpReply): RecipientResult[] =>
    envelope.recipients.map((r) => ({ recipient: r.address, status, reply }));

  /** One destination's share of the message. */
  async function deliverTo(key: string, dest: Destination, envelope: DeliveryEnvelope, message: MessageSource): Promise<RecipientResult[]> {
    const mark = dead.get(key);
    if (mark && mark.until > Date.now()) {
      return everyone(envelope, 'deferred', smtpReply(451, '4.4.1', [`delivery temporarily suspended: ${mark.reply.lines[0] ?? ''}`.slice(0, 480)]));
    }
    const hop = await resolveNextHop(dest, resolveOptions).catch((err: unknown) => ({
      kind: 'deferred' as const,
      reply: smtpReply(451, '4.4.3', `Next-hop lookup failed for ${dest.name}: ${(err as Error)?.message ?? String(err)}`.slice(0, 480)),
    }));
    if (hop.kind !== 'hosts') return everyone(envelope, hop.kind, hop.reply);
    const free = await slots.take(key);
    try {
      let last: RecipientResult[] | undefined;
      for (const host of hop.hosts) {
        if (closed) break;
        const attempt = await poolFor(host).attempt(envelope, message);
        if (attempt.reached) {
          dead.delete(key);
          // For logs: which host answered (Postfix's relay=host[address]:port).
          const relay = `${host.name}[${host.address}]:${host.port}`;
          return attempt.results.map((r) => ({ ...r, relay }));
        }
        last = attempt.results;
      }
      const reply = last?.[0]?.reply ?? smtpReply(451, '4.4.1', `No server of ${dest.name} could be reached`);
      if (deadTime > 0) {
        const now = Date.now();
        // Forget marks that ran out, so the table stays as small as the set of dead destinations.
        if (dead.size >= 1000) for (const [k, d] of dead) if (d.until <= now) dead.delete(k);
        dead.set(key, { until: now + deadTime, reply });
      }
      return last ?? everyone(envelope, 'deferred', reply);
    } finally {
      free();
    }
  }

  async function deliver(envelope: DeliveryEnvelope, message: MessageSource): Promise<RecipientResult[]> {
    if (closed) throw new DovetailError(ErrorCodes.DELIVERY_FAILED, 'smtp(): transport closed');
    // One group per destination, recipients in envelope order within it.
    const groups = new Map<string, { dest: Destination | undefined; indexes: number[] }>();
    envelope.recipients.forEach((r, i) => {
      const domain = domainOf(r.address).toLowerCase().replace(/\.$/, '');
      const key = relay ? `relay:${options.relayhost}` : domain;
      let g = groups.get(key);
      if (!g) groups.set(key, (g = { dest: relay ?? literal(domain, port) ?? (domain ? { name: domain, port, mx: true } : undefined), indexes: [] }));
      g.indexes.push(i);
    });
    const results = new Array<RecipientResult>(envelope.recipients.length);
    await Promise.all(
      [...groups].map(async ([key, g]) => {
        const sub: DeliveryEnvelope = { ...envelope, recipients: g.indexes.map((i) => envelope.recipients[i]!) };
        const got = g.dest ? await deliverTo(key, g.dest, sub, message) : everyone(sub, 'failed', smtpReply(550, '5.1.2', 'Recipient address has no domain'));
        g.indexes.forEach((i, k) => (results[i] = got[k]!));
      }),
    );
    return results;
  }

  return Object.freeze({
    name: 'smtp',
    outbound: true as const,
    deliver,
    stats() {
      const sum = { open: 0, idle: 0, opened: 0, reused: 0, peak: 0, waiting: 0 };
      for (const p of pools.values()) {
        const s = p.stats();
        sum.open += s.open;
        sum.idle += s.idle;
        sum.opened += s.opened;
        sum.reused += s.reused;
        sum.peak = Math.max(sum.peak, s.peak);
        sum.waiting += s.waiting;
      }
      const now = Date.now();
      return { ...sum, destinations: slots.size, dead: [...dead.values()].filter((d) => d.until > now).length };
    },
    async close() {
      closed = true;
      const all = [...pools.values()];
      pools.clear();
      await Promise.all(all.map((p) => p.close()));
    },
  });
}
