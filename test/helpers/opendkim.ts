/**
 * Test helper: opendkim in signing mode in a private temp dir, on a free loopback port,
 * with a key made by opendkim-genkey. A missing binary is an error with a clear message,
 * never a skip: CI installs opendkim and opendkim-tools (.ci/run).
 */
import { spawn, spawnSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { stopChild } from './libmilter.js';
import { freePort, waitForPort } from './ports.js';

const OPENDKIM = ['/usr/sbin/opendkim', '/usr/bin/opendkim'];
const GENKEY = ['/usr/sbin/opendkim-genkey', '/usr/bin/opendkim-genkey'];

function find(candidates: readonly string[], what: string): string {
  const hit = candidates.find((p) => existsSync(p));
  if (!hit) throw new Error(`${what} is not installed (looked in ${candidates.join(', ')}): apt-get install opendkim opendkim-tools (CI: .ci/run)`);
  return hit;
}

export interface RunningOpenDkim {
  readonly port: number;
  readonly domain: string;
  readonly selector: string;
  /** The DNS TXT record value for `<selector>._domainkey.<domain>`. */
  readonly txt: string;
  log(): string;
  stop(): Promise<void>;
}

/** Starts opendkim signing for `domain` with a fresh key. */
export async function startOpenDkim(options: { domain?: string; selector?: string; canonicalization?: string } = {}): Promise<RunningOpenDkim> {
  const opendkim = find(OPENDKIM, 'opendkim');
  const genkey = find(GENKEY, 'opendkim-genkey');
  const domain = options.domain ?? 'sender.test';
  const selector = options.selector ?? 'test';
  const dir = await fs.mkdtemp(path.join(os.tmpdir(), 'dovetail-opendkim-'));
  const g = spawnSync(genkey, ['-b', '1024', '-D', dir, '-d', domain, '-s', selector], { encoding: 'utf8' });
  if (g.status !== 0) throw new Error(`opendkim-genkey failed: ${g.stderr}`);
  // sel.txt: `sel._domainkey IN TXT ( "v=DKIM1; h=sha256; k=rsa; " "p=..." )  ; comment`
  const record = await fs.readFile(path.join(dir, `${selector}.txt`), 'utf8');
  const txt = [...record.replace(/;[^"\n]*$/gm, '').matchAll(/"([^"]*)"/g)].map((m) => m[1]).join('');
  const port = await freePort();
  const conf = [
    'Mode s',
    `Domain ${domain}`,
    `Selector ${selector}`,
    `KeyFile ${path.join(dir, `${selector}.private`)}`,
    `Socket inet:${port}@127.0.0.1`,
    'Background no',
    'Syslog no',
    'RequireSafeKeys no',
    `PidFile ${path.join(dir, 'opendkim.pid')}`,
    `Canonicalization ${options.canonicalization ?? 'relaxed/simple'}`,
    'InternalHosts 127.0.0.1',
    '',
  ].join('\n');
  const confPath = path.join(dir, 'opendkim.conf');
  await fs.writeFile(confPath, conf);
  const child = spawn(opendkim, ['-x', confPath, '-f'], { stdio: ['ignore', 'pipe', 'pipe'] });
  let log = '';
  const keep = (d: Buffer): void => {
    if (log.length < 64_000) log += d.toString();
  };
  child.stdout?.on('data', keep);
  child.stderr?.on('data', keep);
  await waitForPort(port, 15_000, child, 'opendkim');
  return {
    port,
    domain,
    selector,
    txt,
    log: () => log,
    async stop() {
      await stopChild(child);
      await fs.rm(dir, { recursive: true, force: true });
    },
  };
}
