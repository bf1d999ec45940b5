/**
 * Waiting for a socket to drain with a deadline: the one place the LMTP client and the
 * milter client wait for a peer that does not read.
 */
import type { Socket } from 'node:net';

/**
 * Resolves on 'drain'; rejects with `onClose()` if the socket closes first, or with
 * `onTimeout()` after `ms`. Listeners and the timer are removed either way.
 */
export function drainWithin(socket: Socket, ms: number, onClose: () => Error, onTimeout: () => Error): Promise<void> {
  return new Promise<void>((resolve, reject) => {
    const done = (err?: Error): void => {
      clearTimeout(timer);
      socket.off('drain', onDrain);
      socket.off('close', closed);
      if (err) reject(err);
      else resolve();
    };
    const onDrain = (): void => done();
    const closed = (): void => done(onClose());
    const timer = setTimeout(() => done(onTimeout()), ms);
    socket.on('drain', onDrain);
    socket.on('close', closed);
  });
}
