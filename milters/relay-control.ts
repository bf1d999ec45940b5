/**
 * relayControl: never an open relay. At RCPT it decides, as Postfix's smtpd does with
 * `permit_mynetworks, permit_sasl_authenticated, reject_unauth_destination`
 * (src/smtpd/smtpd_check.c, permit_auth_destination), whether this recipient may be
 * accepted: a trusted client network or an authenticated session may send anywhere;
 * anyone else only to the local and relay domains. Everything else is refused with
 * Postfix's `554 5.7.1 <address>: Relay access denied`.
 *
 * The destination is found the way Postfix's trivial-rewrite resolver finds it
 * (src/trivial-rewrite/resolve.c): a trailing dot is stripped; a local domain is stripped
 * and what is left of the local part is resolved again (`user%host` with the percent hack,
 * `host!user` with bang-path swapping, a quoted `"user@host"` looked into as Postfix does
 * with resolve_dequoted = yes, a source route `@a,@b:` dropped); a remote destination
 * whose local part still holds `@`, `%` or `!` is "routed" and, unless
 * allowUntrustedRouting is set, refused even for a relay domain. Domains are compared in
 * their A-label (punycode) form, lower-cased; a domain that IDNA would map to another
 * spelling (full-width letters, ideographic full stops) is not taken as ours. An IP
 * literal is local only when it is the address the client connected to or is listed in
 * localAddresses; it never matches a relay domain.
 *
 * What it does not do: look up users (see GatewayOptions.verifyRecipients), MX-backup
 * (Postfix's deprecated permit_mx_backup), or rate-limit. Client networks are matched
 * with ip-address; an IPv4-mapped IPv6 client matches the IPv4 networks and vice versa.
 */
import net from 'node:net';
import { Address4, Address6 } from 'ip-address';
import { canonicalDomain, defineMilter, domainSet, networkList, reject, DovetailError, ErrorCodes, type EnvelopeAddress, type MessageContext, type Milter } from '../lib/index.js';

export { canonicalDomain };

/** Options of {@link relayControl}. Domain names may be given as U-labels or A-labels, in any case. */
export interface RelayControlOptions {
  /**
   * Trusted client networks (Postfix `mynetworks`): IPv4 or IPv6 addresses or CIDR blocks,
   * e.g. `['127.0.0.0/8', '192.0.2.0/24', '::1/128', '2001:db8::/32']`. Clients in them may
   * relay anywhere. Default: none.
   */
  readonly mynetworks?: readonly string[];
  /** Domains we deliver to finally (Postfix `mydestination` / virtual domains). Default: none. */
  readonly localDomains?: readonly string[];
  /** Domains we relay to a next hop (Postfix `relay_domains`). Default: none. */
  readonly relayDomains?: readonly string[];
  /**
   * When true, a listed `example.com` also matches every subdomain (`a.example.com`), as
   * with Postfix's `parent_domain_matches_subdomains`. Either way an entry written
   * `.example.com` matches the subdomains only. Default false.
   */
  readonly parentDomainMatchesSubdomains?: boolean;
  /** Authenticated (SMTP AUTH) sessions may relay anywhere (`permit_sasl_authenticated`). Default true. */
  readonly permitAuthenticated?: boolean;
  /**
   * IP addresses whose literals (`user@[192.0.2.1]`, `user@[IPv6:2001:db8::1]`) are local,
   * besides the address the client connected to (Postfix: inet_interfaces, proxy_interfaces).
   */
  readonly localAddresses?: readonly string[];
  /** Rewrite `user%host` to `user@host` after stripping a local domain (Postfix `allow_percent_hack`). Default true. */
  readonly allowPercentHack?: boolean;
  /** Rewrite `host!user` to `user@host` after stripping a local domain (Postfix `swap_bangpath`). Default true. */
  readonly swapBangPath?: boolean;
  /**
   * Relay for untrusted clients to a relay domain even when the local part holds further
   * routing (`user%other@relay.example`) (Postfix `allow_untrusted_routing`). Default false.
   */
  readonly allowUntrustedRouting?: boolean;
  /** The reply code of the refusal (Postfix `relay_domains_reject_code`): 554 (default) or 550. */
  readonly rejectCode?: 550 | 554;
}

