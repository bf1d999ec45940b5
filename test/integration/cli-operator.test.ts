/**
 * The operator's walk (issue 12's acceptance), with the real command in a fresh directory:
 * the example JSON config copied there (ports 0 / free ports, paths relative to it),
 * `node <repo>/dist/bin/dovetail.js start -c dovetail.config.json` with that directory as
 * cwd, a message sent with the repo's SMTP test client and found in the Maildir, a deferred
 * message seen with `dovetail queue list` and delivered by `dovetail queue retry` once its
 * peer is up; the queue lock and the control socket; SIGHUP with a changed milter (the next
 * connection gets it, a connection mid-transaction finishes with the old chain), SIGHUP with
 * a broken config (the old one stays); SIGTERM drains; a second SIGTERM exits at once.
 *
 * The log-line and metrics checks need lib/observe (the logging work); they are their own
 * test, "logs and metrics".
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, readFile, rm, writeFile, access } from 'node:fs/promises';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { REPO, listenPort, runCli, startCli, type RunningCli } from '../helpers/cli.js';
import { freePort } from '../helpers/ports.js';
import { startPeer } from '../helpers/smtp-peer.js';
import { ehlo, message, send, split, stored } from '../helpers/smtp.js';
import { waitFor } from '../helpers/wait.js';

type Json = Record<string, any>; // eslint-disable-line @typescript-eslint/no-explicit-any

/** A fresh directory with the example JSON config copied in, changed by `edit`. */
async function operatorDir(edit: (c: Json) => void = () => {}): Promise<{ dir: string; config: Json; write(c: Json): Promise<void> }> {
  const dir = await mkdtemp(path.join(os.tmpdir(), 'dovetail-operator-'));
  const config = JSON.parse(await readFile(path.join(REPO, 'examples', 'dovetail.config.json'), 'utf8')) as Json;
  config['listen'][0].port = 0;
  config['resolveClientNames'] = false;
  edit(config);
  const write = (c: Json): Promise<void> => writeFile(path.join(dir, 'dovetail.config.json'), JSON.stringify(c, null, 2));
  await write(config);
  return { dir, config, write };
}

const queueJson = async (dir: string): Promise<Json[]> => {
  const r = await runCli(['queue', 'list', '--json', '-c', 'dovetail.config.json'], dir);
  assert.equal(r.code, 0, r.stderr);
  return JSON.parse(r.stdout) as Json[];
};

