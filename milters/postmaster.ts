/**
 * postmaster: the role addresses every mail domain must answer reach someone. RFC 5321
 * section 4.5.1: a server that accepts mail for a domain must accept `postmaster@` that
 * domain, and the bare `<Postmaster>` (no domain, any case) at every server; RFC 2142 adds
 * `abuse@` for an Internet service. This milter routes each of them — bare `Postmaster`,
 * and `postmaster@` / `abuse@` (or the `names` you give) of each of our `domains` — to one
 * configurable mailbox, at end of message (the envelope edits exist there), keeping the
 * original in ORCPT for DSNs.
 *
 * They are accepted at RCPT whatever else the chain thinks, when the other milters use the
 * role tests exported here: dnsbl skips its verdict for a role recipient
 * (`exemptRecipient`), spamTag does not reject a message whose recipients are all role
 * addresses, before or after this milter rewrote them (ORCPT; it tags it), and `verifyWithMaps(delivery, [postmaster(…)])` keeps the
 * mailstore from being asked about an address that is not a mailbox. relayControl takes the
 * bare `Postmaster` as local.
 *
 * What it does not do: accept role addresses of domains that are not ours (they are relayed
 * or refused as any address), or rewrite `MAILER-DAEMON` (a sender, not a recipient).
 */
import { canonicalDomain, defineMilter, domainSet, DovetailError, ErrorCodes, xtextDecode, type EnvelopeAddress, type EomContext, type Milter } from '../lib/index.js';
import { inheritedArgs, splitAddress, withMethods, type AddressMapMilter } from './address-maps.js';

/** The role local parts accepted by default (RFC 5321 4.5.1, RFC 2142). */
export const ROLE_NAMES: readonly string[] = Object.freeze(['postmaster', 'abuse']);

/**
 * True for a role address: the bare `Postmaster` (no domain), or `<name>@<any domain>` for a
 * name in `names` (case-insensitive). The domain is not checked here (a DNSBL must not refuse
 * postmaster@ anything we accept); {@link postmaster} routes only our domains.
 */
export function isRoleAddress(address: string, names: readonly string[] = ROLE_NAMES): boolean {
  const { local, domain } = splitAddress(address);
  const l = local.toLowerCase();
  if (domain === undefined) return l === 'postmaster';
  return names.includes(l);
}

/**
 * True for a recipient that is a role address, or was one before an address milter
 * rewrote it (its `ORCPT=rfc822;<original>` names a role address): so a milter that runs
 * after {@link postmaster} still knows the message was for the postmaster.
 */
export function isRoleRecipient(rcpt: EnvelopeAddress, names: readonly string[] = ROLE_NAMES): boolean {
  if (isRoleAddress(rcpt.address, names)) return true;
  const orcpt = rcpt.args['ORCPT'];
  if (typeof orcpt !== 'string') return false;
  const m = /^rfc822;(.+)$/i.exec(orcpt);
  return m !== null && isRoleAddress(xtextDecode(m[1] as string), names);
}

/** Options of {@link postmaster}. */
export interface PostmasterOptions {
  /** Where role mail goes: a full address (a mailbox of ours, or anywhere). */
  readonly mailbox: string;
  /** Our domains: their `postmaster@` and `abuse@` are routed (`.example.com` for subdomains too). */
  readonly domains: readonly string[];
  /** The role local parts. Default `['postmaster', 'abuse']`; bare `Postmaster` is always one. */
  readonly names?: readonly string[];
  /** Give a rewritten recipient `ORCPT=rfc822;<original>` and the original's DSN arguments. Default true (false behind Postfix). */
  readonly dsnArguments?: boolean;
}

/** The postmaster milter, with its table's answer for verifyWithMaps(). */
export type PostmasterMilter = Milter & AddressMapMilter;

/**
 * Creates the role-address milter. Put it with the other address milters (after
 * relayControl), and wrap the delivery with `verifyWithMaps(delivery, [it])` when
 * `verifyRecipients` is on.
 *
 * @example
 * ```ts
 * const pm = postmaster({ mailbox: 'admin@example.com', domains: ['example.com', 'example.org'] });
 * createGateway({ milters: [relayControl(…), pm, dnsbl(…), spamTag(…)], delivery: verifyWithMaps(table, [pm]), verifyRecipients: true, … });
 * ```
 */
export function postmaster(options: PostmasterOptions): PostmasterMilter {
  const bad = (why: string): never => {
    throw new DovetailError(ErrorCodes.INVALID_OPTIONS, `postmaster: ${why}`);
  };
  if (typeof options !== 'object' || options === null) bad('needs an options object');
  const mailbox = options.mailbox;
  if (typeof mailbox !== 'string' || !/^[^@\s<>]+@[^@\s<>]+$/.test(mailbox)) bad('mailbox must be a full address');
  const names = (options.names ?? ROLE_NAMES).map((n) => (typeof n === 'string' && /^[A-Za-z0-9._-]+$/.test(n) ? n.toLowerCase() : bad(`names: ${JSON.stringify(n)} is not a local part`)));
  if (!Array.isArray(options.domains) || options.domains.length === 0) bad('domains must list our domains');
  let ours: (canonical: string) => boolean = () => false;
  try {
    ours = domainSet(options.domains);
  } catch (err) {
    bad(`domains: ${(err as Error).message}`);
  }
  const dsn = options.dsnArguments ?? true;
  if (typeof dsn !== 'boolean') bad('dsnArguments must be a boolean');

  /** True when the address is one of the role addresses this milter routes. */
  const has = (address: string): boolean => {
    const { local, domain } = splitAddress(address);
    if (domain === undefined) return local.toLowerCase() === 'postmaster';
    if (!names.includes(local.toLowerCase())) return false;
    const d = canonicalDomain(domain);
    return d !== undefined && ours(d);
  };

  const milter = defineMilter({
    // Its eom rewrites recipients only: served to Postfix, no header or body is sent to it.
    needs: { headers: false, body: false },
    name: 'postmaster',
    async eom(ctx: EomContext) {
      const roles = ctx.envelope.recipients.filter((r) => has(r.address));
      if (roles.length === 0) return undefined;
      const already = ctx.envelope.recipients.some((r) => r.address.toLowerCase() === mailbox.toLowerCase());
      for (const r of roles) ctx.envelope.removeRecipient(r.address);
      // One copy for the postmaster, however many role addresses the message named.
      if (!already) ctx.envelope.addRecipient(mailbox, dsn ? inheritedArgs(roles[0]!) : '');
      return undefined;
    },
  });
  return withMethods<PostmasterMilter>(milter, {
    has: { value: has },
    expand: { value: (address: string) => (has(address) ? [mailbox] : [address]) },
  });
}
