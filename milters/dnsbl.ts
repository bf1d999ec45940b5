/**
 * dnsbl: DNS block and allow lists the way Postfix's postscreen weighs them
 * (postscreen_dnsbl_sites, postscreen_dnsbl_threshold), with smtpd's RHSBL checks of the
 * sender and HELO domains (reject_rhsbl_sender, reject_rhsbl_helo) and smtpd's delayed
 * reject (smtpd_delay_reject): the client's lookups start at connect, the HELO's at HELO,
 * the sender's at MAIL, all zones in parallel, and the verdict is given at RCPT.
 *
 * Lists are queried as RFC 5782 says: `<reversed address>.<zone>` (IPv4 octets, IPv6
 * nibbles) or `<domain>.<zone>`, type A. Each entry whose filter matches an answer adds
 * its weight; a sum at or over the threshold refuses every RCPT of the session with
 * Postfix's reply (`554 5.7.1 Service unavailable; client [192.0.2.1] blocked using
 * zen.example`). Every hit also goes into the message's spam score. Answers are cached in
 * an LRU cache for their TTL (negative answers for a short, fixed time).
 *
 * A lookup that fails (SERVFAIL, timeout, a list's 127.255.255.x error code) counts as "not
 * listed" (postscreen's behaviour) and is noted in a header; with `onFailure: 'tempfail'`
 * an RCPT whose verdict depends on the failed lookups is answered 451 instead.
 *
 * What it does not do: fetch the lists' TXT reasons, look up PTR names (reject_rhsbl_client),
 * or hold any state a second gateway node would need.
 */
import { LRUCache } from 'lru-cache';
import {
  defineMilter,
  DovetailError,
  ErrorCodes,
  reject,
  tempfail,
  type DefaultAction,
  type EnvelopeAddress,
  type MessageContext,
  type Milter,
  type MilterTimeouts,
  type SessionContext,
} from '../lib/index.js';
import { defaultResolver, isNotFound, normalizeDomain, reverseName, timedQuery, withTimeout, type DnsResolver } from './dns.js';
import { isRoleAddress } from './postmaster.js';

/** One client-IP list, as an object. */
export interface DnsblZone {
  /** The list's DNS zone (`zen.spamhaus.org`). */
  readonly zone: string;
  /** Added to the sum compared with the threshold when the list answers; negative for allow lists. Default 1. */
  readonly weight?: number;
  /**
   * Which answers count, in postscreen's pattern syntax: `127.0.0.[2..11]`, `127.0.[0..255].[1;3;5..7]`.
   * Several patterns: any may match. Default: any address in 127.0.0.0/8 but 127.255.255.0/24.
   */
  readonly filter?: string | readonly string[];
  /** The score rule name. Default `DNSBL_<LABEL>` (`DNSWL_<LABEL>` for a negative weight, `RHSBL_<LABEL>` for RHSBL lists). */
  readonly reason?: string;
  /** Points added to the message's spam score on a hit. Default: the weight. */
  readonly score?: number;
}

/** One right-hand-side list: a domain list checked against the sender's or the HELO domain. */
export interface RhsblZone extends DnsblZone {
  readonly target: 'sender' | 'helo';
}

export interface DnsblCacheOptions {
  /** Entries kept. Default 10 000. */
  readonly max?: number;
  /** Longest time an answer is kept, ms, whatever its TTL. Default 3 600 000 (postscreen_dnsbl_max_ttl). */
  readonly maxTtl?: number;
  /** How long "not listed" (NXDOMAIN / NODATA) is kept, ms. Default 60 000. */
  readonly negativeTtl?: number;
}

