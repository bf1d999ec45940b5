/**
 * Test helper: a gateway program (a test fixture) run as a child process, so a test can
 * SIGKILL it and start it again on the same directories. The fixture prints one JSON line
 * per event on stdout, the first `{ "event": "listening", "port" }`; this collects them.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { waitFor } from './wait.js';

export interface Child {
  readonly process: ChildProcess;
  /** Every JSON line printed so far. */
  readonly events: Record<string, unknown>[];
  readonly port: number;
  readonly exited: Promise<number | string | null>;
}

/** Starts `node <fixture> ...args` and waits (bounded) for its `listening` line. */
export async function startChild(fixture: string, args: readonly string[]): Promise<Child> {
  const child = spawn(process.execPath, [fixture, ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
  const events: Record<string, unknown>[] = [];
  let stderr = '';
  let buf = '';
  child.stderr!.setEncoding('utf8').on('data', (d: string) => (stderr += d));
  child.stdout!.setEncoding('utf8').on('data', (d: string) => {
    buf += d;
    let nl: number;
    while ((nl = buf.indexOf('\n')) >= 0) {
      events.push(JSON.parse(buf.slice(0, nl)) as Record<string, unknown>);
      buf = buf.slice(nl + 1);
    }
  });
  const exited = new Promise<number | string | null>((resolve) => child.once('exit', (code, signal) => resolve(signal ?? code)));
  try {
    const port = await waitFor('the child gateway to listen', () => {
      if (child.exitCode !== null) throw new Error(`the child gateway exited (${child.exitCode}): ${stderr}`);
      return events.find((e) => e['event'] === 'listening')?.['port'] as number | undefined;
    });
    return { process: child, events, port, exited };
  } catch (err) {
    if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
    await exited;
    throw err;
  }
}
