/**
 * Queue ids and RFC 5322 dates: the message's identity and time stamps, used by the gateway
 * (Received, macro `i`), the queue (entry names) and DSNs (Date, Message-ID).
 */
import { randomBytes } from 'node:crypto';

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
