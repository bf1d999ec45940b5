/**
 * Test helper: a real Dovecot LMTP server in a private temp directory (shared/PEERS.md):
 * base_dir/state_dir/log in the temp dir, `protocols = lmtp`, no TLS, Maildir under
 * `<dir>/mail/<user part>/Maildir` owned by `mail`, a passwd-file userdb listing the known
 * users (so Dovecot answers 550 5.1.1 for others), and the quota plugin with a per-user
 * `quota_rule` from userdb extra fields; `lmtp_rcpt_check_quota = yes` so a full mailbox is
 * refused at RCPT. Listens on a free loopback port.
 *
 * It throws (never skips) when the dovecot binary is missing: CI installs dovecot-core and
 * dovecot-lmtpd (.ci/run).
 */
import { execFile, spawn } from 'node:child_process';
import { existsSync } from 'node:fs';
import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';
import { freePort, waitForPort } from './ports.js';

const run = promisify(execFile);

export interface DovecotUser {
  /** Full address; its local part names the maildir (`%n`). */
  readonly address: string;
  /** A quota_rule storage limit, e.g. `'1K'`. */
  readonly quota?: string;
  /** Bytes of mail already in the mailbox (one message in cur/) before Dovecot starts. */
  readonly prefillBytes?: number;
}

export interface Dovecot {
  readonly port: number;
  readonly dir: string;
  /** `<dir>/mail/<local part>/Maildir`. */
  maildir(address: string): string;
  /** Messages in new/ (oldest first by name). */
  messages(address: string): Promise<Buffer[]>;
  log(): Promise<string>;
  stop(): Promise<void>;
}

const BINARIES = ['/usr/sbin/dovecot', '/usr/lib/dovecot/lmtp', '/usr/bin/doveadm'];



const localPart = (address: string): string => address.slice(0, address.lastIndexOf('@')).toLowerCase();

/** Settings of the started Dovecot beyond its users. */
export interface DovecotOptions {
  /**
   * Dovecot's `recipient_delimiter` (e.g. `'+'`): `bob+tag@` is delivered to user bob (the
   * detail is dropped for the userdb lookup and kept in the envelope and Delivered-To).
   */
  readonly recipientDelimiter?: string;
}

