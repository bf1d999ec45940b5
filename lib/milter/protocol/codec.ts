/**
 * Milter framing: every packet, both directions, is a 4-byte big-endian length, one
 * command byte, then `length - 1` data bytes; the length counts the command byte
 * (libmilter comm.c mi_rd_cmd/mi_wr_cmd, Postfix milter8.c milter8_read_resp).
 *
 * `FrameDecoder` is incremental (`push(chunk) → frames`) and hardened as Postfix and
 * libmilter are: a length < 1 is a protocol error (Postfix "bad packet length"), and so is
 * a data size over the maximum (libmilter SMFIC_TOOBIG). The maximum counts DATA bytes,
 * without the command byte, like libmilter's Maxdatasize: by default
 * MILTER_MAX_DATA_SIZE = 65535, i.e. the largest length field accepted is 65536. Raise it
 * to MILTER_MDS_256K / MILTER_MDS_1M after negotiating SMFIP_MDS_256K / SMFIP_MDS_1M. The
 * length is checked as soon as its 4 bytes are in, before anything is buffered for the
 * frame; the decoder holds at most the bytes of the one frame being assembled, copied
 * as they arrive (never an allocation sized by the length field).
 *
 * Does not: interpret payloads (see commands.ts, replies.ts), do I/O, or time anything.
 */
import { DovetailError, ErrorCodes } from '../../errors.js';
import { MILTER_LEN_BYTES, MILTER_MAX_DATA_SIZE } from './constants.js';
import { MilterProtocolError } from './error.js';

/** One decoded packet. `data` may share memory with the chunk given to `push()`. */
export interface Frame {
  /** The command or reply byte as a one-character string (latin1). */
  readonly command: string;
  readonly data: Buffer;
}

export interface FrameDecoderOptions {
  /**
   * Largest data size accepted per frame, without the command byte (libmilter's
   * Maxdatasize). Default MILTER_MAX_DATA_SIZE (65535).
   */
  readonly maxDataSize?: number;
}

/** Largest data size the 32-bit length field can describe. */
const MAX_WIRE_DATA = 0xffff_fffe;
const HEADER = MILTER_LEN_BYTES + 1;
const EMPTY = Buffer.alloc(0);

function checkMax(n: unknown): number {
  if (typeof n !== 'number' || !Number.isInteger(n) || n < 0 || n > MAX_WIRE_DATA) {
    throw new DovetailError(ErrorCodes.INVALID_OPTIONS, `maxDataSize must be an integer from 0 to ${MAX_WIRE_DATA}`);
  }
  return n;
}

/** Builds one frame: length (data + 1), command byte, data. */
export function encodeFrame(command: string, data: Uint8Array = EMPTY): Buffer {
  if (typeof command !== 'string' || command.length !== 1 || command.charCodeAt(0) > 0xff) {
    throw new MilterProtocolError('cannot encode: a command is one byte');
  }
  if (data.length > MAX_WIRE_DATA) throw new MilterProtocolError('cannot encode: data too large for the length field');
  const out = Buffer.allocUnsafe(HEADER + data.length);
  out.writeUInt32BE(data.length + 1, 0);
  out[MILTER_LEN_BYTES] = command.charCodeAt(0);
  out.set(data, HEADER);
  return out;
}

/**
 * Incremental frame decoder. After a protocol error it stays failed: every later `push()`
 * throws the same error (the connection must be dropped, as Postfix does).
 */
export class FrameDecoder {
  #max: number;
  /** Length field + command byte of the frame being assembled. */
  readonly #header = Buffer.alloc(HEADER);
  #headerFill = 0;
  /** Data bytes the current frame carries; -1 until its length field is in. */
  #need = -1;
  #parts: Buffer[] = [];
  #partsLen = 0;
  #failed: MilterProtocolError | undefined;

  constructor(options: FrameDecoderOptions = {}) {
    this.#max = checkMax(options.maxDataSize ?? MILTER_MAX_DATA_SIZE);
  }

  /** Largest data size accepted per frame (without the command byte). */
  get maxDataSize(): number {
    return this.#max;
  }

  /** Changes the limit, e.g. after SMFIP_MDS_256K was negotiated. Applies to frames whose length is not yet read. */
  set maxDataSize(n: number) {
    this.#max = checkMax(n);
  }

  /** Bytes held for the incomplete frame: always below 5 + maxDataSize. */
  get buffered(): number {
    return this.#headerFill + this.#partsLen;
  }

  /** True once a protocol error was thrown. */
  get failed(): boolean {
    return this.#failed !== undefined;
  }

  /** Feeds bytes; returns the frames they complete, in order. Throws MilterProtocolError. */
  push(chunk: Uint8Array): Frame[] {
    if (this.#failed) throw this.#failed;
    const frames: Frame[] = [];
    const n = chunk.length;
    let off = 0;
    while (off < n) {
      if (this.#headerFill < HEADER) {
        const take = Math.min(HEADER - this.#headerFill, n - off);
        this.#header.set(chunk.subarray(off, off + take), this.#headerFill);
        this.#headerFill += take;
        off += take;
        if (this.#need < 0 && this.#headerFill >= MILTER_LEN_BYTES) {
          const len = this.#header.readUInt32BE(0);
          if (len < 1) this.#fail('bad packet length 0');
          if (len - 1 > this.#max) this.#fail(`packet data of ${len - 1} bytes is over the maximum of ${this.#max}`);
          this.#need = len - 1;
        }
        if (this.#headerFill < HEADER) continue;
        if (this.#need === 0) {
          frames.push({ command: this.#command(), data: EMPTY });
          this.#reset();
        }
        continue;
      }
      const want = this.#need - this.#partsLen;
      const avail = n - off;
      if (this.#partsLen === 0 && avail >= want) {
        frames.push({ command: this.#command(), data: Buffer.from(chunk.buffer, chunk.byteOffset + off, want) });
        off += want;
        this.#reset();
        continue;
      }
      const take = Math.min(want, avail);
      this.#parts.push(Buffer.from(chunk.subarray(off, off + take)));
      this.#partsLen += take;
      off += take;
      if (this.#partsLen === this.#need) {
        frames.push({ command: this.#command(), data: Buffer.concat(this.#parts, this.#need) });
        this.#reset();
      }
    }
    return frames;
  }

  /** Call at end of stream: throws MilterProtocolError when a frame was cut short. */
  end(): void {
    if (this.#failed) throw this.#failed;
    if (this.buffered > 0) this.#fail(`connection closed inside a packet (${this.buffered} bytes pending)`);
  }

  #command(): string {
    return String.fromCharCode(this.#header[MILTER_LEN_BYTES] ?? 0);
  }

  #reset(): void {
    this.#headerFill = 0;
    this.#need = -1;
    this.#parts = [];
    this.#partsLen = 0;
  }

  #fail(message: string): never {
    this.#reset();
    this.#failed = new MilterProtocolError(message);
    throw this.#failed;
  }
}
