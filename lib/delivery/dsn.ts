/**
 * Delivery status notifications: builds the message the deferred queue sends to a sender
 * when recipients failed, are delayed, or (NOTIFY=SUCCESS) were delivered.
 *
 * Implements RFC 3464 (the message/delivery-status format) inside RFC 6522's
 * multipart/report, reading the DSN parameters of RFC 3461 from the envelope's ESMTP args:
 * ENVID (Original-Envelope-Id), RET (HDRS: text/rfc822-headers, FULL: message/rfc822),
 * NOTIFY (which events are reported) and ORCPT (Original-Recipient), xtext-decoded.
 * The message is marked `Auto-Submitted: auto-replied` (RFC 3834) and is sent with the null
 * reverse-path by the queue, so it is never bounced in turn.
 *
 * Why a small hand-written multipart and not nodemailer's mail-composer: nodemailer is a
 * development dependency only, and a DSN is a fixed three-part structure whose parts must
 * stay byte-exact (the returned message or header block is embedded as it is, 8bit, never
 * re-encoded), which mail-composer would re-encode. libmime folds the long header lines.
 *
 * It deliberately does not: localise the text, produce message/global-delivery-status
 * (RFC 6533) for internationalised addresses (an address outside ASCII is reported with the
 * `utf-8` address type inside message/delivery-status), or truncate a returned message (a
 * message larger than the size limit is returned as its headers only, as Postfix does).
 */
import { randomBytes } from 'node:crypto';
import libmime from 'libmime';
import Headers from 'mailsplit/lib/headers.js';
import type { EnvelopeAddress } from '../milter/types.js';
import type { SmtpReply } from '../milter/verdict.js';
import { rfc5322Date } from '../message/ids.js';

/** What a DSN reports for one recipient (RFC 3464 2.3.3). */
export type DsnAction = 'failed' | 'delayed' | 'delivered';

/** RFC 3461 NOTIFY: which events the sender wants reported for a recipient. */
export interface Notify {
  readonly success: boolean;
  readonly failure: boolean;
  readonly delay: boolean;
}

/** One recipient's report. */
export interface DsnRecipient {
  /** The recipient's envelope address (Final-Recipient). */
  readonly address: string;
  /** The recipient's ESMTP args (ORCPT is read from them). */
  readonly args: Readonly<Record<string, string | true>>;
  readonly action: DsnAction;
  /** The mailstore's last reply: Status and Diagnostic-Code. */
  readonly reply: SmtpReply;
  /** ms since the epoch. */
  readonly lastAttempt?: number;
  /** For `delayed`: when the queue gives up (ms since the epoch). */
  readonly willRetryUntil?: number;
  /** True when the recipient failed because the message was too long in the queue. */
  readonly expired?: boolean;
}

/** Everything a DSN is made of. */
export interface DsnInput {
  /** Our host name: Reporting-MTA, From, Message-ID. */
  readonly reportingMta: string;
  /** The original message's queue id (X-Dovetail-Queue-ID in the report). */
  readonly queueId: string;
  /** The original envelope sender: the DSN's To (and its args carry ENVID and RET). */
  readonly sender: EnvelopeAddress;
  /** When the original message arrived (ms since the epoch). */
  readonly arrival: number;
  /** When the DSN is made (ms since the epoch). */
  readonly date: number;
  readonly recipients: readonly DsnRecipient[];
  /** The original header block (ending with its blank line or not). */
  readonly headers: Buffer;
  /** The whole original message, when it is to be returned (RET=FULL and within the size limit). */
  readonly full?: Buffer;
}

/** Decodes RFC 3461 xtext (`+XX` hex escapes). Malformed escapes are kept as they are. */
export function xtextDecode(value: string): string {
  const bytes: number[] = [];
  for (let i = 0; i < value.length; i++) {
    const c = value.charCodeAt(i);
    if (c === 0x2b && /^[0-9A-Fa-f]{2}$/.test(value.slice(i + 1, i + 3))) {
      bytes.push(parseInt(value.slice(i + 1, i + 3), 16));
      i += 2;
    } else {
      for (const b of Buffer.from(value[i] ?? '', 'utf8')) bytes.push(b);
    }
  }
  return Buffer.from(bytes).toString('utf8');
}

/**
 * The NOTIFY parameter of a recipient (RFC 3461 4.1). Absent: failure and delay, as
 * Postfix does (the RFC leaves the default to the MTA). NEVER: nothing.
 */
export function notifyOf(args: Readonly<Record<string, string | true>>): Notify {
  const raw = args['NOTIFY'];
  if (typeof raw !== 'string' || raw.trim() === '') return { success: false, failure: true, delay: true };
  const words = new Set(raw.toUpperCase().split(',').map((w) => w.trim()));
  if (words.has('NEVER')) return { success: false, failure: false, delay: false };
  return { success: words.has('SUCCESS'), failure: words.has('FAILURE'), delay: words.has('DELAY') };
}

