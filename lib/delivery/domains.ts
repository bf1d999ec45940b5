/**
 * Domain names as the delivery side compares them: one canonical form (A-label, lower
 * case, one trailing dot dropped) and lists of domains in Postfix's spelling (`example.com`
 * for the domain, `.example.com` for its subdomains). Shared by relayControl, routes(),
 * maildir() and createLmtpServer(), so "our domains" mean the same everywhere.
 *
 * It deliberately does not: accept spellings that IDNA maps onto another name (full-width
 * letters, ideographic full stops): such a name is never taken as one of ours.
 */
import net from 'node:net';
import { domainToASCII, domainToUnicode } from 'node:url';

/**
 * A domain in its canonical A-label form, lower-case, without one trailing dot; undefined
 * when it is not a valid domain name or when IDNA maps it to a different spelling.
 */
export function canonicalDomain(domain: string): string | undefined {
  const d = domain.endsWith('.') && !domain.endsWith('..') ? domain.slice(0, -1) : domain;
  if (!d || d.length > 253) return undefined;
  const ascii = domainToASCII(d);
  if (!ascii || ascii.endsWith('.') || ascii.split('.').some((l) => !l || l.length > 63)) return undefined;
  if (!/^[a-z0-9_-]+(\.[a-z0-9_-]+)*$/.test(ascii)) return undefined;
  // WHATWG host parsing turns `0x7f.1` into 127.0.0.1: a bare number is not a domain.
  if (net.isIP(ascii)) return undefined;
  // Each label must be spelt as itself, in A-label or U-label form (any case): spellings
  // IDNA maps onto another name (full-width letters, U+3002 as a dot, soft hyphens) are not ours.
  const given = d.normalize('NFC').toLowerCase().split('.');
  const labels = ascii.split('.');
  if (given.length !== labels.length) return undefined;
  for (let i = 0; i < labels.length; i++) {
    const a = labels[i] as string;
    const g = given[i] as string;
    if (g !== a && domainToUnicode(a) !== g) return undefined;
  }
  return ascii;
}

/**
 * A membership test for a list of domains: `example.com` matches that domain (and, with
 * `subdomains`, every subdomain, as Postfix's parent_domain_matches_subdomains), `.example.com`
 * its subdomains only. The test takes a domain already in {@link canonicalDomain} form
 * (callers canonicalise once, and often need the form anyway). Throws an Error naming the
 * entry that is not a domain.
 */
export function domainSet(list: readonly string[], options: { readonly subdomains?: boolean } = {}): (domain: string) => boolean {
  const exact = new Set<string>();
  const parents: string[] = [];
  for (const entry of list) {
    if (typeof entry !== 'string') throw new Error('entries must be strings');
    const dotted = entry.startsWith('.');
    const d = canonicalDomain(dotted ? entry.slice(1) : entry);
    if (d === undefined) throw new Error(`${JSON.stringify(entry)} is not a domain name`);
    if (dotted) parents.push('.' + d);
    else {
      exact.add(d);
      if (options.subdomains) parents.push('.' + d);
    }
  }
  return (canonical) => exact.has(canonical) || parents.some((p) => canonical.endsWith(p));
}

/** The domain of an address (after the last `@`), `''` when there is none. */
export function domainOf(address: string): string {
  const at = address.lastIndexOf('@');
  return at < 0 ? '' : address.slice(at + 1);
}
