/**
 * Test helper: a real Postfix 3.7 started by the test, in a private directory on loopback,
 * as shared/PEERS.md describes: a private main.cf/master.cf (chroot off, smtpd on
 * 127.0.0.1:PORT, relay to an LMTP port, smtpd_milters pointing at our server), queue and
 * data directories and the mail log in a fresh temp dir. The milter and the LMTP relay are
 * optional: without them a caller configures delivery freely through `main`
 * (postfix-mta.ts does).
 *
 * Postfix run as root accepts `-c DIR` only for a directory that the default
 * /etc/postfix/main.cf lists in alternate_config_directories, and a maillog_file only under
 * maillog_file_prefixes. So that those two lines stay fixed (and the file does not grow per
 * run, and parallel runs write the same thing), config directories come from a small pool
 * of slots under the temp dir, each taken with a lock (mkdir) for the run.
 */
import { spawn, spawnSync } from 'node:child_process';
import fs from 'node:fs/promises';
import { existsSync, readFileSync } from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { freePort } from './ports.js';

const DEFAULT_MAIN_CF = '/etc/postfix/main.cf';
const SLOTS = 8;

/** Throws a clear error when a peer binary is missing (tests must fail, not skip). */
export function requireBinary(name: string, hint: string): string {
  for (const dir of (process.env['PATH'] ?? '').split(':').concat(['/usr/sbin', '/usr/bin', '/sbin'])) {
    const p = path.join(dir, name);
    if (dir && existsSync(p)) return p;
  }
  throw new Error(`${name} is not installed: ${hint} (CI installs it via .ci/run)`);
}


function run(cmd: string, args: string[]): { status: number; out: string } {
  const r = spawnSync(cmd, args, { encoding: 'utf8', timeout: 30_000 });
  return { status: r.status ?? 1, out: `${r.stdout ?? ''}${r.stderr ?? ''}${r.error ? String(r.error) : ''}` };
}

/** Adds `values` to a list-valued parameter of the default main.cf, keeping what is there. */
function mergeParam(text: string, name: string, values: readonly string[], defaults: readonly string[]): string {
  const re = new RegExp(`^${name}\\s*=(.*(?:\\n[ \\t].*)*)`, 'm');
  const m = re.exec(text);
  const current = m ? (m[1] ?? '').split(/[\s,]+/).filter(Boolean) : [...defaults];
  const missing = values.filter((v) => !current.includes(v));
  if (m && missing.length === 0) return text;
  const line = `${name} = ${[...current, ...missing].join(', ')}`;
  return m ? text.replace(re, line) : `${text}${text && !text.endsWith('\n') ? '\n' : ''}${line}\n`;
}

function slotBase(): string {
  return path.join(os.tmpdir(), 'dovetail-postfix-conf');
}
function logPrefix(): string {
  return path.join(os.tmpdir(), 'dovetail-postfix-');
}

/** Makes the default main.cf allow our config slots and log files (idempotent; nothing else changes). */
async function allowAlternateConfig(): Promise<void> {
  const slots = Array.from({ length: SLOTS }, (_, i) => path.join(slotBase(), `slot-${i}`));
  let text = '';
  try {
    text = await fs.readFile(DEFAULT_MAIN_CF, 'utf8');
  } catch {
    text = '';
  }
  let next = mergeParam(text, 'alternate_config_directories', slots, []);
  next = mergeParam(next, 'maillog_file_prefixes', [logPrefix()], ['/var', '/dev/stdout']);
  if (next === text) return;
  await fs.mkdir(path.dirname(DEFAULT_MAIN_CF), { recursive: true });
  const tmp = `${DEFAULT_MAIN_CF}.dovetail-${process.pid}`;
  await fs.writeFile(tmp, next);
  await fs.rename(tmp, DEFAULT_MAIN_CF);
}

function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
}