/** Where an address resolves to. */
export interface RelayResolution {
  /** `local`: final delivery here; `relay`: a relay domain; `remote`: anything else. */
  readonly class: 'local' | 'relay' | 'remote';
  /** The remote local part still held routing operators (`@`, `%`, `!`). */
  readonly routed: boolean;
  /** The destination domain (A-label form, or `[ip]`), `''` when local without a domain. */
  readonly domain: string;
}

type Matcher = (domain: string) => boolean;

const bad = (why: string): never => {
  throw new DovetailError(ErrorCodes.INVALID_OPTIONS, `relayControl: ${why}`);
};

function domainMatcher(list: readonly string[] | undefined, subdomains: boolean, what: string): Matcher {
  try {
    return domainSet(list ?? [], { subdomains });
  } catch (err) {
    return bad(`${what}: ${(err as Error).message}`);
  }
}

/** An IP address in one canonical form (IPv4 dotted; IPv6 canonical), IPv4-mapped IPv6 as IPv4. */
function canonicalIp(ip: string): string | undefined {
  if (net.isIPv4(ip)) return new Address4(ip).correctForm();
  if (net.isIPv6(ip)) {
    const a = new Address6(ip);
    return a.is4() ? a.to4().correctForm() : a.canonicalForm();
  }
  return undefined;
}

function networkMatcher(list: readonly string[] | undefined): (ip: string) => boolean {
  try {
    return networkList(list ?? []);
  } catch (err) {
    return bad(`mynetworks: ${(err as Error).message}`);
  }
}

/** Splits at the last `@` outside a quoted string; the local part is returned dequoted. */
function splitAddress(address: string): { local: string; domain: string | undefined } {
  let quoted = false;
  let at = -1;
  for (let i = 0; i < address.length; i++) {
    const c = address[i];
    if (c === '\\' && quoted) i++;
    else if (c === '"') quoted = !quoted;
    else if (c === '@' && !quoted) at = i;
  }
  const local = at < 0 ? address : address.slice(0, at);
  const domain = at < 0 ? undefined : address.slice(at + 1);
  // Postfix resolves dequoted (resolve_dequoted = yes): operators inside quotes count.
  return { local: local.replace(/"((?:[^"\\]|\\.)*)"/g, (_m, q: string) => q.replace(/\\(.)/g, '$1')), domain };
}

/**
 * Resolves an envelope address as Postfix's trivial-rewrite does (resolve.c), with our
 * domain lists: the class of its destination and whether it is routed.
 */
