/**
 * Unit tests of the spool (lib/smtp/spool.ts): memory/disk switch at the threshold,
 * byte-identical read-back, ranged reads, disposal, bounded memory, and write failures.
 * Every test uses its own temp directory so the spool's files can be seen and counted.
 */
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { mkdir, mkdtemp, readdir, rm, stat } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Readable } from 'node:stream';
import { after, before, describe, it } from 'node:test';
import { isDovetailError, ErrorCodes } from '../../lib/errors.js';
import { Spool, spoolFrom, spoolMemoryInUse } from '../../lib/message/spool.js';

let root: string;
before(async () => {
  root = await mkdtemp(join(tmpdir(), 'dovetail-spool-test-'));
});
after(async () => {
  await rm(root, { recursive: true, force: true });
});

let counter = 0;
async function freshDir(): Promise<string> {
  const dir = join(root, `d${counter++}`);
  await mkdir(dir);
  return dir;
}

async function collect(stream: Readable): Promise<{ data: Buffer; chunks: number[] }> {
  const parts: Buffer[] = [];
  for await (const chunk of stream) parts.push(chunk as Buffer);
  return { data: Buffer.concat(parts), chunks: parts.map((p) => p.length) };
}

/** Writes `buf` and waits for the spool to have processed it. */
function writeAndWait(spool: Spool, buf: Buffer): Promise<void> {
  return new Promise((resolve, reject) => {
    spool.write(buf, (err) => (err ? reject(err) : resolve()));
  });
}

function endAndWait(spool: Spool): Promise<void> {
  return new Promise((resolve, reject) => {
    spool.once('error', reject);
    spool.end(() => resolve());
  });
}

/** Splits `buf` into chunks of random sizes in [1, max]. */
function randomChunks(buf: Buffer, max: number): Buffer[] {
  const out: Buffer[] = [];
  for (let i = 0; i < buf.length; ) {
    const n = 1 + Math.floor(Math.random() * max);
    out.push(buf.subarray(i, i + n));
    i += n;
  }
  return out;
}