/** Takes a free config slot (lock = a directory holding our pid); a lock whose process is gone is taken over. */
async function takeSlot(): Promise<{ dir: string; release(): Promise<void> }> {
  await fs.mkdir(slotBase(), { recursive: true });
  for (let round = 0; round < 100; round++) {
    for (let i = 0; i < SLOTS; i++) {
      const lock = path.join(slotBase(), `slot-${i}.lock`);
      try {
        await fs.mkdir(lock);
      } catch {
        let pid = 0;
        try {
          pid = Number(readFileSync(path.join(lock, 'pid'), 'utf8'));
        } catch {
          /* being created */
        }
        if (pid > 0 && !alive(pid)) await fs.rm(lock, { recursive: true, force: true });
        continue;
      }
      await fs.writeFile(path.join(lock, 'pid'), String(process.pid));
      const dir = path.join(slotBase(), `slot-${i}`);
      await fs.mkdir(dir, { recursive: true });
      return { dir, release: () => fs.rm(lock, { recursive: true, force: true }) };
    }
    await new Promise((r) => setTimeout(r, 200));
  }
  throw new Error('no free Postfix config slot (8 runs at once?)');
}

export interface PostfixOptions {
  /** smtpd_milters value, e.g. `inet:127.0.0.1:PORT`; without it, no smtpd_milters line. */
  readonly milter?: string;
  /** Port of the LMTP server example.test is relayed to; without it, no transport_maps line. */
  readonly lmtpPort?: number;
  /** More main.cf settings (they override the defaults above; `''` empties one). */
  readonly main?: Readonly<Record<string, string>>;
}

export interface Postfix {
  readonly configDir: string;
  readonly queueDir: string;
  readonly smtpPort: number;
  /** The mail log so far. */
  log(): Promise<string>;
  /** `postqueue -c DIR -p` output. */
  queue(): string;
  stop(): Promise<void>;
}

/** Waits until something on 127.0.0.1:port answers with an SMTP greeting. */
async function waitSmtp(port: number, ms: number, why: () => Promise<string>): Promise<void> {
  const deadline = Date.now() + ms;
  while (Date.now() < deadline) {
    const ok = await new Promise<boolean>((resolve) => {
      const s = net.connect(port, '127.0.0.1');
      let buf = '';
      const done = (v: boolean): void => {
        s.destroy();
        resolve(v);
      };
      s.setTimeout(2000, () => done(false));
      s.on('data', (d) => {
        buf += d.toString();
        if (buf.includes('\r\n')) {
          s.write('QUIT\r\n');
          done(buf.startsWith('220'));
        }
      });
      s.on('error', () => done(false));
    });
    if (ok) return;
    await new Promise((r) => setTimeout(r, 100));
  }
  throw new Error(`Postfix did not answer on 127.0.0.1:${port} within ${ms} ms; log:\n${await why()}`);
}

