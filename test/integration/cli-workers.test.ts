/**
 * `dovetail start --workers N`: the real command in a fresh directory with the example JSON
 * config. The primary forks N workers that share the listener; mail is stored, outbound
 * mail is queued by a worker and shown by `dovetail queue list` (the primary's control
 * socket); the primary's /metrics sums every worker's counters; SIGUSR2 replaces every
 * worker one at a time with mail still accepted; SIGHUP reaches the workers; SIGTERM drains
 * and exits 0. Bad --workers values are usage errors; port 0 is refused with the field named.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { REPO, runCli, startCli, type RunningCli } from '../helpers/cli.js';
import { freePort } from '../helpers/ports.js';
import { ehlo, message, send, stored } from '../helpers/smtp.js';
import { waitFor } from '../helpers/wait.js';

type Json = Record<string, any>; // eslint-disable-line @typescript-eslint/no-explicit-any

async function configDir(port: number, metricsPort: number, downPort: number): Promise<string> {
  const dir = await mkdtemp(path.join(os.tmpdir(), 'dovetail-workers-'));
  const config = JSON.parse(await readFile(path.join(REPO, 'examples', 'dovetail.config.json'), 'utf8')) as Json;
  config['listen'][0].port = port;
  config['resolveClientNames'] = false;
  config['metrics'] = { listen: `127.0.0.1:${metricsPort}` };
  config['milters'][1].relayDomains = ['down.test'];
  config['delivery'].routes['down.test'] = { smtp: { relayhost: `[127.0.0.1]:${downPort}`, deadDestinationTime: 0 } };
  config['queue'] = { dir: './var/queue', backoff: { min: 600_000 } };
  await writeFile(path.join(dir, 'dovetail.config.json'), JSON.stringify(config, null, 2));
  return dir;
}

async function mail(port: number, to: string, subject: string): Promise<number | undefined> {
  const c = await ehlo(port);
  try {
    return (await send(c, 'alice@sender.test', [to], message(subject))).data?.code;
  } finally {
    c.end();
  }
}

const metric = (text: string, name: string): number =>
  text
    .split('\n')
    .filter((l) => l.startsWith(name))
    .reduce((sum, l) => sum + Number(l.split(' ').pop()), 0);

test('dovetail start --workers 2: workers share the port, the primary queues, sums metrics, restarts workers and drains', async () => {
  const [port, metricsPort, downPort] = [await freePort(), await freePort(), await freePort()];
  const dir = await configDir(port, metricsPort, downPort);
  let gw: RunningCli | undefined;
  try {
    gw = await startCli(['start', '-c', 'dovetail.config.json', '--workers', '2'], dir);
    assert.equal(gw.ready['workers'], 2);
    const primaryPid = gw.ready['pid'] as number;
    const workerLines = gw.lines.filter((l) => l.event === 'worker-listening');
    assert.equal(new Set(workerLines.map((l) => l['pid'])).size, 2, 'two worker processes listening');
    assert.ok(workerLines.every((l) => l['pid'] !== primaryPid));

    for (let i = 0; i < 4; i++) assert.equal(await mail(port, 'bob@example.test', `w-${i}`), 250);
    assert.equal((await stored(path.join(dir, 'var/mail'), 'bob@example.test')).length, 4);

    // A worker queues it; the primary's control socket lists it (after its attempt failed).
    assert.equal(await mail(port, 'carol@down.test', 'queued by a worker'), 250);
    const list = await waitFor('the primary to have the entry, deferred', async () => {
      const r = await runCli(['queue', 'list', '--json', '-c', 'dovetail.config.json'], dir);
      const entries = JSON.parse(r.stdout) as Json[];
      return entries.length === 1 && entries[0]!['recipients'][0].status === 'deferred' ? entries : undefined;
    });
    assert.equal(list[0]!['recipients'][0].address, 'carol@down.test');

    // Metrics: the workers' counters, summed by the primary.
    const text = await (await fetch(`http://127.0.0.1:${metricsPort}/metrics`)).text();
    assert.equal(metric(text, 'dovetail_connections_total'), 5);
    assert.equal(metric(text, 'dovetail_queue_entries{'), 1);

    // SIGUSR2: a rolling restart; mail is accepted throughout.
    const before = gw.lines.length;
    gw.process.kill('SIGUSR2');
    let n = 0;
    const during: (number | undefined)[] = [];
    while (!gw.lines.slice(before).some((l) => l.event === 'rolling-restart-done') && n < 200) during.push(await mail(port, 'bob@example.test', `roll-${n++}`));
    const done = await gw.waitForLine('the rolling restart to end', (l) => l.event === 'rolling-restart-done', before, 60_000);
    assert.deepEqual(during.filter((c) => c !== 250), [], 'every message during the restart accepted');
    const fresh = done['pids'] as number[];
    assert.equal(fresh.length, 2);
    for (const pid of fresh) assert.ok(!workerLines.some((l) => l['pid'] === pid), `worker ${pid} is new`);

    // SIGHUP reaches both workers.
    const hup = gw.lines.length;
    gw.process.kill('SIGHUP');
    await waitFor('both workers to reload', () => gw!.lines.slice(hup).filter((l) => l.event === 'reloaded').length >= 2);

    assert.equal(await gw.stop('SIGTERM'), 0);
    assert.equal(gw.lines.filter((l) => l.event === 'worker-exited' && l['expected'] === false).length, 0);
  } finally {
    if (gw && gw.process.exitCode === null) await gw.stop('SIGKILL');
    await rm(dir, { recursive: true, force: true });
  }
});

test('--workers is checked, and a listener on port 0 is refused with --workers', async () => {
  for (const bad of ['0', 'two', '1.5', '-1']) {
    const r = await runCli(['start', '--workers', bad, '-c', 'nothing.json']);
    assert.equal(r.code, 2, `--workers ${bad}`);
    assert.match(r.stderr, /--workers|workers/);
  }
  const dir = await configDir(0, await freePort(), await freePort());
  try {
    const r = await runCli(['start', '-c', 'dovetail.config.json', '--workers', '2'], dir);
    assert.equal(r.code, 1);
    assert.match(r.stderr + r.stdout, /listen: with --workers every listener needs a fixed port/);
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
});
