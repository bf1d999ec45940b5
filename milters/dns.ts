/**
 * DNS plumbing shared by the dnsbl and mailAuth milters: the resolver they take as an option
 * (node:dns/promises Resolver by default), the reverse names DNS lists are queried under
 * (RFC 5782 section 2.1 for IPv4, 2.4 for IPv6 nibbles), a per-query timeout, and the adapter
 * to mailauth's `resolver(name, rrtype)` function.
 *
 * What it does not do: DNSSEC. Caching: dnsbl caches its answers with their TTLs;
 * mailAuth memoises per message and, by default, keeps answers for a short fixed time
 * across messages (cachingResolver).
 */
import { Resolver } from 'node:dns/promises';
import { Address4, Address6 } from 'ip-address';
import { LRUCache } from 'lru-cache';
import { channels, type DnsEvent } from '../lib/diagnostics.js';

/** Resolvers made by cachingResolver: their queries are timed there, on a cache miss. */
const timedResolvers = new WeakSet<DnsResolver>();

/**
 * Publishes one DNS query's time and outcome on `Channels.dns` (only while something
 * subscribes) and returns the query's promise as it is.
 */
export function timedQuery<T>(query: Promise<T>, name: string, rrtype: string): Promise<T> {
  if (!channels.dns.hasSubscribers) return query;
  const t0 = performance.now();
  const publish = (outcome: DnsEvent['outcome']): void => {
    channels.dns.publish({ name, rrtype, outcome, durationMs: performance.now() - t0 } satisfies DnsEvent);
  };
  query.then(
    () => publish('ok'),
    (err: unknown) => publish(isNotFound(err) ? 'notfound' : 'error'),
  );
  return query;
}

/** An address record with its TTL in seconds, as node:dns gives it with `{ ttl: true }`. */
export interface AddressWithTtl {
  readonly address: string;
  readonly ttl: number;
}

/**
 * What the milters need of a resolver. A node:dns/promises `Resolver` fits as it is, so do
 * `dns.promises` itself and any object with these two methods (a DNS-over-HTTPS client, …).
 * Errors should carry node:dns codes: `ENOTFOUND` (NXDOMAIN), `ENODATA` (no record of that
 * type); anything else (`ESERVFAIL`, `ETIMEOUT`, `EREFUSED` …) counts as a temporary failure.
 */
export interface DnsResolver {
  resolve4(hostname: string, options: { ttl: true }): Promise<AddressWithTtl[]>;
  resolve(hostname: string, rrtype: string): Promise<unknown>;
}

/** Options of the default resolver. */
export interface DefaultResolverOptions {
  /** Per-try timeout of one query, ms (c-ares). Default 5000. */
  readonly timeout?: number;
  /** Tries per server. Default 2. */
  readonly tries?: number;
  /** Servers (`'127.0.0.1'`, `'[::1]:5353'` …). Default: the system's (/etc/resolv.conf). */
  readonly servers?: readonly string[];
}

/** A node:dns/promises Resolver with the system's servers (or the ones given). */
export function defaultResolver(options: DefaultResolverOptions = {}): Resolver {
  const r = new Resolver({ timeout: options.timeout ?? 5000, tries: options.tries ?? 2 });
  if (options.servers) r.setServers([...options.servers]);
  return r;
}

/** True for the answers that say "no such record": NXDOMAIN and NODATA. */
export function isNotFound(err: unknown): boolean {
  const code = (err as { code?: unknown } | null)?.code;
  return code === 'ENOTFOUND' || code === 'ENODATA';
}

/** A DNS failure that is not "no such record", with the zone it concerns. */
export class DnsTimeoutError extends Error {
  readonly code = 'ETIMEOUT';
  constructor(readonly query: string, ms: number) {
    super(`no DNS answer for ${query} within ${ms} ms`);
  }
}

/**
 * Races `promise` against a timer of `ms`: rejects with a DnsTimeoutError when it fires.
 * The query itself is not cancelled (c-ares can only cancel every query of a resolver);
 * its late answer is dropped.
 */
export function withTimeout<T>(promise: Promise<T>, ms: number, name: string): Promise<T> {
  if (!(ms > 0) || !Number.isFinite(ms)) return promise;
  let timer: NodeJS.Timeout | undefined;
  return Promise.race([
    promise,
    new Promise<never>((_, reject) => {
      timer = setTimeout(() => reject(new DnsTimeoutError(name, ms)), ms);
      timer.unref();
    }),
  ]).finally(() => clearTimeout(timer));
}

/**
 * The name an address is listed under in a DNS list, without the zone: `192.0.2.1` →
 * `1.2.0.192`; `2001:db8::1` → the 32 nibbles reversed. IPv4-mapped IPv6 addresses are
 * looked up as IPv4 (RFC 5782 section 2.4 leaves them to the IPv4 list). Undefined for
 * anything that is not an IP address.
 */
export function reverseName(address: string): string | undefined {
  const a = address.trim();
  if (Address4.isValid(a) && !a.includes('/')) return new Address4(a).reverseForm({ omitSuffix: true });
  if (!Address6.isValid(a) || a.includes('/') || a.includes('%')) return undefined;
  const v6 = new Address6(a);
  if (v6.is4()) return v6.to4().reverseForm({ omitSuffix: true });
  return v6.reverseForm({ omitSuffix: true });
}

