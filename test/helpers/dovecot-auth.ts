/**
 * Test helper: a private Dovecot 2.3 (dovecot-core) whose only job is its auth service, as
 * the SASL backend of a real Postfix (`smtpd_sasl_type = dovecot`,
 * `smtpd_sasl_path = inet:127.0.0.1:PORT`). It runs in a temp dir (base_dir, state_dir and
 * log there), with no protocols, a passwd-file passdb holding the given users with {PLAIN}
 * passwords, mechanisms PLAIN and LOGIN, plaintext auth allowed (Postfix itself only offers
 * AUTH after STARTTLS), no failure delay (so a wrong-password test does not wait 2 s), and
 * an `inet_listener` of `service auth` on a free loopback port speaking Dovecot's auth
 * client protocol, and the same service on a unix socket in base_dir (mode 0666). It
 * resolves once a client handshake on that port (VERSION, CPID → MECH lines, DONE) works,
 * and throws (never skips) when the dovecot binary is missing.
 *
 * With `tempfailUsers`, a second passdb (checkpassword, a shell script) answers those users
 * with exit code 111, Dovecot's "temporary failure", so the auth service replies
 * `FAIL … code=temp_fail` for them whatever the password.
 */
import { execFile, spawn } from 'node:child_process';
import fs from 'node:fs/promises';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';
import { requireBinary } from './postfix.js';
import { freePort } from './ports.js';

const run = promisify(execFile);

export interface DovecotAuthUser {
  readonly user: string;
  readonly password: string;
}

export interface DovecotAuthOptions {
  /** Users for whom the passdb fails temporarily (checkpassword exit 111). */
  readonly tempfailUsers?: readonly string[];
}

export interface DovecotAuth {
  /** The auth service's loopback TCP port (for `smtpd_sasl_path = inet:127.0.0.1:PORT`). */
  readonly port: number;
  /** The auth service's unix socket (an auth-client listener, mode 0666). */
  readonly socketPath: string;
  /** Dovecot's log so far. */
  log(): Promise<string>;
  /** Stops Dovecot (its files stay), starts it again on the same port and socket, waits for a handshake. */
  restart(): Promise<void>;
  /** Stops Dovecot, leaving its files (for restart()). */
  halt(): Promise<void>;
  stop(): Promise<void>;
}

/**
 * One auth-protocol client handshake: sends `VERSION 1 2` and `CPID`, reads the server's
 * lines up to `DONE`; resolves with the mechanisms offered (empty on failure or timeout).
 */
export function authHandshake(port: number, ms = 2000): Promise<string[]> {
  return new Promise((resolve) => {
    const s = net.connect(port, '127.0.0.1');
    let buf = '';
    const done = (mechs: string[]): void => {
      s.destroy();
      resolve(mechs);
    };
    s.setTimeout(ms, () => done([]));
    s.on('error', () => done([]));
    s.on('connect', () => s.write(`VERSION\t1\t2\nCPID\t${process.pid}\n`));
    s.on('data', (d: Buffer) => {
      buf += d.toString('utf8');
      const lines = buf.split('\n');
      if (!lines.includes('DONE')) return;
      if (!(lines[0] ?? '').startsWith('VERSION\t1\t')) return done([]);
      done(lines.filter((l) => l.startsWith('MECH\t')).map((l) => l.split('\t')[1] ?? ''));
    });
    s.on('end', () => done([]));
  });
}

/** The pids whose parent is `pid` (from /proc). */
async function childrenOf(pid: number): Promise<number[]> {
  const out: number[] = [];
  for (const name of await fs.readdir('/proc').catch(() => [] as string[])) {
    if (!/^\d+$/.test(name)) continue;
    const stat = await fs.readFile(`/proc/${name}/stat`, 'utf8').catch(() => '');
    // "pid (comm) state ppid …": comm may hold spaces and parentheses, so parse after the last ')'.
    const ppid = Number(stat.slice(stat.lastIndexOf(')') + 2).split(' ')[1]);
    if (ppid === pid) out.push(Number(name));
  }
  return out;
}