export async function startPostfix(options: PostfixOptions): Promise<Postfix> {
  const postfix = requireBinary('postfix', 'Debian package "postfix" (3.7)');
  const postqueue = requireBinary('postqueue', 'Debian package "postfix" (3.7)');
  await allowAlternateConfig();
  const slot = await takeSlot();
  const base = await fs.mkdtemp(logPrefix());
  // Postfix's daemons run as user postfix and must reach the queue and data directories.
  await fs.chmod(base, 0o755);
  const queueDir = path.join(base, 'queue');
  const dataDir = path.join(base, 'data');
  const logFile = path.join(base, 'maillog');
  await fs.mkdir(queueDir, { recursive: true });
  await fs.mkdir(dataDir, { recursive: true });
  const pw = run('id', ['-u', 'postfix']);
  const gw = run('id', ['-g', 'postfix']);
  if (pw.status !== 0) throw new Error('user "postfix" does not exist: is the postfix package installed?');
  await fs.chown(dataDir, Number(pw.out.trim()), Number(gw.out.trim()));
  const smtpPort = await freePort();
  const main: Record<string, string> = {
    compatibility_level: '3.6',
    queue_directory: queueDir,
    data_directory: dataDir,
    maillog_file: logFile,
    maillog_file_prefixes: `/var, /dev/stdout, ${logPrefix()}`,
    myhostname: 'mx.postfix.test',
    mydomain: 'postfix.test',
    myorigin: '$myhostname',
    inet_interfaces: 'loopback-only',
    inet_protocols: 'ipv4',
    mydestination: '',
    mynetworks: '127.0.0.0/8',
    relay_domains: 'example.test',
    ...(options.lmtpPort !== undefined ? { transport_maps: `inline:{ example.test=lmtp:inet:127.0.0.1:${options.lmtpPort} }` } : {}),
    ...(options.milter !== undefined ? { smtpd_milters: options.milter } : {}),
    milter_default_action: 'tempfail',
    smtputf8_enable: 'no',
    alias_maps: '',
    alias_database: '',
    local_recipient_maps: '',
    biff: 'no',
    smtp_dns_support_level: 'disabled',
    smtpd_banner: '$myhostname ESMTP',
    ...options.main,
  };
  await fs.writeFile(path.join(slot.dir, 'main.cf'), Object.entries(main).map(([k, val]) => `${k} = ${val}`).join('\n') + '\n');
  const master = (await fs.readFile('/etc/postfix/master.cf', 'utf8'))
    .split('\n')
    .map((line) => {
      if (/^\s|^#|^$/.test(line)) return line;
      const f = line.split(/\s+/);
      if (f.length < 8) return line;
      f[4] = 'n';
      if (f[0] === 'smtp' && f[1] === 'inet') f[0] = `127.0.0.1:${smtpPort}`;
      return f.join('  ');
    })
    .join('\n');
  await fs.writeFile(path.join(slot.dir, 'master.cf'), master);
  const log = async (): Promise<string> => fs.readFile(logFile, 'utf8').catch(() => '(no maillog)');
  const started = run(postfix, ['-c', slot.dir, 'start']);
  if (started.status !== 0) {
    const check = run('script', ['-qc', `${postfix} -c ${slot.dir} check`, '/dev/null']);
    await slot.release();
    throw new Error(`postfix -c ${slot.dir} start failed (${started.status}): ${started.out}\ncheck: ${check.out}\nlog: ${await log()}`);
  }
  const pidFile = path.join(queueDir, 'pid', 'master.pid');
  let stopped = false;
  const stop = async (): Promise<void> => {
    if (stopped) return;
    stopped = true;
    let pid = 0;
    try {
      pid = Number((await fs.readFile(pidFile, 'utf8')).trim());
    } catch {
      /* never started */
    }
    run(postfix, ['-c', slot.dir, 'stop']);
    const deadline = Date.now() + 10_000;
    while (pid > 0 && alive(pid) && Date.now() < deadline) await new Promise((r) => setTimeout(r, 100));
    if (pid > 0 && alive(pid)) {
      run(postfix, ['-c', slot.dir, 'abort']);
      await new Promise((r) => setTimeout(r, 500));
      if (alive(pid)) process.kill(pid, 'SIGKILL');
    }
    await slot.release();
    await fs.rm(base, { recursive: true, force: true }).catch(() => undefined);
  };
  try {
    await waitSmtp(smtpPort, 20_000, log);
  } catch (err) {
    await stop();
    throw err;
  }
  return {
    configDir: slot.dir,
    queueDir,
    smtpPort,
    log,
    queue: () => run(postqueue, ['-c', slot.dir, '-p']).out,
    stop,
  };
}

/** Runs `cmd` to completion (for tools like miltertest); resolves with status and output. */
export function runTool(cmd: string, args: readonly string[], timeoutMs = 30_000): Promise<{ status: number | null; out: string }> {
  return new Promise((resolve) => {
    const child = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    child.stdout.on('data', (d) => (out += d));
    child.stderr.on('data', (d) => (out += d));
    const t = setTimeout(() => child.kill('SIGKILL'), timeoutMs);
    child.on('close', (status) => {
      clearTimeout(t);
      resolve({ status, out });
    });
    child.on('error', (err) => {
      clearTimeout(t);
      resolve({ status: null, out: `${out}${String(err)}` });
    });
  });
}