test("the operator's walk: start from the example config, mail into the Maildir, a deferred message listed and retried, SIGTERM", async () => {
  const peerPort = await freePort();
  const { dir } = await operatorDir((c) => {
    c['milters'][1].relayDomains = ['down.test'];
    c['delivery'].routes['down.test'] = { smtp: { relayhost: `[127.0.0.1]:${peerPort}`, deadDestinationTime: 0 } };
    c['queue'] = { dir: './var/queue', backoff: { min: 600_000 } };
  });
  let gw: RunningCli | undefined;
  let peer: Awaited<ReturnType<typeof startPeer>> | undefined;
  try {
    gw = await startCli(['start', '-c', 'dovetail.config.json'], dir);
    const port = listenPort(gw.ready);
    assert.equal(gw.ready['control'], path.join(dir, 'var/queue/control.sock'));

    // 1. A message for our domain lands in the Maildir of the embedded store.
    const c = await ehlo(port);
    const r = await send(c, 'alice@sender.test', ['bob@example.test'], message('operator walk'));
    assert.equal(r.data?.code, 250, r.data?.text);
    c.end();
    const [m] = await stored(path.join(dir, 'var/mail'), 'bob@example.test');
    assert.ok(m, 'stored in var/mail/bob@example.test/new');
    assert.match(split(m).headers, /\r\nSubject: operator walk\r\n/);

    // 2. Two messages for a domain whose next hop is down: 250 (queued), then deferred.
    const ids: string[] = [];
    for (const to of ['carol@down.test', 'dave@down.test']) {
      const c2 = await ehlo(port);
      const r2 = await send(c2, 'alice@sender.test', [to], message(`for ${to}`));
      assert.equal(r2.data?.code, 250, r2.data?.text);
      ids.push(/queued as (\S+)/.exec(r2.data!.text)![1]!);
      c2.end();
    }
    const entries = await waitFor('both entries deferred after their first attempt', async () => {
      const list = await queueJson(dir);
      return list.length === 2 && list.every((e) => e['recipients'][0].status === 'deferred' && e['recipients'][0].attempts >= 1) ? list : undefined;
    });
    assert.deepEqual(entries.map((e) => e['queueId']).sort(), [...ids].sort());
    const text = await runCli(['queue', 'list', '-c', 'dovetail.config.json'], dir);
    assert.equal(text.code, 0, text.stderr);
    for (const id of ids) assert.match(text.stdout, new RegExp(`^${id} +\\d+[smhd] +\\d+  <alice@sender\\.test>$`, 'm'));
    assert.match(text.stdout, /<carol@down\.test> deferred, 1 attempt: 4\d\d /);
    const show = await runCli(['queue', 'show', ids[0]!, '-c', 'dovetail.config.json'], dir);
    assert.equal(show.code, 0, show.stderr);
    assert.match(show.stdout, new RegExp(`^id: +${ids[0]}$`, 'm'));
    assert.match(show.stdout, /^ {2}<carol@down\.test> deferred, 1 attempt, next \S+, last reply 4\d\d/m);

    // 3. delete one (no DSN), then the peer comes up and `queue retry` delivers the other.
    const del = await runCli(['queue', 'delete', ids[1]!, '-c', 'dovetail.config.json'], dir);
    assert.equal(del.code, 0, del.stderr);
    assert.equal(del.stdout, `${ids[1]}: deleted\n`);
    const again = await runCli(['queue', 'delete', ids[1]!, '-c', 'dovetail.config.json'], dir);
    assert.equal(again.code, 1);
    assert.match(again.stderr, /no queue entry/);
    peer = await startPeer({ port: peerPort });
    const retry = await runCli(['queue', 'retry', ids[0]!, '-c', 'dovetail.config.json'], dir);
    assert.equal(retry.code, 0, retry.stderr);
    assert.equal(retry.stdout, '1 entry attempted\n');
    assert.deepEqual(peer.messages.map((x) => x.to), [['carol@down.test']]);
    assert.equal(peer.messages[0]!.from, 'alice@sender.test');
    const empty = await runCli(['queue', 'list', '-c', 'dovetail.config.json'], dir);
    assert.equal(empty.stdout, 'Mail queue is empty\n');

    // 4. SIGTERM: drained and stopped, exit 0; the queue lock and the control socket are gone.
    assert.equal(await gw.stop('SIGTERM'), 0);
    assert.ok(gw.lines.some((l) => l.event === 'stopped'));
    await assert.rejects(access(path.join(dir, 'var/queue/lock')));
    await assert.rejects(access(path.join(dir, 'var/queue/control.sock')));
    // With no gateway, the queue commands work on the directory itself.
    assert.deepEqual(await queueJson(dir), []);
  } finally {
    await gw?.stop('SIGKILL');
    await peer?.close();
    await rm(dir, { recursive: true, force: true });
  }
});

test('logs and metrics (needs lib/observe): a log line for the message on stdout, GET /metrics', async () => {
  const metricsPort = await freePort();
  const { dir } = await operatorDir((c) => {
    c['metrics'] = { listen: `127.0.0.1:${metricsPort}` };
  });
  let gw: RunningCli | undefined;
  try {
    gw = await startCli(['start'], dir);
    const c = await ehlo(listenPort(gw.ready));
    const r = await send(c, 'alice@sender.test', ['bob@example.test'], message('logged'));
    assert.equal(r.data?.code, 250);
    c.end();
    const queueId = /queued as (\S+)/.exec(r.data!.text)![1]!;
    await gw.waitForLine('a log line naming the message', (l) => JSON.stringify(l).includes(queueId));
    const res = await fetch(`http://127.0.0.1:${metricsPort}/metrics`);
    assert.equal(res.status, 200);
    assert.match(await res.text(), /^dovetail_/m);
  } finally {
    await gw?.stop('SIGTERM');
    await rm(dir, { recursive: true, force: true });
  }
});

