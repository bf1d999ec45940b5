/**
 * virtual: Postfix's virtual alias maps (virtual_alias_maps, virtual(5), done by cleanup(8))
 * as a milter. A recipient that matches a key is replaced, at end of message, by the key's
 * targets, looked up again recursively.
 *
 * Keys are `user@domain` (exact) and `@domain` (the catch-all of a domain); the exact key
 * wins over the catch-all. With a recipient delimiter, `user+ext@domain` is looked up as
 * itself, then as `user@domain`, then as `@domain` (virtual(5), "ADDRESS EXTENSION"). A
 * target is a full address, or `@otherdomain` (the same local part in another domain). A
 * target that is the key itself (`bob@example.com  bob@example.com, archive@example.com`), or
 * an address already on the way to it (a loop), is kept as a final recipient and not looked
 * up again. Past `recursionLimit` levels (default 20) or `expansionLimit` addresses (1000)
 * the message is deferred with `451 4.6.0 Alias expansion error` (Postfix's cleanup reply).
 *
 * With `domains` (Postfix virtual_alias_domains), a recipient in one of those domains that
 * no key matches is refused at RCPT: `550 5.1.1 <addr>: Recipient address rejected: User
 * unknown in virtual alias table`, as Postfix's smtpd does.
 *
 * Where it acts: at RCPT (the refusal above, and a check that the expansion works) and at end
 * of message, the only stage that may change the envelope. RCPT-time checks
 * (relayControl, routes(), verifyRecipients) see the address as the client wrote it: see
 * docs/milters/virtual.md.
 *
 * It deliberately does not: look up bare `user` keys (Postfix does so only for the local
 * domains), rewrite headers (that is canonical(5), not virtual(5)), or read Postfix's
 * `postmap` files.
 */
import { canonicalDomain, defineMilter, domainSet, reject, type EnvelopeAddress, type EomContext, type MessageContext, type Milter } from '../lib/index.js';
import {
  addressKey,
  delimiterFrom,
  dsnFrom,
  expandAddress,
  expandOrTempfail,
  invalidOptions,
  limitsFrom,
  rewriteRecipients,
  splitAddress,
  splitExtension,
  withExtension,
  withMethods,
  type AddressMapMilter,
  type Extension,
  type Target,
} from './address-maps.js';

/** Options of {@link virtual}. */
export interface VirtualOptions {
  /**
   * `user@domain` or `@domain` → one target, a comma-separated list, or an array of targets
   * (`user@domain` or `@domain`): `{ 'info@example.com': ['alice@example.com', 'bob@example.net'],
   * '@old.example': '@example.com' }`. Keys are compared case-insensitively, domains as A-labels.
   */
  readonly map: Readonly<Record<string, string | readonly string[]>>;
  /**
   * Virtual alias domains (Postfix virtual_alias_domains): a recipient in one of them that no
   * key matches is refused at RCPT with `550 5.1.1`. Default: none (an unmatched address
   * goes on unchanged).
   */
  readonly domains?: readonly string[];
  /** Postfix `recipient_delimiter` (e.g. `'+'`). Default: none. */
  readonly recipientDelimiter?: string;
  /**
   * Domains whose mailboxes understand the delimiter: when `user+ext@` matched only as
   * `user@`, the extension is carried to the targets in these domains (Postfix
   * propagate_unmatched_extensions, which carries it to every target). Default: none.
   */
  readonly localDomains?: readonly string[];
  /** Nesting depth (Postfix virtual_alias_recursion_limit, 1000 there). Default 20. */
  readonly recursionLimit?: number;
  /** The most addresses one recipient may expand to (Postfix virtual_alias_expansion_limit). Default 1000. */
  readonly expansionLimit?: number;
  /**
   * Give each new recipient the original's DSN arguments (NOTIFY, ORCPT), and
   * `ORCPT=rfc822;<original>` when it had none, so a DSN names the address the sender used.
   * Served to Postfix these travel as SMFIR_ADDRCPT_PAR, which Postfix ignores with a warning
   * in its log: give false there. Default true.
   */
  readonly dsnArguments?: boolean;
}

/** The virtual() milter: a Milter that can also answer lookups. */
export interface VirtualMilter extends Milter, AddressMapMilter {}

const WHO = 'virtual()';

/** A parsed target: a full address, or `@domain` (keep the local part). */
type VirtualTarget = { readonly kind: 'address'; readonly address: string } | { readonly kind: 'domain'; readonly domain: string };

function parseTarget(key: string, raw: string): VirtualTarget {
  let t = raw.trim();
  if (t.startsWith('<') && t.endsWith('>')) t = t.slice(1, -1).trim();
  // eslint-disable-next-line no-control-regex
  if (t === '' || /[\x00-\x1f\x7f]/.test(t) || /\s/.test(t.replace(/"(?:[^"\\]|\\.)*"/g, ''))) {
    invalidOptions(WHO, `map: ${JSON.stringify(key)}: ${JSON.stringify(raw)} is not an address`);
  }
  const { local, domain } = splitAddress(t);
  if (domain === undefined || canonicalDomain(domain) === undefined) {
    invalidOptions(WHO, `map: ${JSON.stringify(key)}: ${JSON.stringify(raw)} is not user@domain or @domain`);
  }
  return local === '' ? { kind: 'domain', domain: domain as string } : { kind: 'address', address: t };
}

