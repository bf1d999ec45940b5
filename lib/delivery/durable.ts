/**
 * Durable file writes, shared by the Maildir store and the deferred queue: a new file
 * created exclusively (0600), written in full, fsynced and closed — or removed on any
 * failure — and fsync of a directory after a rename or link into it. What a 250 rests on.
 *
 * Does not: choose names, rename, or retry.
 */
import { open, unlink } from 'node:fs/promises';
import type { FileHandle } from 'node:fs/promises';

/** Writes all of `buf` (a file handle may write less than asked). */
export async function writeAll(fh: FileHandle, buf: Buffer): Promise<void> {
  let off = 0;
  while (off < buf.length) {
    const { bytesWritten } = await fh.write(buf, off, buf.length - off);
    off += bytesWritten;
  }
}

/**
 * Creates `file` (it must not exist), writes every chunk, fsyncs (unless `sync` is false)
 * and closes it; on any failure, including one thrown by the chunk source, the file is
 * removed and the error rethrown. Resolves with the bytes written.
 */
export async function writeFileDurably(
  file: string,
  chunks: Iterable<Buffer> | AsyncIterable<Buffer>,
  options: { readonly sync?: boolean } = {},
): Promise<number> {
  const fh = await open(file, 'wx', 0o600);
  let size = 0;
  try {
    for await (const chunk of chunks) {
      await writeAll(fh, chunk);
      size += chunk.length;
    }
    if (options.sync !== false) await fh.sync();
  } catch (err) {
    await fh.close().catch(() => {});
    await unlink(file).catch(() => {});
    throw err;
  }
  try {
    await fh.close();
  } catch (err) {
    await unlink(file).catch(() => {});
    throw err;
  }
  return size;
}

/** fsyncs a directory, so a rename or link into it survives a crash. */
export async function syncDir(dir: string): Promise<void> {
  const fh = await open(dir, 'r');
  try {
    await fh.sync();
  } finally {
    await fh.close();
  }
}