export interface DnsblOptions {
  /** The milter's name (logs, score entries). Default `dnsbl`. */
  readonly name?: string;
  /**
   * Client-IP lists: objects, or strings in postscreen_dnsbl_sites syntax
   * (`'zen.example=127.0.0.[2..11]*3'`, `'list.dnswl.example=127.0.[0..255].[1..3]*-5'`, `'bl.example'`).
   * One zone may be listed several times with different filters and weights.
   */
  readonly zones?: readonly (DnsblZone | string)[];
  /** Domain lists checked against the sender's domain (at MAIL) or the HELO name. */
  readonly rhsbl?: readonly RhsblZone[];
  /** The sum of weights at which the client is refused (postscreen_dnsbl_threshold). Default 1. */
  readonly threshold?: number;
  /** How long one list may take to answer, ms (postscreen_dnsbl_timeout). Default 10 000. */
  readonly timeout?: number;
  /**
   * A lookup failed (no answer in time, SERVFAIL, a 127.255.255.x error code): `'continue'`
   * (default, as postscreen) counts it as not listed; `'tempfail'` answers RCPT with 451 when
   * the failed lists could have changed the verdict.
   */
  readonly onFailure?: 'continue' | 'tempfail';
  /** Header noting hits and failures on the delivered message; `false` for none. Default `X-Dovetail-DNSBL`. */
  readonly header?: string | false;
  /** The answer cache; `false` for none. */
  readonly cache?: DnsblCacheOptions | false;
  /** Default: a node:dns/promises Resolver with the system's servers. */
  readonly resolver?: DnsResolver;
  /** Milliseconds on a monotonic scale, for cache TTLs. Default performance.now. */
  readonly clock?: () => number;
  /**
   * The address looked up. Default: the client's (`ctx.client.address`). Tests and setups
   * behind a proxy that did not pass the client on override it; `undefined` skips the lists.
   */
  readonly clientAddress?: (ctx: SessionContext) => string | undefined;
  /** Sessions not checked at all (no lookup verdict, no score, no header). Default: authenticated ones. */
  readonly exempt?: (ctx: MessageContext) => boolean;
  /**
   * Recipients a listed client is still allowed to reach (no verdict at their RCPT; the
   * score is kept). Default: the role addresses, bare `Postmaster` and `postmaster@`/`abuse@`
   * (RFC 5321 4.5.1, RFC 2142: a blocked sender must be able to complain). `() => false`: none.
   */
  readonly exemptRecipient?: (rcpt: EnvelopeAddress, ctx: MessageContext) => boolean;
  /** The reject's reply code (Postfix: rbl_code / postscreen_dnsbl_action). Default 554. */
  readonly rejectCode?: number;
  readonly defaultAction?: DefaultAction;
  readonly timeouts?: MilterTimeouts;
}

/** A parsed list entry. */
interface Entry {
  readonly zone: string;
  readonly weight: number;
  readonly score: number;
  readonly reason: string;
  readonly match: ((address: string) => boolean) | undefined;
  readonly target: 'client' | 'sender' | 'helo';
}

/** What one query came to. */
type Answer = { readonly kind: 'found'; readonly addresses: readonly string[] } | { readonly kind: 'none' } | { readonly kind: 'error'; readonly why: string };

/** One list entry's outcome for one subject. */
interface Outcome {
  readonly entry: Entry;
  /** What was looked up: the client address or the domain. */
  readonly subject: string;
  readonly hit: string | undefined;
  readonly failure: string | undefined;
}

const GENERIC = new Set(['list', 'lists', 'bl', 'rbl', 'dnsbl', 'all', 'ip', 'ips', 'zone', 'query', 'combined']);

function defaultReason(zone: string, weight: number, target: Entry['target']): string {
  const prefix = target === 'client' ? (weight < 0 ? 'DNSWL' : 'DNSBL') : 'RHSBL';
  const labels = zone.split('.').slice(0, -1);
  const label = labels.find((l) => !GENERIC.has(l)) ?? labels[0] ?? zone;
  const name = label.toUpperCase().replace(/[^A-Z0-9]+/g, '_');
  return name === prefix || name.startsWith(`${prefix}_`) ? name : `${prefix}_${name}`;
}

function bad(why: string): never {
  throw new DovetailError(ErrorCodes.INVALID_OPTIONS, `dnsbl: ${why}`);
}

/**
 * Compiles one postscreen filter pattern (`127.0.0.[2..11]`): four octets, each a number or
 * `[...]` holding numbers and ranges `a..b` separated by `;`.
 */
