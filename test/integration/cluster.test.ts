/**
 * One gateway process per core (lib/cluster.ts) with real processes and sockets: the
 * workers share the listener, each commits outbound mail to a writer queue that the
 * primary adopts and delivers once; a SIGKILLed worker is replaced and loses nothing it
 * acknowledged; a rolling restart under load fails no transaction.
 */
import assert from 'node:assert/strict';
import { mkdtemp, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { after, before, describe, it } from 'node:test';
import { fileURLToPath } from 'node:url';
import { startChild, type Child } from '../helpers/child.js';
import { freePort } from '../helpers/ports.js';
import { ehlo, message, send, split, startGateway, stored } from '../helpers/smtp.js';
import { startPeer, type Peer } from '../helpers/smtp-peer.js';
import { waitFor } from '../helpers/wait.js';

const fixture = fileURLToPath(new URL('../fixtures/cluster-gateway.js', import.meta.url));

/** One message on its own connection; the final reply code, or the error's text. */
async function sendOne(port: number, to: string, subject: string): Promise<number | string> {
  try {
    const c = await ehlo(port);
    try {
      const r = await send(c, 'alice@sender.test', [to], message(subject));
      return r.data?.code ?? r.rcpt[0]?.code ?? r.mail.code;
    } finally {
      c.socket.end('QUIT\r\n');
    }
  } catch (err) {
    return (err as Error).message;
  }
}

/** Sends from `senders` loops until stop() is called; records every outcome by subject. */
function load(port: number, senders: number, tag: string): { stop(): Promise<Map<string, number | string>> } {
  const outcomes = new Map<string, number | string>();
  let running = true;
  let n = 0;
  const loops = Array.from({ length: senders }, async () => {
    while (running) {
      const subject = `${tag}-${n++}`;
      outcomes.set(subject, await sendOne(port, 'bob@local.test', subject));
    }
  });
  return {
    async stop() {
      running = false;
      await Promise.all(loops);
      return outcomes;
    },
  };
}

const subjects = async (root: string): Promise<string[]> =>
  (await stored(root, 'bob@local.test')).map((m) => /^Subject: (.*)$/m.exec(split(m).headers)?.[1]?.trim() ?? '');

const eventsOf = (child: Child, name: string): Record<string, unknown>[] => child.events.filter((e) => e['event'] === name);

describe('a worker per core (startWorkerPool)', () => {
  let base: string;
  let peer: Peer;
  let child: Child;
  let root: string;

  before(async () => {
    base = await mkdtemp(path.join(os.tmpdir(), 'dovetail-cluster-'));
    root = path.join(base, 'mail');
    peer = await startPeer();
    child = await startChild(fixture, [base, String(await freePort()), '2', String(peer.port)]);
  });

  after(async () => {
    if (child.process.exitCode === null) {
      child.process.kill('SIGTERM');
      await child.exited;
    }
    await peer.close();
    await rm(base, { recursive: true, force: true });
  });

  it('serves from every worker on one shared port, and the primary delivers what a worker queued, once', async () => {
    const pids = eventsOf(child, 'listening')[0]!['pids'] as number[];
    assert.equal(pids.length, 2);
    for (let i = 0; i < 8; i++) assert.equal(await sendOne(child.port, 'bob@local.test', `spread-${i}`), 250);
    const stamps = new Set((await stored(root, 'bob@local.test')).map((m) => /^X-Worker: (\d+)/m.exec(split(m).headers)?.[1]));
    assert.deepEqual([...stamps].sort(), pids.map(String).sort(), 'both workers took connections');

    assert.equal(await sendOne(child.port, 'carol@remote.test', 'outbound-1'), 250);
    const [sent] = await peer.waitFor(1);
    assert.match(sent!.data.toString(), /Subject: outbound-1/);
    const adopted = await waitFor('the primary to adopt the entry', () => eventsOf(child, 'adopted').find((e) => e['taken'] === true));
    assert.ok(!pids.includes(adopted['pid'] as number), 'adopted by the primary, not a worker');
    await waitFor('the attempt to be recorded', () => eventsOf(child, 'dovetail:queue:attempt').length > 0);
    const attempts = eventsOf(child, 'dovetail:queue:attempt');
    assert.equal(attempts.length, 1, 'one attempt, by one process');
    assert.equal(attempts[0]!['pid'], adopted['pid']);
    await new Promise((r) => setTimeout(r, 300));
    assert.equal(peer.messages.length, 1, 'delivered once');
  });

  it('replaces a SIGKILLed worker, and every message acknowledged before or after is stored', async () => {
    const before = new Set(child.events.filter((e) => e['event'] === 'worker-ready').map((e) => e['pid'] as number));
    const victim = (eventsOf(child, 'listening')[0]!['pids'] as number[])[0]!;
    const run = load(child.port, 2, 'kill');
    await new Promise((r) => setTimeout(r, 300));
    process.kill(victim, 'SIGKILL');
    const exited = await waitFor('the pool to see the worker die', () => eventsOf(child, 'worker-exited').find((e) => e['pid'] === victim));
    assert.equal(exited['expected'], false);
    const replacement = await waitFor('a replacement worker', () =>
      eventsOf(child, 'worker-ready').find((e) => !before.has(e['pid'] as number) && e['slot'] === exited['slot']),
    );
    assert.notEqual(replacement['pid'], victim);
    await new Promise((r) => setTimeout(r, 300));
    const outcomes = await run.stop();
    const acked = [...outcomes].filter(([, code]) => code === 250).map(([s]) => s);
    assert.ok(acked.length > 0, 'the load got answers');
    const have = new Set(await subjects(root));
    const missing = acked.filter((s) => !have.has(s));
    assert.deepEqual(missing, [], 'every 250 is in the mailstore');
    // Afterwards both slots serve again.
    for (let i = 0; i < 4; i++) assert.equal(await sendOne(child.port, 'bob@local.test', `after-kill-${i}`), 250);
  });

  it('a rolling restart under load fails no transaction and replaces every worker', async () => {
    const old = new Set(eventsOf(child, 'worker-ready').map((e) => e['pid'] as number));
    const run = load(child.port, 3, 'roll');
    await new Promise((r) => setTimeout(r, 200));
    const restartedBefore = eventsOf(child, 'restarted').length;
    child.process.kill('SIGUSR2');
    const done = await waitFor('the rolling restart', () => eventsOf(child, 'restarted')[restartedBefore], 60_000);
    await new Promise((r) => setTimeout(r, 200));
    const outcomes = await run.stop();
    const failed = [...outcomes].filter(([, code]) => code !== 250);
    assert.deepEqual(failed, [], 'no transaction failed during the restart');
    assert.ok(outcomes.size >= 6, `the load ran during the restart (${outcomes.size} messages)`);
    const pids = done['pids'] as number[];
    assert.equal(pids.length, 2);
    for (const pid of pids) assert.ok(!old.has(pid), `worker ${pid} is new`);
    const have = new Set(await subjects(root));
    assert.deepEqual([...outcomes.keys()].filter((s) => !have.has(s)), []);
  });

  it('SIGTERM drains the workers and the queue, and the primary exits 0', async () => {
    child.process.kill('SIGTERM');
    assert.equal(await child.exited, 0);
    const exits = eventsOf(child, 'worker-exited').slice(-2);
    assert.ok(exits.every((e) => e['expected'] === true));
  });
});

describe('gateway.close({ sessions }): how a worker leaves the pool', () => {
  it('lets a connected client finish its session as usual while new connections are refused', async () => {
    const g = await startGateway();
    const c = await ehlo(g.port);
    const closing = g.gateway.close({ sessions: 20_000 });
    await new Promise((r) => setTimeout(r, 100));
    // No longer accepting…
    assert.match(String(await sendOne(g.port, 'bob@example.test', 'late')), /ECONNREFUSED/);
    // …but the session already open runs a whole transaction, then ends with QUIT.
    const r = await send(c, 'alice@sender.test', ['bob@example.test'], message('in-session'));
    assert.equal(r.data?.code, 250);
    assert.equal((await c.cmd('QUIT')).code, 221);
    await closing;
    assert.equal((await stored(g.root, 'bob@example.test')).length, 1);
    await g.close();
  });

  it('still says 421 to a client that outstays the wait', async () => {
    const g = await startGateway();
    const c = await ehlo(g.port);
    await g.gateway.close({ sessions: 300 });
    const r = await c.reply().catch(() => undefined);
    assert.equal(r?.code, 421);
    await g.close();
  });
});
