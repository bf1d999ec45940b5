/**
 * Test helper: OpenDKIM as a verifier of finished messages, the way
 * test/interop/opendkim-sign-verify.test.ts runs it: the `opendkim` filter in test mode
 * (`opendkim -x verify.conf -vvv -t message.eml`, `Mode v`), which prints the
 * Authentication-Results header it would add. The keys come from DNS: Debian's opendkim is
 * built with libunbound, pointed (`ResolverConfiguration`) at a DNS server on loopback
 * through a forward zone, with `local-zone: "test." nodefault` since unbound answers the
 * special-use .test names itself otherwise. An opendkim built without libunbound fails here
 * (it would need TestDNSData). A missing binary is an error, never a skip: CI installs
 * opendkim (.ci/run, scripts/install-peers.sh).
 */
import { execFile } from 'node:child_process';
import { existsSync } from 'node:fs';
import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';

const OPENDKIM = ['/usr/sbin/opendkim', '/usr/bin/opendkim'];

export interface OpenDkimVerifier {
  /** The Authentication-Results value opendkim would add for `message`, unfolded. */
  verify(message: Buffer | string): Promise<string>;
  close(): Promise<void>;
}

function run(file: string, args: readonly string[], cwd: string): Promise<string> {
  return new Promise((resolve, reject) => {
    execFile(file, [...args], { timeout: 30_000, cwd }, (err, stdout, stderr) => {
      if (err) reject(new Error(`${file} ${args.join(' ')} failed: ${err.message}\n${stderr}`));
      else resolve(String(stdout) + String(stderr));
    });
  });
}

/** Prepares an opendkim verifier asking the DNS server on 127.0.0.1:`dnsPort` for keys. */
export async function opendkimVerifier(dnsPort: number): Promise<OpenDkimVerifier> {
  const opendkim = OPENDKIM.find((p) => existsSync(p));
  if (!opendkim) throw new Error(`opendkim is not installed (looked in ${OPENDKIM.join(', ')}): apt-get install opendkim opendkim-tools`);
  const dir = await fs.mkdtemp(path.join(os.tmpdir(), 'dovetail-dkim-verify-'));
  const version = await run(opendkim, ['-V'], dir);
  if (!/USE_UNBOUND/.test(version)) {
    await fs.rm(dir, { recursive: true, force: true });
    throw new Error(`this opendkim is built without libunbound, so it cannot ask a loopback DNS server:\n${version}`);
  }
  const ub = path.join(dir, 'unbound.conf');
  await fs.writeFile(
    ub,
    [
      'server:',
      '  do-not-query-localhost: no',
      '  module-config: "iterator"',
      '  chroot: ""',
      '  username: ""',
      '  use-syslog: no',
      '  local-zone: "test." nodefault',
      'forward-zone:',
      '  name: "."',
      `  forward-addr: 127.0.0.1@${dnsPort}`,
      '',
    ].join('\n'),
  );
  const conf = path.join(dir, 'verify.conf');
  await fs.writeFile(conf, ['Mode v', 'Syslog no', `ResolverConfiguration ${ub}`, ''].join('\n'), { mode: 0o600 });
  let n = 0;
  return {
    async verify(message) {
      const file = path.join(dir, `message-${++n}.eml`);
      await fs.writeFile(file, message);
      const out = await run(opendkim, ['-x', conf, '-vvv', '-t', file], dir);
      const m = /hname='Authentication-Results' hvalue='([^']*)'/.exec(out);
      if (!m) throw new Error(`opendkim added no Authentication-Results:\n${out}`);
      return m[1]!.replace(/\r?\n[ \t]+/g, ' ');
    },
    async close() {
      await fs.rm(dir, { recursive: true, force: true });
    },
  };
}