function splitTargets(value: string | readonly string[]): string[] {
  const list = typeof value === 'string' ? value.split(',') : [...value];
  return list.map((t) => (typeof t === 'string' ? t : '')).filter((t, i, all) => t.trim() !== '' || all.length === 1);
}

/**
 * Creates the virtual alias milter. Put it after relayControl and relocated, and before
 * aliases() (Postfix expands virtual aliases in cleanup, before local(8) sees the mail).
 *
 * @example
 * ```ts
 * virtual({ map: { 'sales@example.com': ['alice@example.com', 'bob@example.net'], '@example.org': 'catchall@example.com' } })
 * ```
 *
 * @throws DovetailError `DOVETAIL_ERR_INVALID_OPTIONS` for malformed options or map entries.
 */
export function virtual(options: VirtualOptions): VirtualMilter {
  if (typeof options !== 'object' || options === null) invalidOptions(WHO, 'options must be an object');
  if (typeof options.map !== 'object' || options.map === null) invalidOptions(WHO, 'map must be an object of address → targets');
  const table = new Map<string, readonly VirtualTarget[]>();
  for (const [key, value] of Object.entries(options.map)) {
    if (typeof value !== 'string' && !Array.isArray(value)) invalidOptions(WHO, `map: ${JSON.stringify(key)} must map to a string or a list of strings`);
    const { local, domain } = splitAddress(key.trim());
    // eslint-disable-next-line no-control-regex
    if (domain === undefined || /[\s\x00-\x1f\x7f]/.test(local)) invalidOptions(WHO, `map: key ${JSON.stringify(key)} is not user@domain or @domain`);
    const k = addressKey(local, domain as string);
    if (k === undefined) invalidOptions(WHO, `map: key ${JSON.stringify(key)}: ${JSON.stringify(domain)} is not a domain name`);
    if (table.has(k as string)) invalidOptions(WHO, `map: ${JSON.stringify(key)} is given twice`);
    const targets = splitTargets(value).map((t) => parseTarget(key, t));
    if (targets.length === 0) invalidOptions(WHO, `map: ${JSON.stringify(key)} has no targets`);
    table.set(k as string, targets);
  }
  const domainList = (list: readonly string[] | undefined, what: string): ((d: string) => boolean) => {
    if (list === undefined) return () => false;
    if (!Array.isArray(list)) return invalidOptions(WHO, `${what} must be a list of domains`);
    try {
      return domainSet(list);
    } catch (err) {
      return invalidOptions(WHO, `${what}: ${(err as Error).message}`);
    }
  };
  const isAliasDomain = domainList(options.domains, 'domains');
  const isLocal = domainList(options.localDomains, 'localDomains');
  const delimiter = delimiterFrom(WHO, options.recipientDelimiter);
  const limits = limitsFrom(WHO, options);
  const dsn = dsnFrom(WHO, options.dsnArguments);

  const lookup = (address: string): readonly Target[] | undefined => {
    const { local, domain } = splitAddress(address);
    if (domain === undefined) return undefined;
    const d = canonicalDomain(domain);
    if (d === undefined) return undefined;
    let entry = local === '' ? undefined : table.get(`${local.toLowerCase()}@${d}`);
    let matchedLocal = local;
    let ext: Extension | undefined;
    if (entry === undefined && local !== '') {
      const split = splitExtension(local, delimiter);
      if (split) {
        entry = table.get(`${split.base.toLowerCase()}@${d}`);
        if (entry !== undefined) {
          matchedLocal = split.base;
          ext = split;
        }
      }
    }
    if (entry === undefined) entry = table.get(`@${d}`);
    if (entry === undefined) return undefined;
    return entry.map((t): Target => {
      let to = t.kind === 'domain' ? `${matchedLocal}@${t.domain}` : t.address;
      if (ext && delimiter) {
        const td = canonicalDomain(splitAddress(to).domain ?? '');
        if (td !== undefined && isLocal(td)) to = withExtension(to, ext, delimiter);
      }
      return { address: to, final: false };
    });
  };
  const expand = (address: string): string[] => expandAddress(address, lookup, limits);

  const milter = defineMilter({
    // Its eom rewrites recipients only: served to Postfix, no header or body is sent to it.
    needs: { headers: false, body: false },
    name: 'virtual',
    async rcpt(_ctx: MessageContext, rcpt: EnvelopeAddress) {
      if (lookup(rcpt.address) === undefined) {
        const d = canonicalDomain(splitAddress(rcpt.address).domain ?? '');
        if (d !== undefined && isAliasDomain(d)) {
          // eslint-disable-next-line no-control-regex
          const shown = rcpt.address.replace(/[\x00-\x1f\x7f]/g, '?').slice(0, 300);
          return reject(550, '5.1.1', `<${shown}>: Recipient address rejected: User unknown in virtual alias table`);
        }
        return undefined;
      }
      const expanded = expandOrTempfail(expand, rcpt.address);
      return Array.isArray(expanded) ? undefined : expanded;
    },
    async eom(ctx: EomContext) {
      return rewriteRecipients(ctx, expand, dsn);
    },
  });

  return withMethods<VirtualMilter>(milter, {
    has: { value: (address: string) => lookup(address) !== undefined },
    expand: { value: expand },
  });
}
