/**
 * What aliases(), virtual() and relocated() share: address splitting with Postfix's
 * `recipient_delimiter`, the /etc/aliases file parser, and recursive expansion with loop
 * detection and limits (Postfix: virtual_alias_recursion_limit, virtual_alias_expansion_limit).
 *
 * Addresses are split at the last `@`; local parts are compared case-insensitively (as
 * Postfix's lookup tables fold keys to lower case), domains in their canonical A-label form.
 *
 * It deliberately does not: dequote local parts (`"a b"@example.com` is looked up as the
 * string `"a b"`), or look up bare local parts in non-local domains.
 */
import { canonicalDomain, DovetailError, ErrorCodes, tempfail, type EnvelopeAddress, type EomContext, type Milter, type Transport } from '../lib/index.js';

/** Postfix virtual_alias_recursion_limit is 1000; nesting that deep is a configuration error here. */
export const DEFAULT_RECURSION_LIMIT = 20;
/** Postfix virtual_alias_expansion_limit. */
export const DEFAULT_EXPANSION_LIMIT = 1000;
/** Lookups one expansion may make (a wide alias tree re-used at every level would otherwise be exponential). */
const MAX_LOOKUPS = 20_000;

/** An address split at its last `@`; `domain` is `undefined` when there is no `@`. */
export function splitAddress(address: string): { readonly local: string; readonly domain: string | undefined } {
  const at = address.lastIndexOf('@');
  return at < 0 ? { local: address, domain: undefined } : { local: address.slice(0, at), domain: address.slice(at + 1) };
}

/** A local part cut at its recipient delimiter: `bob+tag` → base `bob`, delimiter `+`, extension `tag`. */
export interface Extension {
  readonly base: string;
  readonly delimiter: string;
  readonly extension: string;
}

/**
 * Splits a local part at the first delimiter character (Postfix `recipient_delimiter`:
 * each character of `delimiters` is one). A local part that starts with a delimiter, or has
 * none, is not split (undefined).
 */
export function splitExtension(local: string, delimiters: string | undefined): Extension | undefined {
  if (!delimiters) return undefined;
  for (let i = 1; i < local.length; i++) {
    const c = local[i] as string;
    if (delimiters.includes(c)) return { base: local.slice(0, i), delimiter: c, extension: local.slice(i + 1) };
  }
  return undefined;
}

/**
 * Adds an extension to an address's local part (Postfix propagate_unmatched_extensions),
 * unless the local part already holds a delimiter.
 */
export function withExtension(address: string, ext: Extension, delimiters: string): string {
  const { local, domain } = splitAddress(address);
  if ([...delimiters].some((d) => local.includes(d))) return address;
  return `${local}${ext.delimiter}${ext.extension}${domain === undefined ? '' : '@' + domain}`;
}

/** The lookup key of a `user@domain` address: lower-cased local part, canonical domain; undefined when the domain is not one. */
export function addressKey(local: string, domain: string): string | undefined {
  const d = canonicalDomain(domain);
  return d === undefined ? undefined : `${local.toLowerCase()}@${d}`;
}

/** One result of a table lookup: where the address goes. */
export interface Target {
  readonly address: string;
  /** Deliver as is, without looking it up again (aliases(5)'s `\name`). */
  readonly final: boolean;
}

/** A table lookup: the targets an address maps to, or undefined when no entry applies. */
export type Lookup = (address: string) => readonly Target[] | undefined;

/** Why an expansion was given up. */
export class ExpansionError extends Error {
  constructor(
    readonly address: string,
    readonly reason: 'recursion' | 'expansion',
  ) {
    super(
      reason === 'recursion'
        ? `expanding ${address}: nesting deeper than the recursion limit`
        : `expanding ${address}: more addresses than the expansion limit`,
    );
    this.name = 'ExpansionError';
  }
}

/** Limits of one expansion. */
export interface ExpansionLimits {
  /** Nesting depth (an address, its targets, their targets …). */
  readonly recursion: number;
  /** Distinct final addresses. */
  readonly expansion: number;
}