/** True while `pid` is a Dovecot process (its command line starts with "dovecot"). */
async function isDovecot(pid: number): Promise<boolean> {
  const cmd = await fs.readFile(`/proc/${pid}/cmdline`, 'utf8').catch(() => '');
  return /^(\/usr\/sbin\/)?dovecot\b/.test(cmd);
}

/** Sends `signal` to `pid` if it is still a Dovecot process (pids get reused). */
async function signalDovecot(pid: number, signal: NodeJS.Signals): Promise<void> {
  if (!(await isDovecot(pid))) return;
  try {
    process.kill(pid, signal);
  } catch {
    /* gone meanwhile */
  }
}

/** Waits up to 4 s for `pid` to exit (or stop being Dovecot), then SIGKILLs it and waits up to 1 s more. */
async function waitGone(pid: number): Promise<void> {
  for (let i = 0; i < 100; i++) {
    if (!(await isDovecot(pid))) return;
    if (i === 80) await signalDovecot(pid, 'SIGKILL');
    await new Promise((r) => setTimeout(r, 50));
  }
}

/** Starts Dovecot's auth service alone, with these users (PLAIN and LOGIN). */
export async function startDovecotAuth(users: readonly DovecotAuthUser[], options: DovecotAuthOptions = {}): Promise<DovecotAuth> {
  const dovecot = requireBinary('dovecot', 'Debian package "dovecot-core" (2.3)');
  const doveadm = requireBinary('doveadm', 'Debian package "dovecot-core" (2.3)');
  for (const u of users) {
    // passwd-file fields are split on ':'; a newline would start another entry.
    if (/[:\n\r]/.test(u.user) || /[:\n\r]/.test(u.password) || u.user === '') {
      throw new Error(`startDovecotAuth: user/password may not be empty or contain ':' or newlines: ${JSON.stringify(u.user)}`);
    }
  }
  const tempfailUsers = options.tempfailUsers ?? [];
  for (const u of tempfailUsers) {
    if (!/^[A-Za-z0-9._@-]+$/.test(u)) throw new Error(`startDovecotAuth: tempfail user must be [A-Za-z0-9._@-]+: ${JSON.stringify(u)}`);
  }
  const root = process.getuid?.() === 0;
  // Short path: Dovecot's unix sockets live in base_dir (sun_path is 108 bytes).
  const dir = await fs.mkdtemp(path.join(os.tmpdir(), 'dvta-'));
  // The auth process runs as the internal user (dovecot) and reads the passwd-file.
  await fs.chmod(dir, 0o755);
  for (const d of ['run', 'state']) await fs.mkdir(path.join(dir, d));
  const passwd = path.join(dir, 'passwd');
  await fs.writeFile(passwd, users.map((u) => `${u.user}:{PLAIN}${u.password}::::::`).join('\n') + '\n', { mode: 0o644 });
  const checkpassword = path.join(dir, 'checkpassword');
  if (tempfailUsers.length > 0) {
    // checkpassword protocol: "user\0password\0…" on fd 3; exit 1 = refused, 111 = temporary failure.
    await fs.writeFile(
      checkpassword,
      ['#!/bin/sh', "user=$(tr '\\000' '\\n' <&3 | head -n 1)", 'case "$user" in', `  ${tempfailUsers.join('|')}) exit 111 ;;`, 'esac', 'exit 1', ''].join('\n'),
      { mode: 0o755 },
    );
  }
  const logFile = path.join(dir, 'dovecot.log');
  const socketPath = path.join(dir, 'run', 'dovetail-auth');
  const port = await freePort();
  const conf = path.join(dir, 'dovecot.conf');
  const asUser = root ? [] : [`default_internal_user = ${os.userInfo().username}`, `default_login_user = ${os.userInfo().username}`];
  await fs.writeFile(
    conf,
    [
      `base_dir = ${path.join(dir, 'run')}`,
      `state_dir = ${path.join(dir, 'state')}`,
      `log_path = ${logFile}`,
      `info_log_path = ${logFile}`,
      ...asUser,
      // No IMAP/POP3/LMTP: the master still runs the auth service for its listener.
      'protocols =',
      'ssl = no',
      'listen = 127.0.0.1',
      'auth_mechanisms = plain login',
      'disable_plaintext_auth = no',
      'auth_failure_delay = 0',
      'passdb {',
      '  driver = passwd-file',
      `  args = scheme=PLAIN username_format=%u ${passwd}`,
      '}',
      ...(tempfailUsers.length > 0 ? ['passdb {', '  driver = checkpassword', `  args = ${checkpassword}`, '}'] : []),
      'service auth {',
      // An unnamed/any-named inet listener of service auth is an auth *client* socket,
      // the protocol Postfix's dovecot SASL speaks.
      '  inet_listener auth-client {',
      '    address = 127.0.0.1',
      `    port = ${port}`,
      '  }',
      // A unix listener whose name is not auth-login/-master/-userdb/-token is one too.
      `  unix_listener ${path.basename(socketPath)} {`,
      '    mode = 0666',
      '  }',
      '}',
      '',
    ].join('\n'),
  );
  const log = (): Promise<string> => fs.readFile(logFile, 'utf8').catch(() => '');
  // Starts the master; it daemonizes. With pipes it would hold them open, so stdio goes
  // nowhere (errors go to its log file; config errors are read back with `dovecot -n`).
  const launch = async (): Promise<void> => {
    const code = await new Promise<number | null>((resolve, reject) => {
      const child = spawn(dovecot, ['-c', conf], { stdio: ['ignore', 'ignore', 'ignore'] });
      child.once('error', reject);
      child.once('exit', (c) => resolve(c));
    });
    if (code !== 0) {
      const check = await run(dovecot, ['-n', '-c', conf]).then(
        (r) => r.stderr,
        (e: { stderr?: string }) => e.stderr ?? String(e),
      );
      throw new Error(`dovecot -c ${conf} exited with ${code}: ${check}\n${await log()}`);
    }
  };
  // Stops the master (doveadm stop), waiting until its pid is gone; SIGKILL if it lingers.
  // Its children go too: a service process with clients still connected (the auth process
  // serving an open auth-client connection) outlives the master, serving them, so each of
  // the master's children (found before the stop) is killed if still there afterwards, as
  // a service manager stopping Dovecot would.
  let running = false;
  const halt = async (): Promise<void> => {
    if (!running) return;
    running = false;
    const pid = Number((await fs.readFile(path.join(dir, 'run', 'master.pid'), 'utf8').catch(() => '')).trim());
    const children = pid > 0 ? await childrenOf(pid) : [];
    await run(doveadm, ['-c', conf, 'stop']).catch(() => undefined);
    if (pid > 0) await waitGone(pid);
    for (const c of children) await signalDovecot(c, 'SIGTERM');
    for (const c of children) await waitGone(c);
  };
  let stopped = false;
  const stop = async (): Promise<void> => {
    if (stopped) return;
    stopped = true;
    await halt();
    await fs.rm(dir, { recursive: true, force: true });
  };
  // The master listens at once; the auth process starts on the first connection.
  const ready = async (): Promise<void> => {
    const deadline = Date.now() + 15_000;
    let mechs: string[] = [];
    while (Date.now() < deadline) {
      mechs = await authHandshake(port);
      if (mechs.length > 0) break;
      await new Promise((r) => setTimeout(r, 100));
    }
    if (!mechs.includes('PLAIN') || !mechs.includes('LOGIN')) {
      throw new Error(`Dovecot auth on 127.0.0.1:${port} did not complete a handshake offering PLAIN and LOGIN (got ${JSON.stringify(mechs)}); log:\n${await log()}`);
    }
  };
  const start = async (): Promise<void> => {
    await launch();
    running = true;
    await ready();
  };
  try {
    await start();
  } catch (err) {
    await stop();
    throw err;
  }
  const restart = async (): Promise<void> => {
    if (stopped) throw new Error('startDovecotAuth: restart() after stop()');
    await halt();
    await start();
  };
  return { port, socketPath, log, restart, halt, stop };
}
