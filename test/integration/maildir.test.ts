/**
 * The Maildir transport against a real file system: a fresh directory under os.tmpdir()
 * per test, real files read back byte for byte.
 */
import assert from 'node:assert/strict';
import diagnostics_channel from 'node:diagnostics_channel';
import { existsSync } from 'node:fs';
import { mkdir, mkdtemp, readdir, readFile, rm, stat, symlink, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { Readable } from 'node:stream';
import { after, before, describe, it } from 'node:test';
import { maildir } from '../../lib/delivery/maildir.js';
import type { DeliveryEnvelope, MessageSource } from '../../lib/delivery/types.js';
import { Channels } from '../../lib/diagnostics.js';
import type { EnvelopeAddress } from '../../lib/milter/types.js';

const NAME = /^(\d+)\.M(\d{1,6})P(\d+)Q(\d+)\.(.+),S=(\d+)$/;

const MESSAGE = Buffer.from(
  'From: Carol <carol@example.org>\r\nTo: alice@example.com\r\nSubject: hi\r\n\r\nHello there.\r\n',
  'utf8',
);

function addr(address: string): EnvelopeAddress {
  return { address, args: {} };
}

function envelope(sender: string, ...recipients: string[]): DeliveryEnvelope {
  return { queueId: 'Q1', sender: addr(sender), recipients: recipients.map(addr) };
}

function source(buf: Buffer): MessageSource {
  return { size: buf.length, stream: () => Readable.from([buf]) };
}

/** Files in a directory, or [] when it does not exist. */
async function list(dir: string): Promise<string[]> {
  try {
    return (await readdir(dir)).sort();
  } catch {
    return [];
  }
}

/** The one file in `<root>/<box>/new/`, read back. */
async function onlyNew(root: string, box: string): Promise<{ name: string; data: Buffer; nlink: number }> {
  const dir = path.join(root, box, 'new');
  const names = await list(dir);
  assert.equal(names.length, 1, `exactly one file in ${dir}: ${names.join(', ')}`);
  const name = names[0] ?? '';
  const file = path.join(dir, name);
  return { name, data: await readFile(file), nlink: (await stat(file)).nlink };
}

let base: string;
let n = 0;
/** A fresh root below the test's base dir (so escapes from root can be seen in base). */
async function freshRoot(): Promise<string> {
  const root = path.join(base, `root${++n}`);
  await mkdir(root);
  return root;
}

before(async () => {
  base = await mkdtemp(path.join(os.tmpdir(), 'dovetail-maildir-'));
});
after(async () => {
  await rm(base, { recursive: true, force: true });
});

describe('maildir transport', () => {
  it('stores byte-identical hard-linked files in each recipient’s new/, with unique names and S=', async () => {
    const root = await freshRoot();
    // deliveredTo: false: no per-recipient line, so one file is written and linked into both.
    const t = maildir({ root, hostname: 'mx1.example.net', deliveredTo: false });
    assert.equal(t.name, 'maildir');
    const results = await t.deliver(envelope('carol@example.org', 'alice@example.com', 'bob@example.com'), source(MESSAGE));

    const expected = Buffer.concat([Buffer.from('Return-Path: <carol@example.org>\r\n'), MESSAGE]);
    assert.deepEqual(
      results.map((r) => [r.recipient, r.status, r.reply.code, r.reply.enhanced]),
      [
        ['alice@example.com', 'delivered', 250, '2.0.0'],
        ['bob@example.com', 'delivered', 250, '2.0.0'],
      ],
    );
    const a = await onlyNew(root, 'alice@example.com');
    const b = await onlyNew(root, 'bob@example.com');
    assert.deepEqual(a.data, expected);
    assert.deepEqual(b.data, expected);
    assert.notEqual(a.name, b.name);
    // Written once: both names are links to one inode, and the tmp/ file is gone.
    assert.equal(a.nlink, 2);
    assert.equal(b.nlink, 2);
    for (const [file, r] of [[a, results[0]], [b, results[1]]] as const) {
      const m = NAME.exec(file.name);
      assert.ok(m, `unique name ${file.name}`);
      assert.equal(m[3], String(process.pid));
      assert.equal(m[5], 'mx1.example.net');
      assert.equal(Number(m[6]), expected.length);
      assert.ok(Math.abs(Number(m[1]) - Date.now() / 1000) < 60);
      assert.deepEqual(r?.reply.lines, [`Ok: stored as ${file.name}`]);
    }
    for (const box of ['alice@example.com', 'bob@example.com']) {
      assert.deepEqual(await list(path.join(root, box, 'tmp')), []);
      assert.deepEqual(await list(path.join(root, box, 'cur')), []);
      assert.equal((await stat(path.join(root, box))).mode & 0o777, 0o700);
    }
  });

  it('gives every delivery a new name (the Q counter grows)', async () => {
    const root = await freshRoot();
    const t = maildir({ root, hostname: 'h' });
    for (let i = 0; i < 5; i++) await t.deliver(envelope('s@x', 'a@x'), source(MESSAGE));
    const names = await list(path.join(root, 'a@x', 'new'));
    assert.equal(names.length, 5);
    const qs = names.map((name) => Number(NAME.exec(name)?.[4]));
    assert.equal(new Set(qs).size, 5);
  });

  it('stores the exact message bytes with returnPath: false and deliveredTo: false', async () => {
    const root = await freshRoot();
    const t = maildir({ root, returnPath: false, deliveredTo: false });
    const results = await t.deliver(envelope('', 'alice@example.com'), source(MESSAGE));
    assert.equal(results[0]?.status, 'delivered');
    const a = await onlyNew(root, 'alice@example.com');
    assert.deepEqual(a.data, MESSAGE);
    assert.equal(NAME.exec(a.name)?.[6], String(MESSAGE.length));
  });

  it('writes the null sender as Return-Path: <>', async () => {
    const root = await freshRoot();
    await maildir({ root }).deliver(envelope('', 'alice@example.com'), source(MESSAGE));
    const a = await onlyNew(root, 'alice@example.com');
    assert.deepEqual(a.data, Buffer.concat([Buffer.from('Return-Path: <>\r\nDelivered-To: alice@example.com\r\n'), MESSAGE]));
  });

  it('stores a 5 MB message streamed in many chunks', async () => {
    const root = await freshRoot();
    const body = Buffer.alloc(5 * 1024 * 1024);
    for (let i = 0; i < body.length; i++) body[i] = (i * 31 + (i >> 10)) & 0xff;
    const chunks: Buffer[] = [];
    for (let off = 0; off < body.length; off += 65_521) chunks.push(body.subarray(off, off + 65_521));
    const msg: MessageSource = { size: body.length, stream: () => Readable.from(chunks) };
    const results = await maildir({ root, returnPath: false, deliveredTo: false }).deliver(envelope('s@x', 'big@example.com'), msg);
    assert.equal(results[0]?.status, 'delivered');
    const f = await onlyNew(root, 'big@example.com');
    assert.equal(f.data.length, body.length);
    assert.ok(f.data.equals(body));
    assert.equal(NAME.exec(f.name)?.[6], String(body.length));
    assert.deepEqual(await list(path.join(root, 'big@example.com', 'tmp')), []);
  });

  it('fails a recipient whose custom mailbox name is unusable, and delivers the other', async () => {
    const root = await freshRoot();
    const t = maildir({
      root,
      mailbox: (r) => (r.address.startsWith('evil') ? '../x' : r.address.split('@')[0] ?? ''),
    });
    const results = await t.deliver(envelope('s@x', 'evil@example.com', 'alice@example.com'), source(MESSAGE));
    assert.equal(results.length, 2);
    assert.equal(results[0]?.recipient, 'evil@example.com');
    assert.equal(results[0]?.status, 'failed');
    assert.equal(results[0]?.reply.code, 550);
    assert.equal(results[0]?.reply.enhanced, '5.1.3');
    assert.equal(results[1]?.status, 'delivered');
    await onlyNew(root, 'alice');
    assert.equal(existsSync(path.join(root, '..', 'x')), false);
    assert.deepEqual(await list(root), ['alice']);

    for (const bad of ['', '.', '..', 'a/b', 'a\0b', 'x'.repeat(256)]) {
      const [r] = await maildir({ root, mailbox: () => bad }).deliver(envelope('s@x', 'z@x'), source(MESSAGE));
      assert.equal(r?.status, 'failed', JSON.stringify(bad));
      assert.equal(r?.reply.code, 550);
    }
    assert.deepEqual(await list(root), ['alice']);
  });

  it('defers a recipient whose maildir path is blocked by a file, delivers the other, and reports the error', async () => {
    const root = await freshRoot();
    await writeFile(path.join(root, 'bob@example.com'), 'not a directory');
    const seen: unknown[] = [];
    const onError = (m: unknown): void => {
      seen.push(m);
    };
    diagnostics_channel.subscribe(Channels.error, onError);
    try {
      // The blocked one first: the message must then be written into the next maildir.
      const results = await maildir({ root }).deliver(
        { ...envelope('s@x', 'bob@example.com', 'alice@example.com'), queueId: 'QBLOCK' },
        source(MESSAGE),
      );
      assert.equal(results[0]?.recipient, 'bob@example.com');
      assert.equal(results[0]?.status, 'deferred');
      assert.equal(results[0]?.reply.code, 451);
      assert.equal(results[0]?.reply.enhanced, '4.3.0');
      assert.deepEqual(results[0]?.reply.lines, ['Local delivery error']);
      assert.equal(results[1]?.status, 'delivered');
      await onlyNew(root, 'alice@example.com');
      assert.deepEqual(await list(path.join(root, 'alice@example.com', 'tmp')), []);
    } finally {
      diagnostics_channel.unsubscribe(Channels.error, onError);
    }
    const mine = seen.filter((m) => (m as { queueId?: string }).queueId === 'QBLOCK') as {
      recipient: string;
      error: NodeJS.ErrnoException;
    }[];
    assert.equal(mine.length, 1);
    assert.equal(mine[0]?.recipient, 'bob@example.com');
    assert.equal(mine[0]?.error.code, 'ENOTDIR');
  });

  it('defers every recipient and leaves no tmp file when the message stream fails midway', async () => {
    const root = await freshRoot();
    const msg: MessageSource = {
      size: 1000,
      stream: () =>
        Readable.from(
          (async function* () {
            yield Buffer.alloc(300, 0x41);
            await new Promise((r) => setTimeout(r, 5));
            throw new Error('spool read failed');
          })(),
        ),
    };
    const results = await maildir({ root }).deliver(envelope('s@x', 'alice@example.com', 'bob@example.com'), msg);
    assert.deepEqual(
      results.map((r) => [r.recipient, r.status, r.reply.code, r.reply.enhanced]),
      [
        ['alice@example.com', 'deferred', 451, '4.3.0'],
        ['bob@example.com', 'deferred', 451, '4.3.0'],
      ],
    );
    assert.ok(!results.some((r) => r.reply.lines.join(' ').includes('spool read failed')));
    for (const box of ['alice@example.com', 'bob@example.com']) {
      assert.deepEqual(await list(path.join(root, box, 'tmp')), []);
      assert.deepEqual(await list(path.join(root, box, 'new')), []);
    }
  });

  it('defers every recipient when the stream yields fewer bytes than announced', async () => {
    const root = await freshRoot();
    const msg: MessageSource = { size: MESSAGE.length + 10, stream: () => Readable.from([MESSAGE]) };
    const results = await maildir({ root }).deliver(envelope('s@x', 'alice@example.com'), msg);
    assert.equal(results[0]?.status, 'deferred');
    assert.deepEqual(await list(path.join(root, 'alice@example.com', 'tmp')), []);
    assert.deepEqual(await list(path.join(root, 'alice@example.com', 'new')), []);
  });

  it('keeps default mailbox names inside root, and distinct', async () => {
    const root = await freshRoot();
    const rcpts = ['Alice@Example.COM', 'a/b@example.com', '../../etc/passwd', '.hidden@example.com', '..', 'a%2Fb@example.com', 'ü@example.com'];
    const results = await maildir({ root }).deliver(envelope('s@x', ...rcpts), source(MESSAGE));
    assert.deepEqual(
      results.map((r) => r.status),
      rcpts.map(() => 'delivered'),
    );
    const expected = [
      'alice@example.com',
      'a%2Fb@example.com',
      '%2E.%2F..%2Fetc%2Fpasswd',
      '%2Ehidden@example.com',
      '%2E.',
      'a%252fb@example.com', // lower-cased first, then '%' itself encoded
      '%C3%BC@example.com',
    ];
    assert.deepEqual(await list(root), [...expected].sort());
    for (const box of expected) await onlyNew(root, box);
    // Nothing escaped root.
    assert.deepEqual((await list(base)).filter((f) => !f.startsWith('root')), []);
  });

  it('gives duplicate recipients (any case) each a result, with one stored copy', async () => {
    const root = await freshRoot();
    const results = await maildir({ root }).deliver(
      envelope('s@x', 'alice@example.com', 'bob@example.com', 'ALICE@example.com'),
      source(MESSAGE),
    );
    assert.deepEqual(
      results.map((r) => [r.recipient, r.status]),
      [
        ['alice@example.com', 'delivered'],
        ['bob@example.com', 'delivered'],
        ['ALICE@example.com', 'delivered'],
      ],
    );
    const a = await onlyNew(root, 'alice@example.com');
    assert.deepEqual(results[0]?.reply, results[2]?.reply);
    assert.deepEqual(results[0]?.reply.lines, [`Ok: stored as ${a.name}`]);
  });

  it('copies instead of linking into a maildir on another file system (EXDEV)', async (t) => {
    const root = await freshRoot();
    let other: string;
    try {
      other = await mkdtemp('/dev/shm/dovetail-maildir-');
    } catch {
      t.skip('no /dev/shm');
      return;
    }
    try {
      if ((await stat(other)).dev === (await stat(root)).dev) {
        t.skip('/dev/shm is on the same file system as the test root');
        return;
      }
      await symlink(other, path.join(root, 'far@example.com'));
      // deliveredTo: false: one file written near, linked or (across file systems) copied far.
      const results = await maildir({ root, deliveredTo: false }).deliver(envelope('s@x', 'near@example.com', 'far@example.com'), source(MESSAGE));
      assert.deepEqual(
        results.map((r) => r.status),
        ['delivered', 'delivered'],
      );
      const expected = Buffer.concat([Buffer.from('Return-Path: <s@x>\r\n'), MESSAGE]);
      const near = await onlyNew(root, 'near@example.com');
      const far = await onlyNew(root, 'far@example.com');
      assert.deepEqual(near.data, expected);
      assert.deepEqual(far.data, expected);
      assert.equal(far.nlink, 1);
      assert.equal(NAME.exec(far.name)?.[6], String(expected.length));
      assert.deepEqual(await list(path.join(other, 'tmp')), []);
      assert.deepEqual(await list(path.join(root, 'near@example.com', 'tmp')), []);
    } finally {
      await rm(other, { recursive: true, force: true });
    }
  });

  it('recreates a maildir that was removed after it was first used', async () => {
    const root = await freshRoot();
    const t = maildir({ root });
    assert.equal((await t.deliver(envelope('s@x', 'alice@example.com'), source(MESSAGE)))[0]?.status, 'delivered');
    await rm(path.join(root, 'alice@example.com'), { recursive: true });
    assert.equal((await t.deliver(envelope('s@x', 'alice@example.com'), source(MESSAGE)))[0]?.status, 'delivered');
    await onlyNew(root, 'alice@example.com');
  });

  it('defers when root does not exist instead of creating it', async () => {
    const root = path.join(base, 'missing-root');
    const [r] = await maildir({ root }).deliver(envelope('s@x', 'alice@example.com'), source(MESSAGE));
    assert.equal(r?.status, 'deferred');
    assert.equal(r?.reply.code, 451);
    assert.equal(existsSync(root), false);
  });

  it("escapes '/' and ':' in the host part as \\057 and \\072", async () => {
    const root = await freshRoot();
    await maildir({ root, hostname: 'a/b:c' }).deliver(envelope('s@x', 'alice@example.com'), source(MESSAGE));
    const f = await onlyNew(root, 'alice@example.com');
    assert.equal(NAME.exec(f.name)?.[5], 'a\\057b\\072c');
  });

  it('rejects malformed options', () => {
    assert.throws(() => maildir({ root: '' }), { code: 'DOVETAIL_ERR_INVALID_OPTIONS' });
    assert.throws(() => maildir({ root: base, hostname: 'h'.repeat(200) }), { code: 'DOVETAIL_ERR_INVALID_OPTIONS' });
  });
});
