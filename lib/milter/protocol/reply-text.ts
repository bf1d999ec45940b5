/**
 * The text of an SMFIR_REPLYCODE reply, built to libmilter's rules (smfi.c smfi_setreply /
 * smfi_setmlreply): the reply code is 4xx for a tempfail and 5xx for a reject; the enhanced
 * status code's class matches the reply code's; one to 32 lines, none holding CR, LF or NUL;
 * a multi-line reply is `xyz-a.b.c line` lines joined by CRLF, the last one `xyz a.b.c line`;
 * every `%` is doubled to `%%`, because Sendmail uses the text as a format string (Postfix
 * milter8.c turns `%%` back into `%` and drops a single `%`).
 *
 * Does not: decide between SMFIR_REPLYCODE and a plain SMFIR_REJECT/SMFIR_TEMPFAIL (the
 * server sends the plain one for the default replies), or frame anything.
 */
import { MAX_REPLY_LINES, type SmtpReply } from '../verdict.js';

const ENHANCED = /^([245])\.\d{1,3}\.\d{1,3}$/;

/**
 * The REPLYCODE text for a reject or tempfail reply, or undefined when the reply breaks
 * libmilter's rules (the caller then sends the plain SMFIR_REJECT / SMFIR_TEMPFAIL).
 */
export function replyCodeText(type: 'reject' | 'tempfail', reply: SmtpReply): string | undefined {
  const cls = type === 'reject' ? '5' : '4';
  const code = String(reply.code);
  if (!/^[45]\d\d$/.test(code) || code[0] !== cls) return undefined;
  const m = ENHANCED.exec(reply.enhanced);
  if (!m || m[1] !== cls) return undefined;
  const lines = reply.lines;
  if (lines.length < 1 || lines.length > MAX_REPLY_LINES) return undefined;
  const last = lines.length - 1;
  const out: string[] = [];
  for (let i = 0; i < lines.length; i++) {
    const line = lines[i] ?? '';
    if (/[\r\n\0]/.test(line)) return undefined;
    const text = line.replace(/%/g, '%%');
    out.push(`${code}${i < last ? '-' : ' '}${reply.enhanced}${text ? ' ' + text : ''}`);
  }
  return out.join('\r\n');
}

/** Reverses {@link replyCodeText} as Postfix does: `%%` becomes `%`, a single `%` is dropped. */
export function unescapeReplyText(text: string): string {
  return text.replace(/%(.?)/gs, (_m, next: string) => next);
}