test('the queue lock: a second gateway on the same queue refuses; a stale lock (SIGKILL) is taken over; the control socket answers bad input', async () => {
  const { dir } = await operatorDir();
  let a: RunningCli | undefined;
  let b: RunningCli | undefined;
  try {
    a = await startCli(['start', '-c', 'dovetail.config.json'], dir);
    const second = await runCli(['start', '-c', 'dovetail.config.json'], dir);
    assert.equal(second.code, 1);
    assert.match(second.stderr, new RegExp(`locked by process ${a.process.pid}`));
    assert.equal(await readFile(path.join(dir, 'var/queue/lock'), 'utf8'), `${a.process.pid}\n`);

    // The control socket: garbage, an unknown command and an over-long line get defined answers.
    const sock = path.join(dir, 'var/queue/control.sock');
    const ask = (payload: string): Promise<string> =>
      new Promise((resolve, reject) => {
        const s = net.connect({ path: sock });
        let got = '';
        s.setEncoding('utf8');
        s.on('data', (d: string) => (got += d));
        s.once('error', reject);
        s.once('close', () => resolve(got));
        s.once('connect', () => {
          s.write(payload);
          setTimeout(() => s.end(), 200);
        });
      });
    assert.deepEqual(JSON.parse(await ask('not json\n')), { ok: false, error: 'expected one JSON object per line' });
    assert.match(JSON.parse(await ask('{"cmd":"rm -rf"}\n')).error, /unknown command "rm -rf"/);
    assert.match(JSON.parse(await ask('{"cmd":"show","id":"../../etc/passwd"}\n')).error, /id: expected a queue id/);
    assert.match(JSON.parse(await ask('x'.repeat(200_000))).error, /request longer than 65536 bytes/);
    assert.deepEqual(JSON.parse(await ask('{"cmd":"status"}\n')), { ok: true, pid: a.process.pid });

    // SIGKILL leaves the lock and the socket file behind: both are stale.
    assert.equal(await a.stop('SIGKILL'), 'SIGKILL');
    await access(path.join(dir, 'var/queue/lock'));
    const list = await runCli(['queue', 'list', '-c', 'dovetail.config.json'], dir);
    assert.equal(list.code, 0, list.stderr);
    assert.equal(list.stdout, 'Mail queue is empty\n');
    b = await startCli(['start', '-c', 'dovetail.config.json'], dir);
    assert.equal(await readFile(path.join(dir, 'var/queue/lock'), 'utf8'), `${b.process.pid}\n`);
    assert.equal(await b.stop('SIGTERM'), 0);
  } finally {
    await a?.stop('SIGKILL');
    await b?.stop('SIGKILL');
    await rm(dir, { recursive: true, force: true });
  }
});