export function compileFilter(pattern: string): (address: string) => boolean {
  // Split at the dots outside brackets (a range inside them is written `a..b`).
  const octets: string[] = [''];
  let depth = 0;
  for (const ch of pattern.trim()) {
    if (ch === '[') depth++;
    if (ch === ']') depth--;
    if (ch === '.' && depth === 0) octets.push('');
    else octets[octets.length - 1] += ch;
  }
  if (octets.length !== 4) bad(`filter "${pattern}" does not have four octets`);
  const tests = octets.map((o) => {
    const byte = (s: string): number => {
      if (!/^\d{1,3}$/.test(s) || Number(s) > 255) bad(`filter "${pattern}": "${s}" is not an octet`);
      return Number(s);
    };
    if (!o.startsWith('[')) {
      const n = byte(o);
      return (x: number) => x === n;
    }
    if (!o.endsWith(']') || o.length < 3) bad(`filter "${pattern}": "${o}" is not a [list]`);
    const ranges = o.slice(1, -1).split(';').map((item) => {
      const m = /^(\d+)\.\.(\d+)$/.exec(item);
      if (m) {
        const lo = byte(m[1]!);
        const hi = byte(m[2]!);
        if (lo > hi) bad(`filter "${pattern}": range ${item} is empty`);
        return [lo, hi] as const;
      }
      const n = byte(item);
      return [n, n] as const;
    });
    return (x: number) => ranges.some(([lo, hi]) => x >= lo && x <= hi);
  });
  return (address) => {
    const parts = address.split('.');
    return parts.length === 4 && parts.every((p, i) => /^\d{1,3}$/.test(p) && tests[i]!(Number(p)));
  };
}

/**
 * Parses one postscreen_dnsbl_sites entry: `zone[=filter][*weight]`. The filter may itself
 * contain dots and brackets, so the weight is the part after the last `*`.
 */
export function parseSite(site: string): DnsblZone {
  let rest = site.trim();
  let weight: number | undefined;
  const star = rest.lastIndexOf('*');
  if (star >= 0) {
    const w = rest.slice(star + 1);
    if (!/^[-+]?\d+(\.\d+)?$/.test(w)) bad(`"${site}": weight "${w}" is not a number`);
    weight = Number(w);
    rest = rest.slice(0, star);
  }
  const eq = rest.indexOf('=');
  const zone = eq >= 0 ? rest.slice(0, eq) : rest;
  const filter = eq >= 0 ? rest.slice(eq + 1) : undefined;
  return {
    zone,
    ...(weight !== undefined ? { weight } : {}),
    ...(filter !== undefined ? { filter } : {}),
  };
}

function compileEntry(spec: DnsblZone | string, target: Entry['target']): Entry {
  const z = typeof spec === 'string' ? parseSite(spec) : spec;
  const zone = normalizeDomain(String(z.zone ?? ''));
  if (!zone) bad(`"${String(z.zone)}" is not a DNS zone`);
  const weight = z.weight ?? 1;
  if (typeof weight !== 'number' || !Number.isFinite(weight)) bad(`${zone}: weight must be a finite number`);
  const score = z.score ?? weight;
  if (typeof score !== 'number' || !Number.isFinite(score)) bad(`${zone}: score must be a finite number`);
  let match: Entry['match'];
  if (z.filter !== undefined) {
    const filters = (typeof z.filter === 'string' ? [z.filter] : [...z.filter]).map(compileFilter);
    if (filters.length === 0) bad(`${zone}: an empty filter list matches nothing`);
    match = (a) => filters.some((f) => f(a));
  }
  const reason = z.reason ?? defaultReason(zone, weight, target);
  if (!reason) bad(`${zone}: reason must not be empty`);
  return { zone, weight, score, reason, match, target };
}

/** The default filter: a listing is any 127.0.0.0/8 address but the 127.255.255.0/24 error codes. */
function defaultMatch(address: string): boolean {
  return address.startsWith('127.') && !address.startsWith('127.255.255.');
}

const WHAT: Record<Entry['target'], string> = {
  client: 'client',
  sender: 'Sender address',
  helo: 'Helo command',
};

