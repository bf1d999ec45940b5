/**
 * Test helper: a private Dovecot 2.3 (dovecot-core) whose only job is its auth service, as
 * the SASL backend of a real Postfix (`smtpd_sasl_type = dovecot`,
 * `smtpd_sasl_path = inet:127.0.0.1:PORT`). It runs in a temp dir (base_dir, state_dir and
 * log there), with no protocols, a passwd-file passdb holding the given users with {PLAIN}
 * passwords, mechanisms PLAIN and LOGIN, plaintext auth allowed (Postfix itself only offers
 * AUTH after STARTTLS), no failure delay (so a wrong-password test does not wait 2 s), and
 * an `inet_listener` of `service auth` on a free loopback port speaking Dovecot's auth
 * client protocol. It resolves once a client handshake on that port (VERSION, CPID → MECH
 * lines, DONE) works, and throws (never skips) when the dovecot binary is missing.
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

export interface DovecotAuth {
  /** The auth service's loopback TCP port (for `smtpd_sasl_path = inet:127.0.0.1:PORT`). */
  readonly port: number;
  /** Dovecot's log so far. */
  log(): Promise<string>;
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

/** Starts Dovecot's auth service alone, with these users (PLAIN and LOGIN). */
export async function startDovecotAuth(users: readonly DovecotAuthUser[]): Promise<DovecotAuth> {
  const dovecot = requireBinary('dovecot', 'Debian package "dovecot-core" (2.3)');
  const doveadm = requireBinary('doveadm', 'Debian package "dovecot-core" (2.3)');
  for (const u of users) {
    // passwd-file fields are split on ':'; a newline would start another entry.
    if (/[:\n\r]/.test(u.user) || /[:\n\r]/.test(u.password) || u.user === '') {
      throw new Error(`startDovecotAuth: user/password may not be empty or contain ':' or newlines: ${JSON.stringify(u.user)}`);
    }
  }
  const root = process.getuid?.() === 0;
  // Short path: Dovecot's unix sockets live in base_dir (sun_path is 108 bytes).
  const dir = await fs.mkdtemp(path.join(os.tmpdir(), 'dvta-'));
  // The auth process runs as the internal user (dovecot) and reads the passwd-file.
  await fs.chmod(dir, 0o755);
  for (const d of ['run', 'state']) await fs.mkdir(path.join(dir, d));
  const passwd = path.join(dir, 'passwd');
  await fs.writeFile(passwd, users.map((u) => `${u.user}:{PLAIN}${u.password}::::::`).join('\n') + '\n', { mode: 0o644 });
  const logFile = path.join(dir, 'dovecot.log');
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
      'service auth {',
      // An unnamed/any-named inet listener of service auth is an auth *client* socket,
      // the protocol Postfix's dovecot SASL speaks.
      '  inet_listener auth-client {',
      '    address = 127.0.0.1',
      `    port = ${port}`,
      '  }',
      '}',
      '',
    ].join('\n'),
  );
  const log = (): Promise<string> => fs.readFile(logFile, 'utf8').catch(() => '');
  // The master daemonizes; with pipes it would hold them open, so stdio goes nowhere
  // (errors go to its log file; config errors are read back with `dovecot -n` below).
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
    const text = await log();
    await fs.rm(dir, { recursive: true, force: true });
    throw new Error(`dovecot -c ${conf} exited with ${code}: ${check}\n${text}`);
  }
  let stopped = false;
  const stop = async (): Promise<void> => {
    if (stopped) return;
    stopped = true;
    const pid = Number((await fs.readFile(path.join(dir, 'run', 'master.pid'), 'utf8').catch(() => '')).trim());
    await run(doveadm, ['-c', conf, 'stop']).catch(() => undefined);
    if (pid > 0) {
      // Wait for the master to be gone; kill it by its pid if it lingers.
      for (let i = 0; i < 100; i++) {
        try {
          process.kill(pid, 0);
        } catch {
          break;
        }
        if (i === 80) {
          try {
            process.kill(pid, 'SIGKILL');
          } catch {
            /* gone meanwhile */
          }
        }
        await new Promise((r) => setTimeout(r, 50));
      }
    }
    await fs.rm(dir, { recursive: true, force: true });
  };
  // The master listens at once; the auth process starts on the first connection.
  const deadline = Date.now() + 15_000;
  let mechs: string[] = [];
  while (Date.now() < deadline) {
    mechs = await authHandshake(port);
    if (mechs.length > 0) break;
    await new Promise((r) => setTimeout(r, 100));
  }
  if (!mechs.includes('PLAIN') || !mechs.includes('LOGIN')) {
    const text = await log();
    await stop();
    throw new Error(`Dovecot auth on 127.0.0.1:${port} did not complete a handshake offering PLAIN and LOGIN (got ${JSON.stringify(mechs)}); log:\n${text}`);
  }
  return { port, log, stop };
}