/** Starts Dovecot LMTP with these users. */
export async function startDovecot(users: readonly DovecotUser[], options: DovecotOptions = {}): Promise<Dovecot> {
  for (const b of BINARIES) {
    if (!existsSync(b)) throw new Error(`${b} is missing: install dovecot-core and dovecot-lmtpd (see .ci/run)`);
  }
  const root = process.getuid?.() === 0;
  const uid = root ? 8 : (process.getuid?.() ?? 8);
  const gid = root ? 8 : (process.getgid?.() ?? 8);
  // Short path: Dovecot's unix sockets live in base_dir (sun_path is 108 bytes).
  const dir = await fs.mkdtemp(path.join(os.tmpdir(), 'dvt-'));
  await fs.chmod(dir, 0o755);
  const mail = path.join(dir, 'mail');
  for (const d of ['run', 'state', 'mail']) await fs.mkdir(path.join(dir, d));
  const port = await freePort();
  const userLines = users.map((u) => {
    const extra = u.quota ? `userdb_quota_rule=*:storage=${u.quota}` : '';
    return `${u.address.toLowerCase()}::${uid}:${gid}::${path.join(mail, localPart(u.address))}::${extra}`;
  });
  await fs.writeFile(path.join(dir, 'users'), userLines.join('\n') + '\n');
  for (const u of users) {
    if (!u.prefillBytes) continue;
    const md = path.join(mail, localPart(u.address), 'Maildir');
    for (const sub of ['new', 'cur', 'tmp']) await fs.mkdir(path.join(md, sub), { recursive: true });
    const body = `Subject: prefill\r\n\r\n${'y'.repeat(Math.max(0, u.prefillBytes - 21))}\r\n`;
    await fs.writeFile(path.join(md, 'cur', `1700000000.M1P1.prefill,S=${Buffer.byteLength(body)}:2,S`), body);
  }
  const conf = path.join(dir, 'dovecot.conf');
  const user = root ? [] : [`default_internal_user = ${os.userInfo().username}`, `default_login_user = ${os.userInfo().username}`];
  await fs.writeFile(
    conf,
    [
      `base_dir = ${path.join(dir, 'run')}`,
      `state_dir = ${path.join(dir, 'state')}`,
      `log_path = ${path.join(dir, 'dovecot.log')}`,
      `info_log_path = ${path.join(dir, 'dovecot.log')}`,
      ...user,
      'protocols = lmtp',
      'ssl = no',
      'listen = 127.0.0.1',
      `first_valid_uid = ${Math.min(uid, 8)}`,
      `mail_location = maildir:${mail}/%n/Maildir`,
      'mail_plugins = quota',
      // Store the message's own CRLF bytes, so the body compares byte for byte.
      'mail_save_crlf = yes',
      'lmtp_rcpt_check_quota = yes',
      ...(options.recipientDelimiter ? [`recipient_delimiter = ${options.recipientDelimiter}`] : []),
      'plugin {',
      '  quota = maildir:User quota',
      '}',
      'passdb {',
      '  driver = static',
      '  args = nopassword=y',
      '}',
      'userdb {',
      '  driver = passwd-file',
      `  args = username_format=%Lu ${path.join(dir, 'users')}`,
      '}',
      'service lmtp {',
      '  inet_listener lmtp {',
      '    address = 127.0.0.1',
      `    port = ${port}`,
      '  }',
      '}',
      '',
    ].join('\n'),
  );
  if (root) await run('chown', ['-R', 'mail:mail', mail]);
  const log = (): Promise<string> => fs.readFile(path.join(dir, 'dovecot.log'), 'utf8').catch(() => '');
  // The master daemonizes; with pipes it would hold them open, so stdio goes nowhere
  // (errors go to its log file, and doveconf's to stderr before it forks).
  const code = await new Promise<number | null>((resolve, reject) => {
    const child = spawn('/usr/sbin/dovecot', ['-c', conf], { stdio: ['ignore', 'ignore', 'ignore'] });
    child.once('error', reject);
    child.once('exit', (c) => resolve(c));
  });
  if (code !== 0) {
    const check = await run('/usr/sbin/dovecot', ['-n', '-c', conf]).then((r) => r.stderr, (e: { stderr?: string }) => e.stderr ?? String(e));
    throw new Error(`dovecot -c ${conf} exited with ${code}: ${check}\n${await log()}`);
  }
  let stopped = false;
  const stop = async (): Promise<void> => {
    if (stopped) return;
    stopped = true;
    const pidFile = path.join(dir, 'run', 'master.pid');
    const pid = Number((await fs.readFile(pidFile, 'utf8').catch(() => '')).trim());
    await run('/usr/bin/doveadm', ['-c', conf, 'stop']).catch(() => undefined);
    if (pid > 0) {
      // Wait for the master to be gone; kill it by its pid if it lingers.
      for (let i = 0; i < 50; i++) {
        try {
          process.kill(pid, 0);
        } catch {
          break;
        }
        if (i === 40) process.kill(pid, 'SIGKILL');
        await new Promise((r) => setTimeout(r, 50));
      }
    }
    await fs.rm(dir, { recursive: true, force: true });
  };
  try {
    await waitForPort(port, 10_000, undefined, 'dovecot', log);
  } catch (err) {
    await stop();
    throw err;
  }
  return {
    port,
    dir,
    maildir: (address) => path.join(mail, localPart(address), 'Maildir'),
    async messages(address) {
      const d = path.join(mail, localPart(address), 'Maildir', 'new');
      // Dovecot names files `<sec>.M<usec>P<pid>…` with unpadded microseconds: sort by the numbers.
      const key = (n: string): [number, number] => {
        const m = /^(\d+)\.M(\d+)P/.exec(n);
        return m ? [Number(m[1]), Number(m[2])] : [0, 0];
      };
      const names = (await fs.readdir(d).catch(() => [] as string[])).sort((a, b) => key(a)[0] - key(b)[0] || key(a)[1] - key(b)[1]);
      return Promise.all(names.map((n) => fs.readFile(path.join(d, n))));
    },
    log,
    stop,
  };
}
