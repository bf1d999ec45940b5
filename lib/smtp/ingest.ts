/**
 * DATA ingest: streams the message smtp-server hands us (dot-unstuffed, ending with the CRLF
 * of its last line) into a bounded {@link Spool}, while enforcing the size limit, refusing
 * or normalising bare CR and LF (RFC 5321 §2.3.8, the SMTP-smuggling vector), and finding
 * and parsing the top-level header block (RFC 5322 §2.2, §3.5) with mailsplit's Headers.
 *
 * It always reads the data to its end, so the SMTP dialogue can continue, and only reports
 * what it found (`problem`): choosing the SMTP reply, the Received header and MIME parsing of
 * the body are not done here. Obsolete syntax such as WSP before the colon of a field name
 * (RFC 5322 §4.5) is not accepted as a header field: such a line starts the body.
 */
import type { Readable } from 'node:stream';
import Headers from 'mailsplit/lib/headers.js';
import { DovetailError, ErrorCodes } from '../errors.js';
import type { HeaderField } from '../milter/types.js';
import { drained, Spool, type SpoolOptions } from '../message/spool.js';

/** Options of {@link ingest}. */
export interface IngestOptions {
  /** The size limit in bytes: bytes beyond it are counted but not kept. `Infinity` for none. */
  maxBytes: number;
  /** The header block (with its empty line) is kept in memory up to this many bytes. */
  maxHeaderBytes: number;
  /** What a bare CR or LF does: make the message a problem, or be rewritten to CRLF. */
  bareLineEndings: 'reject' | 'normalize';
  /** The longest line (without its CRLF) a message may hold, in bytes. Default: no limit. */
  maxLineBytes?: number;
  /** Where and when the message moves to disk. */
  spool?: SpoolOptions;
}

/** A header field of the received message. */
export interface ParsedHeader extends HeaderField {
  /** The exact bytes of the field as received, folding included, with its final CRLF. */
  readonly raw: Buffer;
}

/**
 * Why a message cannot be accepted as received. Once one is found nothing more is kept (the
 * data is still read to its end); the first one in the data wins.
 * - `too-large`: more than `maxBytes` bytes arrived.
 * - `bare-line-ending`: a CR not followed by LF, or a LF not preceded by CR (`reject` mode).
 * - `header-too-large`: the header block does not end within `maxHeaderBytes`.
 * - `line-too-long`: a line (without its CRLF) longer than `maxLineBytes`.
 */
export type IngestProblem = 'too-large' | 'bare-line-ending' | 'header-too-large' | 'line-too-long';

/** What {@link ingest} found. */
export interface IngestResult {
  /**
   * The message as received (line endings normalised in `normalize` mode), at most
   * `maxBytes` bytes. With a problem: the bytes before the point where it was found. The
   * caller owns it and must `dispose()` it.
   */
  spool: Spool;
  /** Bytes received in all, also those beyond the limit or after a problem. */
  received: number;
  /**
   * The top-level header block, in order. When a problem stopped keeping bytes inside the
   * header block, the fields whose lines arrived before that point (the last one may then
   * lack continuation lines).
   */
  headers: ParsedHeader[];
  /**
   * Offset in the spool where the body starts: after the empty line, or at the first line
   * that is not a header field; `spool.size` for a message that is all header (or when a
   * problem stopped keeping bytes inside the header block).
   */
  bodyOffset: number;
  /** True when an empty line separated the header block from the body. */
  separator: boolean;
  problem: IngestProblem | undefined;
}

const CR = 0x0d;
const LF = 0x0a;
const SP = 0x20;
const HTAB = 0x09;
const COLON = 0x3a;
const EMPTY = Buffer.alloc(0);
const CR_ONLY = Buffer.from('\r', 'latin1');
const LF_ONLY = Buffer.from('\n', 'latin1');
const CRLF = Buffer.from('\r\n', 'latin1');

interface Scanned {
  /** The bytes to keep: in `reject` mode those before a bare line ending. */
  readonly out: Buffer;
  /** A bare line ending was refused (`reject` mode): the scan stopped there. */
  readonly refused: boolean;
}

function joined(parts: Buffer[]): Buffer {
  return parts.length === 1 ? parts[0]! : Buffer.concat(parts);
}

/**
 * Finds bare CR and LF with native Buffer.indexOf. A CR at the end of a chunk is held back
 * until the next chunk shows whether a LF follows it.
 */
class LineEndings {
  readonly #normalize: boolean;
  #carryCR = false;

  constructor(normalize: boolean) {
    this.#normalize = normalize;
  }

