/**
 * mailAuth: SPF (RFC 7208) at MAIL FROM, and DKIM (RFC 6376), DMARC (RFC 7489 / DMARCbis)
 * and ARC (RFC 8617) at end of message, all computed by mailauth with the DNS resolver
 * given as an option. It writes `Authentication-Results` (RFC 8601) and `Received-SPF`
 * (RFC 7208 section 9.1) at the top of the message, removes Authentication-Results fields
 * that came in claiming our authserv-id (RFC 8601 section 5), adds each result to the spam
 * score, and optionally enforces: SPF fail → `550 5.7.23` at MAIL (RFC 7372), SPF temperror
 * → `451 4.7.24`, the sender domain's DMARC policy → `550 5.7.1` (p=reject) or quarantine.
 *
 * The lookups of one message go through one memo. At end of message it computes what
 * mailauth's authenticate() does, from mailauth's parts, without doing work twice: the body
 * is read only for a message with a DKIM-Signature or ARC fields (otherwise the gateway's
 * header parse gives the From fields), SPF is taken from MAIL when the inputs are the same,
 * and public keys are imported once into a shared LRU keyed by the key record.
 *
 * mailauth is an optional peer dependency, loaded (its parts only, never lib/bimi, which
 * needs undici) when mailAuth() is called, not when this module is imported.
 *
 * What it does not do: sign (DKIM or ARC seals), BIMI, DMARC reports, or a local policy
 * override for mail with a trusted ARC chain.
 */
