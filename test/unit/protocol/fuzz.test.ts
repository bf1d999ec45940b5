/**
 * Property-based tests of the milter codec (fast-check):
 * - random bytes, and random sequences of valid frames with mutations (flipped, deleted,
 *   inserted bytes, truncation), fed in random chunks: FrameDecoder and the payload
 *   decoders never throw anything but the protocol error, never return more bytes than they
 *   were given, never hold more than the frame being assembled (`buffered`), and never
 *   return a frame over the maximum;
 * - decode(encode(x)) is x for arbitrary valid commands and replies, also through
 *   FrameDecoder with the stream split at random offsets.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import {
  decodeCommand,
  decodeReply,
  encodeCommand,
  encodeFrame,
  encodeReply,
  FrameDecoder,
  MilterProtocolError,
  SMFIC,
  type Frame,
  type MilterCommand,
  type MilterReply,
} from '../../../lib/milter/protocol/index.js';
import { commandFixtures, replyFixtures } from '../../helpers/milter-frames.js';

/** Splits `bytes` at the given (sorted, deduplicated) cut points. */
function split(bytes: Uint8Array, cuts: number[]): Uint8Array[] {
  const points = [...new Set(cuts.map((c) => c % (bytes.length + 1)))].sort((a, b) => a - b);
  const out: Uint8Array[] = [];
  let last = 0;
  for (const p of points) {
    out.push(bytes.subarray(last, p));
    last = p;
  }
  out.push(bytes.subarray(last));
  return out;
}

/** Feeds chunks, checking the decoder's invariants; returns the frames and whether it failed. */
function feed(chunks: Uint8Array[], maxDataSize: number): { frames: Frame[]; failed: boolean } {
  const d = new FrameDecoder({ maxDataSize });
  const frames: Frame[] = [];
  let given = 0;
  for (const c of chunks) {
    given += c.length;
    try {
      frames.push(...d.push(c));
    } catch (err) {
      assert.ok(err instanceof MilterProtocolError, `unexpected ${String(err)}`);
      assert.equal(d.buffered, 0);
      return { frames, failed: true };
    }
    assert.ok(d.buffered < 5 + maxDataSize, `buffered ${d.buffered} with max ${maxDataSize}`);
    const returned = frames.reduce((n, f) => n + 5 + f.data.length, 0);
    assert.ok(returned + d.buffered === given, `returned ${returned} + buffered ${d.buffered} != given ${given}`);
  }
  for (const f of frames) {
    assert.ok(f.data.length <= maxDataSize);
    assert.equal(f.command.length, 1);
  }
  try {
    d.end();
  } catch (err) {
    assert.ok(err instanceof MilterProtocolError);
  }
  return { frames, failed: false };
}

/** Runs both payload decoders on a frame: either a value or the protocol error. */
function decodeBoth(f: Frame): void {
  for (const decode of [decodeCommand, decodeReply] as ((f: Frame) => unknown)[]) {
    try {
      decode(f);
    } catch (err) {
      assert.ok(err instanceof MilterProtocolError, `unexpected ${String(err)}`);
    }
  }
}

/** Random bytes; half the time behind a small plausible length field so frames get through. */
const anyChunks = fc.oneof(
  fc.array(fc.uint8Array({ maxLength: 300 }), { maxLength: 12 }),
  fc
    .tuple(fc.integer({ min: 0, max: 400 }), fc.uint8Array({ maxLength: 600 }), fc.array(fc.nat(), { maxLength: 8 }))
    .map(([len, rest, cuts]) => {
      const head = Buffer.alloc(4);
      head.writeUInt32BE(len, 0);
      return split(Buffer.concat([head, rest]), cuts);
    }),
);

test('random bytes: only the protocol error, no over-buffering, nothing invented', () => {
  fc.assert(
    fc.property(anyChunks, fc.integer({ min: 0, max: 70_000 }), (chunks, max) => {
      const { frames } = feed(chunks, max);
      frames.forEach(decodeBoth);
    }),
    { numRuns: 500 },
  );
});

const fixtureFrames = [...Object.values(commandFixtures), ...Object.values(replyFixtures)];
const commandLetters = [...Object.values(SMFIC), ...'acdrtsypq4+-2ehimbfl'];

