/**
 * Disk full: the spool and the queue on a small filesystem (a 2 MiB tmpfs, or a 4 MiB
 * loop-mounted ext4 image where tmpfs cannot be mounted) that the test fills on purpose.
 * A message the queue cannot take, and a message the spool cannot hold, each get
 * `452 4.3.1` (RFC 3463 X.3.1: insufficient system storage); nothing of them reaches the
 * next hop, the Maildir or the queue; once space returns the same messages get 250 and are
 * delivered, each exactly once.
 *
 * Mounting needs root (CI runs as root): without it the test fails, it is never skipped.
 * DOVETAIL_TEST_DISKFULL_FS=loop forces the loop-mounted ext4 image.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import diagnostics_channel from 'node:diagnostics_channel';
import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { createGateway, createQueue, isDovetailError, maildir, routes, smtp } from '../../lib/index.js';
import { relayControl } from '../../milters/index.js';
import { startPeer } from '../helpers/smtp-peer.js';
import { ehlo, message, send, split, stored } from '../helpers/smtp.js';
import { waitFor } from '../helpers/wait.js';

const run = (cmd: string, args: string[]): string => execFileSync(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'], encoding: 'utf8' });
const why = (err: unknown): string => {
  const e = err as { stderr?: string; message?: string };
  return (e.stderr || e.message || String(err)).trim();
};

/** Mounts a small filesystem on `dir`: tmpfs (2 MiB), else an ext4 image on a loop device. Returns what was mounted. */
function mountSmall(dir: string, image: string): string {
  const tried: string[] = [];
  if (process.env['DOVETAIL_TEST_DISKFULL_FS'] !== 'loop') {
    try {
      run('mount', ['-t', 'tmpfs', '-o', 'size=2m,mode=0700', 'tmpfs', dir]);
      return 'tmpfs size=2m';
    } catch (err) {
      tried.push(`mount -t tmpfs: ${why(err)}`);
    }
  }
  try {
    run('truncate', ['-s', '4M', image]);
    // -m 0: no blocks reserved for root (the test runs as root and must be able to fill it).
    run('mkfs.ext4', ['-q', '-F', '-m', '0', image]);
    run('mount', ['-o', 'loop', image, dir]);
    return 'ext4 on a 4 MiB loop image';
  } catch (err) {
    tried.push(`loop-mounted ext4: ${why(err)}`);
  }
  throw new Error(`disk-full test: cannot mount a small filesystem on ${dir}:\n  ${tried.join('\n  ')}`);
}

function unmount(dir: string): void {
  try {
    run('umount', [dir]);
  } catch {
    run('umount', ['-l', dir]);
  }
}

/** Free blocks for an unprivileged writer, and the block size. */
async function free(dir: string): Promise<{ blocks: number; bsize: number }> {
  const s = await fs.statfs(dir);
  return { blocks: Number(s.bavail), bsize: Number(s.bsize) };
}

/** Fills the filesystem with `file` until ENOSPC, then gives back space until exactly one block is free. */
async function fillLeavingOneBlock(dir: string, file: string): Promise<void> {
  const fh = await fs.open(file, 'wx', 0o600);
  try {
    const { bsize } = await free(dir);
    let size = 0;
    // Big chunks, then single blocks; again after a sync, as long as statfs still reports
    // free blocks (ext4's delayed allocation reserves more than it finally uses).
    for (let round = 0; round < 8; round++) {
      for (const chunk of [Buffer.alloc(64 * 1024, 0x78), Buffer.alloc(bsize, 0x78)]) {
        for (;;) {
          try {
            const { bytesWritten } = await fh.write(chunk, 0, chunk.length, size);
            size += bytesWritten;
            if (bytesWritten === 0) break;
          } catch (err) {
            if ((err as NodeJS.ErrnoException).code !== 'ENOSPC') throw err;
            break;
          }
        }
      }
      await fh.sync();
      if ((await free(dir)).blocks === 0) break;
    }
    size -= size % bsize;
    // Shrink the filler one block at a time until one block is free (a filesystem may
    // free its own metadata blocks along the way).
    for (let i = 0; i < 64; i++) {
      const { blocks } = await free(dir);
      if (blocks === 1) return;
      assert.ok(blocks === 0, `the filesystem should be full or have one free block, has ${blocks}`);
      size -= bsize;
      await fh.truncate(size);
      await fh.sync();
    }
    assert.fail(`could not leave exactly one free block on ${dir}`);
  } finally {
    await fh.close();
  }
}

