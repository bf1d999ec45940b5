/**
 * Test helper: a real HAProxy (Debian's haproxy package, installed by
 * scripts/install-peers.sh) in TCP mode on a free loopback port, in front of the given
 * backends, round-robin, writing a PROXY header to each: `send-proxy` (v1) or
 * `send-proxy-v2` (or `send-proxy-v2-ssl` behind a TLS-terminating frontend). Private config and socket files in a temp directory; run in the
 * foreground (`-db`) as a child of the test. Throws (never skips) when the binary is missing.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync } from 'node:fs';
import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { freePort, waitForPort } from './ports.js';

export interface Haproxy {
  /** The frontend's port on 127.0.0.1. */
  readonly port: number;
  readonly dir: string;
  log(): string;
  stop(): Promise<void>;
}

const BINARY = '/usr/sbin/haproxy';

/**
 * `proxy` is the server keyword: `send-proxy` (v1), `send-proxy-v2`, or `send-proxy-v2-ssl`
 * (v2 with the SSL TLVs; give `tls` so the frontend terminates TLS, as for port 465).
 */
export async function startHaproxy(
  backends: readonly number[],
  proxy: 'send-proxy' | 'send-proxy-v2' | 'send-proxy-v2-ssl',
  options: { readonly tls?: { readonly key: string; readonly cert: string }; readonly check?: boolean } = {},
): Promise<Haproxy> {
  if (!existsSync(BINARY)) throw new Error(`${BINARY} is missing: run scripts/install-peers.sh (Debian package haproxy)`);
  const dir = await fs.mkdtemp(path.join(os.tmpdir(), 'dovetail-haproxy-'));
  const port = await freePort();
  const pem = path.join(dir, 'frontend.pem');
  if (options.tls) await fs.writeFile(pem, options.tls.cert + options.tls.key, { mode: 0o600 });
  const config = [
    'global',
    '  maxconn 200',
    `  pidfile ${path.join(dir, 'haproxy.pid')}`,
    'defaults',
    '  mode tcp',
    '  timeout connect 5s',
    '  timeout client 60s',
    '  timeout server 60s',
    'frontend smtp',
    `  bind 127.0.0.1:${port}${options.tls ? ` ssl crt ${pem}` : ''}`,
    '  default_backend gateways',
    'backend gateways',
    '  balance roundrobin',
    // send-proxy-v2-ssl sends the TLS version only; the cipher and SNI TLVs are options.
    ...backends.map((p, i) => `  server node${i + 1} 127.0.0.1:${p} ${proxy}${proxy === 'send-proxy-v2-ssl' ? ' proxy-v2-options ssl-cipher,authority' : ''}${options.check ? ' check check-send-proxy inter 200ms' : ''}`),
    '',
  ].join('\n');
  const file = path.join(dir, 'haproxy.cfg');
  await fs.writeFile(file, config);
  let output = '';
  const child: ChildProcess = spawn(BINARY, ['-f', file, '-db'], { stdio: ['ignore', 'pipe', 'pipe'] });
  child.stdout!.setEncoding('utf8').on('data', (d: string) => (output += d));
  child.stderr!.setEncoding('utf8').on('data', (d: string) => (output += d));
  await waitForPort(port, 15_000, child, 'haproxy', async () => output);
  return {
    port,
    dir,
    log: () => output,
    async stop() {
      if (child.exitCode === null && child.signalCode === null) {
        const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()));
        child.kill('SIGTERM');
        const t = setTimeout(() => child.kill('SIGKILL'), 5_000);
        await exited;
        clearTimeout(t);
      }
      await fs.rm(dir, { recursive: true, force: true });
    },
  };
}
