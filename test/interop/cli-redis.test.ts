/**
 * The config file's scale-out parts, with the real command, a real redis-server and real
 * PROXY headers: a listener trusting 127.0.0.1 for the PROXY protocol, `greylist` and
 * `rateLimit` milters and `clientLimits { store: 'redis' }` on the top-level `redis`. Two
 * `dovetail start` processes on one Redis: a triplet greylisted through one passes through
 * the other after the delay, a client over its message rate on one is refused on the other,
 * and the milters see the address the PROXY header named. check-config needs no Redis
 * running; a Redis milter without the top-level redis is an error naming the field.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { encodeProxyHeader } from '../../lib/index.js';
import { REPO, listenPort, runCli, startCli, type RunningCli } from '../helpers/cli.js';
import { startRedis } from '../helpers/redis.js';
import { RawClient, message, stored, split } from '../helpers/smtp.js';

type Json = Record<string, any>; // eslint-disable-line @typescript-eslint/no-explicit-any

async function configDir(redisPort: number | undefined, edit: (c: Json) => void = () => {}): Promise<string> {
  const dir = await mkdtemp(path.join(os.tmpdir(), 'dovetail-cli-redis-'));
  const c = JSON.parse(await readFile(path.join(REPO, 'examples', 'dovetail.config.json'), 'utf8')) as Json;
  c['listen'] = [{ host: '127.0.0.1', port: 0, name: 'mx', proxyProtocol: { trusted: ['127.0.0.1'] } }];
  c['resolveClientNames'] = false;
  if (redisPort !== undefined) c['redis'] = { url: `redis://127.0.0.1:${redisPort}/0` };
  c['milters'].push(
    { use: 'greylist', delay: 1000, prefix: 'gl:', onStoreError: 'closed' },
    { use: 'rateLimit', client: { messages: 4 }, window: 60_000, prefix: 'rl:', onStoreError: 'closed' },
  );
  c['limits'] = { clientLimits: { store: 'redis', maxConnections: 20, prefix: 'anvil:' } };
  edit(c);
  await writeFile(path.join(dir, 'dovetail.config.json'), JSON.stringify(c, null, 2));
  return dir;
}

/** One transaction from `client` (named in a PROXY v2 header); the RCPT and DATA replies. */
async function via(port: number, client: string, to: string, subject: string): Promise<{ rcpt: string; data: string | undefined }> {
  const c = await RawClient.connect(port);
  try {
    c.write(encodeProxyHeader(2, { source: { address: client, port: 40000 }, destination: { address: '127.0.0.1', port: 25 } }));
    assert.equal((await c.reply()).code, 220);
    assert.equal((await c.cmd('EHLO client.example.net')).code, 250);
    const mail = await c.cmd('MAIL FROM:<sender@example.net>');
    if (mail.code !== 250) return { rcpt: mail.text, data: undefined };
    const rcpt = await c.cmd(`RCPT TO:<${to}>`);
    if (rcpt.code !== 250) return { rcpt: rcpt.text, data: undefined };
    return { rcpt: rcpt.text, data: (await c.data(message(subject))).text };
  } finally {
    c.close();
  }
}

test('two dovetail processes share greylisting and rate limits through Redis, behind the PROXY protocol', async () => {
  const redis = await startRedis();
  const dirs: string[] = [];
  const running: RunningCli[] = [];
  try {
    for (let i = 0; i < 2; i++) {
      const dir = await configDir(redis.port);
      dirs.push(dir);
      running.push(await startCli(['start', '-c', 'dovetail.config.json'], dir));
    }
    const [a, b] = running.map((r) => listenPort(r.ready)) as [number, number];

    // Greylisted on A; the retry through B after the delay passes.
    assert.match((await via(a, '192.0.2.10', 'bob@example.test', 'grey')).rcpt, /^450 4\.2\.0 Greylisted/);
    await new Promise((r) => setTimeout(r, 1300));
    const passed = await via(b, '192.0.2.10', 'bob@example.test', 'grey');
    assert.match(passed.rcpt, /^250 /);
    assert.match(passed.data ?? '', /^250 /);
    const [m] = await stored(path.join(dirs[1]!, 'var/mail'), 'bob@example.test');
    assert.match(split(m!).headers, /^Received: from client\.example\.net \(unknown \[192\.0\.2\.10\]\)/m, 'the PROXY header named the client');

    // Rate limit: 4 messages (MAIL FROM) per minute per client, counted across both
    // processes: the greylisted try and its retry were 2, two more pass, the 5th is refused.
    const outcomes: string[] = [];
    for (const [i, port] of [a, b].entries()) outcomes.push((await via(port, '192.0.2.10', 'bob@example.test', `rate-${i}`)).data ?? 'refused');
    assert.ok(outcomes.every((o) => o.startsWith('250')), outcomes.join(' | '));
    const fifth = await via(a, '192.0.2.10', 'bob@example.test', 'rate-5');
    assert.match(fifth.rcpt, /^450 4\.7\.1 /, 'over the shared limit');
    // Another client (by its PROXY address) is not limited.
    assert.match((await via(b, '192.0.2.11', 'postmaster@example.test', 'other')).rcpt, /^250 /);
  } finally {
    for (const r of running) await r.stop('SIGTERM');
    await redis.close();
    for (const d of dirs) await rm(d, { recursive: true, force: true });
  }
});

test('check-config: no Redis needs to run; a Redis milter or store without the top-level redis names the field', async () => {
  const ok = await configDir(1); // nothing listens on port 1: check-config must not connect
  const missing = await configDir(undefined);
  try {
    const r = await runCli(['check-config', '-c', 'dovetail.config.json'], ok);
    assert.equal(r.code, 0, r.stderr);
    const bad = await runCli(['check-config', '-c', 'dovetail.config.json'], missing);
    assert.equal(bad.code, 1);
    assert.match(bad.stderr, /milters\[3\]\.use: greylist keeps its counts in Redis: set the top-level redis \{ url \}/);
    assert.match(bad.stderr, /milters\[4\]\.use: rateLimit keeps its counts in Redis/);
    assert.match(bad.stderr, /limits\.clientLimits\.store: clientLimits in Redis: set the top-level redis \{ url \}/);
  } finally {
    await rm(ok, { recursive: true, force: true });
    await rm(missing, { recursive: true, force: true });
  }
});
