/**
 * masquerade: Postfix's address masquerading (masquerade_domains, masquerade_exceptions,
 * masquerade_classes; ADDRESS_REWRITING_README) as a milter, for mail going out: at end of
 * message the envelope sender `user@host.sub.example.com` becomes `user@example.com` when
 * `example.com` is listed, and, when asked, the addresses in chosen header fields (From:
 * …) are rewritten the same way.
 *
 * The list is read left to right and the first entry that matches decides, as in Postfix's
 * masquerade.c: an entry equal to the address's domain stops (nothing to strip); an entry
 * that is a parent domain strips the address's domain down to it; an entry written
 * `!sub.example.com` matches the same way but keeps the address as it is (so
 * `['!sub.example.com', 'example.com']` masquerades everything below example.com except
 * below sub.example.com). Local parts listed in `exceptions` (`root`, `mailer-daemon`) are
 * never masqueraded.
 *
 * Header addresses are found by a small scanner that skips quoted strings and comments, so a
 * display name such as `"ops@host.example.com"` is left alone; it rewrites the `addr-spec`s
 * (`user@domain`) of the field and nothing else, keeping everything around them.
 *
 * It deliberately does not: masquerade envelope recipients (Postfix's `envelope_recipient`
 * class, off by default there), rewrite the null sender, or decide which mail is outbound:
 * give it to the chain of the listener your users submit on (Postfix masquerades every
 * message that passes cleanup).
 */
import { canonicalDomain, defineMilter, type EomContext, type Milter } from '../lib/index.js';
import { domainToUnicode } from 'node:url';
import { inheritedSenderArgs, invalidOptions, splitAddress } from './address-maps.js';

/** Options of {@link masquerade}. */
export interface MasqueradeOptions {
  /**
   * Postfix masquerade_domains, in order: `example.com` strips subdomains of example.com down
   * to it; `!sub.example.com` keeps addresses at and below sub.example.com as they are.
   */
  readonly domains: readonly string[];
  /**
   * Postfix masquerade_exceptions: local parts (`root`, `mailer-daemon`), or full addresses,
   * compared case-insensitively, that are never masqueraded. Default: none.
   */
  readonly exceptions?: readonly string[];
  /** Masquerade the envelope sender (Postfix class `envelope_sender`). Default true. */
  readonly envelopeSender?: boolean;
  /**
   * Header fields whose addresses are masqueraded too (Postfix classes `header_sender`,
   * `header_recipient`), e.g. `['From']` or `['From', 'Sender', 'Reply-To']`. Default: none.
   */
  readonly headers?: readonly string[];
}

/** The masquerade() milter: a Milter that can also rewrite one address or one header value. */
export interface MasqueradeMilter extends Milter {
  /** The address masqueraded (unchanged when no entry applies). */
  masquerade(address: string): string;
  /** A header value with each of its addresses masqueraded. */
  masqueradeHeader(value: string): string;
}

const WHO = 'masquerade()';

interface Entry {
  readonly domain: string;
  readonly excluded: boolean;
}