const subjectOf = (m: Buffer): string => /^Subject: (.*)$/m.exec(split(m).headers)?.[1]?.trim() ?? '';

test('disk full: 452 4.3.1 for a message the queue or the spool cannot keep, nothing acknowledged is lost, recovery when space returns', { timeout: 120_000 }, async () => {
  assert.equal(
    process.getuid?.(),
    0,
    'disk-full test: must run as root (it mounts a small tmpfs or loop filesystem to fill); run it as root, as CI does. It is never skipped.',
  );
  const base = await fs.mkdtemp(path.join(os.tmpdir(), 'dovetail-diskfull-'));
  const small = path.join(base, 'small');
  await fs.mkdir(small);
  const kind = mountSmall(small, path.join(base, 'fs.img'));
  const errors: unknown[] = [];
  const onError = (m: unknown): void => void errors.push((m as { error: unknown }).error);
  diagnostics_channel.subscribe('dovetail:gateway:error', onError);
  const peer = await startPeer();
  let gateway: ReturnType<typeof createGateway> | undefined;
  try {
    const spoolDir = path.join(small, 'spool');
    const queueDir = path.join(small, 'queue');
    await fs.mkdir(spoolDir);
    const root = path.join(base, 'mail');
    await fs.mkdir(root);
    await fs.mkdir(path.join(base, 'quarantine'));
    const table = routes({
      'example.test': maildir({ root, domains: ['example.test'] }),
      '*': smtp({ relayhost: `[127.0.0.1]:${peer.port}`, hostname: 'mx.example.test', tls: 'none', deadDestinationTime: 0 }),
    });
    const queue = createQueue({ dir: queueDir, transport: table, hostname: 'mx.example.test', backoff: { min: 100, max: 200 }, scanInterval: 50 });
    gateway = createGateway({
      hostname: 'mx.example.test',
      resolveClientNames: false,
      listen: { host: '127.0.0.1', port: 0 },
      spool: { memoryThreshold: 0, dir: spoolDir },
      milters: [relayControl({ localDomains: table.localDomains, mynetworks: ['127.0.0.0/8'] })],
      delivery: table,
      queue,
      quarantine: maildir({ root: path.join(base, 'quarantine') }),
    });
    const [addr] = await gateway.listen();
    const c = await ehlo(addr!.port);

    // A small message fits the one free block as a spool file, so it is the queue's write
    // that fails; a larger one does not fit the spool at all.
    const remote = message('to-remote');
    const big = message('to-local-big', ('y'.repeat(76) + '\r\n').repeat(400));
    const small1 = Buffer.byteLength(remote);
    const { bsize } = await free(small);
    assert.ok(small1 < bsize / 2, 'the small message fits one block with room to spare');
    assert.ok(Buffer.byteLength(big) > 4 * bsize, 'the big message needs several blocks');

    await fillLeavingOneBlock(small, path.join(small, 'filler'));
    const replies: { subject: string; code: number; text: string }[] = [];

    // (b) Queue-first: the spool holds it, the queue cannot write it.
    errors.length = 0;
    const a1 = await send(c, 'sender@client.test', ['bob@remote.test'], remote);
    assert.equal(a1.rcpt[0]?.code, 250);
    assert.equal(a1.data?.code, 452, `queue full: ${a1.data?.text}`);
    assert.match(a1.data!.text, /^452 4\.3\.1 /);
    replies.push({ subject: 'to-remote', code: a1.data!.code, text: a1.data!.text });
    assert.ok(
      errors.some((e) => (e as NodeJS.ErrnoException).code === 'ENOSPC' && !isDovetailError(e)),
      `the queue's ENOSPC went to the error channel: ${errors.map(String).join('; ')}`,
    );

    // (a) The spool cannot be written.
    errors.length = 0;
    const b1 = await send(c, 'sender@client.test', ['alice@example.test'], big);
    assert.equal(b1.rcpt[0]?.code, 250);
    assert.equal(b1.data?.code, 452, `spool full: ${b1.data?.text}`);
    assert.match(b1.data!.text, /^452 4\.3\.1 /);
    replies.push({ subject: 'to-local-big', code: b1.data!.code, text: b1.data!.text });
    assert.ok(
      errors.some((e) => isDovetailError(e, 'DOVETAIL_ERR_SPOOL') && ((e as Error).cause as NodeJS.ErrnoException | undefined)?.code === 'ENOSPC'),
      `the spool's ENOSPC went to the error channel: ${errors.map(String).join('; ')}`,
    );

    // Nothing kept of either: no queue entry, no file left in the spool or the queue's tmp, nothing stored or sent.
    assert.deepEqual(await queue.list(), [], 'nothing in the queue');
    assert.deepEqual(await fs.readdir(spoolDir), [], 'no spool file left behind');
    const queueFiles = (await fs.readdir(queueDir, { recursive: true, withFileTypes: true })).filter((d) => d.isFile());
    assert.deepEqual(queueFiles.map((d) => d.name), [], 'no file in the queue directory');
    assert.deepEqual(await stored(root, 'alice@example.test'), []);
    assert.equal(peer.messages.length, 0);
    assert.equal(peer.connections(), 0, 'the next hop was never contacted');

    // The session is still usable while the disk is full.
    assert.equal((await c.cmd('NOOP')).code, 250);

    // Space returns.
    await fs.rm(path.join(small, 'filler'));
    assert.ok((await free(small)).blocks > 100, 'space is back');

    const a2 = await send(c, 'sender@client.test', ['bob@remote.test'], remote);
    assert.equal(a2.data?.code, 250, `after recovery: ${a2.data?.text}`);
    replies.push({ subject: 'to-remote', code: a2.data!.code, text: a2.data!.text });
    const b2 = await send(c, 'sender@client.test', ['alice@example.test'], big);
    assert.equal(b2.data?.code, 250, `after recovery: ${b2.data?.text}`);
    replies.push({ subject: 'to-local-big', code: b2.data!.code, text: b2.data!.text });
    c.end();

    // Everything answered 250 is delivered, exactly once.
    await peer.waitFor(1);
    await waitFor('an empty queue', async () => (await queue.list()).length === 0);
    const accepted = replies.filter((r) => r.code === 250).map((r) => r.subject).sort();
    const delivered = [...peer.messages.map((m) => subjectOf(m.data)), ...(await stored(root, 'alice@example.test')).map(subjectOf)].sort();
    assert.deepEqual(delivered, accepted, `${kind}: every 250 delivered exactly once, nothing else`);
    assert.deepEqual(peer.messages.map((m) => m.to), [['bob@remote.test']]);
    const [local] = await stored(root, 'alice@example.test');
    assert.ok(local!.includes(Buffer.from(big.slice(big.indexOf('\r\n\r\n') + 4))), 'the big body stored intact');
    assert.deepEqual(await fs.readdir(spoolDir), [], 'no spool file left behind');
  } finally {
    diagnostics_channel.unsubscribe('dovetail:gateway:error', onError);
    await gateway?.close();
    await peer.close();
    unmount(small);
    await fs.rm(base, { recursive: true, force: true });
  }
});
