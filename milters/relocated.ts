/**
 * relocated: Postfix's relocated_maps (relocated(5)) as a milter. A recipient listed as moved
 * is refused at RCPT with its new location, in RFC 5321's words for reply code 551:
 * `551 5.1.6 User has moved; please try <new@address>` (5.1.6: "destination mailbox has
 * moved, no forwarding address", RFC 3463). Only that recipient is refused.
 *
 * Keys are `user@domain` and `@domain` (a whole domain moved); with a recipient delimiter
 * `user+ext@domain` is looked up as itself, then as `user@domain`, then as `@domain`. The
 * value is the new location: an address (shown in angle brackets) or any short text
 * (`'Alice has left the company, call +1 555 0100'`, shown as is).
 *
 * It deliberately does not: forward the mail (that is virtual()), look up bare `user`
 * keys, or refuse recipients added by other milters at end of message (an envelope edit
 * cannot be refused per recipient; Postfix would bounce them from its queue).
 */
import { canonicalDomain, defineMilter, reject, type EnvelopeAddress, type MessageContext, type Milter } from '../lib/index.js';
import { addressKey, delimiterFrom, invalidOptions, splitAddress, splitExtension, withMethods } from './address-maps.js';

/** Options of {@link relocated}. */
export interface RelocatedOptions {
  /** `user@domain` or `@domain` → the new location (an address, or a short text). */
  readonly map: Readonly<Record<string, string>>;
  /** Postfix `recipient_delimiter` (e.g. `'+'`). Default: none. */
  readonly recipientDelimiter?: string;
  /**
   * The reply code: 551 (default; RFC 5321's "User not local; please try <forward-path>")
   * or 550 (what Postfix's smtpd sends for relocated users).
   */
  readonly code?: 550 | 551;
}

/** The relocated() milter: a Milter that can also answer lookups. */
export interface RelocatedMilter extends Milter {
  /** The new location of an address, undefined when it has not moved. */
  lookup(address: string): string | undefined;
}

const WHO = 'relocated()';
/** Longest new location kept in a reply line (RFC 5321 allows 512 bytes a line). */
const MAX_LOCATION = 300;

/**
 * Creates the relocated milter. Put it early in the chain, after relayControl: the refusal
 * is at RCPT, so the milters after it never see a moved recipient.
 *
 * @example
 * ```ts
 * relocated({ map: { 'alice@example.com': 'alice@example.net', '@old.example': 'the new domain example.org' } })
 * ```
 *
 * @throws DovetailError `DOVETAIL_ERR_INVALID_OPTIONS` for malformed options or map entries.
 */
export function relocated(options: RelocatedOptions): RelocatedMilter {
  if (typeof options !== 'object' || options === null) invalidOptions(WHO, 'options must be an object');
  if (typeof options.map !== 'object' || options.map === null) invalidOptions(WHO, 'map must be an object of address → new location');
  const code = options.code ?? 551;
  if (code !== 550 && code !== 551) invalidOptions(WHO, 'code must be 550 or 551');
  const delimiter = delimiterFrom(WHO, options.recipientDelimiter);
  const table = new Map<string, string>();
  for (const [key, value] of Object.entries(options.map)) {
    const { local, domain } = splitAddress(key.trim());
    // eslint-disable-next-line no-control-regex
    if (domain === undefined || /[\s\x00-\x1f\x7f]/.test(local)) invalidOptions(WHO, `map: key ${JSON.stringify(key)} is not user@domain or @domain`);
    const k = addressKey(local, domain as string);
    if (k === undefined) invalidOptions(WHO, `map: key ${JSON.stringify(key)}: ${JSON.stringify(domain)} is not a domain name`);
    if (table.has(k as string)) invalidOptions(WHO, `map: ${JSON.stringify(key)} is given twice`);
    // eslint-disable-next-line no-control-regex
    if (typeof value !== 'string' || value.trim() === '' || /[\x00-\x1f\x7f]/.test(value) || value.length > MAX_LOCATION) {
      invalidOptions(WHO, `map: ${JSON.stringify(key)}: the new location must be a non-empty line of at most ${MAX_LOCATION} characters`);
    }
    let v = value.trim();
    if (v.startsWith('<') && v.endsWith('>')) v = v.slice(1, -1).trim();
    table.set(k as string, /^[^\s<>@]+@[^\s<>@]+$/.test(v) ? `<${v}>` : v);
  }

  const lookup = (address: string): string | undefined => {
    const { local, domain } = splitAddress(address);
    if (domain === undefined) return undefined;
    const d = canonicalDomain(domain);
    if (d === undefined) return undefined;
    const ext = splitExtension(local, delimiter);
    return (
      table.get(`${local.toLowerCase()}@${d}`) ??
      (ext ? table.get(`${ext.base.toLowerCase()}@${d}`) : undefined) ??
      table.get(`@${d}`)
    );
  };

  const milter = defineMilter({
    name: 'relocated',
    async rcpt(_ctx: MessageContext, rcpt: EnvelopeAddress) {
      const moved = lookup(rcpt.address);
      if (moved === undefined) return undefined;
      return reject(code, '5.1.6', `User has moved; please try ${moved}`);
    },
  });
  return withMethods<RelocatedMilter>(milter, { lookup: { value: lookup } });
}
