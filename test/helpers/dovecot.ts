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
 *
 * Optionally it is the whole Dovecot of a mail server, as Postfix+Dovecot setups run it:
 * - `auth: true` also runs the auth service for SMTP AUTH (Postfix's `smtpd_sasl_type =
 *   dovecot`): a passwd-file passdb with the users' `{PLAIN}` passwords (the same file as the
 *   userdb), mechanisms PLAIN and LOGIN, `auth_failure_delay = 0` (a wrong-password test
 *   does not wait 2 s; Dovecot's per-IP penalty stays on), an auth-client `inet_listener`
 *   on a free loopback port (`authPort`) and an auth-client unix socket (`authSocket`). It
 *   resolves once an auth handshake on that port works.
 * - `sieveBefore` runs Pigeonhole Sieve (Debian's dovecot-sieve) in LMTP with that script as
 *   the global `sieve_before`, and `lda_mailbox_autocreate = yes`, so `fileinto "Junk"`
 *   creates the folder (Maildir++: `Maildir/.Junk/`; see `messages(address, 'Junk')`).
 */
import { execFile, spawn } from 'node:child_process';
import { existsSync } from 'node:fs';
import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';
import { authHandshake } from './dovecot-auth.js';
import { freePort, waitForPort } from './ports.js';

const run = promisify(execFile);

export interface DovecotUser {
  /** Full address; its local part names the maildir (`%n`). */
  readonly address: string;
  /** A quota_rule storage limit, e.g. `'1K'`. */
  readonly quota?: string;
  /** Bytes of mail already in the mailbox (one message in cur/) before Dovecot starts. */
  readonly prefillBytes?: number;
  /** The password (stored `{PLAIN}`) the auth service checks, with `auth: true`. */
  readonly password?: string;
}

export interface Dovecot {
  readonly port: number;
  /** With `auth: true`: the auth service's auth-client port on 127.0.0.1 (for dovecotAuth({ host, port })). */
  readonly authPort?: number;
  /** With `auth: true`: the auth-client unix socket (mode 0666), for dovecotAuth({ path }). */
  readonly authSocket?: string;
  readonly dir: string;
  /** `<dir>/mail/<local part>/Maildir`. */
  maildir(address: string): string;
  /** Messages in new/ of INBOX, or of `folder` (`Maildir/.<folder>/new`), oldest first by name. */
  messages(address: string, folder?: string): Promise<Buffer[]>;
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
  /**
   * Also run the auth service (SMTP AUTH backend) on a free loopback port and a unix socket;
   * every user needs a `password`.
   */
  readonly auth?: boolean;
  /**
   * A global Sieve script run before the users' own (Pigeonhole's `sieve_before`) on every
   * LMTP delivery, e.g. `require "fileinto"; if header :contains "X-Spam-Level" "*****" { fileinto "Junk"; }`.
   * Needs Debian's dovecot-sieve.
   */
  readonly sieveBefore?: string;
}

const SIEVE_PLUGIN = '/usr/lib/dovecot/modules/lib90_sieve_plugin.so';

/** Starts Dovecot LMTP with these users. */
export async function startDovecot(users: readonly DovecotUser[], options: DovecotOptions = {}): Promise<Dovecot> {
  for (const b of BINARIES) {
    if (!existsSync(b)) throw new Error(`${b} is missing: install dovecot-core and dovecot-lmtpd (see .ci/run)`);
  }
  if (options.sieveBefore !== undefined && !existsSync(SIEVE_PLUGIN)) {
    throw new Error(`${SIEVE_PLUGIN} is missing: install dovecot-sieve (Pigeonhole; scripts/install-peers.sh)`);
  }
  if (options.auth) {
    for (const u of users) {
      if (u.password === undefined || u.password === '' || /[:\n\r]/.test(u.password)) {
        throw new Error(`startDovecot: with auth, ${u.address} needs a password without ':' or newlines`);
      }
    }
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
    const password = options.auth && u.password !== undefined ? `{PLAIN}${u.password}` : '';
    return `${u.address.toLowerCase()}:${password}:${uid}:${gid}::${path.join(mail, localPart(u.address))}::${extra}`;
  });
  await fs.writeFile(path.join(dir, 'users'), userLines.join('\n') + '\n');
  const authPort = options.auth ? await freePort() : undefined;
  const authSocket = options.auth ? path.join(dir, 'run', 'auth-client') : undefined;
  const sieveDir = path.join(dir, 'sieve');
  if (options.sieveBefore !== undefined) {
    await fs.mkdir(sieveDir);
    await fs.writeFile(path.join(sieveDir, 'before.sieve'), options.sieveBefore, { mode: 0o644 });
  }
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
      ...(options.sieveBefore !== undefined
        ? [
            // Pigeonhole in LMTP: the global script first, then the user's own (none here).
            'protocol lmtp {',
            '  mail_plugins = $mail_plugins sieve',
            '}',
            // fileinto "Junk" creates the folder when it is missing.
            'lda_mailbox_autocreate = yes',
            'lda_mailbox_autosubscribe = yes',
          ]
        : []),
      'plugin {',
      '  quota = maildir:User quota',
      ...(options.sieveBefore !== undefined ? [`  sieve_before = ${path.join(sieveDir, 'before.sieve')}`] : []),
      '}',
      ...(options.auth
        ? [
            'auth_mechanisms = plain login',
            'auth_failure_delay = 0',
            'passdb {',
            '  driver = passwd-file',
            `  args = scheme=PLAIN username_format=%Lu ${path.join(dir, 'users')}`,
            '}',
            'service auth {',
            // Any inet listener of service auth, and a unix listener not named
            // auth-login/-master/-userdb/-token, speak the auth-client protocol.
            '  inet_listener auth-client {',
            '    address = 127.0.0.1',
            `    port = ${authPort}`,
            '  }',
            `  unix_listener ${path.basename(authSocket!)} {`,
            '    mode = 0666',
            '  }',
            '}',
          ]
        : ['passdb {', '  driver = static', '  args = nopassword=y', '}']),
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
  // The LMTP process (the user's uid) compiles the global script next to it (before.svbin).
  if (root && options.sieveBefore !== undefined) await run('chown', ['-R', 'mail:mail', sieveDir]);
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
    // A service process with clients still connected (auth serving an open auth-client
    // connection) outlives the master: note the children first, end them afterwards.
    const children = options.auth && pid > 0 ? await childrenOf(pid) : [];
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
    for (const c of children) await endDovecotChild(c);
    await fs.rm(dir, { recursive: true, force: true });
  };
  try {
    await waitForPort(port, 10_000, undefined, 'dovecot', log);
    if (authPort !== undefined) {
      // The master listens at once; the auth process starts on the first connection.
      const deadline = Date.now() + 15_000;
      let mechs: string[] = [];
      while (Date.now() < deadline && mechs.length === 0) {
        mechs = await authHandshake(authPort);
        if (mechs.length === 0) await new Promise((r) => setTimeout(r, 100));
      }
      if (!mechs.includes('PLAIN')) throw new Error(`Dovecot auth on 127.0.0.1:${authPort} did not complete a handshake offering PLAIN (got ${JSON.stringify(mechs)}); log:\n${await log()}`);
    }
  } catch (err) {
    await stop();
    throw err;
  }
  return {
    port,
    ...(authPort !== undefined ? { authPort } : {}),
    ...(authSocket !== undefined ? { authSocket } : {}),
    dir,
    maildir: (address) => path.join(mail, localPart(address), 'Maildir'),
    async messages(address, folder) {
      const md = path.join(mail, localPart(address), 'Maildir');
      const d = folder === undefined || folder === 'INBOX' ? path.join(md, 'new') : path.join(md, `.${folder}`, 'new');
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

/** SIGTERMs `pid` if it is still a Dovecot process (pids get reused), SIGKILLs it after 2 s, waits up to 3 s. */
async function endDovecotChild(pid: number): Promise<void> {
  const alive = async (): Promise<boolean> => /^(\/usr\/sbin\/)?dovecot\b/.test(await fs.readFile(`/proc/${pid}/cmdline`, 'utf8').catch(() => ''));
  for (let i = 0; i < 60; i++) {
    if (!(await alive())) return;
    if (i === 0 || i === 40) {
      try {
        process.kill(pid, i === 0 ? 'SIGTERM' : 'SIGKILL');
      } catch {
        return;
      }
    }
    await new Promise((r) => setTimeout(r, 50));
  }
}