/** A valid frame: a fixture, or a random command/reply letter (or any byte) with random data. */
const validFrame = fc.oneof(
  fc.constantFrom(...fixtureFrames),
  fc
    .tuple(fc.oneof(fc.constantFrom(...commandLetters), fc.integer({ min: 0, max: 255 }).map((c) => String.fromCharCode(c))), fc.uint8Array({ maxLength: 120 }))
    .map(([c, data]) => encodeFrame(c, data)),
);

type Mutation =
  | { kind: 'flip'; at: number; xor: number }
  | { kind: 'delete'; at: number; count: number }
  | { kind: 'insert'; at: number; bytes: Uint8Array }
  | { kind: 'truncate'; at: number };

const mutation: fc.Arbitrary<Mutation> = fc.oneof(
  fc.record({ kind: fc.constant('flip' as const), at: fc.nat(), xor: fc.integer({ min: 1, max: 255 }) }),
  fc.record({ kind: fc.constant('delete' as const), at: fc.nat(), count: fc.integer({ min: 1, max: 8 }) }),
  fc.record({ kind: fc.constant('insert' as const), at: fc.nat(), bytes: fc.uint8Array({ minLength: 1, maxLength: 8 }) }),
  fc.record({ kind: fc.constant('truncate' as const), at: fc.nat() }),
);

function mutate(bytes: Buffer, m: Mutation): Buffer {
  if (bytes.length === 0) return bytes;
  const at = m.at % bytes.length;
  switch (m.kind) {
    case 'flip': {
      const out = Buffer.from(bytes);
      out[at] = (out[at] ?? 0) ^ m.xor;
      return out;
    }
    case 'delete':
      return Buffer.concat([bytes.subarray(0, at), bytes.subarray(at + m.count)]);
    case 'insert':
      return Buffer.concat([bytes.subarray(0, at), m.bytes, bytes.subarray(at)]);
    case 'truncate':
      return bytes.subarray(0, at);
  }
}

test('valid frame sequences with mutations: only the protocol error, no over-buffering', () => {
  fc.assert(
    fc.property(
      fc.array(validFrame, { minLength: 1, maxLength: 8 }),
      fc.array(mutation, { maxLength: 3 }),
      fc.array(fc.nat(), { maxLength: 10 }),
      fc.integer({ min: 0, max: 400 }),
      (frames, mutations, cuts, max) => {
        let stream: Buffer = Buffer.concat(frames);
        for (const m of mutations) stream = mutate(stream, m);
        const { frames: out } = feed(split(stream, cuts), max);
        out.forEach(decodeBoth);
      },
    ),
    { numRuns: 1000 },
  );
});

test('unmutated sequences come out frame for frame, however they are split', () => {
  fc.assert(
    fc.property(fc.array(validFrame, { maxLength: 8 }), fc.array(fc.nat(), { maxLength: 10 }), (frames, cuts) => {
      const { frames: out, failed } = feed(split(Buffer.concat(frames), cuts), 65535);
      assert.equal(failed, false);
      assert.deepEqual(
        out.map((f) => encodeFrame(f.command, f.data).toString('hex')),
        frames.map((f) => f.toString('hex')),
      );
    }),
    { numRuns: 300 },
  );
});

// ---- round trips ----

const text = fc
  .string({ unit: 'binary', maxLength: 30 })
  .filter((s) => !s.includes('\0') && Buffer.from(s, 'utf8').toString('utf8') === s);
const macroName = fc.stringMatching(/^[!-+\--~]{1,12}$/);
const u32 = fc.integer({ min: 0, max: 0xffff_ffff });
const bytes = fc.uint8Array({ maxLength: 200 }).map((u) => Buffer.from(u));

const optneg = fc.record({
  type: fc.constant('optneg' as const),
  version: u32,
  actions: u32,
  protocol: u32,
  macros: fc.array(fc.record({ stage: u32, names: fc.array(macroName, { maxLength: 5 }) }), { maxLength: 4 }),
});

const withArgs = <T extends string>(type: T) =>
  fc.tuple(text, fc.option(text, { nil: undefined })).map(([address, args]) => (args === undefined ? { type, address } : { type, address, args }));

