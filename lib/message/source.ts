/**
 * A finished message as everything after the milters reads it: transports, the queue, the
 * quarantine. Made by the message model (lib/milter/message.ts) and by the queue (a file).
 */
import type { Readable } from 'node:stream';

/** The message handed to a transport: may be read several times. */
export interface MessageSource {
  /** Size in bytes of what stream() yields. */
  readonly size: number;
  /** A fresh stream of the whole message (headers, blank line, body), CRLF line endings. */
  stream(): Readable;
}