test('SIGHUP: a changed milter applies to the next connection while one mid-transaction finishes with the old chain; a broken config keeps the old one', async () => {
  const { dir, config, write } = await operatorDir((c) => {
    c['milters'].push({ module: './tagger.mjs', options: { tag: 'v1' } });
  });
  await writeFile(
    path.join(dir, 'tagger.mjs'),
    `import { defineMilter } from 'dovetail';
export default (options) => defineMilter({ name: 'tagger', async eom(ctx) { ctx.message.addHeader('X-Tag', options.tag); } });
`,
  );
  const root = path.join(dir, 'var/mail');
  const tags = async (address: string): Promise<string[]> => (await stored(root, address)).map((m) => /\r\nX-Tag: (\S+)\r\n/.exec(split(m).headers)?.[1] ?? '(none)');
  let gw: RunningCli | undefined;
  try {
    gw = await startCli(['start', '-c', 'dovetail.config.json'], dir);
    const port = listenPort(gw.ready);
    // A connection opened before the reload, stopped mid-transaction (after RCPT).
    const old = await ehlo(port);
    assert.equal((await old.cmd('MAIL FROM:<alice@sender.test>')).code, 250);
    assert.equal((await old.cmd('RCPT TO:<old@example.test>')).code, 250);

    config['milters'][config['milters'].length - 1].options.tag = 'v2';
    await write(config);
    let from = gw.lines.length;
    gw.process.kill('SIGHUP');
    await gw.waitForLine('reloaded', (l) => l.event === 'reloaded', from);

    const fresh = await ehlo(port);
    assert.equal((await send(fresh, 'alice@sender.test', ['new@example.test'], message('after reload'))).data?.code, 250);
    fresh.end();
    assert.equal((await old.data(message('before reload'))).code, 250);
    old.end();
    assert.deepEqual(await tags('new@example.test'), ['v2']);
    assert.deepEqual(await tags('old@example.test'), ['v1']);

    // A broken config: logged with the field named, the old config (v2) stays.
    const broken = structuredClone(config);
    broken['listen'][0].port = '25x';
    broken['milters'][broken['milters'].length - 1].options.tag = 'v3';
    await write(broken);
    from = gw.lines.length;
    gw.process.kill('SIGHUP');
    const failed = await gw.waitForLine('reload-failed', (l) => l.event === 'reload-failed', from);
    assert.match(String(failed.msg), /listen\[0\]\.port: expected an integer 0\.\.65535, got "25x"/);
    const third = await ehlo(port);
    assert.equal((await send(third, 'alice@sender.test', ['third@example.test'], message('after a broken reload'))).data?.code, 250);
    third.end();
    assert.deepEqual(await tags('third@example.test'), ['v2']);

    // A valid config that also changes the hostname: milters applied, the hostname needs a restart.
    const renamed = structuredClone(config);
    renamed['hostname'] = 'other.dovetail.test';
    renamed['milters'][renamed['milters'].length - 1].options.tag = 'v4';
    await write(renamed);
    from = gw.lines.length;
    gw.process.kill('SIGHUP');
    const warn = await gw.waitForLine('reload-needs-restart', (l) => l.event === 'reload-needs-restart', from);
    assert.deepEqual(warn['fields'], ['hostname']);
    await gw.waitForLine('reloaded', (l) => l.event === 'reloaded', from);
    const fourth = await ehlo(port);
    assert.equal((await send(fourth, 'alice@sender.test', ['fourth@example.test'], message('v4'))).data?.code, 250);
    fourth.end();
    assert.deepEqual(await tags('fourth@example.test'), ['v4']);
    assert.equal(await gw.stop('SIGTERM'), 0);
  } finally {
    await gw?.stop('SIGKILL');
    await rm(dir, { recursive: true, force: true });
  }
});

test('SIGTERM drains: a message in DATA is finished and stored, new mail is refused, exit 0; a second SIGTERM exits at once', async () => {
  const { dir } = await operatorDir();
  let gw: RunningCli | undefined;
  try {
    gw = await startCli(['start', '-c', 'dovetail.config.json'], dir);
    const port = listenPort(gw.ready);
    const inFlight = await ehlo(port);
    const idle = await ehlo(port);
    assert.equal((await inFlight.cmd('MAIL FROM:<alice@sender.test>')).code, 250);
    assert.equal((await inFlight.cmd('RCPT TO:<bob@example.test>')).code, 250);
    assert.equal((await inFlight.cmd('DATA')).code, 354);
    inFlight.write(message('in flight at SIGTERM'));
    gw.process.kill('SIGTERM');
    await gw.waitForLine('stopping', (l) => l.event === 'stopping');
    // New connections are not accepted any more.
    await assert.rejects(ehlo(port));
    inFlight.write('.\r\n');
    const reply = await inFlight.reply();
    assert.equal(reply.code, 250, reply.text);
    // The idle client is told 421 and disconnected.
    assert.equal((await idle.reply()).code, 421);
    assert.equal(await gw.exited, 0);
    const [m] = await stored(path.join(dir, 'var/mail'), 'bob@example.test');
    assert.match(split(m!).headers, /\r\nSubject: in flight at SIGTERM\r\n/);

    // Again, with a second SIGTERM while the message is still in DATA: exit at once (1).
    gw = await startCli(['start', '-c', 'dovetail.config.json'], dir);
    const c = await ehlo(listenPort(gw.ready));
    assert.equal((await c.cmd('MAIL FROM:<alice@sender.test>')).code, 250);
    assert.equal((await c.cmd('RCPT TO:<carol@example.test>')).code, 250);
    assert.equal((await c.cmd('DATA')).code, 354);
    gw.process.kill('SIGTERM');
    await gw.waitForLine('stopping', (l) => l.event === 'stopping');
    gw.process.kill('SIGTERM');
    assert.equal(await gw.exited, 1);
    await c.waitClosed();
    assert.deepEqual(await stored(path.join(dir, 'var/mail'), 'carol@example.test'), []);
  } finally {
    await gw?.stop('SIGKILL');
    await rm(dir, { recursive: true, force: true });
  }
});