/** RET of the sender (RFC 3461 4.3): what the sender wants back, or undefined (our choice). */
export function retOf(args: Readonly<Record<string, string | true>>): 'FULL' | 'HDRS' | undefined {
  const raw = args['RET'];
  if (typeof raw !== 'string') return undefined;
  const v = raw.toUpperCase();
  return v === 'FULL' || v === 'HDRS' ? v : undefined;
}

/** The header block of a message: everything up to and including the first empty line (CRLF CRLF). */
export function headerBlock(message: Buffer): Buffer {
  if (message.subarray(0, 2).equals(CRLF)) return Buffer.alloc(0);
  const at = message.indexOf('\r\n\r\n');
  return at < 0 ? message : message.subarray(0, at + 4);
}

const CRLF = Buffer.from('\r\n');

// eslint-disable-next-line no-control-regex
const CONTROL = /[\x00-\x1f\x7f]/g;

/** A value that may stand in a header or a delivery-status field: no CR, LF or other controls. */
function clean(value: string): string {
  return value.replace(CONTROL, ' ');
}

/** `rfc822; addr` or, for an address outside ASCII, `utf-8; addr` (RFC 6533 3). */
function typedAddress(address: string): string {
  // eslint-disable-next-line no-control-regex
  return /^[\x20-\x7e]*$/.test(address) ? `rfc822; ${address}` : `utf-8; ${clean(address)}`;
}

/** ORCPT=type;xtext → `type; decoded` (RFC 3461 4.2), or undefined. */
function originalRecipient(args: Readonly<Record<string, string | true>>): string | undefined {
  const raw = args['ORCPT'];
  if (typeof raw !== 'string') return undefined;
  const semi = raw.indexOf(';');
  if (semi <= 0) return undefined;
  const type = raw.slice(0, semi).trim();
  if (!/^[A-Za-z0-9-]+$/.test(type)) return undefined;
  return `${type}; ${clean(xtextDecode(raw.slice(semi + 1)))}`;
}

/** One header or delivery-status field, folded at white space to stay well under 998 octets. */
function field(name: string, value: string): string {
  return libmime.foldLines(`${name}: ${clean(value)}`, 76).replace(/\r?\n/g, '\r\n').trimEnd() + '\r\n';
}

/** The Diagnostic-Code of a reply: `smtp; 550 5.1.1 text …` (every reply line, joined). */
export function diagnosticCode(reply: SmtpReply): string {
  const text = reply.lines.filter((l) => l !== '').join(' ');
  return `smtp; ${reply.code} ${reply.enhanced}${text ? ' ' + text : ''}`;
}

function subjectFor(actions: ReadonlySet<DsnAction>): string {
  if (actions.has('failed')) return 'Undelivered Mail Returned to Sender';
  if (actions.has('delayed')) return 'Delayed Mail (still being retried)';
  return 'Successful Mail Delivery Report';
}

function humanText(input: DsnInput, actions: ReadonlySet<DsnAction>): string {
  const lines: string[] = [`This is the mail system at host ${input.reportingMta}.`, ''];
  const by = (a: DsnAction): DsnRecipient[] => input.recipients.filter((r) => r.action === a);
  // One reply line per text line (a reply line is at most 496 bytes), indented under the address.
  const describe = (r: DsnRecipient): string[] => [
    `<${r.address}>: ${r.expired ? 'delivery time expired; the last reply was:' : 'the mail system said:'}`,
    ...r.reply.lines.map((l, i) => `    ${i === 0 ? `${r.reply.code} ${r.reply.enhanced} ` : ''}${l}`.trimEnd()),
  ];
  if (actions.has('failed')) {
    lines.push(
      "I'm sorry to have to inform you that your message could not be delivered",
      'to one or more recipients. Details are attached below.',
      '',
      ...by('failed').flatMap(describe),
      '',
    );
  }
  if (actions.has('delayed')) {
    const until = by('delayed')[0]?.willRetryUntil;
    lines.push(
      'Your message could not be delivered to one or more recipients yet.',
      `The mail system will keep trying${until !== undefined ? ' until ' + rfc5322Date(new Date(until)) : ''};`,
      'you do not need to send it again.',
      '',
      ...by('delayed').flatMap(describe),
      '',
    );
  }
  if (actions.has('delivered')) {
    lines.push('Your message was delivered to the following recipients, as you asked.', '', ...by('delivered').flatMap(describe), '');
  }
  lines.push(`The message's queue id here was ${input.queueId}.`);
  return lines.map((l) => clean(l)).join('\r\n') + '\r\n';
}

