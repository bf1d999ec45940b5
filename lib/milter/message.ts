/**
 * The message as the chain holds it: the header fields (original bytes kept for those no
 * milter touched), the body (a range of the spool, or a replacement), and the envelope;
 * plus the end-of-message edits as data (one variant per SMFIR_* modification action) and
 * the function that applies them in order.
 *
 * Header edits follow Postfix's cleanup_milter.c: insert positions and change/delete
 * indexes are 1-based, an index past the last header of that name adds it (change) or does
 * nothing (delete). A header value is re-folded only when a line would exceed RFC 5322's
 * 998 octets; continuation lines always start with white space, so no value can inject a
 * header or end the header block.
 */
import { once } from 'node:events';
import { Readable, Transform } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import libmime from 'libmime';
import { DovetailError, ErrorCodes } from '../errors.js';
import type { EnvelopeAddress, HeaderField } from './types.js';
import type { MessageSource } from '../message/source.js';
import { Spool, type SpoolOptions } from '../message/spool.js';

/** A header field with the bytes it is written as (including the final CRLF). */
export interface StoredHeader extends HeaderField {
  readonly raw: Buffer;
}

/** A body: a byte range that can be read many times. */
export interface BodySource {
  readonly size: number;
  stream(highWaterMark?: number): Readable;
}

/** The end-of-message edits, one variant per SMFIR_* action. */
export type MessageEdit =
  | { readonly op: 'addHeader'; readonly name: string; readonly value: string } // SMFIR_ADDHEADER
  | { readonly op: 'insertHeader'; readonly position: number; readonly name: string; readonly value: string } // SMFIR_INSHEADER
  | { readonly op: 'changeHeader'; readonly name: string; readonly index: number; readonly value: string } // SMFIR_CHGHEADER
  | { readonly op: 'changeSender'; readonly address: string; readonly args: Readonly<Record<string, string | true>> } // SMFIR_CHGFROM
  | { readonly op: 'addRecipient'; readonly address: string; readonly args: Readonly<Record<string, string | true>> } // SMFIR_ADDRCPT(_PAR)
  | { readonly op: 'removeRecipient'; readonly address: string } // SMFIR_DELRCPT
  | { readonly op: 'replaceBody'; readonly data: Buffer | Readable } // SMFIR_REPLBODY
  | { readonly op: 'quarantine'; readonly reason: string }; // SMFIR_QUARANTINE

const HEADER_NAME = /^[\x21-\x39\x3b-\x7e]+$/;

/** Throws unless `name` is a valid header field name (RFC 5322 ftext). */
export function checkHeaderName(name: string): void {
  if (typeof name !== 'string' || !HEADER_NAME.test(name)) {
    throw new DovetailError(ErrorCodes.INVALID_EDIT, `invalid header name ${JSON.stringify(name)}`);
  }
}

function checkIndex(what: string, n: number): void {
  if (!Number.isInteger(n) || n < 1 || n > 0x7fffffff) {
    throw new DovetailError(ErrorCodes.INVALID_EDIT, `${what} must be an integer from 1, not ${String(n)}`);
  }
}

/**
 * Normalises an envelope address given by a milter: strips one pair of angle brackets,
 * refuses control characters, spaces outside quotes, and brackets inside.
 */