/**
 * Expands an address recursively: each target is looked up again, until no entry applies.
 * A target that is the address itself, or any address on the way to it (a loop), is kept as
 * a final address and not expanded again; a `final` target is kept as is. The result holds
 * each final address once (compared case-insensitively), in order of first appearance.
 *
 * @throws ExpansionError when the nesting is deeper than `limits.recursion` or the result
 * would hold more than `limits.expansion` addresses.
 */
export function expandAddress(address: string, lookup: Lookup, limits: ExpansionLimits): string[] {
  const out: string[] = [];
  const seen = new Set<string>();
  let lookups = 0;
  const add = (a: string): void => {
    const key = a.toLowerCase();
    if (seen.has(key)) return;
    seen.add(key);
    out.push(a);
    if (out.length > limits.expansion) throw new ExpansionError(address, 'expansion');
  };
  const walk = (current: string, path: readonly string[], depth: number): void => {
    if (++lookups > MAX_LOOKUPS) throw new ExpansionError(address, 'expansion');
    const targets = lookup(current);
    if (targets === undefined) {
      add(current);
      return;
    }
    const here = [...path, current.toLowerCase()];
    for (const t of targets) {
      if (t.final || here.includes(t.address.toLowerCase())) {
        add(t.address);
        continue;
      }
      if (depth + 1 > limits.recursion) throw new ExpansionError(address, 'recursion');
      walk(t.address, here, depth + 1);
    }
  };
  walk(address, [], 0);
  return out;
}

/** The reply when an expansion is given up (Postfix cleanup: `4.6.0 Alias expansion error`). */
export const EXPANSION_ERROR_TEXT = 'Alias expansion error';

/** RFC 3461 xtext. */
function xtext(s: string): string {
  let out = '';
  for (const ch of s) {
    const c = ch.codePointAt(0) ?? 0;
    out += c < 0x21 || c > 0x7e || ch === '+' || ch === '=' ? '+' + c.toString(16).toUpperCase().padStart(2, '0') : ch;
  }
  return out;
}

/** ESMTP arguments as a string for changeSender()/addRecipient(), without any that would not parse. */
function formatArgs(args: EnvelopeAddress['args']): string[] {
  const parts: string[] = [];
  for (const [key, value] of Object.entries(args)) {
    if (!/^[A-Z0-9][A-Z0-9-]*$/.test(key)) continue;
    // eslint-disable-next-line no-control-regex
    if (value !== true && (value === '' || /[\x00-\x20\x7f]/.test(value))) continue;
    parts.push(value === true ? key : `${key}=${value}`);
  }
  return parts;
}

/** The ESMTP arguments of a sender, kept when it is rewritten (SIZE, BODY, RET, ENVID, SMTPUTF8 …). */
export function inheritedSenderArgs(sender: EnvelopeAddress): string {
  return formatArgs(sender.args).join(' ');
}

/**
 * The ESMTP arguments an expanded recipient inherits from the one it replaces, as a string
 * for addRecipient(): the original's (NOTIFY, ORCPT …), plus `ORCPT=rfc822;<original>` when it
 * had none (Postfix keeps the original recipient for DSNs), for an ASCII original address.
 */
export function inheritedArgs(original: EnvelopeAddress): string {
  const parts = formatArgs(original.args);
  // eslint-disable-next-line no-control-regex
  if (original.args['ORCPT'] === undefined && /^[\x21-\x7e]+$/.test(original.address)) {
    parts.push(`ORCPT=rfc822;${xtext(original.address)}`);
  }
  return parts.join(' ');
}

/**
 * Expands `address`; an expansion past the limits is the `451 4.6.0` tempfail verdict (the
 * caller returns it), and anything else thrown is a bug and goes on.
 */
export function expandOrTempfail(expand: (address: string) => string[], address: string): string[] | ReturnType<typeof tempfail> {
  try {
    return expand(address);
  } catch (err) {
    if (err instanceof ExpansionError) return tempfail(451, '4.6.0', EXPANSION_ERROR_TEXT);
    throw err;
  }
}

