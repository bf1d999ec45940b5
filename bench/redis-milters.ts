/**
 * Bench: what the Redis-backed milters cost per SMTP transaction. One connection does
 * MAIL, RCPT, RSET `--n` times against a gateway without milters and against one with
 * rateLimit (a Lua script at MAIL and at RCPT) and greylist (one at RCPT, past the delay),
 * in interleaved rounds, on a private redis-server (Debian's, on a free loopback port, no
 * persistence). Prints the median per-transaction time of each with its min–max spread and
 * the difference.
 *
 *   npm run build && node dist/bench/redis-milters.js [--n 1000] [--rounds 5]
 */
import { spawn } from 'node:child_process';
import net from 'node:net';
import os from 'node:os';
import { Redis } from 'ioredis';
import { createGateway, maildir, type Milter } from '../lib/index.js';
import { greylist, rateLimit } from '../milters/index.js';
import { intArg, spread } from './stats.js';

const argv = process.argv.slice(2);
const flag = (name: string): string | undefined => {
  const i = argv.indexOf(`--${name}`);
  return i >= 0 ? argv[i + 1] : undefined;
};
const n = flag('n') === undefined ? 1000 : intArg('n', flag('n'), 10);
const rounds = flag('rounds') === undefined ? 5 : intArg('rounds', flag('rounds'), 1);

/** A free loopback port. */
async function freePort(): Promise<number> {
  const s = net.createServer();
  await new Promise<void>((r) => s.listen(0, '127.0.0.1', r));
  const port = (s.address() as net.AddressInfo).port;
  await new Promise<void>((r) => s.close(() => r()));
  return port;
}

/** MAIL, RCPT, RSET `count` times on one connection; µs per transaction. `tolerant`: ignore refusals (warm-up). */
async function transactions(port: number, count: number, tolerant: boolean): Promise<number> {
  const s = net.connect(port, '127.0.0.1');
  s.setEncoding('latin1');
  let buf = '';
  let wake: (() => void) | undefined;
  s.on('data', (d: string) => {
    buf += d;
    wake?.();
  });
  const reply = async (): Promise<number> => {
    for (;;) {
      const m = /^(\d{3}) [^\r\n]*\r\n/m.exec(buf);
      if (m) {
        buf = buf.slice(m.index + m[0].length);
        return Number(m[1]);
      }
      await new Promise<void>((r) => (wake = r));
    }
  };
  await reply();
  s.write('EHLO bench.example\r\n');
  await reply();
  const t0 = process.hrtime.bigint();
  for (let i = 0; i < count; i++) {
    s.write('MAIL FROM:<s@example.org>\r\n');
    const mail = await reply();
    s.write(`RCPT TO:<u${i % 50}@example.test>\r\n`);
    const rcpt = await reply();
    if (!tolerant && (mail !== 250 || rcpt !== 250)) throw new Error(`refused: MAIL ${mail}, RCPT ${rcpt}`);
    s.write('RSET\r\n');
    await reply();
  }
  const us = Number(process.hrtime.bigint() - t0) / 1000 / count;
  s.destroy();
  return us;
}

const redisPort = await freePort();
const server = spawn('/usr/bin/redis-server', ['--port', String(redisPort), '--bind', '127.0.0.1', '--save', '', '--appendonly', 'no'], { stdio: 'ignore' });
const redis = new Redis({ port: redisPort, host: '127.0.0.1', enableOfflineQueue: false, lazyConnect: true, retryStrategy: () => 100 });
redis.on('error', () => undefined);
for (let i = 0; ; i++) {
  try {
    await redis.connect();
    break;
  } catch (err) {
    if (i > 100) throw err;
    await new Promise((r) => setTimeout(r, 50));
  }
}

const results: Record<'plain' | 'redis', number[]> = { plain: [], redis: [] };
try {
  for (let round = 0; round < rounds; round++) {
    for (const kind of ['plain', 'redis'] as const) {
      const store = { redis, prefix: `bench${round}:` };
      const milters: Milter[] =
        kind === 'redis' ? [rateLimit({ ...store, client: { messages: 1e9, recipients: 1e9 } }), greylist({ ...store, delay: 0, retryWindow: 60_000, autoAllowAfter: 0 })] : [];
      const gateway = createGateway({
        hostname: 'bench.test',
        resolveClientNames: false,
        listen: { host: '127.0.0.1', port: 0 },
        errorLimits: { soft: 1e6, hard: 1e6 },
        delivery: maildir({ root: os.tmpdir() }),
        quarantine: maildir({ root: os.tmpdir() }),
        milters,
      });
      const [addr] = await gateway.listen();
      // Warm-up: every triplet seen twice (greylist delay 0: the second attempt passes).
      await transactions(addr!.port, 100, true);
      results[kind].push(await transactions(addr!.port, n, false));
      await gateway.close();
    }
  }
} finally {
  redis.disconnect();
  server.kill();
}
const plain = spread(results.plain);
const withRedis = spread(results.redis);
const fmt = (s: { median: number; min: number; max: number }): string => `${s.median.toFixed(0)} µs (${s.min.toFixed(0)}–${s.max.toFixed(0)})`;
process.stdout.write(`MAIL+RCPT+RSET, ${n} per round, ${rounds} rounds, median (min–max)\n`);
process.stdout.write(`  no milters:                              ${fmt(plain)}\n`);
process.stdout.write(`  rateLimit + greylist (3 Redis scripts):  ${fmt(withRedis)}\n`);
process.stdout.write(`  added per transaction:                   ${(withRedis.median - plain.median).toFixed(0)} µs\n`);