/** Lower-cases a domain and drops one trailing dot; undefined when it is not a usable host name. */
export function normalizeDomain(domain: string): string | undefined {
  let d = domain.trim().toLowerCase();
  if (d.endsWith('.')) d = d.slice(0, -1);
  if (!d || d.length > 253) return undefined;
  const labels = d.split('.');
  if (labels.length < 2) return undefined;
  for (const l of labels) {
    // LDH labels (IDNs arrive as A-labels on the wire; an U-label is not looked up).
    if (!/^[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?$/.test(l)) return undefined;
  }
  // A bare IPv4 address is not a domain.
  if (labels.every((l) => /^\d+$/.test(l))) return undefined;
  return d;
}

/**
 * A {@link DnsResolver} with a shared LRU cache of `resolve(name, rrtype)` answers: answers
 * and not-found errors (NXDOMAIN, NODATA) are kept for `ttl` ms, concurrent asks for the
 * same name share one query, failures (SERVFAIL, timeouts) are never kept. Callers get
 * their own copy of an answer.
 */
export function cachingResolver(resolver: DnsResolver, options: { readonly ttl: number; readonly max: number }): DnsResolver {
  type Settled = { ok: true; value: unknown } | { ok: false; error: unknown };
  const cache = new LRUCache<string, Promise<Settled>>({ max: options.max, ttl: options.ttl });
  const caching: DnsResolver = {
    resolve4: (hostname, opts) => timedQuery(resolver.resolve4(hostname, opts), hostname, 'A'),
    async resolve(hostname: string, rrtype: string): Promise<unknown> {
      const key = `${rrtype.toUpperCase()} ${hostname.toLowerCase()}`;
      let p = cache.get(key);
      if (!p) {
        p = timedQuery(resolver.resolve(hostname, rrtype), hostname, rrtype.toUpperCase()).then(
          (value): Settled => ({ ok: true, value }),
          (error: unknown): Settled => ({ ok: false, error }),
        );
        cache.set(key, p);
        void p.then((s) => {
          if (!s.ok && !isNotFound(s.error)) cache.delete(key);
        });
      }
      const s = await p;
      if (!s.ok) throw s.error;
      return copyAnswer(s.value);
    },
  };
  timedResolvers.add(caching);
  return caching;
}

/**
 * A copy of a DNS answer for one caller. Answers are arrays of strings (A, AAAA, NS, PTR),
 * of string arrays (TXT) or of flat records (MX `{ exchange, priority }`): copied by hand,
 * which costs a fraction of structuredClone(); anything else goes through structuredClone().
 */
export function copyAnswer<T>(value: T): T {
  if (!Array.isArray(value)) return structuredClone(value);
  const out: unknown[] = new Array<unknown>(value.length);
  for (let i = 0; i < value.length; i++) {
    const v: unknown = value[i];
    if (typeof v === 'string' || typeof v === 'number') out[i] = v;
    else if (Array.isArray(v) && v.every((x) => typeof x === 'string')) out[i] = [...(v as string[])];
    else if (v !== null && typeof v === 'object' && Object.getPrototypeOf(v) === Object.prototype && Object.values(v).every((x) => typeof x !== 'object' || x === null)) out[i] = { ...(v as object) };
    else return structuredClone(value);
  }
  return out as T;
}

/** The function form mailauth takes as `resolver`: `(name, rrtype) => records`. */
export type MailauthResolver = (name: string, rrtype: string) => Promise<string[][] | string[]>;

/**
 * Adapts a {@link DnsResolver} to mailauth's resolver function, with a memo: each
 * (rrtype, name) is asked once per adapter, failures included. Make one per message so
 * the SPF check at MAIL and authenticate() at end of message share their lookups. Every
 * caller gets its own copy of the answer or the error (mailauth sorts MX lists in place
 * and writes onto errors).
 */
export function mailauthResolver(resolver: DnsResolver, timeout?: number): MailauthResolver {
  type Settled = { ok: true; value: unknown } | { ok: false; error: unknown };
  const memo = new Map<string, Promise<Settled>>();
  const copyError = (err: unknown): unknown => {
    if (!(err instanceof Error)) return err;
    // No stack trace: a copy per caller of an NXDOMAIN would otherwise capture one each time.
    const limit = Error.stackTraceLimit;
    Error.stackTraceLimit = 0;
    let copy: Error & { code?: unknown };
    try {
      copy = Object.assign(new Error(err.message), err) as Error & { code?: unknown };
    } finally {
      Error.stackTraceLimit = limit;
    }
    copy.code = (err as { code?: unknown }).code;
    if (err.stack !== undefined) copy.stack = err.stack;
    return copy;
  };
  return async (name: string, rrtype: string) => {
    const type = rrtype.toUpperCase();
    const key = `${type} ${name.toLowerCase()}`;
    let p = memo.get(key);
    if (!p) {
      const asked = resolver.resolve(name, type);
      const q = timedResolvers.has(resolver) ? asked : timedQuery(asked, name, type);
      p = (timeout === undefined ? q : withTimeout(q, timeout, name)).then(
        (value): Settled => ({ ok: true, value }),
        (error: unknown): Settled => ({ ok: false, error }),
      );
      memo.set(key, p);
    }
    const s = await p;
    if (!s.ok) throw copyError(s.error);
    return copyAnswer(s.value) as string[][] | string[];
  };
}