/** Characters of a dot-atom local part (RFC 5322 atext and `.`), plus UTF-8 (RFC 6532). */
const LOCAL_CHAR = /[A-Za-z0-9!#$%&'*+/=?^_`{|}~.\-\u0080-\uffff]/;
/** Characters of a domain as found in a header. */
const DOMAIN_CHAR = /[A-Za-z0-9.\-_\u0080-\uffff]/;

/**
 * Rewrites the addr-specs of a header value with `rewrite`, leaving quoted strings, comments
 * and everything else as they are. Exported for tests.
 */
export function rewriteHeaderAddresses(value: string, rewrite: (local: string, domain: string) => string | undefined): string {
  // A copy with the insides of quoted strings and comments masked, offsets kept.
  let masked = '';
  let depth = 0;
  let quoted = false;
  for (let i = 0; i < value.length; i++) {
    const c = value[i] as string;
    if (quoted) {
      if (c === '\\' && i + 1 < value.length) {
        masked += 'qq';
        i++;
      } else if (c === '"') {
        quoted = false;
        masked += c;
      } else masked += 'q';
    } else if (depth > 0) {
      if (c === '\\' && i + 1 < value.length) {
        masked += '  ';
        i++;
      } else {
        if (c === '(') depth++;
        else if (c === ')') depth--;
        masked += ' ';
      }
    } else if (c === '"') {
      quoted = true;
      masked += c;
    } else if (c === '(') {
      depth = 1;
      masked += ' ';
    } else masked += c;
  }
  let out = '';
  let last = 0;
  for (let at = masked.indexOf('@'); at >= 0; at = masked.indexOf('@', at + 1)) {
    // The local part: a quoted string or a run of dot-atom characters, right before the @.
    let start = at;
    if (masked[at - 1] === '"') {
      const open = masked.lastIndexOf('"', at - 2);
      if (open < 0) continue;
      start = open;
    } else {
      while (start > 0 && LOCAL_CHAR.test(masked[start - 1] as string)) start--;
    }
    if (start === at || start < last) continue;
    let end = at + 1;
    while (end < masked.length && DOMAIN_CHAR.test(masked[end] as string)) end++;
    if (end === at + 1) continue;
    // A trailing dot ends a sentence, not the domain.
    while (end > at + 1 && masked[end - 1] === '.') end--;
    const local = value.slice(start, at);
    const domain = value.slice(at + 1, end);
    const domainNew = rewrite(local, domain);
    if (domainNew !== undefined && domainNew !== domain) {
      out += value.slice(last, at + 1) + domainNew;
      last = end;
    }
    at = end - 1;
  }
  return out + value.slice(last);
}

/**
 * Creates the masquerade milter. Put it in the chain of the submission listener (mail from
 * your users going out), anywhere: it only acts at end of message.
 *
 * @example
 * ```ts
 * masquerade({ domains: ['!dev.example.com', 'example.com'], exceptions: ['root'], headers: ['From'] })
 * ```
 *
 * @throws DovetailError `DOVETAIL_ERR_INVALID_OPTIONS` for malformed options.
 */
export function masquerade(options: MasqueradeOptions): MasqueradeMilter {
  if (typeof options !== 'object' || options === null) invalidOptions(WHO, 'options must be an object');
  if (!Array.isArray(options.domains) || options.domains.length === 0) invalidOptions(WHO, 'domains must list at least one domain');
  const entries: Entry[] = options.domains.map((raw) => {
    if (typeof raw !== 'string') return invalidOptions(WHO, 'domains must be strings');
    const excluded = raw.trim().startsWith('!');
    const name = raw.trim().slice(excluded ? 1 : 0).replace(/^\./, '');
    const domain = canonicalDomain(name);
    if (domain === undefined) return invalidOptions(WHO, `domains: ${JSON.stringify(raw)} is not a domain name`);
    return { domain, excluded };
  });
  const exceptions = new Set<string>();
  for (const e of options.exceptions ?? []) {
    if (typeof e !== 'string' || e.trim() === '') invalidOptions(WHO, 'exceptions must be non-empty strings');
    exceptions.add(e.trim().toLowerCase());
  }
  const envelopeSender = options.envelopeSender ?? true;
  if (typeof envelopeSender !== 'boolean') invalidOptions(WHO, 'envelopeSender must be a boolean');
  const headers = (options.headers ?? []).map((h) => {
    if (typeof h !== 'string' || !/^[\x21-\x39\x3b-\x7e]+$/.test(h)) return invalidOptions(WHO, `headers: ${JSON.stringify(h)} is not a header field name`);
    return h.toLowerCase();
  });

  /** The masqueraded domain for `local@domain`, or undefined to keep it. */
  const rewriteDomain = (local: string, domain: string): string | undefined => {
    if (exceptions.has(local.toLowerCase()) || exceptions.has(`${local}@${domain}`.toLowerCase())) return undefined;
    const d = canonicalDomain(domain);
    if (d === undefined) return undefined;
    for (const e of entries) {
      if (d === e.domain) return undefined;
      if (d.endsWith('.' + e.domain)) {
        if (e.excluded) return undefined;
        // Written as the address wrote its domain: A-labels for an ASCII domain, U-labels otherwise.
        // eslint-disable-next-line no-control-regex
        return /^[\x00-\x7f]*$/.test(domain) ? e.domain : domainToUnicode(e.domain);
      }
    }
    return undefined;
  };
  const masqueradeAddress = (address: string): string => {
    const { local, domain } = splitAddress(address);
    if (domain === undefined || local === '') return address;
    const to = rewriteDomain(local, domain);
    return to === undefined ? address : `${local}@${to}`;
  };
  const masqueradeHeader = (value: string): string => rewriteHeaderAddresses(value, rewriteDomain);

  const milter = defineMilter({
    // Its eom rewrites headers and never reads the body.
    needs: { body: false },
    name: 'masquerade',
    async eom(ctx: EomContext) {
      const sender = ctx.envelope.sender;
      if (envelopeSender && sender.address !== '') {
        const to = masqueradeAddress(sender.address);
        if (to !== sender.address) ctx.envelope.changeSender(to, inheritedSenderArgs(sender));
      }
      if (headers.length > 0) {
        const index = new Map<string, number>();
        for (const h of ctx.headers) {
          const name = h.name.toLowerCase();
          const n = (index.get(name) ?? 0) + 1;
          index.set(name, n);
          if (!headers.includes(name)) continue;
          const value = masqueradeHeader(h.value);
          if (value !== h.value) ctx.message.changeHeader(h.name, n, value);
        }
      }
      return undefined;
    },
  });
  const out = Object.defineProperties(milter, {
    masquerade: { value: masqueradeAddress },
    masqueradeHeader: { value: masqueradeHeader },
  });
  return out as unknown as MasqueradeMilter;
}
