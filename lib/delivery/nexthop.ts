/**
 * Next-hop resolution for smtp(): from a destination (a recipient's domain, or a relayhost
 * in Postfix's syntax) to the ordered list of servers to try.
 *
 * Implements RFC 5321 section 5.1: MX records in preference order, the order among equal
 * preferences random (so load spreads), every address of every host tried in that order;
 * no MX record at all (NODATA) → the domain's own A/AAAA records as an implicit MX of
 * preference 0; RFC 7505 null MX (a single MX with the root as exchange) → a permanent
 * failure, no connection attempted. A domain that does not exist (NXDOMAIN) fails
 * permanently (5.1.2); any other DNS failure (SERVFAIL, timeout, refused) defers (4.4.3).
 * As Postfix's smtp(8) does, an MX list that names ourselves (by host name, or by one of
 * `localAddresses`) keeps only the hosts preferred over us, and when we are the best MX the
 * mail fails with `5.4.6 mail for <domain> loops back to myself`.
 *
 * Relayhost syntax (Postfix `relayhost`): `[host]:port` or `[host]` is used as it is, with
 * no MX lookup (the host may be a name, resolved by A/AAAA, or an IP address; IPv6 written
 * `[ipv6:2001:db8::1]`); `host:port` or `host` is looked up by MX like a domain.
 *
 * It deliberately does not: follow CNAMEs itself (the resolver does), check DNSSEC/DANE, or
 * cache answers (pass a caching resolver; the dnsbl milter has one).
 */
import net from 'node:net';
import { smtpReply, type SmtpReply } from '../milter/verdict.js';

/** What next-hop resolution needs of a resolver: node:dns/promises (or a `Resolver`) fits as it is. */
export interface MxResolver {
  resolveMx(hostname: string): Promise<{ exchange: string; priority: number }[]>;
  resolve4(hostname: string): Promise<string[]>;
  resolve6(hostname: string): Promise<string[]>;
}

/** One server to try. */
export interface NextHopHost {
  /** The host name (MX exchange or relayhost), or the address itself for a literal. */
  readonly name: string;
  readonly address: string;
  readonly port: number;
}

/** Where a destination's mail goes: servers to try in order, or why there are none. */
export type NextHop =
  | { readonly kind: 'hosts'; readonly hosts: readonly NextHopHost[] }
  | { readonly kind: 'failed' | 'deferred'; readonly reply: SmtpReply };

/** A parsed destination: look up MX of `name`, or use `name` as the host. */
export interface Destination {
  readonly name: string;
  readonly port: number;
  readonly mx: boolean;
}

/**
 * Parses a relayhost in Postfix's syntax; undefined when it is not one.
 * `[mail.example.com]:587` → no MX lookup; `example.com:25` → MX lookup of example.com.
 */
export function parseRelayhost(spec: string, defaultPort: number): Destination | undefined {
  const bracketed = /^\[([^\]\s]+)\](?::(\d{1,5}))?$/.exec(spec);
  const bare = /^([A-Za-z0-9._-]+)(?::(\d{1,5}))?$/.exec(spec);
  const m = bracketed ?? bare;
  if (!m) return undefined;
  const port = m[2] === undefined ? defaultPort : Number(m[2]);
  if (!(port >= 1 && port <= 65535)) return undefined;
  const name = (m[1] as string).replace(/^ipv6:/i, '');
  if (!bracketed && net.isIP(name)) return undefined;
  return { name: name.toLowerCase(), port, mx: !bracketed };
}

export interface ResolveOptions {
  readonly resolver: MxResolver;
  /** Our own names (host name first): an MX host of that name is us. */
  readonly selfNames: readonly string[];
  /** Our own addresses: an MX host with such an address is us. */
  readonly localAddresses: readonly string[];
  /** Look up AAAA records too. */
  readonly ipv6: boolean;
}

function errnoOf(err: unknown): string {
  const code = typeof err === 'object' && err !== null ? (err as { code?: unknown }).code : undefined;
  return typeof code === 'string' ? code : 'EUNKNOWN';
}

/** c-ares codes that mean "the name does not exist" and "it exists, without records of that type". */
const NXDOMAIN = new Set(['ENOTFOUND']);
const NODATA = new Set(['ENODATA']);

const dnsTemp = (name: string, type: string, err: unknown): SmtpReply =>
  smtpReply(451, '4.4.3', `Host or domain name not found. Name service error for name=${name} type=${type}: ${errnoOf(err)}, try again`);
const dnsNotFound = (name: string, type: string): SmtpReply => smtpReply(550, '5.1.2', `Host or domain name not found. Name service error for name=${name} type=${type}: Host not found`);

