/**
 * Verdicts: what a milter handler answers. Exactly the Sendmail milter set (SMFIS_CONTINUE,
 * SMFIS_ACCEPT, SMFIS_REJECT, SMFIS_TEMPFAIL, SMFIS_DISCARD, SMFIS_SKIP, and quarantine,
 * which libmilter spells smfi_quarantine + a verdict) as a discriminated union, with the
 * subset each stage may return spelled out as its own type so a wrong verdict at a stage
 * fails to compile.
 *
 * Replies follow libmilter's smfi_setreply / smfi_setmlreply rules: a reject carries a 5xx
 * code, a tempfail a 4xx code, the enhanced status code's class matches the reply's, and a
 * multi-line reply has at most 32 lines. A reply that breaks them throws when it is built.
 */
import { DovetailError, ErrorCodes } from '../errors.js';

/** An SMTP reply: a three-digit code, an RFC 3463 enhanced status code, one or more lines of text. */
export interface SmtpReply {
  readonly code: number;
  readonly enhanced: string;
  readonly lines: readonly string[];
}

/** Carry on with the next milter / the next stage (SMFIS_CONTINUE). */
export interface Continue { readonly type: 'continue' }
/** This milter is done: it is not called again for this message, or, at connect/helo, for this session (SMFIS_ACCEPT). */
export interface Accept { readonly type: 'accept' }
/** Refuse with a 5xx reply (SMFIS_REJECT / SMFIR_REPLYCODE). At RCPT: that recipient only. */
export interface Reject { readonly type: 'reject'; readonly reply: SmtpReply }
/** Refuse with a 4xx reply (SMFIS_TEMPFAIL / SMFIR_REPLYCODE). At RCPT: that recipient only. */
export interface Tempfail { readonly type: 'tempfail'; readonly reply: SmtpReply }
/** Tell the client 250 and throw the message away (SMFIS_DISCARD). */
export interface Discard { readonly type: 'discard' }
/** Accept the message but hold it in quarantine instead of delivering it (smfi_quarantine). End of message only. */
export interface Quarantine { readonly type: 'quarantine'; readonly reason: string }
/** Send no more body chunks to this milter; go on to end of message (SMFIS_SKIP, protocol v6). Body stage only. */
export interface Skip { readonly type: 'skip' }

/** Every verdict. */
export type Verdict = Continue | Accept | Reject | Tempfail | Discard | Quarantine | Skip;
/** What connect and helo may answer: the session-level verdicts (discard and quarantine concern messages). */
export type SessionVerdict = Continue | Accept | Reject | Tempfail;
/** What mail, rcpt, data, header, eoh and unknown may answer. */
export type MessageVerdict = Continue | Accept | Reject | Tempfail | Discard;
/** What body may answer. */
export type BodyVerdict = MessageVerdict | Skip;
/** What eom may answer. */
export type EomVerdict = MessageVerdict | Quarantine;

/** The longest multi-line reply libmilter's smfi_setmlreply allows. */
export const MAX_REPLY_LINES = 32;
/** The longest text line we put after `code enhanced ` (RFC 5321 4.5.3.1.5 allows 512 octets a reply line). */
export const MAX_REPLY_LINE_LENGTH = 496;

const ENHANCED = /^([245])\.(\d{1,3})\.(\d{1,3})$/;

/**
 * Builds a validated reply. `text` may be one line or several (an array, or a string with
 * line breaks); each line is sent as `code-enhanced text` / `code enhanced text`.
 */
export function smtpReply(code: number, enhanced: string, text: string | readonly string[]): SmtpReply {
  if (!Number.isInteger(code) || code < 200 || code > 599) {
    throw new DovetailError(ErrorCodes.INVALID_REPLY, `reply code ${String(code)} is not a three-digit SMTP code`);
  }
  const m = ENHANCED.exec(enhanced);
  if (!m || m[1] !== String(code)[0]) {
    throw new DovetailError(ErrorCodes.INVALID_REPLY, `enhanced status code "${enhanced}" does not match reply code ${code}`);
  }
  const lines = (typeof text === 'string' ? text.split(/\r\n|\r|\n/) : [...text]).map((l) => l.trimEnd());
  if (lines.length === 0 || lines.length > MAX_REPLY_LINES) {
    throw new DovetailError(ErrorCodes.INVALID_REPLY, `a reply has 1 to ${MAX_REPLY_LINES} lines, not ${lines.length}`);
  }
  for (const line of lines) {
    // eslint-disable-next-line no-control-regex
    if (/[\x00-\x1f\x7f]/.test(line)) {
      throw new DovetailError(ErrorCodes.INVALID_REPLY, 'a reply line may not contain control characters');
    }
    if (Buffer.byteLength(line) > MAX_REPLY_LINE_LENGTH) {
      throw new DovetailError(ErrorCodes.INVALID_REPLY, `a reply line is longer than ${MAX_REPLY_LINE_LENGTH} bytes`);
    }
  }
  return Object.freeze({ code, enhanced, lines: Object.freeze(lines) });
}

