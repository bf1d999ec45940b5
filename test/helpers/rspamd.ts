/**
 * Test helper: a real rspamd (Debian's 3.4) in a private temp dir: its packaged rules and
 * modules (/etc/rspamd) with this project's overrides (test/fixtures/rspamd, copied into the
 * temp dir and used as $LOCAL_CONFDIR), and only one worker, rspamd_proxy in milter mode with
 * self_scan, on a free loopback port. Database, run and log dirs are in the temp dir; DNS
 * goes to a closed loopback port (fails at once) and the modules that need the network are
 * off. Ready means: the port accepts and the proxy answers a milter OPTNEG (whose reply is
 * kept: what rspamd asks for). A missing binary is an error with a clear message, never a
 * skip: scripts/install-peers.sh installs rspamd.
 */
import { spawn } from 'node:child_process';
import { existsSync, readFileSync } from 'node:fs';
import fs from 'node:fs/promises';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { FrameDecoder } from '../../lib/milter/protocol/codec.js';
import { encodeCommand } from '../../lib/milter/protocol/commands.js';
import { OFFERED_ACTIONS, OFFERED_PROTOCOL } from '../../lib/milter/protocol/client.js';
import { SMFI_PROT_VERSION } from '../../lib/milter/protocol/constants.js';
import { decodeReply } from '../../lib/milter/protocol/replies.js';
import { repoRoot } from './libmilter.js';
import { freePort } from './ports.js';

const RSPAMD = ['/usr/bin/rspamd', '/usr/sbin/rspamd'];
export const RSPAMD_FIXTURES = path.join(repoRoot, 'test/fixtures/rspamd');

/** What rspamd answered to connectMilter's OPTNEG offer (version 6, every action, every flag it honours). */
export interface RspamdNegotiation {
  readonly version: number;
  readonly actions: number;
  readonly protocol: number;
}

export interface RunningRspamd {
  readonly port: number;
  /** The socket spec for connectMilter(). */
  readonly spec: string;
  readonly pid: number;
  /** How long start-up took, ms (process start to the first OPTNEG answered). */
  readonly startupMs: number;
  readonly negotiation: RspamdNegotiation;
  /** The tail of rspamd's log file and of its stdout/stderr (for failure messages). */
  log(): Promise<string>;
  /**
   * SIGTERM to the main process (it stops its workers), SIGKILL after 5 s to it and to any
   * worker still there; removes the temp dir.
   */
  stop(): Promise<void>;
}

function findRspamd(): string {
  const hit = RSPAMD.find((p) => existsSync(p));
  if (!hit) throw new Error(`rspamd is not installed (looked in ${RSPAMD.join(', ')}): apt-get install rspamd (scripts/install-peers.sh)`);
  return hit;
}

/** One OPTNEG round trip (then QUIT): rejects on anything but an OPTNEG reply within `ms`. */
async function probe(port: number, ms: number): Promise<RspamdNegotiation> {
  const socket = net.connect(port, '127.0.0.1');
  try {
    return await new Promise<RspamdNegotiation>((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`no OPTNEG reply within ${ms} ms`)), ms);
      const decoder = new FrameDecoder();
      socket.once('error', (err) => {
        clearTimeout(timer);
        reject(err);
      });
      socket.once('close', () => {
        clearTimeout(timer);
        reject(new Error('closed before the OPTNEG reply'));
      });
      socket.once('connect', () => {
        // Exactly connectMilter's offer, so the reply is what connectMilter negotiates.
        socket.write(encodeCommand({ type: 'optneg', version: SMFI_PROT_VERSION, actions: OFFERED_ACTIONS, protocol: OFFERED_PROTOCOL, macros: [] }));
      });
      socket.on('data', (chunk: Buffer) => {
        try {
          for (const frame of decoder.push(chunk)) {
            const r = decodeReply(frame);
            if (r.type !== 'optneg') throw new Error(`unexpected reply ${r.type} to OPTNEG`);
            clearTimeout(timer);
            socket.write(encodeCommand({ type: 'quit' }));
            resolve({ version: r.version, actions: r.actions, protocol: r.protocol });
            return;
          }
        } catch (err) {
          clearTimeout(timer);
          reject(err as Error);
        }
      });
    });
  } finally {
    socket.end();
    setTimeout(() => socket.destroy(), 1000).unref();
  }
}

/** The live child processes of `pid` that are rspamd's (its workers: proxy, hs_helper). */
function rspamdChildren(pid: number): number[] {
  let list: string;
  try {
    list = readFileSync(`/proc/${pid}/task/${pid}/children`, 'utf8');
  } catch {
    return [];
  }
  return list
    .split(/\s+/)
    .filter(Boolean)
    .map(Number)
    .filter((child) => isRspamd(child));
}

/** `pid` is alive and is an rspamd process (not a reused pid). */
function isRspamd(pid: number): boolean {
  try {
    return /^rspamd/.test(readFileSync(`/proc/${pid}/cmdline`, 'latin1'));
  } catch {
    return false;
  }
}