/**
 * Replaces every recipient of the message that `expand` maps elsewhere by its expansion
 * (at eom): removes it (unless it expands to itself among others), adds each new address with
 * the original's DSN arguments (when `dsn`). Returns a 451 4.6.0 tempfail verdict when an
 * expansion fails.
 */
export function rewriteRecipients(ctx: EomContext, expand: (address: string) => string[], dsn: boolean) {
  const plan: { readonly original: EnvelopeAddress; readonly to: readonly string[] }[] = [];
  for (const r of ctx.envelope.recipients) {
    const to = expandOrTempfail(expand, r.address);
    if (!Array.isArray(to)) return to;
    if (to.length === 1 && to[0]?.toLowerCase() === r.address.toLowerCase()) continue;
    plan.push({ original: r, to });
  }
  for (const { original, to } of plan) {
    const self = original.address.toLowerCase();
    if (!to.some((a) => a.toLowerCase() === self)) ctx.envelope.removeRecipient(original.address);
    const args = dsn ? inheritedArgs(original) : '';
    for (const a of to) if (a.toLowerCase() !== self) ctx.envelope.addRecipient(a, args);
  }
  return undefined;
}

/** A milter backed by an address table, with the table's answers for other code to use. */
export interface AddressMapMilter {
  /** True when an entry of the table applies to the address (it will be rewritten at eom). */
  has(address: string): boolean;
  /**
   * The final addresses `address` expands to (the address itself when no entry applies).
   *
   * @throws ExpansionError past the recursion or expansion limit.
   */
  expand(address: string): string[];
}

/**
 * A transport that answers `verifyRecipient` itself for the addresses one of `maps` knows
 * (they are accepted: the alias exists, as Postfix counts alias_maps and virtual_alias_maps
 * in its recipient tables) and asks `delivery` about every other. Everything else (delivery,
 * routing, close) is `delivery`'s own. Use it as the gateway's `delivery` with
 * `verifyRecipients: true`, so that the mailstore, which knows mailboxes but not aliases, is
 * not asked about an alias.
 *
 * @example
 * ```ts
 * const a = aliases({ file: '/etc/aliases', domains: ['example.com'] });
 * createGateway({ milters: [a], delivery: verifyWithMaps(lmtp({ port: 24 }), [a]), verifyRecipients: true, … });
 * ```
 */
export function verifyWithMaps<T extends Transport>(delivery: T, maps: readonly Pick<AddressMapMilter, 'has'>[]): T {
  if (typeof delivery?.deliver !== 'function') {
    throw new DovetailError(ErrorCodes.INVALID_OPTIONS, 'verifyWithMaps(): delivery must be a transport');
  }
  if (!Array.isArray(maps) || maps.some((m) => typeof m?.has !== 'function')) {
    throw new DovetailError(ErrorCodes.INVALID_OPTIONS, 'verifyWithMaps(): maps must be a list of aliases()/virtual() milters');
  }
  const inner = delivery.verifyRecipient;
  const wrapped = Object.create(delivery) as T & { verifyRecipient: NonNullable<Transport['verifyRecipient']> };
  Object.defineProperty(wrapped, 'verifyRecipient', {
    enumerable: true,
    value: async (envelope: { readonly queueId: string; readonly sender: EnvelopeAddress }, recipient: EnvelopeAddress) => {
      if (maps.some((m) => m.has(recipient.address))) return undefined;
      return inner ? inner.call(delivery, envelope, recipient) : undefined;
    },
  });
  return wrapped;
}

// ---- the aliases(5) file format -----------------------------------------------------------

/** One right-hand-side element of an aliases(5) entry. */
export type AliasTarget =
  /** A local name (`bob`), delivered in the domain of the address being expanded; `final` for `\bob`. */
  | { readonly kind: 'local'; readonly name: string; readonly final: boolean }
  /** A full address (`bob@example.org`). */
  | { readonly kind: 'address'; readonly address: string };

/** The parsed table: lower-cased alias name → its targets, in file order. */
export type AliasTable = ReadonlyMap<string, readonly AliasTarget[]>;

