/**
 * createQueue({ lock: true }): one process per queue directory. A second queue on a locked
 * directory rejects with DOVETAIL_ERR_QUEUE_LOCKED (in this process, or held by another
 * live one); close() releases; a lock whose process is gone, or that names our own pid
 * without a queue of ours holding it (a pid reused after a restart), is taken over. The
 * cross-process case through `dovetail start` is in cli-operator.test.ts.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { mkdtemp, readFile, rm, writeFile, access } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { createQueue, isDovetailError, queueLockHolder, type Transport } from '../../lib/index.js';

const idle: Transport = {
  name: 'idle',
  async deliver() {
    throw new Error('not used');
  },
};

test('queue lock: held, refused, released, stale locks taken over', async () => {
  const dir = await mkdtemp(path.join(os.tmpdir(), 'dovetail-lock-'));
  try {
    const a = createQueue({ dir, transport: idle, lock: true });
    await a.start();
    assert.equal(await readFile(path.join(dir, 'lock'), 'utf8'), `${process.pid}\n`);
    assert.equal(await queueLockHolder(dir), process.pid);
    const b = createQueue({ dir, transport: idle, lock: true });
    await assert.rejects(b.list(), (err: unknown) => isDovetailError(err, 'DOVETAIL_ERR_QUEUE_LOCKED') && new RegExp(`locked by process ${process.pid}`).test((err as Error).message));
    // Without lock: true nothing is checked (the library default).
    assert.deepEqual(await createQueue({ dir, transport: idle }).list(), []);
    await a.close();
    await assert.rejects(access(path.join(dir, 'lock')));
    assert.equal(await queueLockHolder(dir), undefined);
    // Released: the next one gets it.
    assert.deepEqual(await b.list(), []);
    await b.close();

    // A lock left by a process that is gone.
    const child = spawn(process.execPath, ['-e', '0']);
    const pid = child.pid!;
    await new Promise((r) => child.once('exit', r));
    await writeFile(path.join(dir, 'lock'), `${pid}\n`);
    assert.equal(await queueLockHolder(dir), undefined);
    const c = createQueue({ dir, transport: idle, lock: true });
    await c.start();
    assert.equal(await readFile(path.join(dir, 'lock'), 'utf8'), `${process.pid}\n`);
    await c.close();

    // Our own pid, but no queue of ours holds it: stale as well. Garbage in the file too.
    for (const content of [`${process.pid}\n`, 'not a pid\n']) {
      await writeFile(path.join(dir, 'lock'), content);
      const d = createQueue({ dir, transport: idle, lock: true });
      await d.start();
      await d.close();
      await assert.rejects(access(path.join(dir, 'lock')));
    }

    // A live process of someone else (our parent, say) holds it: refused, and the file stays.
    await writeFile(path.join(dir, 'lock'), `${process.ppid}\n`);
    const e = createQueue({ dir, transport: idle, lock: true });
    await assert.rejects(e.start(), (err: unknown) => isDovetailError(err, 'DOVETAIL_ERR_QUEUE_LOCKED'));
    assert.equal(await readFile(path.join(dir, 'lock'), 'utf8'), `${process.ppid}\n`);
    await e.close();
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
});
