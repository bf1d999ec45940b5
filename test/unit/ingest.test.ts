/**
 * Unit tests of DATA ingest (lib/smtp/ingest.ts): header block parsing and its end, bare line
 * endings (refused and normalised, across chunk boundaries), the size and header limits,
 * draining, I/O failures, and chunking independence (fixtures split at every byte offset).
 */
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { mkdir, mkdtemp, readdir, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Readable } from 'node:stream';
import { after, before, describe, it } from 'node:test';
import { ErrorCodes, isDovetailError } from '../../lib/errors.js';
import { ingest, type IngestOptions, type IngestResult } from '../../lib/smtp/ingest.js';

let root: string;
before(async () => {
  root = await mkdtemp(join(tmpdir(), 'dovetail-ingest-test-'));
});
after(async () => {
  await rm(root, { recursive: true, force: true });
});

const b = (s: string): Buffer => Buffer.from(s, 'utf8');

/** A data stream that hands out exactly these chunks (object mode keeps their boundaries). */
function source(chunks: Buffer[]): Readable {
  return Readable.from(chunks.filter((c) => c.length > 0));
}

const base: IngestOptions = { maxBytes: 1 << 20, maxHeaderBytes: 64 * 1024, bareLineEndings: 'reject' };

interface Snapshot {
  problem: IngestResult['problem'];
  received: number;
  size: number;
  content: string;
  bodyOffset: number;
  separator: boolean;
  headers: Array<{ name: string; value: string; raw: string }>;
}

/** Runs ingest over `chunks` and returns everything it found, content included; disposes the spool. */
async function run(chunks: Buffer[], options: Partial<IngestOptions> = {}): Promise<Snapshot> {
  const result = await ingest(source(chunks), { ...base, ...options });
  try {
    const content = await result.spool.read(0, result.spool.size);
    return {
      problem: result.problem,
      received: result.received,
      size: result.spool.size,
      content: content.toString('latin1'),
      bodyOffset: result.bodyOffset,
      separator: result.separator,
      headers: result.headers.map((h) => ({ name: h.name, value: h.value, raw: h.raw.toString('latin1') })),
    };
  } finally {
    await result.spool.dispose();
  }
}

const latin1 = (s: string): string => Buffer.from(s, 'utf8').toString('latin1');

