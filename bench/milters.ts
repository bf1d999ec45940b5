/**
 * Bench fixture: a small in-process milter chain of the kind a gateway runs on every
 * message, each touching a different stage so the chain's per-stage cost shows:
 * - `rcpt-policy`: MAIL and RCPT: checks the sender's syntax and that the recipient's
 *   domain is one we accept (a relay-access check);
 * - `header-score`: every header, and eoh: scores a missing Message-ID/Date, a shouting
 *   Subject and a From domain that differs from the envelope sender's;
 * - `body-scan`: every body chunk: looks for a few spammy phrases;
 * - `eom-tag`: end of message: adds `X-Spam-Score` with the score total.
 *
 * The checks are cheap on purpose: the bench measures the chain, not the filters.
 * None of them rejects the bench's message.
 */
import { defineMilter, reject, type Milter } from '../lib/index.js';

const RELAY_DENIED = reject(554, '5.7.1', 'Relay access denied');
const BAD_SENDER = reject(553, '5.1.7', 'Bad sender address syntax');

/** The chain used by the "gateway + milters" target. `domains`: recipient domains we accept. */
export function benchMilters(domains: readonly string[] = ['example.test']): Milter[] {
  const accepted = new Set(domains.map((d) => d.toLowerCase()));

  const rcptPolicy = defineMilter({
    name: 'rcpt-policy',
    async mail(_ctx, sender) {
      if (sender.address !== '' && !/^[^@\s]+@[^@\s]+$/.test(sender.address)) return BAD_SENDER;
      return undefined;
    },
    async rcpt(_ctx, recipient) {
      const at = recipient.address.lastIndexOf('@');
      const domain = at < 0 ? '' : recipient.address.slice(at + 1).toLowerCase();
      return accepted.has(domain) ? undefined : RELAY_DENIED;
    },
  });

  const headerScore = defineMilter({
    name: 'header-score',
    async header(ctx, h) {
      const name = h.name.toLowerCase();
      if (name === 'subject' && /[A-Z]{12,}|!!!/.test(h.value)) ctx.score.add(1.5, 'SUBJ_SHOUTING');
      if (name === 'from') {
        const m = /@([^>\s]+)/.exec(h.value);
        const envDomain = ctx.envelope.sender.address.split('@')[1] ?? '';
        if (m && m[1]?.toLowerCase() !== envDomain.toLowerCase()) ctx.score.add(0.5, 'FROM_ENV_MISMATCH');
      }
      return undefined;
    },
    async eoh(ctx) {
      const names = new Set(ctx.headers.map((h) => h.name.toLowerCase()));
      if (!names.has('message-id')) ctx.score.add(1, 'MISSING_MID');
      if (!names.has('date')) ctx.score.add(1, 'MISSING_DATE');
      return undefined;
    },
  });

  const PHRASES = ['viagra', 'lottery winner', 'wire transfer now', 'click here to claim'].map((p) => Buffer.from(p, 'latin1'));
  const bodyScan = defineMilter({
    name: 'body-scan',
    async body(ctx, chunk) {
      for (const p of PHRASES) if (chunk.includes(p)) ctx.score.add(2, 'BODY_PHRASE', p.toString('latin1'));
      return undefined;
    },
  });

  const eomTag = defineMilter({
    name: 'eom-tag',
    async eom(ctx) {
      ctx.message.addHeader('X-Spam-Score', ctx.score.total.toFixed(1));
      return undefined;
    },
  });

  return [rcptPolicy, headerScore, bodyScan, eomTag];
}
