/**
 * The message spool: a Writable that keeps a message in memory up to a threshold and then
 * moves all of it to a private temp file, so memory use per message stays bounded whatever
 * its size (DESIGN.md, "Message path"). Once finished, any byte range can be read back as
 * a stream or a Buffer, as often as needed.
 *
 * It does not parse, limit or transform what it is given (ingest.ts does that), and it is
 * not a durable queue: the temp file lives only until dispose().
 */
import { randomBytes } from 'node:crypto';
import { open, unlink, type FileHandle } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Readable, Writable } from 'node:stream';
import { DovetailError, ErrorCodes } from '../errors.js';

/** Options of a {@link Spool}. */
export interface SpoolOptions {
  /** Bytes kept in memory before everything moves to a temp file; default 256 KiB. */
  memoryThreshold?: number;
  /**
   * Bytes all the spools of this process may hold in memory together; default 64 MiB. A
   * spool whose next write would take the total past it moves to a temp file even below
   * its `memoryThreshold`, so many concurrent large messages (1000 × the threshold would be
   * 250 MiB) cannot add up.
   */
  memoryBudget?: number;
  /** Directory for temp files; default `os.tmpdir()`. */
  dir?: string;
}

const DEFAULT_THRESHOLD = 256 * 1024;
const DEFAULT_BUDGET = 64 * 1024 * 1024;

/** Bytes held in memory by every spool of this process (see SpoolOptions.memoryBudget). */
let heldInMemory = 0;

/** Bytes all spools of this process hold in memory now (for tests and metrics). */
export function spoolMemoryInUse(): number {
  return heldInMemory;
}
const DEFAULT_READ_CHUNK = 64 * 1024;

function spoolError(message: string, cause?: unknown): DovetailError {
  return cause === undefined
    ? new DovetailError(ErrorCodes.SPOOL_FAILED, message)
    : new DovetailError(ErrorCodes.SPOOL_FAILED, message, { cause });
}

/** Writes every byte of `buffers` at `position`, looping over short writes. */
async function writeAll(fh: FileHandle, buffers: readonly Buffer[], position: number): Promise<void> {
  let bufs = buffers.filter((b) => b.length > 0);
  while (bufs.length > 0) {
    const { bytesWritten } = await fh.writev(bufs, position);
    if (bytesWritten <= 0) throw new Error('short write: no progress');
    position += bytesWritten;
    let skip = bytesWritten;
    while (skip > 0 && bufs.length > 0) {
      const first = bufs[0]!;
      if (first.length <= skip) {
        skip -= first.length;
        bufs = bufs.slice(1);
      } else {
        bufs = [first.subarray(skip), ...bufs.slice(1)];
        skip = 0;
      }
    }
  }
}

/**
 * A bounded-memory store for one message. Write to it like any Writable (it honours
 * backpressure); after `'finish'`, read ranges back with {@link Spool.createReadStream} or
 * {@link Spool.read}. Call {@link Spool.dispose} when done to remove the temp file.
 *
 * Up to `memoryThreshold` bytes stay in memory. The write that would exceed it creates a
 * temp file with an unguessable name (mode 0600, created exclusively) in `dir`, writes all
 * bytes held so far to it, and drops them from memory; later writes go straight to the file.
 * A failing write (ENOSPC, EACCES …) destroys the spool with a {@link DovetailError} of
 * code `SPOOL_FAILED` and removes the temp file.
 */
export class Spool extends Writable {
  readonly #threshold: number;
  readonly #budget: number;
  /** This spool's share of heldInMemory. */
  #held = 0;
  /** undefined: os.tmpdir(), looked up only when a spool moves to disk (it is not free per message). */
  readonly #dir: string | undefined;
  #memory: Buffer[] = [];
  #size = 0;
  #path: string | undefined;
  #fh: FileHandle | undefined;
  /** The file operation in flight (a write or close), awaited by dispose(). */
  #pending: Promise<unknown> = Promise.resolve();
  #disposing: Promise<void> | undefined;

  constructor(options: SpoolOptions = {}) {
    super({ decodeStrings: true });
    const threshold = options.memoryThreshold ?? DEFAULT_THRESHOLD;
    if (!Number.isSafeInteger(threshold) || threshold < 0) {
      throw new DovetailError(ErrorCodes.INVALID_OPTIONS, 'spool memoryThreshold must be a non-negative integer');
    }
    this.#threshold = threshold;
    const budget = options.memoryBudget ?? DEFAULT_BUDGET;
    if (!Number.isSafeInteger(budget) || budget < 0) {
      throw new DovetailError(ErrorCodes.INVALID_OPTIONS, 'spool memoryBudget must be a non-negative integer');
    }
    this.#budget = budget;
    this.#dir = options.dir;
  }

  /** Bytes written so far. */
  get size(): number {
    return this.#size;
  }

  /** True once the spool moved to a temp file. */
  get onDisk(): boolean {
    return this.#path !== undefined;
  }