describe('ingest: header block', () => {
  const head =
    'Subject: Grüße aus Köln ✓\r\n' +
    'To: a@example.com,\r\n\tb@example.com\r\n' +
    'X-Empty:\r\n' +
    'X-Tight:value\r\n' +
    'X-Two:  two spaces\r\n' +
    'Received: from x\r\n by y\r\n  with z\r\n';
  const message = b(head + '\r\nBody: not a header\r\nline\r\n');

  it('parses folded and 8-bit fields, keeping their exact bytes', async () => {
    const r = await ingest(source([message]), base);
    assert.equal(r.problem, undefined);
    assert.equal(r.received, message.length);
    assert.equal(r.separator, true);
    assert.equal(r.bodyOffset, Buffer.byteLength(head) + 2);
    assert.deepEqual(
      r.headers.map((h) => [h.name, h.value]),
      [
        ['Subject', 'Grüße aus Köln ✓'],
        ['To', 'a@example.com,\r\n\tb@example.com'],
        ['X-Empty', ''],
        ['X-Tight', 'value'],
        ['X-Two', ' two spaces'],
        ['Received', 'from x\r\n by y\r\n  with z'],
      ],
    );
    assert.deepEqual(
      r.headers.map((h) => h.raw),
      [
        b('Subject: Grüße aus Köln ✓\r\n'),
        b('To: a@example.com,\r\n\tb@example.com\r\n'),
        b('X-Empty:\r\n'),
        b('X-Tight:value\r\n'),
        b('X-Two:  two spaces\r\n'),
        b('Received: from x\r\n by y\r\n  with z\r\n'),
      ],
    );
    assert.deepEqual(Buffer.concat(r.headers.map((h) => h.raw)), b(head));
    assert.deepEqual(await r.spool.read(0, r.spool.size), message);
    assert.equal((await r.spool.read(r.bodyOffset, r.spool.size)).toString(), 'Body: not a header\r\nline\r\n');
    await r.spool.dispose();
  });

  it('ends the block at the first line that is not a field, without separator', async () => {
    const r = await run([b('Subject: x\r\nTo: y\r\nthis line has no colon\r\n\r\nmore\r\n')]);
    assert.deepEqual(
      r.headers.map((h) => h.name),
      ['Subject', 'To'],
    );
    assert.equal(r.separator, false);
    assert.equal(r.bodyOffset, 'Subject: x\r\nTo: y\r\n'.length);
  });

  it('does not take a name with space before the colon, or an empty name, as a field', async () => {
    assert.equal((await run([b('A: 1\r\nSubject : x\r\n\r\n')])).bodyOffset, 6);
    assert.equal((await run([b('A: 1\r\n: x\r\n\r\n')])).bodyOffset, 6);
    assert.equal((await run([b('A: 1\r\nN\u00e4me: x\r\n\r\n')])).bodyOffset, 6);
  });

  it('has no header block when the first line is not a field', async () => {
    for (const text of ['From someone Mon Jan 1\r\nSubject: x\r\n\r\n', ' folded: x\r\nSubject: x\r\n\r\n', 'hello\r\n']) {
      const r = await run([b(text)]);
      assert.deepEqual(r.headers, [], text);
      assert.equal(r.bodyOffset, 0, text);
      assert.equal(r.separator, false, text);
      assert.equal(r.content, text);
    }
  });

  it('handles an empty header block and an empty message', async () => {
    const r = await run([b('\r\nbody\r\n')]);
    assert.deepEqual(r.headers, []);
    assert.equal(r.separator, true);
    assert.equal(r.bodyOffset, 2);
    const e = await run([]);
    assert.deepEqual(e, {
      problem: undefined,
      received: 0,
      size: 0,
      content: '',
      bodyOffset: 0,
      separator: false,
      headers: [],
    });
  });

  it('gives bodyOffset = size for a message of headers only', async () => {
    const r = await run([b('Subject: x\r\nTo: y\r\n\tz\r\n')]);
    assert.equal(r.problem, undefined);
    assert.equal(r.separator, false);
    assert.equal(r.bodyOffset, r.size);
    assert.deepEqual(
      r.headers.map((h) => [h.name, h.value]),
      [
        ['Subject', 'x'],
        ['To', 'y\r\n\tz'],
      ],
    );
  });

  it('reports header-too-large when the block does not end within maxHeaderBytes, and drains', async () => {
    const text = 'Subject: x\r\nX-Long: ' + 'y'.repeat(100) + '\r\n\r\nbody\r\n';
    const data = source([b(text)]);
    const r = await ingest(data, { ...base, maxHeaderBytes: 50 });
    assert.equal(r.problem, 'header-too-large');
    assert.equal(r.received, text.length);
    assert.equal(r.spool.size, 50, 'nothing past the byte that settled it is kept');
    assert.deepEqual(
      r.headers.map((h) => h.name),
      ['Subject'],
    );
    assert.equal(r.bodyOffset, r.spool.size);
    assert.equal(r.separator, false);
    assert.equal(data.readableEnded, true);
    await r.spool.dispose();
  });

  it('counts the empty line in maxHeaderBytes, to the byte', async () => {
    const text = 'Subject: x\r\n\r\nbody\r\n';
    assert.equal((await run([b(text)], { maxHeaderBytes: 14 })).problem, undefined);
    const over = await run([b(text)], { maxHeaderBytes: 13 });
    assert.equal(over.problem, 'header-too-large');
    assert.equal(over.content, 'Subject: x\r\n');

    assert.equal((await run([b('Subject: x\r\n')], { maxHeaderBytes: 12 })).problem, undefined);
    assert.equal((await run([b('Subject: x\r\n')], { maxHeaderBytes: 11 })).problem, 'header-too-large');

    // A non-field line starting at the limit ends the block within it.
    const ok = await run([b('Subject: x\r\nno header here\r\n')], { maxHeaderBytes: 12 });
    assert.equal(ok.problem, undefined);
    assert.equal(ok.bodyOffset, 12);
  });

  it('classifies a long name-like line before judging the header size', async () => {
    const prefix = 'Subject: x\r\n' + 'N'.repeat(100);
    const body = await run([b(prefix + ' and then text\r\n')], { maxHeaderBytes: 20 });
    assert.equal(body.problem, undefined);
    assert.equal(body.bodyOffset, 12);
    const field = await run([b(prefix + ': v\r\n\r\n')], { maxHeaderBytes: 20 });
    assert.equal(field.problem, 'header-too-large');
    assert.equal(field.size, prefix.length, 'cut at the colon that made the line a field');
  });
});

