/**
 * No acknowledged recipient is lost when the gateway process dies: the gateway
 * (test/fixtures/queue-gateway.ts) runs as a child process, answers 250 for a message with
 * one recipient delivered and one deferred, is killed with SIGKILL, and is started again
 * on the same directories; the deferred recipient must then be delivered, exactly once,
 * and the other one not again. Waits are bounded polls, never sleeps with assertions.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { ehlo, message, send, split, stored } from '../helpers/smtp.js';
import { waitFor } from '../helpers/wait.js';
import { startChild, type Child } from '../helpers/child.js';

const FIXTURE = fileURLToPath(new URL('../fixtures/queue-gateway.js', import.meta.url));

test('SIGKILL after a 250 with a recipient queued: delivered after restart, nothing lost or doubled', async () => {
  const base = await fs.mkdtemp(path.join(os.tmpdir(), 'dovetail-queue-restart-'));
  const mail = path.join(base, 'mail');
  await fs.mkdir(mail);
  await fs.writeFile(path.join(base, 'flag'), 'refuse later@ while this file exists\n');
  const children: Child[] = [];
  try {
    const first = await startChild(FIXTURE, [base]);
    children.push(first);
    const c = await ehlo(first.port);
    const r = await send(c, 'alice@sender.test', ['bob@example.test', 'later@example.test'], message('survives', 'Survives a crash.\r\n'));
    assert.equal(r.data?.code, 250, r.data?.text);
    const queueId = /queued as (\w+)/.exec(r.data!.text)?.[1];
    assert.ok(queueId);
    c.end();

    // The child has retried at least once and still has the entry (the flag refuses `later`).
    await waitFor('a retry in the first process', () => first.events.some((e) => e['event'] === 'dovetail:queue:attempt' && e['queueId'] === queueId));
    assert.equal((await stored(mail, 'later@example.test')).length, 0);
    assert.equal((await stored(mail, 'bob@example.test')).length, 1);

    first.process.kill('SIGKILL');
    assert.equal(await first.exited, 'SIGKILL');
    assert.deepEqual((await fs.readdir(path.join(base, 'queue', 'active'))).sort(), [queueId, `${queueId}.json`]);
    // What a crash in the middle of another defer() would have left as well.
    await fs.writeFile(path.join(base, 'queue', 'tmp', 'HALFWRITTEN1'), 'Subject: half\r\n');

    await fs.rm(path.join(base, 'flag'));
    const second = await startChild(FIXTURE, [base]);
    children.push(second);
    const loaded = second.events.find((e) => e['event'] === 'dovetail:queue:loaded');
    assert.deepEqual(loaded, { event: 'dovetail:queue:loaded', entries: 1, tmpRemoved: 1, orphansRemoved: 0, corrupt: 0 });

    const later = await waitFor('the queued recipient after restart', async () => {
      const got = await stored(mail, 'later@example.test');
      return got.length ? got : undefined;
    });
    assert.equal(later.length, 1);
    assert.deepEqual(split(later[0]!).body, Buffer.from('Survives a crash.\r\n'));
    assert.match(split(later[0]!).headers, new RegExp(`\\bid\\s+${queueId}\\b`), 'the same message, with the Received header of its first pass');
    await waitFor('the entry to leave the queue', () => second.events.some((e) => e['event'] === 'dovetail:queue:removed' && e['queueId'] === queueId));
    assert.deepEqual(await fs.readdir(path.join(base, 'queue', 'active')), []);
    assert.deepEqual(await fs.readdir(path.join(base, 'queue', 'tmp')), []);
    assert.equal((await stored(mail, 'bob@example.test')).length, 1, 'bob is not delivered again');
    assert.equal((await stored(mail, 'later@example.test')).length, 1);

    second.process.kill('SIGTERM');
    assert.equal(await second.exited, 0);
  } finally {
    for (const ch of children) if (ch.process.exitCode === null && ch.process.signalCode === null) ch.process.kill('SIGKILL');
    await Promise.all(children.map((ch) => ch.exited));
    await fs.rm(base, { recursive: true, force: true });
  }
});