export function checkAddress(address: string, allowEmpty: boolean): string {
  if (typeof address !== 'string') throw new DovetailError(ErrorCodes.INVALID_EDIT, 'an address must be a string');
  let a = address.trim();
  if (a.startsWith('<') && a.endsWith('>')) a = a.slice(1, -1);
  // eslint-disable-next-line no-control-regex
  if (/[\x00-\x1f\x7f<>]/.test(a) || /\s/.test(a.replace(/"[^"]*"/g, '')) || (!a && !allowEmpty)) {
    throw new DovetailError(ErrorCodes.INVALID_EDIT, `invalid envelope address ${JSON.stringify(address)}`);
  }
  return a;
}

/** Parses ESMTP arguments (`'SIZE=100 BODY=8BITMIME NOTIFY=NEVER'`) into a record with upper-case keys. */
export function parseEsmtpArgs(args: string | undefined): Record<string, string | true> {
  const out: Record<string, string | true> = {};
  if (!args) return out;
  for (const part of args.trim().split(/\s+/)) {
    if (!part) continue;
    const eq = part.indexOf('=');
    const key = (eq < 0 ? part : part.slice(0, eq)).toUpperCase();
    // eslint-disable-next-line no-control-regex
    if (!/^[A-Z0-9][A-Z0-9-]*$/.test(key) || /[\x00-\x20\x7f]/.test(part)) {
      throw new DovetailError(ErrorCodes.INVALID_EDIT, `invalid ESMTP argument ${JSON.stringify(part)}`);
    }
    out[key] = eq < 0 ? true : part.slice(eq + 1);
  }
  return out;
}

/** Formats `name: value` as header bytes, folding safely. */
export function formatHeader(name: string, value: string): StoredHeader {
  checkHeaderName(name);
  if (typeof value !== 'string') throw new DovetailError(ErrorCodes.INVALID_EDIT, 'a header value must be a string');
  // Every line after the first must be a continuation: starts with white space, is not empty.
  const lines = value.split(/\r\n|\r|\n/);
  const parts: string[] = [];
  for (let i = 0; i < lines.length; i++) {
    const line = lines[i] ?? '';
    if (i === 0) {
      parts.push(line.replace(/^[ \t]+/, ''));
    } else if (line.trim()) {
      parts.push(/^[ \t]/.test(line) ? line : '\t' + line);
    }
  }
  let text = `${name}: ${parts.join('\r\n')}`;
  if (text.split('\r\n').some((l) => Buffer.byteLength(l) > 998)) {
    text = libmime.foldLines(text.replace(/\r\n(?=[ \t])/g, ''), 78, false).replace(/\r?\n/g, '\r\n');
  }
  const stored = text.slice(name.length + 1).replace(/^[ \t]+/, '');
  return { name, value: stored, raw: Buffer.from(text + '\r\n', 'utf8') };
}

/** A body held in a spool, from `start` to the spool's end. */
export function spoolBody(spool: Spool, start: number, end: number = spool.size): BodySource {
  return {
    size: Math.max(0, end - start),
    stream: (hwm?: number) => spool.createReadStream(start, end, hwm),
  };
}

/** The message in the chain: headers, body, envelope, and what milters decided about it. */
export class MessageState {
  headers: StoredHeader[];
  body: BodySource;
  sender: EnvelopeAddress;
  recipients: EnvelopeAddress[];
  /** Set by a quarantine verdict or edit: the message goes to the quarantine transport. */
  quarantine: string | undefined;
  /** Spools made for replacement bodies, disposed with the message. */
  private readonly owned: Spool[] = [];

  constructor(init: { headers: StoredHeader[]; body: BodySource; sender: EnvelopeAddress; recipients: EnvelopeAddress[] }) {
    this.headers = init.headers;
    this.body = init.body;
    this.sender = init.sender;
    this.recipients = init.recipients;
    this.quarantine = undefined;
  }

  /** Bytes of the header block, the empty line, and the body. */
  get size(): number {
    let n = 2 + this.body.size;
    for (const h of this.headers) n += h.raw.length;
    return n;
  }

  /** The whole message as bytes: headers, CRLF, body. */
  stream(): Readable {
    const headers = Buffer.concat([...this.headers.map((h) => h.raw), CRLF]);
    const body = this.body;
    return Readable.from(
      (async function* () {
        yield headers;
        yield* body.stream();
      })(),
      { objectMode: false },
    );
  }

  /** A MessageSource for transports, fixed at this point (later edits do not change it). */
  source(): MessageSource {
    const snapshot = new MessageState({ headers: [...this.headers], body: this.body, sender: this.sender, recipients: this.recipients });
    return { size: snapshot.size, stream: () => snapshot.stream() };
  }

  /** Applies one milter's edits, in the order it made them; `origin` names that milter on the headers it writes. */
  async apply(edits: readonly MessageEdit[], spoolOptions: SpoolOptions, origin?: string, maxMessageBytes?: number): Promise<void> {
    const bodies: (Buffer | Readable)[] = [];
    const header = (name: string, value: string): StoredHeader => {
      const h = formatHeader(name, value);
      return origin === undefined ? h : { ...h, origin };
    };
    for (const e of edits) {
      switch (e.op) {
        case 'addHeader':
          this.headers.push(header(e.name, e.value));
          break;
        case 'insertHeader': {
          const at = Math.min(e.position - 1, this.headers.length);
          this.headers.splice(at, 0, header(e.name, e.value));
          break;
        }
        case 'changeHeader': {
          const lower = e.name.toLowerCase();
          let seen = 0;
          const at = this.headers.findIndex((h) => h.name.toLowerCase() === lower && ++seen === e.index);
          if (at >= 0) {
            if (e.value === '') this.headers.splice(at, 1);
            else this.headers[at] = header(this.headers[at]?.name ?? e.name, e.value);
          } else if (e.value !== '') {
            this.headers.push(header(e.name, e.value));
          }
          break;
        }
        case 'changeSender':
          this.sender = { address: e.address, args: e.args };
          break;
        case 'addRecipient': {
          const lower = e.address.toLowerCase();
          if (!this.recipients.some((r) => r.address.toLowerCase() === lower)) {
            this.recipients = [...this.recipients, { address: e.address, args: e.args }];
          }
          break;
        }
        case 'removeRecipient': {
          const lower = e.address.toLowerCase();
          this.recipients = this.recipients.filter((r) => r.address.toLowerCase() !== lower);
          break;
        }
        case 'replaceBody':
          bodies.push(e.data);
          break;
        case 'quarantine':
          this.quarantine = e.reason;
          break;
      }
    }
    if (bodies.length > 0) {
      const spool = new Spool(spoolOptions);
      this.owned.push(spool);
      for (const part of bodies) {
        const source = Buffer.isBuffer(part) ? Readable.from([part]) : part;
        await pipeline(source, crlfNormalizer(), async (chunks: AsyncIterable<Buffer>) => {
          for await (const chunk of chunks) {
            // A replacement body stops at the size limit: it is never spooled past it.
            if (maxMessageBytes !== undefined && spool.size + chunk.length > maxMessageBytes) {
              throw new DovetailError(ErrorCodes.INVALID_EDIT, `the replacement body would make the message larger than ${maxMessageBytes} bytes`);
            }
            if (!spool.write(chunk)) await once(spool, 'drain');
          }
        });
      }
      await new Promise<void>((resolve, reject) => {
        spool.once('error', reject);
        spool.end(() => resolve());
      });
      this.body = spoolBody(spool, 0);
    }
  }

  /** Removes the temp files of replacement bodies. */
  async dispose(): Promise<void> {
    await Promise.all(this.owned.map((s) => s.dispose()));
  }
}

const CRLF = Buffer.from('\r\n');

/** Rewrites LF, CR and CRLF line ends to CRLF (replacement bodies come from milters in any form). */
export function crlfNormalizer(): Transform {
  let carry = '';
  return new Transform({
    transform(chunk: Buffer | string, _enc, done) {
      let s = carry + (typeof chunk === 'string' ? chunk : chunk.toString('latin1'));
      carry = '';
      if (s.endsWith('\r')) {
        carry = '\r';
        s = s.slice(0, -1);
      }
      done(null, Buffer.from(s.replace(/\r\n|\r|\n/g, '\r\n'), 'latin1'));
    },
    flush(done) {
      done(null, carry ? CRLF : undefined);
    },
  });
}

/** What one milter's end-of-message edits may do (see ChainOptions.editLimits). */
export interface EditLimits {
  /** The header block (all fields) may not grow past this many bytes (the gateway's maxHeaderBytes). */
  readonly maxHeaderBytes?: number;
  /** The message may not grow past this many bytes (the gateway's size limit). */
  readonly maxMessageBytes?: number;
  /** Recipients the envelope may have after the edits (the gateway's maxRecipients). */
  readonly maxRecipients?: number;
  /** Edits one milter may make at one end of message. Default: no limit (the gateway sets 1000). */
  readonly maxEdits?: number;
}

/**
 * Records the edits one milter makes in its eom handler; validates each when it is made,
 * so a malformed edit, or one past the limits, throws in the milter (and its default
 * action applies) before anything is held for it: a filter that sends 10,000 header edits
 * of 60 KB costs at most the header limit, not 600 MB.
 */
export class EditRecorder {
  readonly edits: MessageEdit[] = [];
  private readonly maxEdits: number;
  /** Header bytes the message would have with the edits so far (counted up only: deletions free nothing here). */
  private headerBytes: number;
  private recipients: number;

  constructor(
    private readonly limits: EditLimits = {},
    state?: { readonly headers: readonly StoredHeader[]; readonly recipients: readonly EnvelopeAddress[] },
  ) {
    this.maxEdits = limits.maxEdits ?? Infinity;
    this.headerBytes = 0;
    for (const h of state?.headers ?? []) this.headerBytes += h.raw.length;
    this.recipients = state?.recipients.length ?? 0;
  }

  private count(): void {
    if (this.edits.length >= this.maxEdits) throw new DovetailError(ErrorCodes.INVALID_EDIT, `more than ${this.maxEdits} edits at one end of message`);
  }

  private grow(h: StoredHeader): void {
    this.headerBytes += h.raw.length;
    const max = this.limits.maxHeaderBytes;
    if (max !== undefined && this.headerBytes > max) throw new DovetailError(ErrorCodes.INVALID_EDIT, `header edits would make the header block larger than ${max} bytes`);
  }

  addHeader(name: string, value: string): void {
    this.count();
    this.grow(formatHeader(name, value));
    this.edits.push({ op: 'addHeader', name, value });
  }
  insertHeader(position: number, name: string, value: string): void {
    this.count();
    checkIndex('insertHeader position', position);
    this.grow(formatHeader(name, value));
    this.edits.push({ op: 'insertHeader', position, name, value });
  }
  changeHeader(name: string, index: number, value: string): void {
    this.count();
    checkIndex('changeHeader index', index);
    if (value === '') checkHeaderName(name);
    else this.grow(formatHeader(name, value));
    this.edits.push({ op: 'changeHeader', name, index, value });
  }
  deleteHeader(name: string, index: number): void {
    this.changeHeader(name, index, '');
  }
  replaceBody(body: string | Buffer | Readable): void {
    this.count();
    let data: Buffer | Readable;
    if (typeof body === 'string') data = Buffer.from(body, 'utf8');
    else if (Buffer.isBuffer(body) || body instanceof Readable) data = body;
    else throw new DovetailError(ErrorCodes.INVALID_EDIT, 'replaceBody takes a string, Buffer or Readable');
    this.edits.push({ op: 'replaceBody', data });
  }
  changeSender(address: string, args?: string): void {
    this.count();
    this.edits.push({ op: 'changeSender', address: checkAddress(address, true), args: parseEsmtpArgs(args) });
  }
  addRecipient(address: string, args?: string): void {
    this.count();
    const max = this.limits.maxRecipients;
    if (max !== undefined && ++this.recipients > max) throw new DovetailError(ErrorCodes.INVALID_EDIT, `recipient edits would give the message more than ${max} recipients`);
    this.edits.push({ op: 'addRecipient', address: checkAddress(address, false), args: parseEsmtpArgs(args) });
  }
  removeRecipient(address: string): void {
    this.count();
    this.recipients--;
    this.edits.push({ op: 'removeRecipient', address: checkAddress(address, false) });
  }
  quarantine(reason: string): void {
    const r = String(reason).replace(/[\r\n]+/g, ' ').trim();
    if (!r) throw new DovetailError(ErrorCodes.INVALID_EDIT, 'quarantine needs a reason');
    this.edits.push({ op: 'quarantine', reason: r });
  }
}