describe('ingest: bare line endings', () => {
  it('refuses a bare LF, keeps what came before it, and drains', async () => {
    const text = 'Subject: x\r\n\r\nline one\nline two\r\n';
    const data = source([b(text)]);
    const r = await ingest(data, base);
    assert.equal(r.problem, 'bare-line-ending');
    assert.equal(r.received, text.length);
    assert.equal((await r.spool.read(0, r.spool.size)).toString(), 'Subject: x\r\n\r\nline one');
    assert.equal(data.readableEnded, true);
    await r.spool.dispose();
  });

  it('refuses a bare LF in the header block and at the start of a chunk', async () => {
    assert.equal((await run([b('Subject: x\n\r\n')])).problem, 'bare-line-ending');
    assert.equal((await run([b('Subject: x\r\n\r\nab'), b('\ncd\r\n')])).problem, 'bare-line-ending');
    assert.equal((await run([b('\n')])).problem, 'bare-line-ending');
  });

  it('refuses a bare CR, also at the end of a chunk followed by a non-LF', async () => {
    const mid = await run([b('Subject: x\r\n\r\na\rb\r\n')]);
    assert.equal(mid.problem, 'bare-line-ending');
    assert.equal(mid.content, 'Subject: x\r\n\r\na');

    const split = await run([b('Subject: x\r\n\r\nab\r'), b('cd\r\n')]);
    assert.equal(split.problem, 'bare-line-ending');
    assert.equal(split.content, 'Subject: x\r\n\r\nab');

    assert.equal((await run([b('Subject: x\r\n\r\nab\r'), b('\r\n')])).problem, 'bare-line-ending');
    assert.equal((await run([b('Subject: x\r\n\r\nab\r\r\n')])).problem, 'bare-line-ending');
    const last = await run([b('Subject: x\r\n\r\nab\r')]);
    assert.equal(last.problem, 'bare-line-ending', 'a CR as the very last byte is bare');
    assert.equal(last.content, 'Subject: x\r\n\r\nab');
  });

  it('accepts a CRLF split across chunks', async () => {
    const r = await run([b('Subject: x\r'), b('\n\r'), b('\nab\r'), b('\ncd\r\n')]);
    assert.equal(r.problem, undefined);
    assert.equal(r.content, 'Subject: x\r\n\r\nab\r\ncd\r\n');
    assert.equal(r.separator, true);
    assert.equal(r.bodyOffset, 14);
  });

  it('rewrites bare CR and LF to CRLF in normalize mode', async () => {
    const text = 'Subject: x\nTo: y\r\n\tz\n\nbody\rmore\r\r\nend\n\r';
    const r = await run([b(text)], { bareLineEndings: 'normalize' });
    assert.equal(r.problem, undefined);
    assert.equal(r.content, 'Subject: x\r\nTo: y\r\n\tz\r\n\r\nbody\r\nmore\r\n\r\nend\r\n\r\n');
    assert.equal(r.received, text.length);
    assert.equal(r.separator, true);
    assert.equal(r.bodyOffset, 'Subject: x\r\nTo: y\r\n\tz\r\n\r\n'.length);
    assert.deepEqual(
      r.headers.map((h) => [h.name, h.value, h.raw]),
      [
        ['Subject', 'x', 'Subject: x\r\n'],
        ['To', 'y\r\n\tz', 'To: y\r\n\tz\r\n'],
      ],
    );
    const split = await run([b('A: 1\r'), b('B: 2\r'), b('\n\n')], { bareLineEndings: 'normalize' });
    assert.equal(split.content, 'A: 1\r\nB: 2\r\n\r\n');
    assert.equal(split.headers.length, 2);
  });

  it('keeps scanning a chunk of many bare LF in linear time', async () => {
    const text = Buffer.alloc(2 * 1024 * 1024, '\n');
    const started = process.hrtime.bigint();
    const r = await run([b('A: 1\r\n\r\n'), text], { bareLineEndings: 'normalize', maxBytes: Infinity });
    const ms = Number(process.hrtime.bigint() - started) / 1e6;
    assert.equal(r.size, 8 + 2 * text.length);
    assert.ok(ms < 5000, `took ${ms} ms`);
  });
});

