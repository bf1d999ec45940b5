/**
 * mailAuth: SPF (RFC 7208) at MAIL FROM, and DKIM (RFC 6376), DMARC (RFC 7489 / DMARCbis)
 * and ARC (RFC 8617) at end of message, all computed by mailauth with the DNS resolver
 * given as an option. It writes `Authentication-Results` (RFC 8601) and `Received-SPF`
 * (RFC 7208 section 9.1) at the top of the message, removes Authentication-Results fields
 * that came in claiming our authserv-id (RFC 8601 section 5), adds each result to the spam
 * score, and optionally enforces: SPF fail → `550 5.7.23` at MAIL (RFC 7372), SPF temperror
 * → `451 4.7.24`, the sender domain's DMARC policy → `550 5.7.1` (p=reject) or quarantine.
 *
 * The lookups of one message go through one memo, so authenticate() at end of message
 * re-evaluates SPF from the answers MAIL already had.
 *
 * What it does not do: sign (DKIM or ARC seals), BIMI, DMARC reports, or a local policy
 * override for mail with a trusted ARC chain.
 */
import { authenticate, spf, type AuthenticateResult, type SPFResult } from 'mailauth';
import {
  defineMilter,
  DovetailError,
  ErrorCodes,
  quarantine,
  reject,
  tempfail,
  type DefaultAction,
  type MessageContext,
  type Milter,
  type MilterTimeouts,
  type SessionContext,
} from '../lib/index.js';
import { cachingResolver, defaultResolver, mailauthResolver, type DnsResolver, type MailauthResolver } from './dns.js';

/** The score rules mailAuth adds (when their points are not 0). */
export type MailAuthRule =
  | 'SPF_PASS'
  | 'SPF_FAIL'
  | 'SPF_SOFTFAIL'
  | 'SPF_NEUTRAL'
  | 'SPF_NONE'
  | 'SPF_PERMERROR'
  | 'SPF_TEMPERROR'
  | 'DKIM_VALID'
  | 'DKIM_VALID_AU'
  | 'DKIM_INVALID'
  | 'DMARC_PASS'
  | 'DMARC_FAIL_REJECT'
  | 'DMARC_FAIL_QUARANTINE'
  | 'DMARC_FAIL_NONE'
  | 'ARC_PASS'
  | 'ARC_FAIL';

/** The default points of each rule (rspamd's weights, roughly). */
export const MAIL_AUTH_DEFAULT_SCORES: Readonly<Record<MailAuthRule, number>> = Object.freeze({
  SPF_PASS: -0.2,
  SPF_FAIL: 1,
  SPF_SOFTFAIL: 0.5,
  SPF_NEUTRAL: 0,
  SPF_NONE: 0,
  SPF_PERMERROR: 0.5,
  SPF_TEMPERROR: 0,
  DKIM_VALID: -0.2,
  DKIM_VALID_AU: -0.2,
  DKIM_INVALID: 1,
  DMARC_PASS: -0.5,
  DMARC_FAIL_REJECT: 2,
  DMARC_FAIL_QUARANTINE: 1.5,
  DMARC_FAIL_NONE: 0.1,
  ARC_PASS: -0.5,
  ARC_FAIL: 1,
});