/** Formats a reply as it goes on the wire (without the final CRLF). */
export function formatReply(reply: SmtpReply): string {
  const last = reply.lines.length - 1;
  return reply.lines.map((line, i) => `${reply.code}${i < last ? '-' : ' '}${reply.enhanced}${line ? ' ' + line : ''}`).join('\r\n');
}

const CONTINUE: Continue = Object.freeze({ type: 'continue' });
const ACCEPT: Accept = Object.freeze({ type: 'accept' });
const DISCARD: Discard = Object.freeze({ type: 'discard' });
const SKIP: Skip = Object.freeze({ type: 'skip' });

/** Postfix's reply for a bare SMFIS_REJECT. */
export const DEFAULT_REJECT_REPLY = smtpReply(550, '5.7.1', 'Command rejected');
/** Postfix's reply for a bare SMFIS_TEMPFAIL. */
export const DEFAULT_TEMPFAIL_REPLY = smtpReply(451, '4.7.1', 'Service unavailable - try again later');

/** Continue (SMFIS_CONTINUE). Returning nothing from a handler means the same. */
export function continue_(): Continue {
  return CONTINUE;
}
/** Accept: this milter is done with the message (at connect/helo: with the session). */
export function accept(): Accept {
  return ACCEPT;
}
/** Discard: the client is told 250, the message is dropped. */
export function discard(): Discard {
  return DISCARD;
}
/** Skip the rest of the body (body stage only). */
export function skip(): Skip {
  return SKIP;
}
/** Quarantine the message with a reason (end of message only). */
export function quarantine(reason: string): Quarantine {
  const r = String(reason).replace(/[\r\n]+/g, ' ').trim();
  if (!r) throw new DovetailError(ErrorCodes.INVALID_EDIT, 'quarantine needs a reason');
  return Object.freeze({ type: 'quarantine', reason: r });
}

/**
 * Reject with a 5xx reply. `reject()` alone answers `550 5.7.1 Command rejected`.
 * `text` may hold several lines (array or line breaks) for a multi-line reply.
 */
export function reject(code?: number, enhanced?: string, text?: string | readonly string[]): Reject {
  if (code === undefined) return Object.freeze({ type: 'reject', reply: DEFAULT_REJECT_REPLY });
  if (code < 500 || code > 599) {
    throw new DovetailError(ErrorCodes.INVALID_REPLY, `reject() needs a 5xx code, not ${code}`);
  }
  return Object.freeze({ type: 'reject', reply: smtpReply(code, enhanced ?? '5.7.1', text ?? 'Command rejected') });
}

/**
 * Tempfail with a 4xx reply. `tempfail()` alone answers `451 4.7.1 Service unavailable - try again later`.
 */
export function tempfail(code?: number, enhanced?: string, text?: string | readonly string[]): Tempfail {
  if (code === undefined) return Object.freeze({ type: 'tempfail', reply: DEFAULT_TEMPFAIL_REPLY });
  if (code < 400 || code > 499) {
    throw new DovetailError(ErrorCodes.INVALID_REPLY, `tempfail() needs a 4xx code, not ${code}`);
  }
  return Object.freeze({
    type: 'tempfail',
    reply: smtpReply(code, enhanced ?? '4.7.1', text ?? 'Service unavailable - try again later'),
  });
}

const KNOWN = new Set<Verdict['type']>(['continue', 'accept', 'reject', 'tempfail', 'discard', 'quarantine', 'skip']);

/** Checks at run time that a handler's result is a verdict (or nothing). Used by the chain for untyped callers. */
export function toVerdict(value: unknown): Verdict {
  if (value === undefined || value === null) return CONTINUE;
  if (typeof value === 'object' && KNOWN.has((value as { type: Verdict['type'] }).type)) {
    const v = value as Verdict;
    if ((v.type === 'reject' || v.type === 'tempfail') && !isReply(v.reply)) {
      throw new DovetailError(ErrorCodes.INVALID_VERDICT, `${v.type} verdict without a valid reply`);
    }
    if (v.type === 'reject' && (v.reply.code < 500 || v.reply.code > 599)) {
      throw new DovetailError(ErrorCodes.INVALID_VERDICT, 'a reject verdict needs a 5xx reply');
    }
    if (v.type === 'tempfail' && (v.reply.code < 400 || v.reply.code > 499)) {
      throw new DovetailError(ErrorCodes.INVALID_VERDICT, 'a tempfail verdict needs a 4xx reply');
    }
    return v;
  }
  throw new DovetailError(ErrorCodes.INVALID_VERDICT, 'a milter handler returned something that is not a verdict');
}

function isReply(r: unknown): r is SmtpReply {
  if (typeof r !== 'object' || r === null) return false;
  const x = r as SmtpReply;
  try {
    smtpReply(x.code, x.enhanced, x.lines);
    return true;
  } catch {
    return false;
  }
}
