/**
 * spamTag: turns the message's spam score into SpamAssassin-compatible headers at end of
 * message, so that Sieve rules, MUAs and downstream filters written for SpamAssassin work
 * unchanged:
 *
 *   X-Spam-Flag: YES                                 (only at or over requiredScore)
 *   X-Spam-Score: 6.3
 *   X-Spam-Level: ******                             (one `*` per whole point, at most 50)
 *   X-Spam-Status: Yes, score=6.3 required=5.0 tests=RULE1,RULE2
 *
 * The score is ctx.score (what the milters before it added), plus, by option, the score a
 * remote filter wrote into the message: rspamd's `X-Spamd-Result: default: False [3.40 /
 * 15.00]`, SpamAssassin's `X-Spam-Status: Yes, score=5.2 …` (or `X-Spam-Score: 5.2`). Every
 * X-Spam-Flag/-Score/-Level/-Status already in the message is removed before its own are
 * added, so a client cannot hand in a verdict. Optionally it tags the Subject once, rejects
 * (550 5.7.1) at rejectScore, and quarantines at quarantineScore.
 *
 * With remoteHeaders, only score headers a milter wrote (HeaderField.origin set: a remote
 * filter behind connectMilter, or an in-process milter) are read, the last one winning; a
 * copy the client sent is never trusted. What it does not do: score anything itself.
 */
import libmime from 'libmime';
import { defineMilter, quarantine, reject, DovetailError, ErrorCodes, type EomContext, type HeaderField, type Milter } from '../lib/index.js';
import { isRoleRecipient } from './postmaster.js';

/** Remote filters whose score headers spamTag can read. */
export type RemoteScoreHeader = 'rspamd' | 'spamassassin';

/** Options of {@link spamTag}. Scores are compared as `score >= threshold`. */
export interface SpamTagOptions {
  /** At or over this score the message is spam: X-Spam-Flag: YES, `Yes` in X-Spam-Status, the subject tag. Default 5. */
  readonly requiredScore?: number;
  /** At or over this score the message is refused at end of DATA with `550 5.7.1`. Default: never. */
  readonly rejectScore?: number;
  /** At or over this score (and under rejectScore) the message is tagged and quarantined. Default: never. */
  readonly quarantineScore?: number;
  /** Prepended (with a space) to the Subject of spam, once: a subject that already starts with it is left alone. */
  readonly subjectTag?: string;
  /**
   * Also count the score a remote filter wrote into the message: `'rspamd'` reads
   * X-Spamd-Result, `'spamassassin'` X-Spam-Status (or X-Spam-Score without it). `true`
   * means both. Default: none. See the header comment on trusting these headers.
   */
  readonly remoteHeaders?: boolean | readonly RemoteScoreHeader[];
  /**
   * A message whose recipients are all role addresses (bare `Postmaster`, `postmaster@`,
   * `abuse@`: RFC 5321 4.5.1, RFC 2142) is tagged, never rejected at `rejectScore`, so a
   * complaint about spam reaches someone. Default true.
   */
  readonly neverRejectRoleRecipients?: boolean;
  /** The text of the reject reply. Default `Message rejected as spam`. */
  readonly rejectText?: string;
}

/** The headers spamTag owns: any copy already in the message is removed. */
export const SPAM_HEADERS = ['X-Spam-Flag', 'X-Spam-Score', 'X-Spam-Level', 'X-Spam-Status'] as const;

/** SpamAssassin prints at most 50 stars. */
const MAX_STARS = 50;

const NUMBER = String.raw`[-+]?(?:\d+(?:\.\d*)?|\.\d+)`;
const RSPAMD = new RegExp(String.raw`\[\s*(${NUMBER})\s*/\s*(${NUMBER})\s*\]`);
const SA_STATUS = new RegExp(String.raw`(?:^|[\s,;])score=(${NUMBER})`, 'i');
const SA_SCORE = new RegExp(String.raw`^\s*(${NUMBER})\s*$`);

function bad(why: string): never {
  throw new DovetailError(ErrorCodes.INVALID_OPTIONS, `spamTag: ${why}`);
}

function threshold(name: string, v: number | undefined): void {
  if (v !== undefined && !(typeof v === 'number' && Number.isFinite(v))) bad(`${name} must be a finite number`);
}

/** One decimal, as SpamAssassin prints scores (never `-0.0`). */
export function formatScore(score: number): string {
  const r = Math.round(score * 10) / 10;
  return (r === 0 ? 0 : r).toFixed(1);
}

/** One `*` per whole point, none for a score under 1, at most 50. */
export function spamLevel(score: number): string {
  return score >= 1 ? '*'.repeat(Math.min(MAX_STARS, Math.floor(score))) : '';
}

/** Value of the last header called `name`, unfolded; undefined when there is none. */
function last(headers: readonly HeaderField[], name: string): string | undefined {
  const lower = name.toLowerCase();
  for (let i = headers.length - 1; i >= 0; i--) {
    const h = headers[i] as HeaderField;
    // A client's copy (no origin) is a forgery as far as scoring goes.
    if (h.origin !== undefined && h.name.toLowerCase() === lower) return h.value.replace(/\r\n([ \t])/g, '$1');
  }
  return undefined;
}

