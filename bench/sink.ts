/**
 * Postfix's `smtp-sink` as the bench's mail sink: started on a free loopback port, SMTP or
 * (`lmtp: true`) LMTP, answering every message 250 and dropping it, counting with `-c`. The
 * bench reads its running counters (`sess=N quit=N mesg=N`, written on stdout) and can
 * wait until it has received a number of messages. One sink per system under test, so
 * that counts and connection reuse are that system's own.
 *
 * It needs the postfix package (smtp-sink) and root (`-u postfix`). It does not store or
 * check the messages it receives.
 */
import { spawn } from 'node:child_process';
import { performance } from 'node:perf_hooks';
import { requireBinary } from '../test/helpers/postfix.js';
import { freePort, waitForPort } from '../test/helpers/ports.js';
import { stopChild } from './proc.js';

export interface Sink {
  readonly port: number;
  readonly pid: number;
  /** Messages received so far (smtp-sink's `mesg=` counter). */
  messages(): number;
  /** Sessions ended so far (`sess=`). */
  sessions(): number;
  /** Resolves with performance.now() once `count` messages were received; rejects after timeoutMs. */
  waitFor(count: number, timeoutMs: number): Promise<number>;
  stop(): Promise<void>;
  /** Synchronous last resort (an exit handler). */
  kill(): void;
}

export interface SinkOptions {
  /** For the host name it announces and error messages. */
  readonly name: string;
  /** Speak LMTP (`-L`) instead of SMTP. */
  readonly lmtp?: boolean;
  /** Listen backlog (default 1000). */
  readonly backlog?: number;
}

export async function startSink(options: SinkOptions): Promise<Sink> {
  const smtpSink = requireBinary('smtp-sink', 'Debian package "postfix" (3.7); scripts/install-peers.sh installs it');
  const port = await freePort();
  const args = ['-c', '-u', 'postfix', ...(options.lmtp ? ['-L'] : []), '-h', `sink.${options.name.replace(/[^a-z0-9-]/gi, '-')}.test`, `127.0.0.1:${port}`, String(options.backlog ?? 1000)];
  const child = spawn(smtpSink, args, { stdio: ['ignore', 'pipe', 'pipe'] });
  let mesg = 0;
  let sess = 0;
  let tail = '';
  let stderr = '';
  const waiters: { count: number; resolve: (t: number) => void }[] = [];
  child.stdout!.setEncoding('latin1');
  child.stdout!.on('data', (d: string) => {
    const now = performance.now();
    // `sess=N quit=N mesg=N\r` per update; keep the last complete one.
    const text = tail + d;
    const cut = text.lastIndexOf('\r');
    tail = text.slice(cut + 1);
    const m = /sess=(\d+) quit=\d+ mesg=(\d+)\s*$/.exec(text.slice(0, cut + 1));
    if (!m) return;
    sess = Number(m[1]);
    mesg = Number(m[2]);
    for (let i = waiters.length - 1; i >= 0; i--) {
      if (mesg >= waiters[i]!.count) waiters.splice(i, 1)[0]!.resolve(now);
    }
  });
  child.stderr!.on('data', (d: Buffer) => {
    if (stderr.length < 16_000) stderr += d.toString();
  });
  const pid = child.pid!;
  try {
    await waitForPort(port, 10_000, child, `smtp-sink for ${options.name}`, async () => stderr);
  } catch (err) {
    child.kill('SIGKILL');
    throw err;
  }
  return {
    port,
    pid,
    messages: () => mesg,
    sessions: () => sess,
    waitFor(count, timeoutMs) {
      if (mesg >= count) return Promise.resolve(performance.now());
      return new Promise((resolve, reject) => {
        const w = {
          count,
          resolve: (t: number) => {
            clearTimeout(timer);
            resolve(t);
          },
        };
        const timer = setTimeout(() => {
          waiters.splice(waiters.indexOf(w), 1);
          reject(new Error(`sink for ${options.name}: ${mesg} of ${count} messages after ${timeoutMs} ms`));
        }, timeoutMs);
        waiters.push(w);
      });
    },
    stop: () => stopChild(child, 'SIGTERM'),
    kill: () => {
      try {
        process.kill(pid, 'SIGKILL');
      } catch {
        /* gone */
      }
    },
  };
}
