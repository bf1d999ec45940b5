/**
 * The queue split for a worker per core: a queue with `deliver: false` (a worker's) only
 * writes and hands each committed entry on; the delivering queue (the primary's) adopts it
 * and delivers it once; an entry nobody told the primary about is found by the adopt scan.
 * Real files, a real Maildir store.
 */
import assert from 'node:assert/strict';
import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { Readable } from 'node:stream';
import { test } from 'node:test';
import { maildir, smtpReply, type MessageSource, type RecipientResult, type Transport } from '../../lib/index.js';
import { createQueue } from '../../lib/delivery/queue.js';
import { message, stored } from '../helpers/smtp.js';
import { waitFor } from '../helpers/wait.js';

const source = (content: string): MessageSource => {
  const buf = Buffer.from(content);
  return { size: buf.length, stream: () => Readable.from([buf]) };
};

async function setup() {
  const base = await fs.mkdtemp(path.join(os.tmpdir(), 'dovetail-qwriter-'));
  const root = path.join(base, 'mail');
  await fs.mkdir(root);
  const store = maildir({ root });
  let calls = 0;
  const transport: Transport = {
    name: 'counted-maildir',
    async deliver(envelope, msg) {
      calls++;
      return store.deliver(envelope, msg);
    },
  };
  return { base, root, transport, calls: () => calls, dir: path.join(base, 'queue') };
}

const envelope = (queueId: string, to: string[], from = 'alice@sender.test') => ({
  queueId,
  sender: { address: from, args: {} },
  recipients: to.map((address) => ({ address, args: {} })),
});

test('a writer queue commits, tells onCommitted, and never delivers; the delivering queue adopts it once', async () => {
  const s = await setup();
  const committed: string[] = [];
  const writer = createQueue({ dir: s.dir, transport: s.transport, deliver: false, onCommitted: (id) => committed.push(id) });
  const primary = createQueue({ dir: s.dir, transport: s.transport, adoptScanInterval: 0 });
  await primary.start();
  await writer.start();
  await writer.defer(envelope('4XyZaBcDeF01', ['bob@example.test']), source(message('adopt me')), [undefined]);
  assert.equal(committed.length, 1);
  assert.equal(s.calls(), 0, 'the writer delivered nothing');
  await assert.rejects(writer.list(), /only writes/);
  await assert.rejects(writer.retryNow(), /only writes/);
  assert.equal((await primary.list()).length, 0, 'not known to the primary before adopt()');

  assert.equal(await primary.adopt(committed[0]!), true);
  assert.equal(await primary.adopt(committed[0]!), false, 'a second notice changes nothing');
  await waitFor('the adopted entry to be delivered', async () => (await stored(s.root, 'bob@example.test')).length === 1);
  await waitFor('the entry to leave the queue', async () => (await primary.list()).length === 0);
  assert.equal(s.calls(), 1);
  assert.equal(await primary.adopt('4XyZaBcDeF99'), false, 'an id with nothing on disk');
  await writer.close();
  await primary.close();
  await fs.rm(s.base, { recursive: true, force: true });
});

test('a writer queues the DSN of a failed recipient and hands that on too', async () => {
  const s = await setup();
  const committed: string[] = [];
  const writer = createQueue({ dir: s.dir, transport: s.transport, deliver: false, onCommitted: (id) => committed.push(id) });
  const failed: RecipientResult = { recipient: 'gone@example.test', status: 'failed', reply: smtpReply(550, '5.1.1', 'No such user') };
  await writer.defer(envelope('4XyZaBcDeF02', ['gone@example.test', 'bob@example.test']), source(message('half')), [failed, undefined]);
  assert.equal(committed.length, 2, 'the message and its DSN');
  const primary = createQueue({ dir: s.dir, transport: s.transport, adoptScanInterval: 0 });
  await primary.start(); // a fresh primary loads both from disk
  const kinds = (await primary.list()).map((e) => e.kind).sort();
  assert.deepEqual(kinds, ['dsn', 'message']);
  await waitFor('the DSN to reach the sender', async () => (await stored(s.root, 'alice@sender.test')).length === 1);
  await primary.close();
  await fs.rm(s.base, { recursive: true, force: true });
});

test('the adopt scan takes an entry whose notice was lost, once it is old enough', async () => {
  const s = await setup();
  const primary = createQueue({ dir: s.dir, transport: s.transport, adoptScanInterval: 50, adoptAfter: 200 });
  await primary.start();
  const writer = createQueue({ dir: s.dir, transport: s.transport, deliver: false }); // no onCommitted: the notice is "lost"
  await writer.defer(envelope('4XyZaBcDeF03', ['bob@example.test']), source(message('found by the scan')), [undefined]);
  await waitFor('the scan to adopt and deliver it', async () => (await stored(s.root, 'bob@example.test')).length === 1);
  assert.equal(s.calls(), 1);
  await primary.close();
  await fs.rm(s.base, { recursive: true, force: true });
});
