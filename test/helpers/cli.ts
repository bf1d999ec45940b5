/**
 * Test helper: the `dovetail` command as an operator runs it, `node <repo>/dist/bin/dovetail.js
 * …` as a child process with a chosen working directory. `runCli` waits for a command to end;
 * `startCli` keeps a long-running one (`start`, `milter serve`) and collects its JSON log
 * lines from stdout.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { waitFor } from './wait.js';

/** The repository root (this file is dist/test/helpers/cli.js). */
export const REPO = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../..');
/** The built command. */
export const BIN = path.join(REPO, 'dist', 'bin', 'dovetail.js');

export interface CliResult {
  readonly code: number | null;
  readonly signal: NodeJS.Signals | null;
  readonly stdout: string;
  readonly stderr: string;
}

/** Runs `dovetail …args` in `cwd` to its end (killed after `ms`: a hang guard). */
export function runCli(args: readonly string[], cwd: string = REPO, ms = 60_000): Promise<CliResult> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [BIN, ...args], { cwd, stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout.setEncoding('utf8').on('data', (d: string) => (stdout += d));
    child.stderr.setEncoding('utf8').on('data', (d: string) => (stderr += d));
    const timer = setTimeout(() => {
      child.kill('SIGKILL');
      reject(new Error(`dovetail ${args.join(' ')} did not end within ${ms} ms\nstdout: ${stdout}\nstderr: ${stderr}`));
    }, ms);
    child.once('error', reject);
    child.once('close', (code, signal) => {
      clearTimeout(timer);
      resolve({ code, signal, stdout, stderr });
    });
  });
}

/** A JSON log line (pino). */
export type LogLine = Record<string, unknown> & { msg?: string; event?: string; level?: number };

export interface RunningCli {
  readonly process: ChildProcess;
  /** Every JSON line printed on stdout so far. */
  readonly lines: LogLine[];
  /** Lines of stdout that were not JSON. */
  readonly text: string[];
  stderr(): string;
  /** The `listening` line's fields (for `start`) / `milter-listening` (for `milter serve`). */
  readonly ready: LogLine;
  /** Resolves with the first line (after `from`) that `match` accepts. */
  waitForLine(what: string, match: (l: LogLine) => boolean, from?: number, ms?: number): Promise<LogLine>;
  /** Resolves with the exit code (or signal) once the process has ended. */
  readonly exited: Promise<number | string | null>;
  /** Sends `signal` and waits for the end (SIGKILL after `ms`). */
  stop(signal?: NodeJS.Signals, ms?: number): Promise<number | string | null>;
}

/** Starts `dovetail …args` in `cwd` and waits for its `listening` (or `milter-listening`) log line. */
export async function startCli(args: readonly string[], cwd: string, readyEvent = 'listening'): Promise<RunningCli> {
  const child = spawn(process.execPath, [BIN, ...args], { cwd, stdio: ['ignore', 'pipe', 'pipe'] });
  const lines: LogLine[] = [];
  const text: string[] = [];
  let stderr = '';
  let buf = '';
  child.stderr!.setEncoding('utf8').on('data', (d: string) => (stderr += d));
  child.stdout!.setEncoding('utf8').on('data', (d: string) => {
    buf += d;
    let nl: number;
    while ((nl = buf.indexOf('\n')) >= 0) {
      const line = buf.slice(0, nl);
      buf = buf.slice(nl + 1);
      try {
        lines.push(JSON.parse(line) as LogLine);
      } catch {
        text.push(line);
      }
    }
  });
  const exited = new Promise<number | string | null>((resolve) => child.once('exit', (code, signal) => resolve(signal ?? code)));
  const waitForLine = (what: string, match: (l: LogLine) => boolean, from = 0, ms = 30_000): Promise<LogLine> =>
    waitFor(
      what,
      () => {
        const found = lines.slice(from).find(match);
        if (found) return found;
        if (child.exitCode !== null || child.signalCode !== null) throw new Error(`dovetail exited (${child.exitCode ?? child.signalCode}) before ${what}; stderr: ${stderr}; stdout: ${JSON.stringify(lines)}`);
        return undefined;
      },
      ms,
    );
  let ready: LogLine;
  try {
    ready = await waitForLine(`dovetail ${args[0]} to be ready`, (l) => l.event === readyEvent);
  } catch (err) {
    if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
    await exited;
    throw err;
  }
  return {
    process: child,
    lines,
    text,
    stderr: () => stderr,
    ready,
    waitForLine,
    exited,
    async stop(signal: NodeJS.Signals = 'SIGTERM', ms = 30_000) {
      if (child.exitCode !== null || child.signalCode !== null) return exited;
      child.kill(signal);
      const t = setTimeout(() => child.kill('SIGKILL'), ms);
      const r = await exited;
      clearTimeout(t);
      return r;
    },
  };
}

/** The first gateway port of a `listening` line. */
export function listenPort(ready: LogLine): number {
  const l = (ready['listen'] as { port: number }[] | undefined)?.[0];
  if (!l) throw new Error(`no listen address in ${JSON.stringify(ready)}`);
  return l.port;
}