describe('ingest: size limit', () => {
  const text = 'Subject: big\r\n\r\n' + '0123456789abcdef\r\n'.repeat(100);

  it('keeps at most maxBytes, counts everything, and drains', async () => {
    const chunks = [];
    for (let i = 0; i < text.length; i += 7) chunks.push(b(text.slice(i, i + 7)));
    const data = source(chunks);
    const r = await ingest(data, { ...base, maxBytes: 100 });
    assert.equal(r.problem, 'too-large');
    assert.equal(r.received, text.length);
    assert.equal(r.spool.size, 100);
    assert.equal((await r.spool.read(0, 100)).toString(), text.slice(0, 100));
    assert.equal(data.readableEnded, true);
    assert.deepEqual(
      r.headers.map((h) => [h.name, h.value]),
      [['Subject', 'big']],
    );
    assert.equal(r.bodyOffset, 16);
    await r.spool.dispose();
  });

  it('accepts exactly maxBytes and refuses one byte more', async () => {
    assert.equal((await run([b(text)], { maxBytes: text.length })).problem, undefined);
    const over = await run([b(text)], { maxBytes: text.length - 1 });
    assert.equal(over.problem, 'too-large');
    assert.equal(over.size, text.length - 1);
  });

  it('reports the problem that comes first in the data', async () => {
    const late = 'Subject: x\r\n\r\n' + 'a'.repeat(100) + '\n';
    assert.equal((await run([b(late)], { maxBytes: 50 })).problem, 'too-large');
    const early = 'Subject: x\r\n\r\na\n' + 'a'.repeat(100);
    assert.equal((await run([b(early)], { maxBytes: 50 })).problem, 'bare-line-ending');
  });

  it('cuts inside the header block', async () => {
    const r = await run([b(text)], { maxBytes: 5 });
    assert.equal(r.problem, 'too-large');
    assert.deepEqual(r.headers, []);
    assert.equal(r.bodyOffset, 5);
    assert.equal(r.size, 5);
  });

  it('moves a large message to disk byte for byte', async () => {
    const dir = join(root, 'large');
    await mkdir(dir);
    const body = randomBytes(600_000).toString('base64').replace(/.{76}/g, '$&\r\n');
    const message = b('Subject: large\r\n\r\n' + body + '\r\n');
    const chunks = [];
    for (let i = 0; i < message.length; i += 65_536) chunks.push(message.subarray(i, i + 65_536));
    const r = await ingest(source(chunks), { ...base, spool: { dir, memoryThreshold: 64 * 1024 } });
    assert.equal(r.problem, undefined);
    assert.equal(r.spool.onDisk, true);
    assert.ok((await r.spool.read(0, r.spool.size)).equals(message));
    await r.spool.dispose();
    assert.deepEqual(await readdir(dir), []);
  });
});

describe('ingest: failures', () => {
  it('rejects with SPOOL_FAILED when the spool cannot be written, after draining the data', async () => {
    const data = source([b('Subject: x\r\n\r\n'), Buffer.alloc(1000, 'a'), b('\r\n')]);
    await assert.rejects(
      ingest(data, { ...base, spool: { dir: join(root, 'missing'), memoryThreshold: 10 } }),
      (err) => isDovetailError(err, ErrorCodes.SPOOL_FAILED),
    );
    assert.equal(data.readableEnded, true);
  });

  it('rejects with the error of the data stream', async () => {
    const boom = new Error('connection reset');
    const data = new Readable({
      read() {
        this.push(b('Subject: x\r\n'));
        this.destroy(boom);
      },
    });
    await assert.rejects(ingest(data, base), (err) => err === boom);
  });

  it('rejects invalid options', async () => {
    await assert.rejects(ingest(source([]), { ...base, maxBytes: -1 }), (e) =>
      isDovetailError(e, ErrorCodes.INVALID_OPTIONS),
    );
    await assert.rejects(
      ingest(source([]), { ...base, bareLineEndings: 'lenient' as unknown as 'reject' }),
      (e) => isDovetailError(e, ErrorCodes.INVALID_OPTIONS),
    );
  });
});