  push(c: Buffer): Scanned {
    const parts: Buffer[] = [];
    let seg = 0; // start of the part of c not yet copied to parts
    let pos = 0; // where the scan goes on
    if (this.#carryCR) {
      this.#carryCR = false;
      if (c[0] === LF) {
        parts.push(CR_ONLY);
        pos = 1;
      } else if (this.#normalize) {
        parts.push(CRLF);
      } else {
        return { out: EMPTY, refused: true };
      }
    }
    let cr = c.indexOf(CR, pos);
    let lf = c.indexOf(LF, pos);
    for (;;) {
      // Each search is redone only once the scan passed its hit: every byte is scanned at
      // most once per search, even for a chunk of many bare LF.
      if (cr !== -1 && cr < pos) cr = c.indexOf(CR, pos);
      if (lf !== -1 && lf < pos) lf = c.indexOf(LF, pos);
      if (cr === -1 && lf === -1) break;
      if (cr !== -1 && (lf === -1 || cr < lf)) {
        if (lf === cr + 1) {
          pos = cr + 2;
          continue;
        }
        if (cr + 1 === c.length) {
          parts.push(c.subarray(seg, cr));
          this.#carryCR = true;
          return { out: joined(parts), refused: false };
        }
        if (!this.#normalize) {
          parts.push(c.subarray(seg, cr));
          return { out: joined(parts), refused: true };
        }
        parts.push(c.subarray(seg, cr + 1), LF_ONLY);
        seg = pos = cr + 1;
      } else {
        // A LF with a CR right before it was taken with that CR above: this one is bare.
        if (!this.#normalize) {
          parts.push(c.subarray(seg, lf));
          return { out: joined(parts), refused: true };
        }
        parts.push(c.subarray(seg, lf), CRLF);
        seg = pos = lf + 1;
      }
    }
    parts.push(seg === 0 ? c : c.subarray(seg));
    return { out: joined(parts), refused: false };
  }

  /** The end of the data: a CR held back is bare. */
  end(): Scanned {
    if (!this.#carryCR) return { out: EMPTY, refused: false };
    this.#carryCR = false;
    return this.#normalize ? { out: CRLF, refused: false } : { out: EMPTY, refused: true };
  }
}

const LINE_START = 0; // no byte of the current line seen yet
const LINE_NAME = 1; // only field-name characters so far
const LINE_REST = 2; // a header field or continuation line: runs to its LF

/** A byte allowed in a field name: printable US-ASCII except ':' (RFC 5322 §2.2). */
function isNameByte(b: number): boolean {
  return b > 0x20 && b < 0x7f && b !== COLON;
}

/**
 * Finds the end of the header block in the kept bytes (all line endings CRLF by now),
 * keeping at most `max` bytes of it in memory. Deterministic to the byte, so the result
 * does not depend on how the data was chunked.
 */
class HeaderBlock {
  readonly #max: number;
  #fed = 0;
  #lineStart = 0;
  #line = LINE_START;
  readonly #captured: Buffer[] = [];
  #capturedBytes = 0;
  #ended = false;
  #stopped = false;
  #fieldsEnd = 0;
  /** Valid once ended. */
  bodyOffset = 0;
  separator = false;

  constructor(max: number) {
    this.#max = max;
  }

  get active(): boolean {
    return !this.#ended && !this.#stopped;
  }

  get ended(): boolean {
    return this.#ended;
  }

