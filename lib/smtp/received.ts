/**
 * Trace information: queue ids and the Received header (RFC 5321 4.4, RFC 5322 3.6.7), in
 * the shape Postfix writes it so log and header tooling reads it as usual.
 */
import { randomBytes } from 'node:crypto';
import type { TlsInfo } from '../milter/types.js';

const ALPHABET = '0123456789BCDFGHJKLMNPQRSTVWXYZ';
// The time part of the last id: milliseconds × 1024 + a sequence number within the ms.
let last = 0n;

/**
 * A queue id: 12 characters from a consonant-and-digit alphabet (no vowels, so no words):
 * nine from a strictly increasing time-and-sequence number (unique within the process even
 * if the clock steps back or more than 1 024 ids are made in one millisecond), three random
 * (unlikely to repeat across processes).
 */
export function newQueueId(): string {
  const now = BigInt(Date.now()) * 1024n;
  // Regression: ids repeated when the clock stepped back; never go below the last one.
  last = now > last ? now : last + 1n;
  let n = last;
  let out = '';
  for (let i = 0; i < 9; i++) {
    out = ALPHABET[Number(n % 31n)] + out;
    n /= 31n;
  }
  for (let i = 0; i < 3; i++) out += ALPHABET[randomByte() % 31];
  return out;
}

// Random bytes drawn from a pool: one randomBytes() call per 1 024 queue ids, not per id.
let pool = Buffer.alloc(0);
let poolAt = 0;
function randomByte(): number {
  if (poolAt >= pool.length) {
    pool = randomBytes(3072);
    poolAt = 0;
  }
  return pool[poolAt++] as number;
}

const DAYS = ['Sun', 'Mon', 'Tue', 'Wed', 'Thu', 'Fri', 'Sat'];
const MONTHS = ['Jan', 'Feb', 'Mar', 'Apr', 'May', 'Jun', 'Jul', 'Aug', 'Sep', 'Oct', 'Nov', 'Dec'];
const pad = (n: number): string => String(n).padStart(2, '0');

/** An RFC 5322 date-time in UTC: `Sun, 22 Nov 2026 08:16:40 +0000`. */
export function rfc5322Date(d: Date = new Date()): string {
  return (
    `${DAYS[d.getUTCDay()]}, ${d.getUTCDate()} ${MONTHS[d.getUTCMonth()]} ${d.getUTCFullYear()} ` +
    `${pad(d.getUTCHours())}:${pad(d.getUTCMinutes())}:${pad(d.getUTCSeconds())} +0000`
  );
}

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