  override _write(chunk: Buffer, _encoding: BufferEncoding, callback: (error?: Error | null) => void): void {
    this.#store([chunk], callback);
  }

  override _writev(chunks: Array<{ chunk: Buffer }>, callback: (error?: Error | null) => void): void {
    this.#store(
      chunks.map((c) => c.chunk),
      callback,
    );
  }

  #store(chunks: Buffer[], callback: (error?: Error | null) => void): void {
    if (this.#disposing !== undefined) {
      callback(spoolError('spool was disposed'));
      return;
    }
    let bytes = 0;
    for (const c of chunks) bytes += c.length;
    if (this.#path === undefined && this.#size + bytes <= this.#threshold && heldInMemory + bytes <= this.#budget) {
      for (const c of chunks) if (c.length > 0) this.#memory.push(c);
      this.#size += bytes;
      this.#held += bytes;
      heldInMemory += bytes;
      callback();
      return;
    }
    const op = this.#storeOnDisk(chunks, bytes);
    this.#pending = op.catch(() => undefined);
    op.then(
      () => callback(),
      (err: unknown) => callback(spoolError('writing the spool file failed', err)),
    );
  }

  async #storeOnDisk(chunks: Buffer[], bytes: number): Promise<void> {
    if (this.#fh === undefined) {
      // Written from position 0: everything held in memory, then the new chunks.
      const path = join(this.#dir ?? tmpdir(), `dovetail-spool-${randomBytes(16).toString('hex')}`);
      this.#fh = await open(path, 'wx', 0o600);
      this.#path = path;
      await writeAll(this.#fh, [...this.#memory, ...chunks], 0);
      this.#memory = [];
      this.#release();
    } else {
      await writeAll(this.#fh, chunks, this.#size);
    }
    this.#size += bytes;
  }

  override _final(callback: (error?: Error | null) => void): void {
    const fh = this.#fh;
    if (fh === undefined) {
      callback();
      return;
    }
    this.#fh = undefined;
    const op = fh.close();
    this.#pending = op.catch(() => undefined);
    op.then(
      () => callback(),
      (err: unknown) => callback(spoolError('closing the spool file failed', err)),
    );
  }

  override _destroy(error: Error | null, callback: (error?: Error | null) => void): void {
    // After a normal finish (autoDestroy) the content stays readable until dispose();
    // destroyed before that, or with an error, the spool is useless: remove its file.
    if (error === null && this.writableFinished) {
      callback(null);
      return;
    }
    this.dispose().then(
      () => callback(error),
      () => callback(error),
    );
  }

  /**
   * Removes the temp file and drops what is held in memory. Idempotent, and safe while a
   * write is in flight or after an error. The spool cannot be read or written afterwards.
   */
  dispose(): Promise<void> {
    if (this.#disposing === undefined) {
      this.#memory = [];
      this.#release();
      this.#disposing = this.#removeFile();
      // Set before destroy(): _destroy() calls dispose() again and must get this promise.
      if (!this.destroyed) this.destroy();
    }
    return this.#disposing;
  }

  /** Gives this spool's memory back to the process-wide budget. */
  #release(): void {
    heldInMemory -= this.#held;
    this.#held = 0;
  }

  async #removeFile(): Promise<void> {
    await this.#pending;
    const fh = this.#fh;
    this.#fh = undefined;
    if (fh !== undefined) await fh.close().catch(() => undefined);
    const path = this.#path;
    if (path !== undefined) {
      await unlink(path).catch((err: NodeJS.ErrnoException) => {
        if (err.code !== 'ENOENT') throw spoolError('removing the spool file failed', err);
      });
    }
  }

  #checkRange(start: number, end: number): void {
    if (!this.writableFinished) throw spoolError('the spool is read before it finished');
    if (this.#disposing !== undefined) throw spoolError('the spool was disposed');
    if (!Number.isSafeInteger(start) || !Number.isSafeInteger(end) || start < 0 || start > end || end > this.#size) {
      throw new RangeError(`invalid spool range [${start}, ${end}) of ${this.#size} bytes`);
    }
  }

  /**
   * A stream of the bytes [start, end) (end exclusive, default {@link Spool.size}), in
   * chunks of at most `highWaterMark` bytes (default 64 KiB). Only valid after `'finish'`;
   * throws a `RangeError` for a range outside the spool. Read errors are emitted as a
   * {@link DovetailError} with code `SPOOL_FAILED`.
   */
  createReadStream(start = 0, end: number = this.#size, highWaterMark = DEFAULT_READ_CHUNK): Readable {
    this.#checkRange(start, end);
    if (!Number.isSafeInteger(highWaterMark) || highWaterMark < 1) {
      throw new RangeError('highWaterMark must be a positive integer');
    }
    if (this.#path === undefined) return memoryReader(this.#memory, start, end, highWaterMark);
    return fileReader(this.#path, start, end, highWaterMark);
  }

  /** Reads [start, end) fully into memory: meant for small ranges such as the header block. */
  async read(start: number, end: number): Promise<Buffer> {
    this.#checkRange(start, end);
    if (this.#path === undefined) return Buffer.concat(sliceMemory(this.#memory, start, end));
    const out = Buffer.allocUnsafe(end - start);
    let fh: FileHandle | undefined;
    try {
      fh = await open(this.#path, 'r');
      let done = 0;
      while (done < out.length) {
        const { bytesRead } = await fh.read(out, done, out.length - done, start + done);
        if (bytesRead === 0) throw new Error('spool file is shorter than the spool');
        done += bytesRead;
      }
    } catch (err) {
      throw spoolError('reading the spool file failed', err);
    } finally {
      await fh?.close().catch(() => undefined);
    }
    return out;
  }
}

/** The parts of the in-memory chunks that cover [start, end). */
function sliceMemory(chunks: readonly Buffer[], start: number, end: number): Buffer[] {
  const out: Buffer[] = [];
  let offset = 0;
  for (const c of chunks) {
    const cEnd = offset + c.length;
    if (cEnd > start && offset < end) {
      out.push(c.subarray(Math.max(0, start - offset), Math.min(c.length, end - offset)));
    }
    offset = cEnd;
    if (offset >= end) break;
  }
  return out;
}

function memoryReader(chunks: readonly Buffer[], start: number, end: number, chunkSize: number): Readable {
  const parts = sliceMemory(chunks, start, end);
  let index = 0;
  let within = 0;
  return new Readable({
    highWaterMark: chunkSize,
    read() {
      // One chunk per call, made of as many stored pieces as fit: chunks are exactly
      // chunkSize bytes but the last, however the data was written (a milter's body
      // handler sees what Postfix would send, not the client's TCP segmentation).
      if (index >= parts.length) {
        this.push(null);
        return;
      }
      const pieces: Buffer[] = [];
      let n = 0;
      while (n < chunkSize && index < parts.length) {
        const part = parts[index] as Buffer;
        const piece = part.subarray(within, within + (chunkSize - n));
        pieces.push(piece);
        n += piece.length;
        within += piece.length;
        if (within >= part.length) {
          index++;
          within = 0;
        }
      }
      this.push(pieces.length === 1 ? pieces[0] : Buffer.concat(pieces, n));
    },
  });
}

function fileReader(path: string, start: number, end: number, chunkSize: number): Readable {
  let fh: FileHandle | undefined;
  let position = start;
  return new Readable({
    highWaterMark: chunkSize,
    construct(callback) {
      open(path, 'r').then(
        (handle) => {
          fh = handle;
          callback();
        },
        (err: unknown) => callback(spoolError('opening the spool file failed', err)),
      );
    },
    read() {
      const handle = fh;
      if (handle === undefined) return;
      if (position >= end) {
        this.push(null);
        return;
      }
      const want = Math.min(chunkSize, end - position);
      handle.read(Buffer.allocUnsafe(want), 0, want, position).then(
        ({ bytesRead, buffer }) => {
          if (bytesRead === 0) {
            this.destroy(spoolError('spool file is shorter than the spool'));
            return;
          }
          position += bytesRead;
          this.push(bytesRead === want ? buffer : buffer.subarray(0, bytesRead));
        },
        (err: unknown) => this.destroy(spoolError('reading the spool file failed', err)),
      );
    },
    destroy(error, callback) {
      const handle = fh;
      fh = undefined;
      if (handle === undefined) {
        callback(error);
        return;
      }
      handle.close().then(
        () => callback(error),
        () => callback(error),
      );
    },
  });
}

/**
 * Writes all of `source` (a string is written as UTF-8) into a new {@link Spool} and
 * resolves once it finished. On failure the spool is disposed and the promise rejects.
 */
export async function spoolFrom(source: string | Buffer | Readable, options?: SpoolOptions): Promise<Spool> {
  const spool = new Spool(options);
  const done = new Promise<void>((resolve, reject) => {
    spool.once('finish', resolve);
    spool.once('error', reject);
  });
  // Observed below; this keeps an early spool error from being an unhandled rejection.
  done.catch(() => undefined);
  try {
    if (source instanceof Readable) {
      for await (const chunk of source) {
        if (spool.destroyed) break;
        const buf = typeof chunk === 'string' ? Buffer.from(chunk, 'utf8') : (chunk as Buffer);
        if (!spool.write(buf)) await drained(spool);
      }
      if (!spool.destroyed) spool.end();
    } else {
      spool.end(typeof source === 'string' ? Buffer.from(source, 'utf8') : source);
    }
    await done;
  } catch (err) {
    await spool.dispose().catch(() => undefined);
    throw err;
  }
  return spool;
}

/** Resolves on 'drain', or when the stream errors or closes (the error is observed elsewhere). */
export function drained(stream: Writable): Promise<void> {
  if (stream.destroyed) return Promise.resolve();
  return new Promise((resolve) => {
    const done = (): void => {
      stream.off('drain', done);
      stream.off('error', done);
      stream.off('close', done);
      resolve();
    };
    stream.on('drain', done);
    stream.on('error', done);
    stream.on('close', done);
  });
}