  /**
   * Takes the next kept bytes. Returns the index in `p` at which the header block became
   * certain to exceed the limit (nothing from there on may be kept), or -1.
   */
  feed(p: Buffer): number {
    const base = this.#fed;
    const max = this.#max;
    if (this.#capturedBytes < max && p.length > 0) {
      const n = Math.min(p.length, max - this.#capturedBytes);
      this.#captured.push(p.subarray(0, n));
      this.#capturedBytes += n;
    }
    const n = p.length;
    let i = 0;
    while (i < n) {
      if (this.#line === LINE_START) {
        const b = p[i]!;
        const o = base + i;
        if (b === CR) {
          // An empty line (a CR is always followed by LF here): the end, with separator.
          if (o + 2 > max) return this.#fail(base, i);
          this.#end(o, o + 2, true);
          break;
        }
        if ((b === SP || b === HTAB) && o > 0) {
          this.#line = LINE_REST; // a continuation line
        } else if (isNameByte(b)) {
          this.#line = LINE_NAME;
          i++;
        } else {
          // Not a field, nor a continuation (a first line starting with WSP continues nothing).
          this.#end(o, o, false);
          break;
        }
      } else if (this.#line === LINE_NAME) {
        let j = i;
        while (j < n && isNameByte(p[j]!)) j++;
        if (j === n) {
          i = n;
        } else if (p[j] === COLON) {
          this.#line = LINE_REST;
          i = j; // the colon is the first byte known to belong to a field
        } else {
          this.#end(this.#lineStart, this.#lineStart, false);
          break;
        }
      } else {
        const lf = p.indexOf(LF, i);
        const lineEnd = lf === -1 ? n : lf + 1;
        // Any byte of a field at offset >= max puts the end of the block beyond max.
        const limit = max - base;
        if (limit < lineEnd) return this.#fail(base, Math.max(i, limit));
        i = lineEnd;
        if (lf !== -1) {
          this.#line = LINE_START;
          this.#lineStart = base + i;
        }
      }
    }
    this.#fed = base + n;
    return -1;
  }

  /** The data ended with the block still open: all of it is header (or ends at a name-only line). */
  finish(size: number): void {
    if (!this.active) return;
    if (this.#line === LINE_NAME) this.#end(this.#lineStart, this.#lineStart, false);
    else this.#end(size, size, false);
  }

  #end(fieldsEnd: number, bodyOffset: number, separator: boolean): void {
    this.#ended = true;
    this.#fieldsEnd = fieldsEnd;
    this.bodyOffset = bodyOffset;
    this.separator = separator;
  }

  #fail(base: number, index: number): number {
    this.#stopped = true;
    this.#fed = base + index;
    return index;
  }

