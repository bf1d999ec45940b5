/**
 * Test helpers for real milter peers: a free loopback port, waiting for a port to accept,
 * and the python3-milter reference filter (test/fixtures/libmilter/reference.py, on the
 * real C libmilter) started on a free port. A missing peer is an error with a clear
 * message, never a skip: CI installs python3-milter (.ci/run).
 */
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { existsSync } from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { freePort, waitForPort } from './ports.js';

/** The repository root (dist/test/helpers → ../../..). */
export const repoRoot = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../..');
export const PYTHON = '/usr/bin/python3';
export const REFERENCE_FILTER = path.join(repoRoot, 'test/fixtures/libmilter/reference.py');



/** Resolves once a unix socket at `p` accepts a connection. */
async function waitForPath(p: string, ms: number, child: ChildProcess): Promise<void> {
  const deadline = Date.now() + ms;
  for (;;) {
    if (child.exitCode !== null) throw new Error(`reference filter exited with code ${child.exitCode}`);
    const ok = await new Promise<boolean>((resolve) => {
      const s = net.connect(p);
      s.once('connect', () => {
        s.destroy();
        resolve(true);
      });
      s.once('error', () => resolve(false));
    });
    if (ok) return;
    if (Date.now() > deadline) throw new Error(`reference filter did not listen on ${p} within ${ms} ms`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

/** Throws a clear error unless Debian's python3-milter is importable by /usr/bin/python3. */
export function requirePythonMilter(): void {
  if (!existsSync(PYTHON)) throw new Error(`${PYTHON} is missing: install Debian's python3 and python3-milter (CI: .ci/run)`);
  const r = spawnSync(PYTHON, ['-c', 'import Milter'], { encoding: 'utf8' });
  if (r.status !== 0) {
    throw new Error(`python3-milter is not installed for ${PYTHON} (apt-get install python3-milter; CI: .ci/run): ${r.stderr.trim()}`);
  }
}

export interface RunningFilter {
  readonly port: number;
  /** The socket spec to give connectMilter(). */
  readonly spec: string;
  readonly child: ChildProcess;
  /** What the filter wrote to stderr (for failure messages). */
  stderr(): string;
  stop(): Promise<void>;
}

/** Starts the reference filter in `mode` on a free port and waits until it listens. */
export async function startReferenceFilter(
  mode: 'edit' | 'slow' | 'minimal' = 'edit',
  env: Record<string, string> = {},
  unixPath?: string,
): Promise<RunningFilter> {
  requirePythonMilter();
  const port = unixPath ? 0 : await freePort();
  const spec = unixPath ? `unix:${unixPath}` : `inet:${port}@127.0.0.1`;
  const child = spawn(PYTHON, [REFERENCE_FILTER, unixPath ? spec : String(port), mode], {
    env: { ...process.env, ...env },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let err = '';
  child.stderr?.setEncoding('utf8');
  child.stderr?.on('data', (d: string) => {
    if (err.length < 64_000) err += d;
  });
  child.stdout?.resume();
  if (unixPath) await waitForPath(unixPath, 15_000, child);
  else await waitForPort(port, 15_000, child, `reference filter (${err})`);
  return {
    port,
    spec,
    child,
    stderr: () => err,
    stop: () => stopChild(child),
  };
}

/** SIGTERM, then SIGKILL after 3 s; resolves when the process is gone. */
export async function stopChild(child: ChildProcess): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null) return;
  const gone = new Promise<void>((resolve) => child.once('exit', () => resolve()));
  child.kill('SIGTERM');
  const t = setTimeout(() => child.kill('SIGKILL'), 3000);
  await gone;
  clearTimeout(t);
}