export function resolveDestination(
  address: string,
  opts: {
    readonly isLocalDomain: (d: string) => boolean;
    readonly isRelayDomain: (d: string) => boolean;
    readonly isLocalAddress: (ip: string) => boolean;
    readonly percentHack: boolean;
    readonly bangPath: boolean;
  },
): RelayResolution {
  let addr = address.trim();
  for (let round = 0; round < 32; round++) {
    // A source route (@a,@b:user@c) is dropped; RFC 5321 4.1.2 / appendix C.
    const route = /^@[^:]*:(.+)$/.exec(addr);
    if (route) addr = route[1] as string;
    // Strip trailing @ (resolve.c strips a trailing dot or @).
    while (addr.endsWith('@')) addr = addr.slice(0, -1);
    const { local, domain } = splitAddress(addr);
    if (domain !== undefined) {
      let d: string | undefined;
      let localDest = false;
      const literal = /^\[(?:ipv6:)?([^\]]+)\]\.?$/i.exec(domain);
      if (literal) {
        const ip = canonicalIp(literal[1] as string);
        if (ip === undefined) return { class: 'remote', routed: false, domain };
        d = `[${ip}]`;
        localDest = opts.isLocalAddress(ip);
      } else {
        d = canonicalDomain(domain);
        if (d === undefined) return { class: 'remote', routed: /[@%!]/.test(local), domain };
        localDest = opts.isLocalDomain(d);
      }
      if (!localDest) {
        // Remote: routing operators left in the local part make it "routed".
        const cls = !literal && opts.isRelayDomain(d) ? 'relay' : 'remote';
        return { class: cls, routed: /[@%!]/.test(local), domain: d };
      }
    }
    // Local (or no domain at all: our own host). What is left of the local part may route further.
    if (local.includes('@')) {
      addr = local;
    } else if (opts.bangPath && local.includes('!')) {
      const bang = local.indexOf('!');
      addr = `${local.slice(bang + 1)}@${local.slice(0, bang)}`;
    } else if (opts.percentHack && local.includes('%')) {
      const pct = local.lastIndexOf('%');
      addr = `${local.slice(0, pct)}@${local.slice(pct + 1)}`;
    } else {
      return { class: 'local', routed: false, domain: domain === undefined ? '' : addr.slice(addr.lastIndexOf('@') + 1).toLowerCase() };
    }
  }
  // Pathologically deep routing: never trust it.
  return { class: 'remote', routed: true, domain: '' };
}

/**
 * Creates the relay-control milter. Put it early in the chain (after sizeLimit), so that a
 * relay attempt is refused before costlier checks run.
 *
 * @example
 * ```ts
 * relayControl({ mynetworks: ['127.0.0.0/8', '::1/128'], localDomains: ['example.com'], relayDomains: ['example.org'] })
 * ```
 */
export function relayControl(options: RelayControlOptions = {}): Milter {
  if (typeof options !== 'object' || options === null) bad('options must be an object');
  const subdomains = options.parentDomainMatchesSubdomains ?? false;
  const isLocalDomain = domainMatcher(options.localDomains, subdomains, 'localDomains');
  const isRelayDomain = domainMatcher(options.relayDomains, subdomains, 'relayDomains');
  const trusted = networkMatcher(options.mynetworks);
  const localIps = new Set<string>();
  for (const ip of options.localAddresses ?? []) {
    const c = canonicalIp(String(ip));
    if (c === undefined) bad(`localAddresses: ${JSON.stringify(ip)} is not an IP address`);
    localIps.add(c as string);
  }
  const code = options.rejectCode ?? 554;
  if (code !== 550 && code !== 554) bad('rejectCode must be 550 or 554');
  const permitAuthenticated = options.permitAuthenticated ?? true;
  const allowRouting = options.allowUntrustedRouting ?? false;
  const percentHack = options.allowPercentHack ?? true;
  const bangPath = options.swapBangPath ?? true;

  return defineMilter({
    name: 'relay-control',
    async rcpt(ctx: MessageContext, rcpt: EnvelopeAddress) {
      // permit_mynetworks, permit_sasl_authenticated
      if (trusted(ctx.client.address)) return undefined;
      if (permitAuthenticated && ctx.auth !== undefined) return undefined;
      // reject_unauth_destination
      const own = canonicalIp(ctx.server.address);
      const r = resolveDestination(rcpt.address, {
        isLocalDomain,
        isRelayDomain,
        isLocalAddress: (ip) => ip === own || localIps.has(ip),
        percentHack,
        bangPath,
      });
      if (r.routed && !allowRouting) return deny(code, rcpt.address);
      if (r.class === 'local' || r.class === 'relay') return undefined;
      return deny(code, rcpt.address);
    },
  });
}

function deny(code: 550 | 554, address: string) {
  // The address goes into the reply as the client gave it, made safe for a reply line.
  // eslint-disable-next-line no-control-regex
  const shown = address.replace(/[\x00-\x1f\x7f]/g, '?').slice(0, 300);
  return reject(code, '5.7.1', `<${shown}>: Relay access denied`);
}