export interface MailAuthOptions {
  /** The milter's name. Default `mail-auth`. */
  readonly name?: string;
  /** The authserv-id in Authentication-Results (and the `mta` of Received-SPF). Default: the gateway's host name. */
  readonly authservId?: string;
  /** Default: a node:dns/promises Resolver with the system's servers. */
  readonly resolver?: DnsResolver;
  /** How long one DNS query may take, ms. Default 5000. */
  readonly dnsTimeout?: number;
  /**
   * A cache of DNS answers shared by every message (SPF, DKIM keys, DMARC policies repeat
   * from message to message): answers and "no such record" are kept for `ttl` ms (the
   * resolver gives TXT records no TTL, so a fixed one applies; keep it short), failures never.
   * Default `{ ttl: 60_000, max: 10_000 }`; `false` turns it off (a local caching resolver such
   * as unbound then does the job).
   */
  readonly dnsCache?: { readonly ttl?: number; readonly max?: number } | false;
  /** Longest SPF evaluation at MAIL, ms, after which SPF is temperror. Default 20 000. */
  readonly spfTimeout?: number;
  /** Refuse MAIL FROM with `550 5.7.23 SPF validation failed` when SPF is `fail` (`-all`). Default false. */
  readonly rejectSpfFail?: boolean;
  /** Answer MAIL FROM with `451 4.7.24 SPF validation error` when SPF is `temperror`. Default false. */
  readonly tempfailSpfError?: boolean;
  /**
   * Enforce the author domain's DMARC policy when DMARC fails: p=reject → `550 5.7.1`,
   * p=quarantine → quarantine. Default false (results are only reported and scored).
   */
  readonly enforceDmarc?: boolean;
  /**
   * Forwarders (mailing lists) whose ARC seal is trusted: when their chain passes, a DMARC
   * failure is not enforced (local policy override). Default none.
   */
  readonly trustedArcSealers?: readonly string[];
  /** Points per rule; merged over {@link MAIL_AUTH_DEFAULT_SCORES}. 0 adds no entry. */
  readonly scores?: Partial<Record<MailAuthRule, number>>;
  /** Shortest DKIM/ARC key accepted, bits. Default 1024 (mailauth's). */
  readonly minBitLength?: number;
  /** The client address SPF is checked for. Default `ctx.client.address`. */
  readonly clientAddress?: (ctx: SessionContext) => string | undefined;
  /** Messages not checked at all. Default: from authenticated sessions. */
  readonly exempt?: (ctx: MessageContext) => boolean;
  readonly defaultAction?: DefaultAction;
  readonly timeouts?: MilterTimeouts;
}

/** What the milter keeps for the message in progress. */
interface MessageAuth {
  readonly queueId: string;
  readonly resolve: MailauthResolver;
  /** MAIL FROM as the client gave it (SPF checks that one, whatever later milters change). */
  readonly sender: string | undefined;
  readonly spf: SPFResult | undefined;
}

function bad(why: string): never {
  throw new DovetailError(ErrorCodes.INVALID_OPTIONS, `mailAuth: ${why}`);
}

/** The authserv-id of an Authentication-Results value (before the first `;`, comments dropped). */
function authservIdOf(value: string): string {
  return value
    .split(';', 1)[0]!
    .replace(/\([^)]*\)/g, ' ')
    .trim()
    .split(/\s+/, 1)[0]!
    .toLowerCase();
}

/** Unfolds a header value and drops the field name mailauth put in front of it. */
function valueOf(field: string, name: string): string {
  return field.replace(/\r?\n$/, '').replace(new RegExp(`^${name}:\\s*`, 'i'), '');
}