/** Creates the milter. */
export function dnsbl(options: DnsblOptions = {}): Milter {
  const name = options.name ?? 'dnsbl';
  const client = (options.zones ?? []).map((z) => compileEntry(z, 'client'));
  const rhs = (options.rhsbl ?? []).map((z) => {
    if (z.target !== 'sender' && z.target !== 'helo') bad(`${String(z.zone)}: target must be 'sender' or 'helo'`);
    return compileEntry(z, z.target);
  });
  if (client.length + rhs.length === 0) bad('no zones given');
  const threshold = options.threshold ?? 1;
  if (!Number.isFinite(threshold)) bad('threshold must be a finite number');
  const timeout = options.timeout ?? 10_000;
  if (!(timeout > 0)) bad('timeout must be a positive number of milliseconds');
  const onFailure = options.onFailure ?? 'continue';
  if (onFailure !== 'continue' && onFailure !== 'tempfail') bad(`onFailure must be 'continue' or 'tempfail'`);
  const header = options.header ?? 'X-Dovetail-DNSBL';
  const rejectCode = options.rejectCode ?? 554;
  if (!(rejectCode >= 500 && rejectCode <= 599)) bad('rejectCode must be a 5xx code');
  const exempt = options.exempt ?? ((ctx: MessageContext) => ctx.auth !== undefined);
  const exemptRecipient = options.exemptRecipient ?? ((rcpt: EnvelopeAddress) => isRoleAddress(rcpt.address));
  if (typeof exemptRecipient !== 'function') bad('exemptRecipient must be a function');
  const clientAddress = options.clientAddress ?? ((ctx: SessionContext) => (ctx.client.family === 'ipv4' || ctx.client.family === 'ipv6' ? ctx.client.address : undefined));
  let resolver = options.resolver;

  const cacheOptions = options.cache === false ? undefined : (options.cache ?? {});
  const maxTtl = cacheOptions?.maxTtl ?? 3_600_000;
  const negativeTtl = cacheOptions?.negativeTtl ?? 60_000;
  const cache =
    cacheOptions === undefined
      ? undefined
      : new LRUCache<string, Answer>({
          max: cacheOptions.max ?? 10_000,
          ttlAutopurge: false,
          ...(options.clock ? { perf: { now: options.clock } } : {}),
        });
  const inflight = new Map<string, Promise<Answer>>();

  /** One A query, through the cache; never rejects. */
  function query(qname: string): Promise<Answer> {
    const cached = cache?.get(qname);
    if (cached) return Promise.resolve(cached);
    let p = inflight.get(qname);
    if (p) return p;
    resolver ??= defaultResolver({ timeout: Math.min(timeout, 5000) });
    const r = resolver;
    p = (async (): Promise<Answer> => {
      try {
        const records = await withTimeout(timedQuery(r.resolve4(qname, { ttl: true }), qname, 'A'), timeout, qname);
        const answer: Answer = { kind: 'found', addresses: records.map((x) => x.address) };
        const ttl = Math.min(maxTtl, Math.min(...records.map((x) => x.ttl)) * 1000);
        if (cache && ttl > 0) cache.set(qname, answer, { ttl });
        return answer;
      } catch (err) {
        if (isNotFound(err)) {
          const answer: Answer = { kind: 'none' };
          if (cache && negativeTtl > 0) cache.set(qname, answer, { ttl: negativeTtl });
          return answer;
        }
        const code = (err as { code?: unknown } | null)?.code;
        return { kind: 'error', why: typeof code === 'string' ? code : 'error' };
      } finally {
        inflight.delete(qname);
      }
    })();
    inflight.set(qname, p);
    return p;
  }

  /** Looks `subject` up in every entry of `entries`; never rejects. */
  function lookup(entries: readonly Entry[], subject: string, key: string): Promise<Outcome[]> {
    return Promise.all(
      entries.map(async (entry): Promise<Outcome> => {
        const qname = `${key}.${entry.zone}`;
        if (qname.length > 253) return { entry, subject, hit: undefined, failure: undefined };
        const answer = await query(qname);
        if (answer.kind === 'none') return { entry, subject, hit: undefined, failure: undefined };
        if (answer.kind === 'error') return { entry, subject, hit: undefined, failure: answer.why };
        const match = entry.match ?? defaultMatch;
        const hit = answer.addresses.find((a) => match(a));
        if (hit !== undefined) return { entry, subject, hit, failure: undefined };
        const code = answer.addresses.find((a) => a.startsWith('127.255.255.'));
        return { entry, subject, hit: undefined, failure: code === undefined ? undefined : `error code ${code}` };
      }),
    );
  }

  const clientEntries = client;
  const senderEntries = rhs.filter((e) => e.target === 'sender');
  const heloEntries = rhs.filter((e) => e.target === 'helo');

  /** Every outcome that applies to the message in progress. */
  async function outcomes(ctx: MessageContext): Promise<Outcome[]> {
    const all: Outcome[] = [];
    const c = ctx.state.get('client') as Promise<Outcome[]> | undefined;
    if (c) all.push(...(await c));
    const h = ctx.state.get('helo') as { name: string; outcomes: Promise<Outcome[]> } | undefined;
    if (h && h.name === ctx.helo) all.push(...(await h.outcomes));
    const s = ctx.state.get('sender') as { queueId: string; outcomes: Promise<Outcome[]> } | undefined;
    if (s && s.queueId === ctx.queueId) all.push(...(await s.outcomes));
    return all;
  }

  function describe(o: Outcome): string {
    const what = o.entry.target === 'client' ? `client [${o.subject}]` : o.entry.target === 'sender' ? `sender domain ${o.subject}` : `helo ${o.subject}`;
    return `${what} listed by ${o.entry.zone} (${o.hit ?? ''})`;
  }

  /** Adds each hit to the message's score, once per message. */
  function score(ctx: MessageContext, list: readonly Outcome[]): void {
    if (ctx.state.get('scored') === ctx.queueId) return;
    ctx.state.set('scored', ctx.queueId);
    for (const o of list) {
      if (o.hit !== undefined && o.entry.score !== 0) ctx.score.add(o.entry.score, o.entry.reason, describe(o));
    }
  }

  return defineMilter({
    // Its eom replaces its own result header and never reads the body.
    needs: { body: false },
    name,
    ...(options.defaultAction ? { defaultAction: options.defaultAction } : {}),
    ...(options.timeouts ? { timeouts: options.timeouts } : {}),

    async connect(ctx) {
      if (clientEntries.length === 0) return;
      const address = clientAddress(ctx);
      const key = address === undefined ? undefined : reverseName(address);
      if (address === undefined || key === undefined) return;
      // Started now, awaited at RCPT: the greeting does not wait for the lists.
      ctx.state.set('client', lookup(clientEntries, address.trim(), key));
    },

    async helo(ctx, hostname) {
      if (heloEntries.length === 0) return;
      const domain = normalizeDomain(hostname);
      ctx.state.set('helo', { name: hostname, outcomes: domain ? lookup(heloEntries, domain, domain) : Promise.resolve([]) });
    },

    async mail(ctx, sender) {
      if (senderEntries.length === 0) return;
      const at = sender.address.lastIndexOf('@');
      const domain = at < 0 ? undefined : normalizeDomain(sender.address.slice(at + 1));
      ctx.state.set('sender', {
        queueId: ctx.queueId,
        address: sender.address,
        outcomes: domain ? lookup(senderEntries, domain, domain) : Promise.resolve([]),
      });
    },

    async rcpt(ctx, rcpt) {
      if (exempt(ctx)) return;
      const list = await outcomes(ctx);
      score(ctx, list);
      if (exemptRecipient(rcpt, ctx)) return;
      let total = 0;
      let best: Outcome | undefined;
      for (const o of list) {
        if (o.hit === undefined) continue;
        total += o.entry.weight;
        if (o.entry.weight > 0 && (!best || o.entry.weight > best.entry.weight)) best = o;
      }
      const failed = list.filter((o) => o.failure !== undefined);
      if (onFailure === 'tempfail' && failed.length) {
        // Tempfail only when the failed lists could have changed the verdict.
        const up = failed.reduce((s, o) => s + Math.max(0, o.entry.weight), 0);
        const down = failed.reduce((s, o) => s + Math.min(0, o.entry.weight), 0);
        const listed = total >= threshold;
        if (listed ? total + down < threshold : total + up >= threshold) {
          const zones = [...new Set(failed.map((o) => o.entry.zone))].join(', ');
          return tempfail(451, '4.7.1', `Service unavailable; temporary failure looking up ${zones}`);
        }
      }
      if (total >= threshold && best) {
        const s = ctx.state.get('sender') as { address: string } | undefined;
        const what = best.entry.target === 'sender' ? (s?.address ?? best.subject) : best.subject;
        return reject(rejectCode, '5.7.1', `Service unavailable; ${WHAT[best.entry.target]} [${what}] blocked using ${best.entry.zone}`);
      }
    },

    async eom(ctx) {
      if (exempt(ctx)) return;
      const list = await outcomes(ctx);
      score(ctx, list);
      if (header === false) return;
      // Drop copies of our header that came with the message: only ours may say this.
      const theirs = ctx.headers.filter((h) => h.name.toLowerCase() === header.toLowerCase()).length;
      for (let i = theirs; i >= 1; i--) ctx.message.deleteHeader(header, i);
      for (const o of list) {
        if (o.hit !== undefined) ctx.message.addHeader(header, `${describe(o)}, weight ${o.entry.weight}`);
      }
      for (const zone of new Set(list.filter((o) => o.failure !== undefined).map((o) => o.entry.zone))) {
        ctx.message.addHeader(header, `temporary failure looking up ${zone}`);
      }
    },
  });
}
