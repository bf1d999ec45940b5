/**
 * Ports for the peers the tests start: a free loopback port, and waiting until one listens.
 */
import type { ChildProcess } from 'node:child_process';
import net from 'node:net';

/** A port that was free a moment ago on 127.0.0.1 (bind to 0, read it, release it). */
export async function freePort(): Promise<number> {
  const server = net.createServer();
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(0, '127.0.0.1', () => resolve());
  });
  const port = (server.address() as net.AddressInfo).port;
  await new Promise<void>((resolve) => server.close(() => resolve()));
  return port;
}

/**
 * Resolves once 127.0.0.1:port accepts a connection; rejects after `ms`, or when `child`
 * exits first. `detail` adds something to the error (a peer's log).
 */
export async function waitForPort(
  port: number,
  ms = 15_000,
  child?: ChildProcess,
  what = 'peer',
  detail?: () => Promise<string>,
): Promise<void> {
  const deadline = Date.now() + ms;
  for (;;) {
    if (child && child.exitCode !== null) throw new Error(`${what} exited with code ${child.exitCode} before listening on ${port}`);
    const ok = await new Promise<boolean>((resolve) => {
      const s = net.connect(port, '127.0.0.1');
      s.once('connect', () => {
        s.destroy();
        resolve(true);
      });
      s.once('error', () => resolve(false));
    });
    if (ok) return;
    if (Date.now() > deadline) {
      throw new Error(`${what} did not listen on 127.0.0.1:${port} within ${ms} ms${detail ? `; log:\n${await detail()}` : ''}`);
    }
    await new Promise((r) => setTimeout(r, 50));
  }
}