/** A syntax error in an aliases table; `line` is 1-based (0 for a `map` entry). */
export class AliasSyntaxError extends Error {
  constructor(
    readonly source: string,
    readonly line: number,
    readonly reason: string,
  ) {
    super(line > 0 ? `${source}, line ${line}: ${reason}` : `${source}: ${reason}`);
    this.name = 'AliasSyntaxError';
  }
}

// eslint-disable-next-line no-control-regex
const CONTROL = /[\x00-\x1f\x7f]/;

/** Splits at commas outside double quotes; each piece trimmed. */
function splitList(value: string): string[] {
  const out: string[] = [];
  let cur = '';
  let quoted = false;
  for (let i = 0; i < value.length; i++) {
    const c = value[i] as string;
    if (c === '\\' && quoted && i + 1 < value.length) {
      cur += c + value[++i];
      continue;
    }
    if (c === '"') quoted = !quoted;
    if (c === ',' && !quoted) {
      out.push(cur.trim());
      cur = '';
    } else cur += c;
  }
  out.push(cur.trim());
  return out;
}

/**
 * Parses one target of an aliases(5) right-hand side. Refuses what dovetail cannot do:
 * `|command`, `:include:/file`, `/file` deliveries (Postfix local(8) features).
 */
export function parseAliasTarget(raw: string, fail: (why: string) => never): AliasTarget {
  let t = raw.trim();
  if (t === '') fail('empty address in the list');
  // A quoted target ("|cmd", "/file", "a b") is looked into: what it holds decides.
  const unquoted = t.startsWith('"') && t.endsWith('"') && t.length >= 2 ? t.slice(1, -1) : t;
  if (unquoted.startsWith('|')) fail(`${JSON.stringify(raw)}: delivery to a command (|command) is not supported`);
  if (/^:include:/i.test(unquoted)) fail(`${JSON.stringify(raw)}: :include: files are not supported`);
  if (unquoted.startsWith('/')) fail(`${JSON.stringify(raw)}: delivery to a file is not supported`);
  if (t.startsWith('<') && t.endsWith('>')) t = t.slice(1, -1).trim();
  if (CONTROL.test(t) || /\s/.test(t.replace(/"(?:[^"\\]|\\.)*"/g, ''))) fail(`${JSON.stringify(raw)} is not an address`);
  let final = false;
  if (t.startsWith('\\')) {
    final = true;
    t = t.slice(1);
  }
  const { local, domain } = splitAddress(t);
  if (local === '') fail(`${JSON.stringify(raw)} has an empty local part`);
  if (domain === undefined) {
    if (/[<>,]/.test(t)) fail(`${JSON.stringify(raw)} is not an address`);
    return { kind: 'local', name: t, final };
  }
  if (final) fail(`${JSON.stringify(raw)}: a backslash applies to local names only`);
  if (canonicalDomain(domain) === undefined) fail(`${JSON.stringify(raw)}: ${JSON.stringify(domain)} is not a domain name`);
  return { kind: 'address', address: t };
}

/** Checks an alias name (the left-hand side): a local part, no domain. */
function parseAliasName(raw: string, fail: (why: string) => never): string {
  let name = raw.trim();
  if (name.startsWith('"') && name.endsWith('"') && name.length >= 2) name = name.slice(1, -1).replace(/\\(.)/g, '$1');
  else if (name.includes('@')) fail(`alias name ${JSON.stringify(raw)} has a domain: names are local parts (use virtual() for full addresses)`);
  if (name === '') fail('empty alias name');
  if (CONTROL.test(name)) fail(`alias name ${JSON.stringify(raw)} holds a control character`);
  return name.toLowerCase();
}

/**
 * Parses the aliases(5) format (/etc/aliases):
 *
 * - `name: target, target, …` — a target is a local name, `\name` (no further aliasing), or
 *   a full address;
 * - a line that starts with white space continues the previous entry;
 * - empty lines, and lines whose first non-blank character is `#`, are ignored;
 * - names are local parts, compared case-insensitively; `"quoted names"` may hold `:`, `@`,
 *   `#` or spaces.
 *
 * Refused, with the line number: a line without `name:`, an empty name or list, a name with
 * a domain, a name given twice, a continuation line with no entry before it, and the local(8)
 * deliveries dovetail does not do (`|command`, `:include:/file`, `/file`).
 *
 * @throws AliasSyntaxError
 */
export function parseAliases(text: string, source = 'aliases'): AliasTable {
  if (typeof text !== 'string') throw new AliasSyntaxError(source, 0, 'the table must be text');
  const table = new Map<string, AliasTarget[]>();
  const lines = text.replace(/^\uFEFF/, '').split(/\r?\n/);
  /** The logical entries: text and the line where each started. */
  const entries: { text: string; line: number }[] = [];
  lines.forEach((line, i) => {
    const n = i + 1;
    if (line.trim() === '' || /^\s*#/.test(line)) return;
    if (/^[ \t]/.test(line)) {
      const last = entries[entries.length - 1];
      if (!last) throw new AliasSyntaxError(source, n, 'a continuation line (starting with white space) with no entry before it');
      last.text += ' ' + line.trim();
      return;
    }
    entries.push({ text: line, line: n });
  });
  for (const { text: entry, line } of entries) {
    const fail = (why: string): never => {
      throw new AliasSyntaxError(source, line, why);
    };
    // The name ends at the first colon outside quotes.
    let colon = -1;
    let quoted = false;
    for (let i = 0; i < entry.length; i++) {
      const c = entry[i];
      if (c === '\\' && quoted) i++;
      else if (c === '"') quoted = !quoted;
      else if (c === ':' && !quoted) {
        colon = i;
        break;
      }
    }
    if (colon < 0) fail(`expected "name: address, …", got ${JSON.stringify(entry.slice(0, 80))}`);
    const name = parseAliasName(entry.slice(0, colon), fail);
    if (table.has(name)) fail(`alias ${JSON.stringify(name)} is defined twice`);
    const value = entry.slice(colon + 1).trim();
    if (value === '') fail(`alias ${JSON.stringify(name)} has no addresses`);
    const targets = splitList(value).map((t) => parseAliasTarget(t, fail));
    table.set(name, targets);
  }
  return table;
}

/**
 * Adds lookup methods to a milter object as non-enumerable properties: the gateway checks
 * that every enumerable function of a milter is a stage handler (a misspelt handler must not
 * pass), and these are not handlers.
 */
export function withMethods<T>(milter: Milter, props: PropertyDescriptorMap): T {
  return Object.defineProperties(milter, props) as unknown as T;
}

/** Formats an options-time error the way the bundled milters do. */
export function invalidOptions(who: string, why: string): never {
  throw new DovetailError(ErrorCodes.INVALID_OPTIONS, `${who}: ${why}`);
}

/** Checks the dsnArguments option; returns it with its default (true). */
export function dsnFrom(who: string, value: unknown): boolean {
  if (value === undefined) return true;
  if (typeof value !== 'boolean') invalidOptions(who, 'dsnArguments must be a boolean');
  return value as boolean;
}

/** Checks the shared limit options; returns them with defaults. */
export function limitsFrom(who: string, options: { readonly recursionLimit?: number; readonly expansionLimit?: number }): ExpansionLimits {
  const recursion = options.recursionLimit ?? DEFAULT_RECURSION_LIMIT;
  const expansion = options.expansionLimit ?? DEFAULT_EXPANSION_LIMIT;
  if (!Number.isInteger(recursion) || recursion < 1 || recursion > 1000) invalidOptions(who, 'recursionLimit must be an integer from 1 to 1000');
  if (!Number.isInteger(expansion) || expansion < 1 || expansion > 100_000) invalidOptions(who, 'expansionLimit must be an integer from 1 to 100000');
  return { recursion, expansion };
}

/** Checks a recipientDelimiter option. */
export function delimiterFrom(who: string, value: unknown): string | undefined {
  if (value === undefined) return undefined;
  // eslint-disable-next-line no-control-regex
  if (typeof value !== 'string' || value === '' || value.length > 8 || /[@\s"\\\x00-\x1f\x7f]/.test(value)) {
    invalidOptions(who, "recipientDelimiter must be a few characters such as '+' (no '@', quotes, backslashes, spaces or control characters)");
  }
  return value as string;
}
