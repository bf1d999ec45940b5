/**
 * Trace information: the Received header (RFC 5321 4.4, RFC 5322 3.6.7), in the shape
 * Postfix writes it so log and header tooling reads it as usual. Queue ids and dates are
 * lib/message/ids.ts (the queue and DSNs use them too).
 */
import type { TlsInfo } from '../milter/types.js';
import { rfc5322Date } from '../message/ids.js';

export { newQueueId, rfc5322Date } from '../message/ids.js';

export interface ReceivedInfo {
  readonly helo: string | undefined;
  readonly clientHostname: string;
  readonly clientAddress: string;
  readonly hostname: string;
  /** ESMTP, ESMTPS, ESMTPSA … (RFC 3848). */
  readonly protocol: string;
  readonly queueId: string;
  readonly tls: TlsInfo | undefined;
  /** Named in a `for` clause only when there is exactly one. */
  readonly recipients: readonly string[];
  readonly date?: Date;
}

/** The value of our Received header (folded with CRLF TAB, as Postfix folds it). */
export function receivedValue(r: ReceivedInfo): string {
  const literal = r.clientAddress.includes(':') ? `IPv6:${r.clientAddress}` : r.clientAddress;
  const lines = [`from ${r.helo ?? 'unknown'} (${r.clientHostname.startsWith('[') ? 'unknown' : r.clientHostname} [${literal}])`];
  if (r.tls) lines.push(`(using ${r.tls.version} with cipher ${r.tls.cipher} (${r.tls.bits}/${r.tls.bits} bits))`);
  lines.push(`by ${r.hostname} (dovetail) with ${r.protocol} id ${r.queueId}`);
  const only = r.recipients.length === 1 ? r.recipients[0] : undefined;
  if (only !== undefined) lines.push(`for <${only}>; ${rfc5322Date(r.date)}`);
  else lines[lines.length - 1] += `; ${rfc5322Date(r.date)}`;
  return lines.join('\r\n\t');
}
