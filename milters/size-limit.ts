/**
 * sizeLimit: the SMTP SIZE extension (RFC 1870) as a milter. Its `limits.maxMessageBytes`
 * asks the gateway to advertise `SIZE <maxBytes>` in EHLO, to refuse a `MAIL FROM ...
 * SIZE=` over it with 552 5.3.4 at once, and to stop keeping bytes beyond it while DATA
 * streams, answering 552 5.3.4 (naming our host) at the end of DATA: memory stays flat
 * whatever the client sends (see lib/smtp/gateway.ts and lib/smtp/ingest.ts).
 *
 * Its `mail` handler checks the declared SIZE= itself, with Postfix's reply
 * (`552 5.3.4 Message size exceeds fixed limit`, smtpd.c), so the same milter refuses an
 * oversized declaration when it is served to Postfix or Sendmail, where the gateway hook
 * does not exist. In the gateway smtp-server answers that case first, with its own text.
 *
 * What it does not do: count the bytes of DATA itself (the gateway does it while they
 * stream; behind Postfix, set message_size_limit), or limit anything but message size.
 */
import { defineMilter, reject, DovetailError, ErrorCodes, type EnvelopeAddress, type MessageContext, type Milter } from '../lib/index.js';

/** Options of {@link sizeLimit}. */
export interface SizeLimitOptions {
  /** The largest message accepted, in bytes (headers, empty line and body, as received). */
  readonly maxBytes: number;
}

/**
 * Creates the size-limit milter. Put it first in the chain: a declared size over the
 * limit is then refused before any other milter runs.
 *
 * @example
 * ```ts
 * createGateway({ milters: [sizeLimit({ maxBytes: 25 << 20 }), …], … })
 * ```
 */
export function sizeLimit(options: SizeLimitOptions): Milter {
  const maxBytes = options?.maxBytes;
  if (!(typeof maxBytes === 'number' && Number.isSafeInteger(maxBytes) && maxBytes > 0)) {
    throw new DovetailError(ErrorCodes.INVALID_OPTIONS, 'sizeLimit: maxBytes must be a positive integer');
  }
  return defineMilter({
    name: 'size-limit',
    limits: { maxMessageBytes: maxBytes },
    async mail(_ctx: MessageContext, sender: EnvelopeAddress) {
      const declared = sender.args['SIZE'];
      // RFC 1870: size-value ::= 1*20DIGIT. Anything else is the MTA's syntax error to answer.
      if (typeof declared === 'string' && /^\d{1,20}$/.test(declared) && Number(declared) > maxBytes) {
        return reject(552, '5.3.4', 'Message size exceeds fixed limit');
      }
      return undefined;
    },
  });
}