  /** The parsed fields: of the whole block, or of the complete lines before it stopped. */
  fields(): ParsedHeader[] {
    const end = this.#ended ? this.#fieldsEnd : this.#lineStart;
    if (end === 0) return [];
    return parseHeaderBlock(Buffer.concat(this.#captured, this.#capturedBytes).subarray(0, end));
  }
}

/**
 * Parses a header block (header fields and continuation lines only, CRLF line endings) with
 * mailsplit's Headers, and maps each field back to its bytes.
 */
function parseHeaderBlock(block: Buffer): ParsedHeader[] {
  const headers: ParsedHeader[] = [];
  let offset = 0;
  for (const { line } of new Headers(block).getList()) {
    // `line` is the field as a binary string: one char per byte, lines joined by CRLF.
    let end = offset + line.length;
    if (block[end] === CR && block[end + 1] === LF) end += 2;
    const colon = line.indexOf(':');
    let value = line.slice(colon + 1);
    if (value.startsWith(' ')) value = value.slice(1);
    headers.push({
      name: line.slice(0, colon),
      value: Buffer.from(value, 'latin1').toString('utf8'),
      raw: block.subarray(offset, end),
    });
    offset = end;
  }
  if (offset !== block.length) {
    // Cannot happen for a block HeaderBlock delimited; guard the raw mapping anyway.
    throw new DovetailError(ErrorCodes.SPOOL_FAILED, 'header block and parsed header fields disagree');
  }
  return headers;
}

/** The pure part of ingest: bytes in, bytes to keep out, plus what was found. */
class Ingester {
  received = 0;
  kept = 0;
  problem: IngestProblem | undefined;
  readonly #maxBytes: number;
  readonly #maxLine: number;
  /** Bytes of the current line kept so far (its CR included once seen). */
  #line = 0;
  readonly #endings: LineEndings;
  readonly #header: HeaderBlock;

  constructor(options: IngestOptions) {
    this.#maxBytes = options.maxBytes;
    this.#maxLine = options.maxLineBytes ?? Infinity;
    this.#endings = new LineEndings(options.bareLineEndings === 'normalize');
    this.#header = new HeaderBlock(options.maxHeaderBytes);
  }

  /** Takes a chunk of data; returns the bytes to keep (possibly empty). */
  push(chunk: Buffer): Buffer {
    this.received += chunk.length;
    if (this.problem !== undefined || chunk.length === 0) return EMPTY;
    return this.#take(this.#endings.push(chunk));
  }

  /** The end of the data; returns the last bytes to keep. */
  end(): Buffer {
    if (this.problem !== undefined) return EMPTY;
    const out = this.#take(this.#endings.end());
    if (this.problem === undefined) this.#header.finish(this.kept);
    return out;
  }

  #take({ out, refused }: Scanned): Buffer {
    let piece = out;
    let tooLarge = false;
    const room = this.#maxBytes - this.kept;
    if (piece.length > room) {
      piece = piece.subarray(0, room);
      tooLarge = true;
    }
    if (this.#header.active) {
      const cut = this.#header.feed(piece);
      if (cut >= 0) {
        piece = piece.subarray(0, cut);
        this.problem = 'header-too-large';
      }
    }
    if (this.problem === undefined && this.#maxLine !== Infinity) {
      // Line lengths from the LF positions (native indexOf): the CR before each LF is in the
      // count, so a line is too long when more than maxLine + 1 bytes come before its LF.
      let from = 0;
      for (let lf = piece.indexOf(LF); ; lf = piece.indexOf(LF, from)) {
        const len = this.#line + (lf === -1 ? piece.length : lf) - from;
        if (len > this.#maxLine + 1) {
          piece = piece.subarray(0, Math.max(0, from + this.#maxLine + 1 - this.#line));
          this.problem = 'line-too-long';
          break;
        }
        if (lf === -1) {
          this.#line = len;
          break;
        }
        this.#line = 0;
        from = lf + 1;
      }
    }
    if (this.problem === undefined && tooLarge) this.problem = 'too-large';
    if (this.problem === undefined && refused) this.problem = 'bare-line-ending';
    this.kept += piece.length;
    return piece;
  }

  result(spool: Spool): IngestResult {
    const header = this.#header;
    return {
      spool,
      received: this.received,
      headers: header.fields(),
      bodyOffset: header.ended ? Math.min(header.bodyOffset, this.kept) : this.kept,
      separator: header.ended && header.separator,
      problem: this.problem,
    };
  }
}

function checkLimit(value: unknown, name: string): void {
  if (typeof value !== 'number' || !(value >= 0) || (!Number.isSafeInteger(value) && value !== Infinity)) {
    throw new DovetailError(ErrorCodes.INVALID_OPTIONS, `ingest ${name} must be a non-negative integer or Infinity`);
  }
}

function toBuffer(chunk: Buffer | Uint8Array | string): Buffer {
  if (typeof chunk === 'string') return Buffer.from(chunk, 'utf8');
  return Buffer.isBuffer(chunk) ? chunk : Buffer.from(chunk.buffer, chunk.byteOffset, chunk.byteLength);
}


/** Resolves on 'finish', or when the spool errors or closes. */
function settled(spool: Spool): Promise<void> {
  if (spool.writableFinished || spool.destroyed) return Promise.resolve();
  return new Promise((resolve) => {
    const done = (): void => {
      spool.off('finish', done);
      spool.off('error', done);
      spool.off('close', done);
      resolve();
    };
    spool.on('finish', done);
    spool.on('error', done);
    spool.on('close', done);
  });
}

/**
 * Reads the DATA stream to its end into a new {@link Spool}, enforcing `maxBytes` and the
 * bare line ending policy as the bytes stream in, and parses the top-level header block.
 * Memory use is bounded by the spool threshold plus `maxHeaderBytes`.
 *
 * A message that breaks a rule is not an error: it resolves with `problem` set, after the
 * data was read to its end. Only I/O fails: an error of `data` rejects at once; a spool
 * failure (a {@link DovetailError} with code `SPOOL_FAILED`) rejects once `data` ended.
 * On rejection the spool is disposed. Invalid options reject with `INVALID_OPTIONS`
 * before `data` is read.
 */
export async function ingest(data: Readable, options: IngestOptions): Promise<IngestResult> {
  checkLimit(options.maxBytes, 'maxBytes');
  checkLimit(options.maxHeaderBytes, 'maxHeaderBytes');
  if (options.bareLineEndings !== 'reject' && options.bareLineEndings !== 'normalize') {
    throw new DovetailError(ErrorCodes.INVALID_OPTIONS, "ingest bareLineEndings must be 'reject' or 'normalize'");
  }
  const spool = new Spool(options.spool);
  let failure: unknown;
  spool.on('error', (err: unknown) => {
    failure ??= err;
  });
  const ingester = new Ingester(options);
  try {
    for await (const chunk of data as AsyncIterable<Buffer | Uint8Array | string>) {
      const piece = ingester.push(toBuffer(chunk));
      if (piece.length > 0 && failure === undefined && !spool.write(piece)) await drained(spool);
    }
  } catch (err) {
    await spool.dispose().catch(() => undefined);
    throw err;
  }
  const tail = ingester.end();
  if (failure === undefined) {
    if (tail.length > 0) spool.write(tail);
    spool.end();
    await settled(spool);
  }
  if (failure !== undefined) {
    await spool.dispose().catch(() => undefined);
    throw failure;
  }
  return ingester.result(spool);
}