import { createRequire } from 'node:module';
import crypto, { type KeyObject } from 'node:crypto';
import { isIP } from 'node:net';
import { once, type EventEmitter } from 'node:events';
import type { Readable } from 'node:stream';
import { LRUCache } from 'lru-cache';
import type { ARCResult, DKIMVerifyResult, DMARCResult, SPFOptions, SPFResult } from 'mailauth';
import {
  defineMilter,
  DovetailError,
  ErrorCodes,
  quarantine,
  reject,
  tempfail,
  type DefaultAction,
  type EomContext,
  type HeaderField,
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
  /**
   * Parsed DKIM/ARC public keys kept across messages, keyed by the key record's text
   * ({@link publicKeyCache}; pass one to share it between milters or to read its stats).
   * Default: a cache of 1000 keys for this milter; `false` parses the key on every message.
   */
  readonly keyCache?: PublicKeyCache | false;
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
  /** The HELO name the SPF check at MAIL was given. */
  readonly spfHelo?: string | undefined;
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

// ---------------------------------------------------------------------------------------
// mailauth, loaded when mailAuth() is first called (it is an optional peer dependency).
// Only the parts are loaded, never mailauth's index: that one loads lib/bimi, which needs
// undici (Node >= 22.19 for mailauth 7).

/** mailauth's per-message key lookup cache, as its DKIM verifier and ARC code call it. */
interface MailauthKeyCache {
  readonly resolver: MailauthResolver;
  get(type: string, name: string, minBitLength: number | undefined, options?: { strict?: boolean; hashAlgo?: string }): Promise<PublicKeyRecord>;
}

/** What mailauth's getPublicKey() returns for a key record (publicKey: PEM, or here a KeyObject). */
interface PublicKeyRecord {
  readonly publicKey: string | KeyObject;
  readonly rr: string;
  readonly modulusLength: number;
  readonly keyType: string;
  readonly flags: string[];
  readonly testing: boolean;
  readonly warnings: string[];
}

/** mailauth's parsed header block: one row per field, `line` the field's bytes without the final CRLF. */
interface ParsedHeaders {
  readonly parsed: { key: string | null; casedKey: string | undefined; line: Buffer }[];
  readonly original: Buffer;
}

/** The DkimVerifier of mailauth/lib/dkim/dkim-verifier (a Writable fed the message). */
interface DkimVerifier extends NodeJS.WritableStream {
  keyCache: MailauthKeyCache;
  readonly arc: { chain: unknown; warnings: string[]; keyCache?: MailauthKeyCache };
  readonly headerFrom: string[];
  readonly fromFields: number;
  readonly envelopeFrom: string | false;
  readonly results: DKIMVerifyResult['results'];
  byteLength: number;
  emitHeaders(chunk: Buffer): Promise<void>;
  messageHeaders(headers: ParsedHeaders): Promise<void>;
  finalChunk(): Promise<void>;
}

interface MailauthParts {
  readonly spf: (opts: SPFOptions & { maxElapsedTime?: number }) => Promise<SPFResult | false>;
  readonly DkimVerifier: new (options: Record<string, unknown>) => DkimVerifier;
  readonly arc: (data: DkimVerifier['arc'], opts: Record<string, unknown>) => Promise<ARCResult>;
  readonly evaluateDmarc: (opts: Record<string, unknown>) => Promise<{ response: DMARCResult | false; dkimAligned?: Set<string> }>;
  readonly getPublicKey: (type: string, name: string, minBitLength: number | undefined, resolver: MailauthResolver, options: object) => Promise<PublicKeyRecord>;
  readonly toALabel: (name: string) => string;
  readonly formatDomain: (domain: string) => string;
  readonly getAlignment: (fromDomain: string, domains: string[], strict?: boolean) => { domain?: string } | false | undefined;
}

let loaded: MailauthParts | undefined;

/**
 * Loads the parts of mailauth mailAuth uses, synchronously, once. Throws a DovetailError
 * (`DOVETAIL_ERR_INVALID_OPTIONS`) saying how to install it when it cannot be loaded.
 */
function loadMailauth(): MailauthParts {
  if (loaded) return loaded;
  const require = createRequire(import.meta.url);
  try {
    const tools = require('mailauth/lib/tools') as Pick<MailauthParts, 'getPublicKey' | 'toALabel' | 'formatDomain' | 'getAlignment'>;
    loaded = {
      spf: (require('mailauth/lib/spf') as Pick<MailauthParts, 'spf'>).spf,
      DkimVerifier: (require('mailauth/lib/dkim/dkim-verifier') as Pick<MailauthParts, 'DkimVerifier'>).DkimVerifier,
      arc: (require('mailauth/lib/arc') as Pick<MailauthParts, 'arc'>).arc,
      evaluateDmarc: (require('mailauth/lib/dmarc') as Pick<MailauthParts, 'evaluateDmarc'>).evaluateDmarc,
      getPublicKey: tools.getPublicKey,
      toALabel: tools.toALabel,
      formatDomain: tools.formatDomain,
      getAlignment: tools.getAlignment,
    };
    for (const [k, v] of Object.entries(loaded)) if (typeof v !== 'function') throw new Error(`mailauth has no ${k}`);
  } catch (err) {
    loaded = undefined;
    throw new DovetailError(
      ErrorCodes.INVALID_OPTIONS,
      `mailAuth needs the mailauth package, an optional peer dependency: npm install mailauth (mailauth 7 needs Node >= 22.19); it could not be loaded: ${(err as Error).message}`,
      { cause: err },
    );
  }
  return loaded;
}

/** Hit and miss counts of a {@link PublicKeyCache}. */
export interface PublicKeyCacheStats {
  /** Key records found already parsed. */
  readonly hits: number;
  /** Key records parsed (and imported) because they were not in the cache. */
  readonly misses: number;
  /** Parsed keys held now. */
  readonly size: number;
}

/**
 * A cache of parsed DKIM/ARC public keys shared by the messages one or more mailAuth()
 * milters check, keyed by the key record's text (and the checks that depend on the
 * caller: minimum key length, hash algorithm), so a key is validated and imported into a
 * `KeyObject` once and not on every message. A changed or revoked record is a different
 * key: nothing goes stale. Failures are never kept.
 */
export interface PublicKeyCache {
  stats(): PublicKeyCacheStats;
}

/**
 * The cache as mailAuth() uses it. Kept out of the public interface so the published
 * declarations name no mailauth type (mailauth is an optional peer: a project without it
 * must still type-check against dovetail/milters).
 */
interface KeyCacheInternals extends PublicKeyCache {
  /** mailauth's per-message key lookup, backed by this cache. */
  forMessage(parts: MailauthParts, resolver: MailauthResolver): MailauthKeyCache;
}
const internals = (cache: PublicKeyCache): KeyCacheInternals => cache as KeyCacheInternals;

/** Creates a {@link PublicKeyCache} holding at most `max` parsed keys (default 1000). */
export function publicKeyCache(options: { readonly max?: number } = {}): PublicKeyCache {
  const max = options.max ?? 1000;
  if (!(Number.isSafeInteger(max) && max > 0)) throw new DovetailError(ErrorCodes.INVALID_OPTIONS, 'publicKeyCache: max must be a positive integer');
  const lru = new LRUCache<string, Promise<PublicKeyRecord>>({ max });
  let hits = 0;
  let misses = 0;
  const cache: KeyCacheInternals = {
    stats: () => ({ hits, misses, size: lru.size }),
    forMessage(parts, resolver) {
      // As mailauth's own createKeyCache: one lookup per question per message.
      const memo = new Map<string, Promise<PublicKeyRecord>>();
      const lookup = async (type: string, name: string, minBitLength: number | undefined, options: { strict?: boolean; hashAlgo?: string }): Promise<PublicKeyRecord> => {
        // The same DNS question getPublicKey() asks; its answer picks the parsed key.
        const list = await resolver(parts.toALabel(name), 'TXT');
        const answered = (): Promise<string[][] | string[]> => Promise.resolve(list);
        const first: unknown = list[0];
        const rr = ([] as unknown[]).concat(first ?? []).join('').replace(/\s+/g, '');
        if (!rr) return parts.getPublicKey(type, name, minBitLength, answered, options); // throws mailauth's own error
        const key = `${options.strict ? 1 : 0}:${minBitLength ?? ''}:${options.hashAlgo ?? ''}:${rr}`;
        let p = lru.get(key);
        if (p) {
          hits++;
        } else {
          misses++;
          p = parts.getPublicKey(type, name, minBitLength, answered, options).then((r) => ({
            ...r,
            // crypto.verify() given the PEM would parse it on every signature.
            publicKey: typeof r.publicKey === 'string' ? crypto.createPublicKey(r.publicKey) : r.publicKey,
          }));
          lru.set(key, p);
          p.catch(() => {
            if (lru.peek(key) === p) lru.delete(key);
          });
        }
        const r = await p;
        return { ...r, flags: [...r.flags], warnings: [...r.warnings] };
      };
      return {
        resolver,
        get(type, name, minBitLength, options = {}) {
          const k = `${options.strict ? 1 : 0}:${minBitLength ?? ''}:${options.hashAlgo ?? ''}:${name}`;
          let p = memo.get(k);
          if (!p) {
            p = lookup(type, name, minBitLength, options);
            p.catch(() => false);
            memo.set(k, p);
          }
          return p;
        },
      };
    },
  };
  return cache;
}

const ARC_HEADERS = new Set(['arc-seal', 'arc-message-signature', 'arc-authentication-results']);
const CRLFCRLF = Buffer.from('\r\n\r\n');

/** mailauth's lower-casing of a field name (ASCII only). */
function lowerAscii(s: string): string {
  return /[^\x00-\x7f]/.test(s) ? s.replace(/[A-Z]/g, (c) => c.toLowerCase()) : s.toLowerCase();
}

/** The rows of mailauth's header parse for the fields given, rebuilt from the parse the gateway made. */
function parsedRows(headers: readonly HeaderField[], keep: (key: string) => boolean): ParsedHeaders {
  const parsed: ParsedHeaders['parsed'] = [];
  for (const h of headers) {
    const key = lowerAscii(h.name);
    if (keep(key)) parsed.push({ key, casedKey: h.name, line: Buffer.from(`${h.name}: ${h.value}`, 'utf8') });
  }
  return { parsed, original: Buffer.alloc(0) };
}

/**
 * Feeds the message to the verifier. The header block is handed over at once (mailauth's
 * parser would look for its end byte by byte); the body is written as mailauth's
 * dkimVerify() writes it. A header block with a bare LF goes through mailauth's own parser.
 */
async function feedVerifier(verifier: DkimVerifier, message: Readable): Promise<void> {
  const it = message[Symbol.asyncIterator]() as AsyncIterator<Buffer>;
  const held: Buffer[] = [];
  let heldBytes = 0;
  let headerEnd = -1;
  for (;;) {
    const next = await it.next();
    if (next.done) break;
    const chunk = Buffer.isBuffer(next.value) ? next.value : Buffer.from(next.value as Uint8Array);
    held.push(chunk);
    heldBytes += chunk.length;
    const all = held.length === 1 ? chunk : Buffer.concat(held, heldBytes);
    if (all[0] === 0x0d && all[1] === 0x0a) {
      headerEnd = 2;
      break;
    }
    const i = all.indexOf(CRLFCRLF, Math.max(0, heldBytes - chunk.length - 3));
    if (i >= 0) {
      headerEnd = i + 4;
      break;
    }
    if (heldBytes > 1 << 20) break; // mailauth's own parser from here
  }
  const all = held.length === 1 ? held[0]! : Buffer.concat(held, heldBytes);
  const head = headerEnd >= 0 ? all.subarray(0, headerEnd) : undefined;
  // eslint-disable-next-line no-control-regex
  const plain = head !== undefined && !/(^|[^\r])\n/.test(head.toString('latin1'));
  // Written by hand: pipeline() makes an AbortController and an AbortError per call.
  const done = new Promise<void>((resolve, reject) => {
    verifier.once('finish', resolve);
    verifier.once('error', reject);
  });
  done.catch(() => undefined);
  const write = async (chunk: Buffer): Promise<void> => {
    if (chunk.length && !verifier.write(chunk)) await Promise.race([once(verifier as unknown as EventEmitter, 'drain'), done]);
  };
  try {
    if (plain) {
      verifier.byteLength += head.length;
      await verifier.emitHeaders(head);
      await write(all.subarray(headerEnd));
    } else {
      await write(all);
    }
    for (;;) {
      const next = await it.next();
      if (next.done) break;
      await write(next.value);
    }
    verifier.end();
    await done;
  } finally {
    await it.return?.();
  }
}

/**
 * Creates the milter. Loads mailauth (an optional peer dependency) on the first call:
 * throws a DovetailError saying `npm install mailauth` when it is not installed.
 */
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
  const ma = loadMailauth();
  const keys = options.keyCache === false ? undefined : (options.keyCache ?? publicKeyCache());
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

  /**
   * What mailauth's authenticate() computes (without BIMI, sealing or trustReceived), made
   * from its parts: the DKIM verifier reads the body only when the message has a
   * DKIM-Signature or ARC header fields (else it gets the From and Return-Path fields the
   * gateway already parsed), ARC is verified only when there is a chain, SPF is not
   * evaluated again when MAIL already did it with the same inputs, and public keys come
   * from the shared key cache.
   */
  async function evaluate(ctx: EomContext, m: MessageAuth, ip: string | undefined, id: string) {
    const sender = m.sender ?? ctx.envelope.sender.address;
    // The null sender: SPF checks the HELO identity (RFC 7208 section 2.4).
    const authSender = sender ? sender : ctx.helo !== undefined ? `postmaster@${ctx.helo}` : undefined;
    let helo = ctx.helo || (ip ?? undefined);
    if (helo && isIP(helo)) helo = `[${helo}]`;

    const verifier = new ma.DkimVerifier({ resolver: m.resolve, sender: authSender, minBitLength: options.minBitLength, strict: false });
    if (keys) {
      const kc = internals(keys).forMessage(ma, m.resolve);
      verifier.keyCache = kc;
      Object.defineProperty(verifier.arc, 'keyCache', { value: kc, enumerable: false, configurable: true, writable: true });
    }
    const signed = ctx.headers.some((h) => {
      const k = lowerAscii(h.name);
      return k === 'dkim-signature' || ARC_HEADERS.has(k);
    });
    if (signed) {
      await feedVerifier(verifier, ctx.message.stream());
    } else {
      await verifier.messageHeaders(parsedRows(ctx.headers, (k) => k === 'from' || k === 'return-path'));
      await verifier.finalChunk();
    }
    const dkim = { headerFrom: verifier.headerFrom, fromFields: verifier.fromFields, envelopeFrom: verifier.envelopeFrom, results: verifier.results };

    // SPF as MAIL checked it, when authenticate() would have asked the same question.
    const reuse = m.spf !== undefined && !!m.sender && m.spfHelo === helo && m.spf.status.result !== 'temperror';
    const spfResult: SPFResult | false =
      reuse && m.spf
        ? m.spf
        : await ma.spf({
            ...(authSender !== undefined ? { sender: authSender } : {}),
            ...(ip !== undefined ? { ip } : {}),
            ...(helo ? { helo } : {}),
            mta: id,
            resolver: m.resolve,
          } as SPFOptions);

    const arcResult = await ma.arc(verifier.arc, { resolver: m.resolve, minBitLength: options.minBitLength, strict: false, ip });

    let dmarcResult: DMARCResult | false = false;
    {
      const { response, dkimAligned } = await ma.evaluateDmarc({
        headerFrom: dkim.headerFrom,
        fromFields: dkim.fromFields,
        spfDomains: spfResult && spfResult.status.result === 'pass' && spfResult.domain ? [spfResult.domain] : [],
        dkimDomains: dkim.results
          .filter((r) => r.status.result === 'pass')
          .map((r) => ({ id: r.id, domain: r.signingDomain, aligned: r.status.aligned, underSized: r.status.underSized })),
        arcResult,
        resolver: m.resolve,
        strict: false,
      });
      dmarcResult = response;
      if (dkimAligned && dmarcResult) {
        // As authenticate(): passing signatures take the DMARC verdict on alignment.
        const fromDomain = dmarcResult.status.header?.from;
        const strictDkim = (dmarcResult as { alignment?: { dkim?: { strict?: boolean } } }).alignment?.dkim?.strict;
        for (const row of dkim.results) {
          const status = row.status as { result: string; aligned?: string | false };
          if (status.result === 'pass') {
            status.aligned = dkimAligned.has(ma.formatDomain(row.signingDomain ?? '')) ? (row.signingDomain ?? false) : false;
          } else if (strictDkim) {
            status.aligned = (status.aligned && (ma.getAlignment(fromDomain ?? '', [row.signingDomain ?? ''], true) || undefined)?.domain) || false;
          }
        }
      }
    }
    return { dkim, spf: spfResult, dmarc: dmarcResult, arc: arcResult };
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
      const result = await ma.spf({
        sender: sender.address,
        ip,
        ...(ctx.helo !== undefined ? { helo: ctx.helo } : {}),
        mta: authservId(ctx),
        resolver: m.resolve,
        maxElapsedTime: spfTimeout,
      });
      if (!result) return;
      ctx.state.set('message', { ...m, sender: sender.address, spf: result, spfHelo: ctx.helo });
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
      const result = await evaluate(ctx, m, ip, id);

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