function deliveryStatus(input: DsnInput): string {
  let out = field('Reporting-MTA', `dns; ${input.reportingMta}`);
  out += field('X-Dovetail-Queue-ID', input.queueId);
  const envid = input.sender.args['ENVID'];
  if (typeof envid === 'string') out += field('Original-Envelope-Id', xtextDecode(envid));
  out += field('Arrival-Date', rfc5322Date(new Date(input.arrival)));
  for (const r of input.recipients) {
    out += '\r\n';
    const orcpt = originalRecipient(r.args);
    if (orcpt !== undefined) out += field('Original-Recipient', orcpt);
    out += field('Final-Recipient', typedAddress(r.address));
    out += field('Action', r.action);
    out += field('Status', r.reply.enhanced);
    out += field('Diagnostic-Code', diagnosticCode(r.reply));
    if (r.lastAttempt !== undefined) out += field('Last-Attempt-Date', rfc5322Date(new Date(r.lastAttempt)));
    if (r.action === 'delayed' && r.willRetryUntil !== undefined) out += field('Will-Retry-Until', rfc5322Date(new Date(r.willRetryUntil)));
  }
  return out;
}

// eslint-disable-next-line no-control-regex
const has8bit = (b: Buffer): boolean => b.some((x) => x > 0x7e || (x < 0x20 && x !== 0x0d && x !== 0x0a && x !== 0x09));

/**
 * Builds the DSN: a multipart/report; report-type=delivery-status message with a text/plain
 * part for people, a message/delivery-status part, and the original as text/rfc822-headers
 * or, when `full` is given, message/rfc822. CRLF line endings throughout.
 */
export function buildDsn(input: DsnInput): Buffer {
  const actions = new Set(input.recipients.map((r) => r.action));
  // At most 70 characters (RFC 2046 5.1.1); random, so it cannot occur in the returned message.
  const boundary = `=_${input.queueId.slice(0, 24)}.${randomBytes(12).toString('hex')}`;
  const messageId = `<${input.date}.${randomBytes(6).toString('hex')}.${input.queueId}@${clean(input.reportingMta)}>`;
  const original = new Headers(headerBlock(input.headers));
  const originalId = original.getFirst('message-id').replace(CONTROL, '');
  const to = input.sender.address;

  let head = '';
  head += field('From', `MAILER-DAEMON@${input.reportingMta} (Mail Delivery System)`);
  head += field('To', `<${to}>`);
  head += field('Subject', subjectFor(actions));
  head += field('Date', rfc5322Date(new Date(input.date)));
  head += field('Message-ID', messageId);
  if (/^<[^<>\s]+>$/.test(originalId)) {
    head += field('In-Reply-To', originalId);
    head += field('References', originalId);
  }
  head += field('Auto-Submitted', 'auto-replied');
  head += 'MIME-Version: 1.0\r\n';
  head += field('Content-Type', `multipart/report; report-type=delivery-status; boundary="${boundary}"`);
  head += field('Content-Description', 'Delivery report');
  head += '\r\n';

  const text = humanText(input, actions);
  const status = deliveryStatus(input);
  const returned = input.full ?? headerBlock(input.headers);
  const returnedType = input.full ? 'message/rfc822' : 'text/rfc822-headers';
  const returnedDescription = input.full ? 'Undelivered Message' : 'Undelivered Message Headers';
  // Message parts may only be 7bit, 8bit or binary (RFC 2046 5.2.1); never re-encoded here.
  const returnedCte = has8bit(returned) ? '8bit' : '7bit';

  const parts: Buffer[] = [
    Buffer.from(head, 'utf8'),
    Buffer.from('This is a MIME-encapsulated message.\r\n\r\n', 'utf8'),
    Buffer.from(
      `--${boundary}\r\n` +
        field('Content-Description', 'Notification') +
        'Content-Type: text/plain; charset=utf-8\r\n' +
        `Content-Transfer-Encoding: ${/^[\x00-\x7e]*$/.test(text) ? '7bit' : '8bit'}\r\n\r\n` +
        text +
        `\r\n--${boundary}\r\n` +
        field('Content-Description', 'Delivery report') +
        'Content-Type: message/delivery-status\r\n\r\n' +
        status +
        `\r\n--${boundary}\r\n` +
        field('Content-Description', returnedDescription) +
        `Content-Type: ${returnedType}\r\n` +
        `Content-Transfer-Encoding: ${returnedCte}\r\n\r\n`,
      'utf8',
    ),
    returned,
    Buffer.from(`${returned.length === 0 || returned.subarray(-2).equals(CRLF) ? '' : '\r\n'}\r\n--${boundary}--\r\n`, 'utf8'),
  ];
  return Buffer.concat(parts);
}