/** Creates the milter. */
export function mailAuth(options: MailAuthOptions = {}): Milter {
  const name = options.name ?? 'mail-auth';
  const scores: Record<MailAuthRule, number> = { ...MAIL_AUTH_DEFAULT_SCORES, ...(options.scores ?? {}) };
  for (const [rule, points] of Object.entries(scores)) {
    if (!(rule in MAIL_AUTH_DEFAULT_SCORES)) bad(`unknown score rule ${rule}`);
    if (typeof points !== 'number' || !Number.isFinite(points)) bad(`score ${rule} must be a finite number`);
  }
  const dnsTimeout = options.dnsTimeout ?? 5000;
  if (!(dnsTimeout > 0)) bad('dnsTimeout must be a positive number of milliseconds');
  const spfTimeout = options.spfTimeout ?? 20_000;
  if (!(spfTimeout > 0)) bad('spfTimeout must be a positive number of milliseconds');
  if (options.authservId !== undefined && !/^[A-Za-z0-9.-]+$/.test(options.authservId)) bad('authservId must be a host name');
  const exempt = options.exempt ?? ((ctx: MessageContext) => ctx.auth !== undefined);
  const clientAddress = options.clientAddress ?? ((ctx: SessionContext) => (ctx.client.family === 'ipv4' || ctx.client.family === 'ipv6' ? ctx.client.address : undefined));
  const cache = options.dnsCache === false ? undefined : { ttl: options.dnsCache?.ttl ?? 60_000, max: options.dnsCache?.max ?? 10_000 };
  if (cache && !(cache.ttl > 0 && Number.isSafeInteger(cache.max) && cache.max > 0)) bad('dnsCache needs a positive ttl and max');
  let resolver: DnsResolver | undefined;
  const baseResolver = (): DnsResolver => (resolver ??= cache ? cachingResolver(options.resolver ?? defaultResolver({ timeout: dnsTimeout }), cache) : (options.resolver ?? defaultResolver({ timeout: dnsTimeout })));
  const trustedSealers = new Set((options.trustedArcSealers ?? []).map((d) => d.toLowerCase().replace(/\.$/, '')));
  const authservId = (ctx: SessionContext): string => options.authservId ?? ctx.server.hostname;

  const add = (ctx: SessionContext, rule: MailAuthRule, detail?: string): void => {
    const points = scores[rule];
    if (points !== 0) ctx.score.add(points, rule, detail);
  };

  const SPF_RULES: Partial<Record<string, MailAuthRule>> = {
    pass: 'SPF_PASS',
    fail: 'SPF_FAIL',
    softfail: 'SPF_SOFTFAIL',
    neutral: 'SPF_NEUTRAL',
    none: 'SPF_NONE',
    permerror: 'SPF_PERMERROR',
    temperror: 'SPF_TEMPERROR',
  };

  /** The message's state, made at MAIL (or late, if MAIL did not reach us). */
  function messageAuth(ctx: MessageContext): MessageAuth {
    const m = ctx.state.get('message') as MessageAuth | undefined;
    if (m && m.queueId === ctx.queueId) return m;
    const fresh: MessageAuth = { queueId: ctx.queueId, resolve: mailauthResolver(baseResolver(), dnsTimeout), sender: undefined, spf: undefined };
    ctx.state.set('message', fresh);
    return fresh;
  }

  return defineMilter({
    name,
    ...(options.defaultAction ? { defaultAction: options.defaultAction } : {}),
    ...(options.timeouts ? { timeouts: options.timeouts } : {}),

    async mail(ctx, sender) {
      if (exempt(ctx)) return;
      const m = messageAuth(ctx);
      const ip = clientAddress(ctx);
      if (ip === undefined) return;
      const result = await spf({
        sender: sender.address,
        ip,
        ...(ctx.helo !== undefined ? { helo: ctx.helo } : {}),
        mta: authservId(ctx),
        resolver: m.resolve,
        maxElapsedTime: spfTimeout,
      });
      ctx.state.set('message', { ...m, sender: sender.address, spf: result });
      const rule = SPF_RULES[result.status.result];
      if (rule) add(ctx, rule, result.status.comment || `SPF ${result.status.result} for ${result.domain}`);
      if (options.rejectSpfFail && result.status.result === 'fail') return reject(550, '5.7.23', 'SPF validation failed');
      if (options.tempfailSpfError && result.status.result === 'temperror') return tempfail(451, '4.7.24', 'SPF validation error');
    },

    async eom(ctx) {
      if (exempt(ctx)) return;
      const m = messageAuth(ctx);
      const id = authservId(ctx);
      const ip = clientAddress(ctx);
      const sender = m.sender ?? ctx.envelope.sender.address;
      const result: AuthenticateResult = await authenticate(ctx.message.stream(), {
        ...(ip !== undefined ? { ip } : {}),
        ...(ctx.helo !== undefined ? { helo: ctx.helo } : {}),
        // The null sender: SPF checks the HELO identity (RFC 7208 section 2.4).
        ...(sender ? { sender } : ctx.helo !== undefined ? { sender: `postmaster@${ctx.helo}` } : {}),
        mta: id,
        resolver: m.resolve,
        disableBimi: true,
        ...(options.minBitLength !== undefined ? { minBitLength: options.minBitLength } : {}),
      });

      // SPF as checked at MAIL (the same answers, through the memo); else the one just made.
      // Without a client address there was no SPF check to report.
      const spfResult = ip === undefined ? undefined : (m.spf ?? (result.spf || undefined));
      // A body hash mismatch is a failed verification (RFC 6376 section 6.1.3, RFC 8601
      // section 2.7.1: dkim=fail); mailauth's lenient mode says neutral.
      const dkimResults = result.dkim.results.map((r) =>
        r.status.result === 'neutral' && r.status.comment === 'body hash did not verify'
          ? { ...r, status: { ...r.status, result: 'fail' as const }, info: r.info.replace(/^dkim=neutral/, 'dkim=fail') }
          : r,
      );
      const arc = result.arc || undefined;
      const parts: string[] = [];
      if (spfResult) parts.push(spfResult.info);
      for (const r of dkimResults) parts.push(r.info);
      if (result.dmarc) parts.push(result.dmarc.info);
      if (arc) parts.push(arc.info || `arc=${arc.status.result}`);

      // RFC 8601 section 5: remove what came in under our authserv-id, then add ours at the top.
      const received = ctx.headers.filter((h) => h.name.toLowerCase() === 'authentication-results');
      for (let n = received.length; n >= 1; n--) {
        if (authservIdOf(received[n - 1]!.value) === id.toLowerCase()) ctx.message.deleteHeader('Authentication-Results', n);
      }
      if (spfResult) ctx.message.insertHeader(1, 'Received-SPF', valueOf(spfResult.header, 'Received-SPF'));
      ctx.message.insertHeader(1, 'Authentication-Results', [`${id};`, ...parts.map((p, i) => ` ${p}${i < parts.length - 1 ? ';' : ''}`)].join('\r\n'));

      // Score.
      if (!m.spf && spfResult) {
        const rule = SPF_RULES[spfResult.status.result];
        if (rule) add(ctx, rule, spfResult.status.comment || `SPF ${spfResult.status.result} for ${spfResult.domain}`);
      }
      const passing = dkimResults.filter((r) => r.status.result === 'pass');
      if (passing.length) {
        add(ctx, 'DKIM_VALID', passing.map((r) => r.signingDomain).join(', '));
        const aligned = passing.find((r) => r.status.aligned);
        if (aligned) add(ctx, 'DKIM_VALID_AU', aligned.signingDomain);
      } else {
        const failed = dkimResults.find((r) => r.status.result === 'fail');
        if (failed) add(ctx, 'DKIM_INVALID', `${failed.signingDomain ?? ''}: ${failed.status.comment ?? 'signature did not verify'}`);
      }
      const dmarc = result.dmarc || undefined;
      if (dmarc?.status.result === 'pass') add(ctx, 'DMARC_PASS', dmarc.status.header?.from);
      if (dmarc?.status.result === 'fail') {
        const policy = dmarc.policy;
        const rule: MailAuthRule = policy === 'reject' ? 'DMARC_FAIL_REJECT' : policy === 'quarantine' ? 'DMARC_FAIL_QUARANTINE' : 'DMARC_FAIL_NONE';
        add(ctx, rule, `${dmarc.status.header?.from ?? dmarc.domain} p=${policy}`);
      }
      const sealer = arc?.status.result === 'pass' && arc.signature ? arc.signature.signingDomain?.toLowerCase() : undefined;
      if (arc?.status.result === 'pass') add(ctx, 'ARC_PASS', `i=${String(arc.i)} sealed by ${sealer ?? '?'}`);
      if (arc?.status.result === 'fail') add(ctx, 'ARC_FAIL', arc.status.comment);

      // Policy. A chain that passes, sealed by a trusted forwarder, overrides a DMARC
      // failure (RFC 7489 section 7.2, local policy; RFC 8617 section 7.2.1).
      const overridden = sealer !== undefined && trustedSealers.has(sealer);
      if (options.enforceDmarc && dmarc?.status.result === 'fail' && !overridden) {
        const from = dmarc.status.header?.from ?? dmarc.domain;
        if (dmarc.policy === 'reject') return reject(550, '5.7.1', `Rejected by DMARC policy for ${from}`);
        if (dmarc.policy === 'quarantine') return quarantine(`DMARC policy of ${from}: quarantine`);
      }
    },
  });
}
