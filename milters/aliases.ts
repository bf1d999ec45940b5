/**
 * aliases: Postfix's local aliasing (alias_maps, aliases(5), done by local(8)) as a milter.
 * A recipient in one of our local domains whose local part is an alias name is replaced, at
 * end of message, by the addresses the alias expands to, recursively.
 *
 * The table is /etc/aliases' format (`name: a, b`, `#` comments, continuation lines that
 * start with white space), read once when the milter is created (`reload()` reads it
 * again, as `newaliases` would); names are local parts, compared case-insensitively. A
 * target is a local name (delivered in the domain of the address being expanded), `\name`
 * (delivered as is, not aliased again), or a full address.
 *
 * Expansion is recursive to `recursionLimit` levels (default 20); a target that is the alias
 * itself, or an address already on the way to it, is kept as a final recipient and not
 * expanded again, so a loop ends instead of spinning. Past the limits the message is deferred
 * (`451 4.6.0 Alias expansion error`, Postfix's cleanup reply).
 *
 * Where it acts: at RCPT it only checks that an alias expands (a broken one defers that
 * recipient), because only end of message may change the envelope (SMFIR_DELRCPT/ADDRCPT).
 * So the RCPT-time checks (relayControl, GatewayOptions.verifyRecipients) see the alias as
 * the client wrote it: list the alias domains as local, and with verifyRecipients wrap the
 * delivery in verifyWithMaps() so that the mailstore is not asked about alias names.
 *
 * It deliberately does not: deliver to commands (`|cmd`), files (`/path`) or `:include:`
 * lists (refused when the table is loaded), honour `owner-` aliases, or read `.forward`.
 */
import { readFileSync } from 'node:fs';
import { canonicalDomain, defineMilter, domainSet, type EnvelopeAddress, type EomContext, type MessageContext, type Milter } from '../lib/index.js';
import {
  AliasSyntaxError,
  delimiterFrom,
  dsnFrom,
  expandAddress,
  expandOrTempfail,
  invalidOptions,
  limitsFrom,
  parseAliases,
  parseAliasTarget,
  rewriteRecipients,
  splitAddress,
  splitExtension,
  withExtension,
  withMethods,
  type AddressMapMilter,
  type AliasTable,
  type AliasTarget,
  type Target,
} from './address-maps.js';

/** Options of {@link aliases}: the table as a `map` or as a `file`, and the domains it applies to. */
export type AliasesOptions = AliasesCommonOptions & (
  | {
      /**
       * Alias name → targets: `{ postmaster: 'root', team: ['alice', 'bob@example.org'] }`. Names
       * and targets as in the file format (a string may list several targets: `'alice, bob'`).
       */
      readonly map: Readonly<Record<string, string | readonly string[]>>;
      readonly file?: undefined;
    }
  | {
      /** Path of a table in /etc/aliases format, read (synchronously) when the milter is created. */
      readonly file: string;
      readonly map?: undefined;
    }
);

export interface AliasesCommonOptions {
  /**
   * Our local domains (`example.com`, `.example.com` for subdomains): only recipients in them
   * are aliased, and local-name targets stay in the recipient's domain (Postfix:
   * mydestination). Required.
   */
  readonly domains: readonly string[];
  /**
   * Postfix `recipient_delimiter` (e.g. `'+'`): `bob+tag@` is looked up as `bob+tag`, then as
   * `bob`; when only `bob` matched, the extension is carried to the targets in `domains`
   * (`bob: robert` makes `bob+tag@` `robert+tag@`). Default: none.
   */
  readonly recipientDelimiter?: string;
  /** Carry an unmatched extension to local targets (Postfix propagate_unmatched_extensions with `alias`). Default true. */
  readonly propagateExtension?: boolean;
  /** Nesting depth of the expansion (Postfix's local(8) stops at 100 levels of .forward/alias nesting). Default 20. */
  readonly recursionLimit?: number;
  /** The most addresses one recipient may expand to. Default 1000. */
  readonly expansionLimit?: number;
  /**
   * Give each new recipient the original's DSN arguments (NOTIFY, ORCPT), and
   * `ORCPT=rfc822;<original>` when it had none, so a DSN names the address the sender used.
   * Served to Postfix these travel as SMFIR_ADDRCPT_PAR, which Postfix ignores with a warning
   * in its log: give false there. Default true.
   */
  readonly dsnArguments?: boolean;
}

/** The aliases() milter: a Milter that can also answer lookups and reload its file. */
export interface AliasesMilter extends Milter, AddressMapMilter {
  /** The parsed table (lower-cased name → targets). */
  readonly table: AliasTable;
  /**
   * Reads the file again (a `file` table only) and swaps the table in when it parses; a
   * broken file throws `DOVETAIL_ERR_INVALID_OPTIONS` and the old table stays.
   */
  reload(): void;
}

const WHO = 'aliases()';