/** The remote filters' scores found in the headers, one entry per filter. */
export function remoteScores(headers: readonly HeaderField[], kinds: readonly RemoteScoreHeader[]): { reason: string; points: number }[] {
  const out: { reason: string; points: number }[] = [];
  if (kinds.includes('rspamd')) {
    const v = last(headers, 'X-Spamd-Result');
    const m = v === undefined ? null : RSPAMD.exec(v);
    const points = m ? Number(m[1]) : NaN;
    if (Number.isFinite(points)) out.push({ reason: 'RSPAMD', points });
  }
  if (kinds.includes('spamassassin')) {
    const status = last(headers, 'X-Spam-Status');
    const m = status !== undefined ? SA_STATUS.exec(status) : SA_SCORE.exec(last(headers, 'X-Spam-Score') ?? '');
    const points = m ? Number(m[1]) : NaN;
    if (Number.isFinite(points)) out.push({ reason: 'SPAMASSASSIN', points });
  }
  return out;
}

/** `tests=` as SpamAssassin writes it: rule names, sorted, comma-separated, folded; `none` when empty. */
function testsList(reasons: readonly string[]): string {
  // Rule names are tokens: no white space, commas or control characters.
  const names = [...new Set(reasons.map((r) => r.replace(/[^\x21-\x2b\x2d-\x7e]+/g, '_')))].sort();
  if (names.length === 0) return 'none';
  const lines: string[] = [];
  let line = '';
  for (const [i, n] of names.entries()) {
    const item = n + (i < names.length - 1 ? ',' : '');
    if (line && line.length + item.length > 60) {
      lines.push(line);
      line = '';
    }
    line += item;
  }
  lines.push(line);
  return lines.join('\r\n\t');
}

/**
 * Creates the spam-tag milter. Put it last in the chain: it reads what the milters before
 * it scored.
 *
 * @example
 * ```ts
 * spamTag({ requiredScore: 5, subjectTag: '[SPAM]', quarantineScore: 10, rejectScore: 15 })
 * ```
 */
export function spamTag(options: SpamTagOptions = {}): Milter {
  if (typeof options !== 'object' || options === null) bad('options must be an object');
  const required = options.requiredScore ?? 5;
  threshold('requiredScore', required);
  threshold('rejectScore', options.rejectScore);
  threshold('quarantineScore', options.quarantineScore);
  const tag = options.subjectTag;
  if (tag !== undefined && (typeof tag !== 'string' || !tag.trim() || /[\r\n]/.test(tag))) bad('subjectTag must be a non-empty single line');
  const kinds: readonly RemoteScoreHeader[] =
    options.remoteHeaders === true ? ['rspamd', 'spamassassin'] : options.remoteHeaders === false || options.remoteHeaders === undefined ? [] : options.remoteHeaders;
  for (const k of kinds) if (k !== 'rspamd' && k !== 'spamassassin') bad(`unknown remoteHeaders kind ${JSON.stringify(k)}`);
  const rejectText = options.rejectText ?? 'Message rejected as spam';
  // Build it once, so a bad text fails at start-up.
  const rejection = reject(550, '5.7.1', rejectText);
  const protectRoles = options.neverRejectRoleRecipients ?? true;

  return defineMilter({
    // Its eom reads and writes headers, never the body.
    needs: { body: false },
    name: 'spam-tag',
    async eom(ctx: EomContext) {
      const headers = ctx.headers;
      const remote = remoteScores(headers, kinds);
      let score = ctx.score.total;
      for (const r of remote) score += r.points;
      score = Math.round(score * 1000) / 1000;
      const reasons = [...ctx.score.entries.map((e) => e.reason), ...remote.map((r) => r.reason)];

      if (options.rejectScore !== undefined && score >= options.rejectScore && !(protectRoles && ctx.envelope.recipients.every((r) => isRoleRecipient(r)))) return rejection;

      const spam = score >= required;
      // Remove every copy already there (sent by the client, or by a filter we just read), last first.
      for (const name of SPAM_HEADERS) {
        const lower = name.toLowerCase();
        const n = headers.filter((h) => h.name.toLowerCase() === lower).length;
        for (let i = n; i >= 1; i--) ctx.message.deleteHeader(name, i);
      }
      const shown = formatScore(score);
      if (spam) ctx.message.addHeader('X-Spam-Flag', 'YES');
      ctx.message.addHeader('X-Spam-Score', shown);
      ctx.message.addHeader('X-Spam-Level', spamLevel(score));
      ctx.message.addHeader('X-Spam-Status', `${spam ? 'Yes' : 'No'}, score=${shown} required=${formatScore(required)} tests=${testsList(reasons)}`);

      if (spam && tag !== undefined) {
        const subject = headers.find((h) => h.name.toLowerCase() === 'subject');
        if (subject === undefined) {
          ctx.message.addHeader('Subject', tag);
        } else {
          const raw = subject.value.replace(/\r\n([ \t])/g, '$1').trimStart();
          let decoded = raw;
          try {
            decoded = libmime.decodeWords(raw).trimStart();
          } catch {
            // Undecodable encoded words: compare the raw text only.
          }
          if (!raw.startsWith(tag) && !decoded.startsWith(tag)) ctx.message.changeHeader('Subject', 1, `${tag} ${subject.value.trimStart()}`);
        }
      }

      if (options.quarantineScore !== undefined && score >= options.quarantineScore) {
        return quarantine(`spam score ${shown} >= ${formatScore(options.quarantineScore)}`);
      }
      return undefined;
    },
  });
}