const command: fc.Arbitrary<MilterCommand> = fc.oneof(
  optneg,
  fc.record({
    type: fc.constant('macro' as const),
    stage: fc.constantFrom(...Object.values(SMFIC)),
    macros: fc.array(fc.record({ name: text, value: text }), { maxLength: 5 }),
  }),
  fc.record({ type: fc.constant('connect' as const), hostname: text, family: fc.constant('unknown' as const) }),
  fc.record({
    type: fc.constant('connect' as const),
    hostname: text,
    family: fc.constantFrom('ipv4' as const, 'ipv6' as const, 'unix' as const),
    port: fc.integer({ min: 0, max: 0xffff }),
    address: text,
  }),
  fc.record({ type: fc.constant('helo' as const), hostname: text }),
  fc.record({ type: fc.constantFrom('mail' as const, 'rcpt' as const), address: text, args: fc.array(text, { maxLength: 4 }) }),
  fc.record({ type: fc.constant('header' as const), name: text, value: text }),
  fc.record({ type: fc.constantFrom('body' as const, 'bodyEob' as const), chunk: bytes }),
  fc.record({ type: fc.constant('unknown' as const), command: text }),
  fc.record({ type: fc.constantFrom('eoh' as const, 'abort' as const, 'quit' as const, 'quitNc' as const, 'data' as const) }),
);

const reply: fc.Arbitrary<MilterReply> = fc.oneof(
  optneg,
  fc.record({
    type: fc.constantFrom(
      'accept' as const,
      'continue' as const,
      'discard' as const,
      'reject' as const,
      'tempfail' as const,
      'skip' as const,
      'progress' as const,
      'connFail' as const,
      'shutdown' as const,
    ),
  }),
  fc.record({ type: fc.constant('replyCode' as const), reply: text }),
  fc.record({ type: fc.constant('quarantine' as const), reason: text }),
  fc.record({ type: fc.constant('addHeader' as const), name: text, value: text }),
  fc.record({ type: fc.constantFrom('insertHeader' as const, 'changeHeader' as const), index: u32, name: text, value: text }),
  withArgs('changeFrom'),
  withArgs('addRcptPar'),
  fc.record({ type: fc.constantFrom('addRcpt' as const, 'deleteRcpt' as const), address: text }),
  fc.record({ type: fc.constant('replaceBody' as const), chunk: bytes }),
  fc.record({ type: fc.constant('setSymList' as const), data: bytes }),
);

/** A comparable copy: buffers as hex, objects with a plain prototype (fast-check builds null-prototype records). */
function norm(x: unknown): unknown {
  if (x instanceof Uint8Array) return `hex:${Buffer.from(x).toString('hex')}`;
  if (Array.isArray(x)) return x.map(norm);
  if (x !== null && typeof x === 'object') {
    return Object.fromEntries(Object.entries(x).map(([k, v]) => [k, norm(v)]));
  }
  return x;
}

function only(buf: Buffer): Frame {
  const frames = new FrameDecoder({ maxDataSize: 1 << 20 }).push(buf);
  assert.equal(frames.length, 1);
  return frames[0] as Frame;
}

test('decodeCommand(encodeCommand(x)) is x', () => {
  fc.assert(
    fc.property(command, (cmd) => {
      assert.deepEqual(norm(decodeCommand(only(encodeCommand(cmd)))), norm(cmd));
    }),
    { numRuns: 1000 },
  );
});

test('decodeReply(encodeReply(x)) is x', () => {
  fc.assert(
    fc.property(reply, (r) => {
      assert.deepEqual(norm(decodeReply(only(encodeReply(r)))), norm(r));
    }),
    { numRuns: 1000 },
  );
});

test('a stream of encoded commands split anywhere decodes to the same commands', () => {
  fc.assert(
    fc.property(fc.array(command, { maxLength: 10 }), fc.array(fc.nat(), { maxLength: 10 }), (cmds, cuts) => {
      const d = new FrameDecoder();
      const out: MilterCommand[] = [];
      for (const chunk of split(Buffer.concat(cmds.map(encodeCommand)), cuts)) {
        for (const f of d.push(chunk)) out.push(decodeCommand(f));
      }
      d.end();
      assert.deepEqual(norm(out), norm(cmds));
    }),
    { numRuns: 300 },
  );
});