function tableFromMap(map: Readonly<Record<string, string | readonly string[]>>): AliasTable {
  const lines: string[] = [];
  for (const [name, value] of Object.entries(map)) {
    const list = typeof value === 'string' ? [value] : value;
    if (!Array.isArray(list) || list.some((t) => typeof t !== 'string')) invalidOptions(WHO, `map: ${JSON.stringify(name)} must map to a string or a list of strings`);
    if (/[\r\n]/.test(name) || (list as string[]).some((t) => /[\r\n]/.test(t))) invalidOptions(WHO, `map: ${JSON.stringify(name)}: line breaks are not allowed`);
    const quotedName = /[:\s#"@]/.test(name) ? `"${name.replace(/["\\]/g, '\\$&')}"` : name;
    lines.push(`${quotedName}: ${(list as string[]).join(', ')}`);
  }
  return parseAliases(lines.join('\n'), 'map');
}

function load(options: AliasesOptions): AliasTable {
  try {
    if (options.file !== undefined) {
      if (typeof options.file !== 'string' || options.file === '') invalidOptions(WHO, 'file must be a path');
      let text: string;
      try {
        text = readFileSync(options.file, 'utf8');
      } catch (err) {
        return invalidOptions(WHO, `cannot read ${options.file}: ${(err as Error).message}`);
      }
      return parseAliases(text, options.file);
    }
    if (typeof options.map !== 'object' || options.map === null) return invalidOptions(WHO, 'needs a map or a file');
    return tableFromMap(options.map);
  } catch (err) {
    if (err instanceof AliasSyntaxError) invalidOptions(WHO, err.message);
    throw err;
  }
}

/**
 * Creates the aliases milter. Put it after relayControl and relocated (and after virtual(),
 * as Postfix expands virtual aliases before local ones), before the milters that should see
 * the final recipients at end of message.
 *
 * @example
 * ```ts
 * aliases({ file: '/etc/aliases', domains: ['example.com'], recipientDelimiter: '+' })
 * aliases({ map: { postmaster: 'root', team: ['alice', 'bob'] }, domains: ['example.com'] })
 * ```
 *
 * @throws DovetailError `DOVETAIL_ERR_INVALID_OPTIONS` for malformed options and for a table
 * that does not parse (the message names the file and line).
 */
export function aliases(options: AliasesOptions): AliasesMilter {
  if (typeof options !== 'object' || options === null) invalidOptions(WHO, 'options must be an object');
  if (options.map !== undefined && options.file !== undefined) invalidOptions(WHO, 'give either map or file, not both');
  if (!Array.isArray(options.domains) || options.domains.length === 0) {
    invalidOptions(WHO, 'domains must list the local domains the aliases apply to');
  }
  let isOurs: (canonical: string) => boolean;
  try {
    isOurs = domainSet(options.domains);
  } catch (err) {
    return invalidOptions(WHO, `domains: ${(err as Error).message}`);
  }
  const delimiter = delimiterFrom(WHO, options.recipientDelimiter);
  const propagate = options.propagateExtension ?? true;
  if (typeof propagate !== 'boolean') invalidOptions(WHO, 'propagateExtension must be a boolean');
  const limits = limitsFrom(WHO, options);
  const dsn = dsnFrom(WHO, options.dsnArguments);
  let table = load(options);

  const local = (address: string): boolean => {
    const d = splitAddress(address).domain;
    const c = d === undefined ? undefined : canonicalDomain(d);
    return c !== undefined && isOurs(c);
  };

  const lookup = (address: string): readonly Target[] | undefined => {
    const { local: lp, domain } = splitAddress(address);
    if (domain === undefined || !local(address)) return undefined;
    let entry = table.get(lp.toLowerCase());
    const ext = entry === undefined ? splitExtension(lp, delimiter) : undefined;
    if (entry === undefined && ext) entry = table.get(ext.base.toLowerCase());
    if (entry === undefined) return undefined;
    return entry.map((t: AliasTarget): Target => {
      let to = t.kind === 'local' ? `${t.name}@${domain.toLowerCase()}` : t.address;
      if (ext && propagate && delimiter && local(to)) to = withExtension(to, ext, delimiter);
      return { address: to, final: t.kind === 'local' && t.final };
    });
  };
  const expand = (address: string): string[] => expandAddress(address, lookup, limits);

  const milter = defineMilter({
    // Its eom rewrites recipients only: served to Postfix, no header or body is sent to it.
    needs: { headers: false, body: false },
    name: 'aliases',
    async rcpt(_ctx: MessageContext, rcpt: EnvelopeAddress) {
      if (lookup(rcpt.address) === undefined) return undefined;
      const expanded = expandOrTempfail(expand, rcpt.address);
      return Array.isArray(expanded) ? undefined : expanded;
    },
    async eom(ctx: EomContext) {
      return rewriteRecipients(ctx, expand, dsn);
    },
  });

  return withMethods<AliasesMilter>(milter, {
    table: { get: () => table },
    has: { value: (address: string) => lookup(address) !== undefined },
    expand: { value: expand },
    reload: {
      value: () => {
        if (options.file === undefined) invalidOptions(WHO, 'reload() needs a file table');
        table = load(options);
      },
    },
  });
}

export { parseAliases, parseAliasTarget, AliasSyntaxError };
export type { AliasTable, AliasTarget };
