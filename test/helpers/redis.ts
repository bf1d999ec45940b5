/**
 * Test helper: a real redis-server (Debian's redis-server package, installed by
 * scripts/install-peers.sh) in a private temp directory on a free loopback port, with no
 * persistence (`--save '' --appendonly no`). A test can stop it, pause it (SIGSTOP: a Redis
 * that hangs), resume it and start it again on the same port.
 *
 * It throws (never skips) when the binary is missing.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync } from 'node:fs';
import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { freePort, waitForPort } from './ports.js';

export interface RedisPeer {
  readonly port: number;
  readonly dir: string;
  /** Stops the server (SIGTERM, then SIGKILL after 5 s) and waits for it to exit. */
  stop(): Promise<void>;
  /** Starts it again on the same port (after stop()). */
  start(): Promise<void>;
  /** SIGSTOP: the server keeps its connections but answers nothing (a hung Redis). */
  pause(): void;
  /** SIGCONT after pause(). */
  resume(): void;
  /** stop() and remove the directory. */
  close(): Promise<void>;
  log(): Promise<string>;
}

const BINARY = '/usr/bin/redis-server';

export async function startRedis(): Promise<RedisPeer> {
  if (!existsSync(BINARY)) throw new Error(`${BINARY} is missing: run scripts/install-peers.sh (Debian package redis-server)`);
  const dir = await fs.mkdtemp(path.join(os.tmpdir(), 'dovetail-redis-'));
  const port = await freePort();
  let child: ChildProcess | undefined;
  const logFile = path.join(dir, 'redis.log');
  const start = async (): Promise<void> => {
    const c = spawn(BINARY, ['--port', String(port), '--bind', '127.0.0.1', '--save', '', '--appendonly', 'no', '--dir', dir, '--logfile', logFile, '--daemonize', 'no', '--protected-mode', 'no'], {
      stdio: 'ignore',
    });
    child = c;
    await waitForPort(port, 15_000, c, 'redis-server', async () => fs.readFile(logFile, 'utf8').catch(() => ''));
  };
  const stop = async (): Promise<void> => {
    const c = child;
    child = undefined;
    if (!c || c.exitCode !== null || c.signalCode !== null) return;
    const exited = new Promise<void>((resolve) => c.once('exit', () => resolve()));
    c.kill('SIGCONT');
    c.kill('SIGTERM');
    const t = setTimeout(() => c.kill('SIGKILL'), 5_000);
    await exited;
    clearTimeout(t);
  };
  await start();
  return {
    port,
    dir,
    stop,
    start,
    pause: () => child?.kill('SIGSTOP'),
    resume: () => child?.kill('SIGCONT'),
    async close() {
      await stop();
      await fs.rm(dir, { recursive: true, force: true });
    },
    log: () => fs.readFile(logFile, 'utf8').catch(() => ''),
  };
}