describe('Spool', () => {
  it('the memory budget is shared by every spool: past it, a spool below its threshold goes to disk; dispose gives it back', async () => {
    const dir = await freshDir();
    const base = spoolMemoryInUse();
    const opts = { memoryThreshold: 100_000, memoryBudget: base + 150_000, dir };
    const a = await spoolFrom(randomBytes(80_000), opts);
    assert.equal(a.onDisk, false);
    assert.equal(spoolMemoryInUse(), base + 80_000);
    const payload = randomBytes(80_000);
    const b = await spoolFrom(payload, opts);
    assert.equal(b.onDisk, true, 'a and b together would pass the budget');
    assert.equal(spoolMemoryInUse(), base + 80_000);
    assert.deepEqual((await collect(b.createReadStream())).data, payload, 'the spilled one reads back whole');
    // A spool that spills gives back what it held in memory.
    const c = new Spool(opts);
    await writeAndWait(c, randomBytes(60_000));
    assert.equal(spoolMemoryInUse(), base + 140_000);
    await writeAndWait(c, randomBytes(20_000));
    await endAndWait(c);
    assert.equal(c.onDisk, true);
    assert.equal(spoolMemoryInUse(), base + 80_000);
    await a.dispose();
    assert.equal(spoolMemoryInUse(), base);
    const d = await spoolFrom(randomBytes(80_000), opts);
    assert.equal(d.onDisk, false, 'room again once a was disposed');
    for (const s of [b, c, d]) await s.dispose();
    await a.dispose();
    assert.equal(spoolMemoryInUse(), base, 'disposing twice gives nothing back twice');
    assert.throws(() => new Spool({ memoryBudget: -1 }), { code: ErrorCodes.INVALID_OPTIONS });
  });

  it('keeps a message below the threshold in memory', async () => {
    const dir = await freshDir();
    const payload = randomBytes(1000);
    const spool = await spoolFrom(payload, { memoryThreshold: 1024, dir });
    assert.equal(spool.onDisk, false);
    assert.equal(spool.size, 1000);
    assert.deepEqual(await readdir(dir), []);
    assert.deepEqual((await collect(spool.createReadStream())).data, payload);
    await spool.dispose();
  });

  it('stays in memory at exactly the threshold and moves to disk one byte above it', async () => {
    const dir = await freshDir();
    const at = await spoolFrom(randomBytes(4096), { memoryThreshold: 4096, dir });
    assert.equal(at.onDisk, false);
    assert.deepEqual(await readdir(dir), []);

    const payload = randomBytes(4097);
    const above = await spoolFrom(Readable.from(randomChunks(payload, 300), { objectMode: false }), {
      memoryThreshold: 4096,
      dir,
    });
    assert.equal(above.onDisk, true);
    const files = await readdir(dir);
    assert.equal(files.length, 1);
    const info = await stat(join(dir, files[0]!));
    assert.equal(info.size, 4097);
    assert.equal(info.mode & 0o777 & ~0o600, 0, 'the temp file is private to its owner');
    assert.match(files[0]!, /[0-9a-f]{32}/, 'the temp file name carries 128 random bits');
    assert.deepEqual(await above.read(0, above.size), payload);
    await Promise.all([at.dispose(), above.dispose()]);
    assert.deepEqual(await readdir(dir), []);
  });

  it('reads back a 3 MB random payload byte for byte', async () => {
    const dir = await freshDir();
    const payload = randomBytes(3 * 1024 * 1024);
    const spool = await spoolFrom(Readable.from(randomChunks(payload, 70_000), { objectMode: false }), {
      memoryThreshold: 64 * 1024,
      dir,
    });
    assert.equal(spool.onDisk, true);
    assert.equal(spool.size, payload.length);
    const { data, chunks } = await collect(spool.createReadStream());
    assert.ok(data.equals(payload));
    assert.ok(chunks.every((n) => n <= 64 * 1024), 'default read chunks are at most 64 KiB');
    assert.ok((await spool.read(0, spool.size)).equals(payload));
    // Read twice: reading does not consume.
    assert.ok((await collect(spool.createReadStream(0, spool.size, 10_000))).data.equals(payload));
    await spool.dispose();
  });

  for (const onDisk of [false, true]) {
    it(`serves ranged reads (${onDisk ? 'on disk' : 'in memory'})`, async () => {
      const dir = await freshDir();
      const payload = randomBytes(50_000);
      const spool = await spoolFrom(Readable.from(randomChunks(payload, 997), { objectMode: false }), {
        memoryThreshold: onDisk ? 1000 : 100_000,
        dir,
      });
      assert.equal(spool.onDisk, onDisk);
      const ranges: Array<[number, number]> = [
        [0, 0],
        [0, 1],
        [0, 50_000],
        [1, 49_999],
        [996, 998],
        [12_345, 23_456],
        [49_999, 50_000],
        [50_000, 50_000],
        [25_000, 25_000],
      ];
      for (const [start, end] of ranges) {
        const expected = payload.subarray(start, end);
        assert.deepEqual(await spool.read(start, end), expected, `read(${start}, ${end})`);
        const { data, chunks } = await collect(spool.createReadStream(start, end, 1000));
        assert.deepEqual(data, expected, `createReadStream(${start}, ${end})`);
        assert.ok(chunks.every((n) => n > 0 && n <= 1000), `chunks of [${start}, ${end}) fit the highWaterMark`);
      }
      assert.deepEqual((await collect(spool.createReadStream(40_000))).data, payload.subarray(40_000));
      assert.throws(() => spool.createReadStream(10, 5), RangeError);
      assert.throws(() => spool.createReadStream(0, 50_001), RangeError);
      assert.throws(() => spool.createReadStream(-1, 5), RangeError);
      await assert.rejects(spool.read(0, 50_001), RangeError);
      await spool.dispose();
    });
  }

  it('refuses reads before it finished and after dispose', async () => {
    const dir = await freshDir();
    const spool = new Spool({ dir, memoryThreshold: 10 });
    await writeAndWait(spool, Buffer.from('hello'));
    assert.throws(() => spool.createReadStream(), (err) => isDovetailError(err, ErrorCodes.SPOOL_FAILED));
    await endAndWait(spool);
    assert.equal((await collect(spool.createReadStream())).data.toString(), 'hello');
    await spool.dispose();
    assert.throws(() => spool.createReadStream(), (err) => isDovetailError(err, ErrorCodes.SPOOL_FAILED));
  });

  it('removes its file on dispose, idempotently', async () => {
    const dir = await freshDir();
    const spool = await spoolFrom(randomBytes(10_000), { memoryThreshold: 100, dir });
    assert.equal((await readdir(dir)).length, 1);
    await Promise.all([spool.dispose(), spool.dispose()]);
    assert.deepEqual(await readdir(dir), []);
    await spool.dispose();
    assert.deepEqual(await readdir(dir), []);
  });

  it('removes its file when disposed in the middle of writing', async () => {
    const dir = await freshDir();
    const spool = new Spool({ dir, memoryThreshold: 100 });
    spool.on('error', () => undefined);
    await writeAndWait(spool, randomBytes(1000));
    spool.write(randomBytes(1000)); // in flight while disposing
    await spool.dispose();
    assert.deepEqual(await readdir(dir), []);
    assert.equal(spool.destroyed, true);
  });

  it('removes its file when destroyed with an error', async () => {
    const dir = await freshDir();
    const spool = new Spool({ dir, memoryThreshold: 100 });
    spool.on('error', () => undefined);
    await writeAndWait(spool, randomBytes(1000));
    assert.equal((await readdir(dir)).length, 1);
    spool.destroy(new Error('boom'));
    await new Promise((resolve) => spool.once('close', resolve));
    assert.deepEqual(await readdir(dir), []);
  });

  it('never holds more than the threshold in memory: past it every byte is in the file', async () => {
    const dir = await freshDir();
    const threshold = 50_000;
    const spool = new Spool({ dir, memoryThreshold: threshold });
    let written = 0;
    let sawMemory = false;
    for (let i = 0; i < 40; i++) {
      await writeAndWait(spool, randomBytes(7_000));
      written += 7_000;
      const files = await readdir(dir);
      if (written <= threshold) {
        sawMemory = true;
        assert.equal(spool.onDisk, false, `${written} bytes fit in memory`);
        assert.equal(files.length, 0);
      } else {
        assert.equal(spool.onDisk, true, `${written} bytes are on disk`);
        assert.equal(files.length, 1);
        // The file holds everything written so far: nothing is left behind in memory.
        assert.equal((await stat(join(dir, files[0]!))).size, written);
      }
      assert.equal(spool.size, written);
    }
    assert.ok(sawMemory);
    await endAndWait(spool);
    await spool.dispose();
  });

  it('honours backpressure: write() returns false while a disk write is pending', async () => {
    const dir = await freshDir();
    const spool = new Spool({ dir, memoryThreshold: 0 });
    let sawFalse = false;
    for (let i = 0; i < 20; i++) if (!spool.write(randomBytes(8192))) sawFalse = true;
    assert.ok(sawFalse);
    await endAndWait(spool);
    assert.equal(spool.size, 20 * 8192);
    await spool.dispose();
  });

  it('reports a write failure as a SPOOL_FAILED stream error', async () => {
    const dir = join(await freshDir(), 'does-not-exist');
    const spool = new Spool({ dir, memoryThreshold: 10 });
    const error = new Promise<unknown>((resolve) => spool.once('error', resolve));
    spool.write(Buffer.alloc(100));
    const err = await error;
    assert.ok(isDovetailError(err, ErrorCodes.SPOOL_FAILED), String(err));
    assert.equal((err as Error & { cause?: { code?: string } }).cause?.code, 'ENOENT');
    await spool.dispose(); // safe after an error

    await assert.rejects(spoolFrom(Buffer.alloc(100), { dir, memoryThreshold: 10 }), (e) =>
      isDovetailError(e, ErrorCodes.SPOOL_FAILED),
    );
    await assert.rejects(
      spoolFrom(Readable.from([Buffer.alloc(50), Buffer.alloc(50)], { objectMode: false }), {
        dir,
        memoryThreshold: 10,
      }),
      (e) => isDovetailError(e, ErrorCodes.SPOOL_FAILED),
    );
  });

  it('spools a string as UTF-8', async () => {
    const spool = await spoolFrom('Grüße\r\n', { dir: await freshDir() });
    assert.equal(spool.size, Buffer.byteLength('Grüße\r\n'));
    assert.equal((await spool.read(0, spool.size)).toString('utf8'), 'Grüße\r\n');
    await spool.dispose();
  });

  it('rejects a bad threshold', () => {
    assert.throws(() => new Spool({ memoryThreshold: -1 }), (e) => isDovetailError(e, ErrorCodes.INVALID_OPTIONS));
  });

  it('hands out full chunks of highWaterMark bytes however the data was written (regression: body chunks split at write boundaries)', async () => {
    for (const threshold of [1 << 20, 0]) {
      const spool = new Spool({ memoryThreshold: threshold, dir: await freshDir() });
      const data = randomBytes(10_000);
      for (let i = 0; i < data.length; i += 7) await writeAndWait(spool, data.subarray(i, i + 7));
      await endAndWait(spool);
      const got = await collect(spool.createReadStream(3, 9_003, 1000));
      assert.ok(got.data.equals(data.subarray(3, 9_003)));
      assert.deepEqual(got.chunks, Array(9).fill(1000));
      await spool.dispose();
    }
  });
});