describe('ingest: chunking does not change the result', () => {
  const fixtures: Array<[string, string, Partial<IngestOptions>]> = [
    ['folded 8-bit headers', 'Subject: Grüße\r\nTo: a,\r\n\tb\r\nX:\r\n\r\nbody\r\n', {}],
    ['no separator', 'Subject: x\r\nnot a field\r\n', {}],
    ['headers only', 'Subject: x\r\nTo: y\r\n', {}],
    ['name-only last line', 'Subject: x\r\nabc', {}],
    ['bare LF', 'Subject: x\r\nBad\nline\r\n', {}],
    ['bare CR', 'A: 1\r\n\r\nx\ry\r\n', {}],
    ['trailing CR', 'A: 1\r\n\r\nxy\r', {}],
    ['normalize', 'A: 1\nB: two\r\n\tfold\r\r\n\nbody\rline\n\r', { bareLineEndings: 'normalize' }],
    ['too large', 'Subject: Grüße\r\nTo: a,\r\n\tb\r\n\r\nbody body body\r\n', { maxBytes: 30 }],
    ['too large, normalize', 'A: 1\nB: 2\n\nbody\n', { maxBytes: 9, bareLineEndings: 'normalize' }],
    ['header too large', 'Subject: Grüße\r\nTo: a,\r\n\tb\r\n\r\nbody\r\n', { maxHeaderBytes: 20 }],
    ['header too large at a name', 'A: 1\r\nLongName: v\r\n\r\n', { maxHeaderBytes: 8 }],
  ];

  for (const [name, text, options] of fixtures) {
    it(`${name}: split at every byte offset`, async () => {
      const whole = b(text);
      const expected = await run([whole], options);
      for (let k = 1; k < whole.length; k++) {
        const got = await run([whole.subarray(0, k), whole.subarray(k)], options);
        assert.deepEqual(got, expected, `split at ${k}`);
      }
      const bytes = [...whole].map((x) => Buffer.from([x]));
      assert.deepEqual(await run(bytes, options), expected, 'one byte per chunk');
    });
  }

  it('the fixtures give the results they are meant to', async () => {
    const results = await Promise.all(fixtures.map(([, text, options]) => run([b(text)], options)));
    assert.deepEqual(
      results.map((r) => r.problem),
      [
        undefined,
        undefined,
        undefined,
        undefined,
        'bare-line-ending',
        'bare-line-ending',
        'bare-line-ending',
        undefined,
        'too-large',
        'too-large',
        'header-too-large',
        'header-too-large',
      ],
    );
    assert.equal(results[0]!.headers[0]!.value, 'Grüße');
    assert.equal(results[3]!.bodyOffset, 12);
    assert.equal(results[7]!.content, 'A: 1\r\nB: two\r\n\tfold\r\n\r\n\r\nbody\r\nline\r\n\r\n');
    assert.equal(results[9]!.content, 'A: 1\r\nB: ');
    assert.equal(results[11]!.size, 14, 'cut at the colon of the field that crossed the limit');
    assert.equal(results[0]!.headers[0]!.raw, latin1('Subject: Grüße\r\n'));
  });
});

describe('ingest: line length', () => {
  it('a line of maxLineBytes passes and one byte more is line-too-long, at every split offset', async () => {
    const max = 20;
    const fits = Buffer.from(`Subject: x\r\n\r\n${'a'.repeat(max)}\r\nshort\r\n${'b'.repeat(max)}`, 'latin1');
    const over = Buffer.from(`Subject: x\r\n\r\nok\r\n${'c'.repeat(max + 1)}\r\nafter\r\n`, 'latin1');
    for (let cut = 0; cut <= over.length; cut++) {
      const a = await run([fits.subarray(0, Math.min(cut, fits.length)), fits.subarray(Math.min(cut, fits.length))], { maxLineBytes: max });
      assert.equal(a.problem, undefined, `fits, cut at ${cut}`);
      assert.equal(a.content, fits.toString('latin1'));
      const b = await run([over.subarray(0, cut), over.subarray(cut)], { maxLineBytes: max });
      assert.equal(b.problem, 'line-too-long', `over, cut at ${cut}`);
    }
  });
});