/** Fisher–Yates over each run of equal preference (RFC 5321 5.1: randomise among equals). */
function shuffleEqual<T extends { priority: number }>(list: T[]): T[] {
  list.sort((a, b) => a.priority - b.priority);
  for (let start = 0; start < list.length; ) {
    let end = start + 1;
    while (end < list.length && list[end]!.priority === list[start]!.priority) end++;
    for (let i = end - 1; i > start; i--) {
      const j = start + Math.floor(Math.random() * (i - start + 1));
      [list[i], list[j]] = [list[j]!, list[i]!];
    }
    start = end;
  }
  return list;
}

/** The addresses of one host, IPv4 first; `undefined` and the error when none could be had. */
async function addressesOf(name: string, o: ResolveOptions): Promise<{ addresses: string[]; error?: { reply: SmtpReply; permanent: boolean } }> {
  if (net.isIP(name)) return { addresses: [name] };
  const lookups: Promise<string[]>[] = [o.resolver.resolve4(name)];
  if (o.ipv6) lookups.push(o.resolver.resolve6(name));
  const settled = await Promise.allSettled(lookups);
  const addresses = settled.flatMap((s) => (s.status === 'fulfilled' ? s.value : []));
  if (addresses.length > 0) return { addresses };
  const errors = settled.flatMap((s) => (s.status === 'rejected' ? [s.reason as unknown] : []));
  const permanent = errors.every((e) => NXDOMAIN.has(errnoOf(e)) || NODATA.has(errnoOf(e)));
  const first = errors.find((e) => !NXDOMAIN.has(errnoOf(e)) && !NODATA.has(errnoOf(e))) ?? errors[0];
  return {
    addresses,
    error: permanent ? { reply: dnsNotFound(name, 'A'), permanent: true } : { reply: dnsTemp(name, 'A', first), permanent: false },
  };
}

/** Resolves a destination to the servers to try (see the file header for the rules). */
export async function resolveNextHop(dest: Destination, o: ResolveOptions): Promise<NextHop> {
  let mx: { exchange: string; priority: number }[];
  let implicit = false;
  if (!dest.mx || net.isIP(dest.name)) {
    mx = [{ exchange: dest.name, priority: 0 }];
    implicit = true;
  } else {
    try {
      mx = await o.resolver.resolveMx(dest.name);
    } catch (err) {
      const code = errnoOf(err);
      if (NXDOMAIN.has(code)) return { kind: 'failed', reply: dnsNotFound(dest.name, 'MX') };
      if (!NODATA.has(code)) return { kind: 'deferred', reply: dnsTemp(dest.name, 'MX', err) };
      mx = [];
    }
    const norm = mx.map((r) => ({ exchange: r.exchange.replace(/\.$/, '').toLowerCase(), priority: r.priority }));
    // RFC 7505: a single MX whose exchange is the root means "this domain takes no mail".
    if (norm.length === 1 && norm[0]!.exchange === '') {
      return { kind: 'failed', reply: smtpReply(556, '5.1.10', `Recipient address rejected: domain ${dest.name} does not accept mail (nullMX)`) };
    }
    mx = norm.filter((r) => r.exchange !== '');
    if (mx.length === 0) {
      mx = [{ exchange: dest.name, priority: 0 }];
      implicit = true;
    }
  }
  const ordered = shuffleEqual(mx.map((r) => ({ ...r })));
  const selves = new Set(o.selfNames.map((n) => n.toLowerCase()));
  const ours = new Set(o.localAddresses);
  const found = await Promise.all(ordered.map(async (r) => ({ r, ...(await addressesOf(r.exchange, o)) })));
  // The best preference at which we appear ourselves: only better hosts may be used.
  let selfPref = Infinity;
  for (const f of found) {
    if (selves.has(f.r.exchange) || f.addresses.some((a) => ours.has(a))) selfPref = Math.min(selfPref, f.r.priority);
  }
  const usable = found.filter((f) => f.r.priority < selfPref);
  if (usable.length === 0 && selfPref !== Infinity) {
    return { kind: 'failed', reply: smtpReply(554, '5.4.6', `mail for ${dest.name} loops back to myself`) };
  }
  const hosts = usable.flatMap((f) => f.addresses.map((address) => ({ name: f.r.exchange, address, port: dest.port })));
  if (hosts.length > 0) return { kind: 'hosts', hosts };
  // No address anywhere: a domain without MX whose name has none fails; otherwise try later.
  const errors = usable.flatMap((f) => (f.error ? [f.error] : []));
  if (implicit && errors.every((e) => e.permanent)) return { kind: 'failed', reply: errors[0]?.reply ?? dnsNotFound(dest.name, 'A') };
  const temp = errors.find((e) => !e.permanent);
  return { kind: 'deferred', reply: temp?.reply ?? smtpReply(451, '4.4.4', `No address for any mail exchanger of ${dest.name}; will try again`) };
}