function signal(pid: number, sig: NodeJS.Signals): void {
  if (!(pid > 0)) return; // never -1 (every process) or 0 (our group)
  try {
    process.kill(pid, sig);
  } catch {
    /* already gone */
  }
}

/** Starts rspamd as described above and waits until the proxy answers OPTNEG. */
export async function startRspamd(options: { readyTimeout?: number } = {}): Promise<RunningRspamd> {
  const rspamd = findRspamd();
  const readyTimeout = options.readyTimeout ?? 45_000;
  const dir = await fs.mkdtemp(path.join(os.tmpdir(), 'dovetail-rspamd-'));
  const conf = path.join(dir, 'conf');
  const dirs = { DBDIR: path.join(dir, 'db'), RUNDIR: path.join(dir, 'run'), LOGDIR: path.join(dir, 'log') };
  await fs.cp(RSPAMD_FIXTURES, conf, { recursive: true });
  for (const d of Object.values(dirs)) await fs.mkdir(d);
  const port = await freePort();
  // A port nothing listens on (checked for TCP a moment ago; UDP there is just as closed in practice).
  const dnsPort = await freePort();
  const vars = { LOCAL_CONFDIR: conf, ...dirs, PROXY_PORT: String(port), DNS_PORT: String(dnsPort) };
  // As root (these machines): -i lets the workers run as root too; otherwise it runs as the caller.
  const asRoot = process.getuid?.() === 0 ? ['-i', '-u', 'root', '-g', 'root'] : [];
  const args = ['-f', ...asRoot, '-c', path.join(conf, 'rspamd.conf'), ...Object.entries(vars).map(([k, v]) => `--var=${k}=${v}`)];
  const logFile = path.join(dirs.LOGDIR, 'rspamd.log');
  const started = Date.now();
  // Not detached: a Ctrl-C of the test run reaches rspamd too.
  const child = spawn(rspamd, args, { stdio: ['ignore', 'pipe', 'pipe'], cwd: dir });
  const mainPid = child.pid ?? -1;
  // If this process ends without stop() (a cancelled run), the main process still gets
  // SIGTERM and takes its workers down with it.
  const onExit = (): void => signal(mainPid, 'SIGTERM');
  process.once('exit', onExit);
  let out = '';
  const keep = (d: Buffer): void => {
    if (out.length < 64_000) out += d.toString();
  };
  child.stdout?.on('data', keep);
  child.stderr?.on('data', keep);
  let spawnError: Error | undefined;
  const exited = new Promise<void>((resolve) => {
    child.once('exit', () => resolve());
    // A failed spawn emits 'error' and no 'exit'.
    child.once('error', (err) => {
      spawnError = err;
      keep(Buffer.from(`spawn ${rspamd}: ${err.message}\n`));
      resolve();
    });
  });

  const log = async (): Promise<string> => {
    let file = '';
    try {
      file = (await fs.readFile(logFile, 'utf8')).split('\n').slice(-60).join('\n');
    } catch {
      file = '(no log file)';
    }
    return `--- rspamd stdout/stderr:\n${out.slice(-4000)}\n--- ${logFile} (last lines):\n${file}`;
  };
  let stopped = false;
  const stop = async (): Promise<void> => {
    if (stopped) return;
    stopped = true;
    process.off('exit', onExit);
    const workers = new Set(rspamdChildren(mainPid));
    if (child.exitCode === null && child.signalCode === null && !spawnError && mainPid > 0) {
      signal(mainPid, 'SIGTERM');
      const t = setTimeout(() => {
        for (const w of rspamdChildren(mainPid)) workers.add(w);
        signal(mainPid, 'SIGKILL');
      }, 5000);
      await exited;
      clearTimeout(t);
    }
    // Workers that outlived the main process (it was killed): by their pids, checked.
    for (const w of workers) if (isRspamd(w)) signal(w, 'SIGKILL');
    await fs.rm(dir, { recursive: true, force: true });
  };

  try {
    // Polled with OPTNEG, not just a connect: the main process binds the port before it
    // forks the proxy, so the port accepts before anything answers.
    let negotiation: RspamdNegotiation | undefined;
    let lastError: unknown;
    while (!negotiation) {
      if (child.exitCode !== null || spawnError) throw new Error(`rspamd exited (code ${child.exitCode}) ${spawnError?.message ?? ''}`);
      const left = started + readyTimeout - Date.now();
      if (left <= 0) throw new Error(`rspamd's proxy did not answer OPTNEG within ${readyTimeout} ms: ${String(lastError)}`);
      try {
        negotiation = await probe(port, Math.min(left, 5000));
      } catch (err) {
        lastError = err;
        await new Promise((r) => setTimeout(r, 100));
      }
    }
    const startupMs = Date.now() - started;
    return { port, spec: `inet:127.0.0.1:${port}`, pid: mainPid, startupMs, negotiation, log, stop };
  } catch (err) {
    const text = await log();
    await stop();
    throw new Error(`rspamd did not start: ${(err as Error).message}\n${text}`);
  }
}
