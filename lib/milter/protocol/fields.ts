/**
 * The field types milter payloads are made of: uint32 and uint16 in network order, single
 * bytes, NUL-terminated strings, and a raw tail (Postfix milter8.c MILTER8_DATA_HLONG,
 * _NSHORT, _OCTET, _STRING, _BUFFER). The reader throws MilterProtocolError on a short
 * field, a missing NUL, or (at `end()`) left-over bytes; the writer refuses values that
 * cannot be framed (a NUL inside a string, numbers out of range).
 *
 * Strings are UTF-8, as the rest of dovetail keeps header values and addresses; bytes that
 * are not valid UTF-8 decode to U+FFFD (never an exception). Raw payloads (BODY, REPLBODY)
 * stay Buffers. Internal to the protocol modules.
 */
import { MilterProtocolError } from './error.js';

export class FieldReader {
  #pos = 0;
  readonly #buf: Buffer;
  readonly #what: string;

  constructor(buf: Buffer, what: string) {
    this.#buf = buf;
    this.#what = what;
  }

  get remaining(): number {
    return this.#buf.length - this.#pos;
  }

  #short(field: string, size: number): never {
    throw new MilterProtocolError(`${this.#what}: ${field} needs ${size} bytes, ${this.remaining} left`);
  }

  uint32(field: string): number {
    if (this.remaining < 4) this.#short(field, 4);
    const v = this.#buf.readUInt32BE(this.#pos);
    this.#pos += 4;
    return v;
  }

  uint16(field: string): number {
    if (this.remaining < 2) this.#short(field, 2);
    const v = this.#buf.readUInt16BE(this.#pos);
    this.#pos += 2;
    return v;
  }

  byte(field: string): number {
    if (this.remaining < 1) this.#short(field, 1);
    return this.#buf[this.#pos++] ?? 0;
  }

  /** A NUL-terminated string. */
  cstring(field: string): string {
    const nul = this.#buf.indexOf(0, this.#pos);
    if (nul < 0) {
      throw new MilterProtocolError(`${this.#what}: ${field} has no NUL terminator`);
    }
    const s = this.#buf.toString('utf8', this.#pos, nul);
    this.#pos = nul + 1;
    return s;
  }

  /** Everything left, as a view. */
  rest(): Buffer {
    const b = this.#buf.subarray(this.#pos);
    this.#pos = this.#buf.length;
    return b;
  }

  /** Throws if bytes are left over after the last field. */
  end(): void {
    if (this.remaining !== 0) {
      throw new MilterProtocolError(`${this.#what}: ${this.remaining} left-over bytes`);
    }
  }
}

export class FieldWriter {
  readonly #parts: Buffer[] = [];
  readonly #what: string;

  constructor(what: string) {
    this.#what = what;
  }

  #uint(field: string, v: number, max: number): void {
    if (!Number.isInteger(v) || v < 0 || v > max) {
      throw new MilterProtocolError(`cannot encode ${this.#what}: ${field} must be an integer from 0 to ${max}`);
    }
  }

  uint32(field: string, v: number): this {
    this.#uint(field, v, 0xffff_ffff);
    const b = Buffer.allocUnsafe(4);
    b.writeUInt32BE(v, 0);
    this.#parts.push(b);
    return this;
  }

  uint16(field: string, v: number): this {
    this.#uint(field, v, 0xffff);
    const b = Buffer.allocUnsafe(2);
    b.writeUInt16BE(v, 0);
    this.#parts.push(b);
    return this;
  }

  byte(field: string, v: number): this {
    this.#uint(field, v, 0xff);
    this.#parts.push(Buffer.of(v));
    return this;
  }

  cstring(field: string, s: string): this {
    if (typeof s !== 'string') throw new MilterProtocolError(`cannot encode ${this.#what}: ${field} must be a string`);
    if (s.includes('\0')) throw new MilterProtocolError(`cannot encode ${this.#what}: ${field} contains a NUL`);
    this.#parts.push(Buffer.from(s + '\0', 'utf8'));
    return this;
  }

  raw(b: Uint8Array): this {
    this.#parts.push(Buffer.from(b.buffer, b.byteOffset, b.length));
    return this;
  }

  toBuffer(): Buffer {
    return Buffer.concat(this.#parts);
  }
}
