/**
 * Hardening of the milter codec: every malformed frame is the protocol error
 * (DOVETAIL_ERR_MILTER_PROTOCOL), never another exception — length 0, length over the
 * maximum (checked before anything is buffered), truncated frames at end of stream,
 * missing NULs, short fields and left-over bytes for every command and reply — and the
 * encoders refuse values that cannot be framed.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import {
  decodeCommand,
  decodeReply,
  encodeCommand,
  encodeReply,
  encodeFrame,
  FrameDecoder,
  MilterProtocolError,
  MILTER_PROTOCOL_ERROR,
  MILTER_MAX_DATA_SIZE,
  MILTER_MDS_256K,
  type Frame,
} from '../../../lib/milter/protocol/index.js';
import { DovetailError, ErrorCodes } from '../../../lib/errors.js';
import { badCommandFrames, badReplyFrames, commandFixtures, frame, u32 } from '../../helpers/milter-frames.js';

function protocolError(fn: () => unknown, what: string): void {
  assert.throws(
    fn,
    (err: unknown) => err instanceof MilterProtocolError && err instanceof DovetailError && (err.code as string) === MILTER_PROTOCOL_ERROR,
    what,
  );
}

function toFrame(bytes: Buffer): Frame {
  const frames = new FrameDecoder().push(bytes);
  const [f] = frames;
  assert.ok(f && frames.length === 1);
  return f;
}

test('the error carries the stable code and is a DovetailError', () => {
  const err = new MilterProtocolError('x');
  assert.equal(err.code, 'DOVETAIL_ERR_MILTER_PROTOCOL');
  assert.equal(err.name, 'MilterProtocolError');
  assert.ok(err instanceof DovetailError);
});

test('length 0 is a protocol error, and the decoder stays failed', () => {
  const d = new FrameDecoder();
  protocolError(() => d.push(Buffer.from([0, 0, 0, 0])), 'length 0');
  assert.equal(d.failed, true);
  assert.equal(d.buffered, 0);
  protocolError(() => d.push(commandFixtures.quit), 'after failure');
  protocolError(() => d.end(), 'end after failure');
});

test('length 0 is caught from its 4 length bytes alone, split anywhere', () => {
  for (let i = 1; i <= 4; i++) {
    const d = new FrameDecoder();
    const bytes = Buffer.from([0, 0, 0, 0, 0x41]);
    protocolError(() => {
      d.push(bytes.subarray(0, i));
      d.push(bytes.subarray(i, 4));
    }, `split at ${i}`);
  }
});

test('the default maximum is 65535 data bytes (length field 65536)', () => {
  assert.equal(new FrameDecoder().maxDataSize, MILTER_MAX_DATA_SIZE);
  const ok = encodeFrame('B', Buffer.alloc(65535, 0x61));
  const frames = new FrameDecoder().push(ok);
  assert.equal(frames[0]?.data.length, 65535);
  protocolError(() => new FrameDecoder().push(encodeFrame('B', Buffer.alloc(65536))), '65536 data bytes');
});

test('a length over the maximum is refused from the 4 length bytes, before anything is buffered', () => {
  for (const len of [65537, 0x7fffffff, 0xffffffff]) {
    const d = new FrameDecoder();
    protocolError(() => d.push(Buffer.from(u32(len))), `length ${len}`);
    assert.equal(d.buffered, 0);
  }
});

test('the maximum is an option and can be raised after MDS negotiation', () => {
  const d = new FrameDecoder({ maxDataSize: 10 });
  assert.equal(d.push(encodeFrame('B', Buffer.alloc(10))).length, 1);
  protocolError(() => d.push(encodeFrame('B', Buffer.alloc(11))), 'over 10');
  const e = new FrameDecoder();
  e.maxDataSize = MILTER_MDS_256K;
  assert.equal(e.push(encodeFrame('b', Buffer.alloc(200_000))).length, 1);
  for (const bad of [-1, 1.5, Number.NaN, 2 ** 32]) {
    assert.throws(() => new FrameDecoder({ maxDataSize: bad }), (err: unknown) => err instanceof DovetailError && err.code === ErrorCodes.INVALID_OPTIONS);
  }
});

test('a frame cut short at end of stream is a protocol error; a clean end is not', () => {
  const bytes = commandFixtures.helo;
  for (let i = 1; i < bytes.length; i++) {
    const d = new FrameDecoder();
    assert.deepEqual(d.push(bytes.subarray(0, i)), []);
    assert.equal(d.buffered, i);
    protocolError(() => d.end(), `cut at ${i}`);
  }
  const d = new FrameDecoder();
  d.push(bytes);
  d.end();
});

test('buffered never exceeds the frame being assembled', () => {
  const d = new FrameDecoder({ maxDataSize: 100 });
  const f = encodeFrame('B', Buffer.alloc(100, 1));
  const two = Buffer.concat([f, f]);
  for (let i = 0; i < two.length; i += 7) {
    d.push(two.subarray(i, i + 7));
    assert.ok(d.buffered < f.length, `buffered ${d.buffered}`);
  }
  assert.equal(d.buffered, 0);
});

test('every malformed command is the protocol error', () => {
  for (const [name, bytes] of Object.entries(badCommandFrames)) {
    protocolError(() => decodeCommand(toFrame(bytes)), name);
  }
});

test('every malformed reply is the protocol error', () => {
  for (const [name, bytes] of Object.entries(badReplyFrames)) {
    protocolError(() => decodeReply(toFrame(bytes)), name);
  }
});

test('every command fixture with its last byte cut is refused or decodes to something else', () => {
  // Truncating a payload must never silently give the same value; for fixed layouts it is an error.
  for (const [name, bytes] of Object.entries(commandFixtures)) {
    if (bytes.length <= 5) continue;
    const cut = frame(String.fromCharCode(bytes[4] ?? 0), [...bytes.subarray(5, bytes.length - 1)]);
    const full = decodeCommand(toFrame(bytes));
    try {
      assert.notDeepEqual(decodeCommand(toFrame(cut)), full, name);
    } catch (err) {
      if (!(err instanceof MilterProtocolError)) throw err;
    }
  }
});

test('the encoders refuse values that cannot be framed', () => {
  protocolError(() => encodeCommand({ type: 'helo', hostname: 'a\0b' }), 'NUL in a string');
  protocolError(() => encodeCommand({ type: 'connect', hostname: 'h', family: 'ipv4', port: 70000, address: '1.2.3.4' }), 'port');
  protocolError(() => encodeCommand({ type: 'optneg', version: -1, actions: 0, protocol: 0, macros: [] }), 'version');
  protocolError(
    () => encodeCommand({ type: 'optneg', version: 6, actions: 0, protocol: 0, macros: [{ stage: 0, names: ['a b'] }] }),
    'macro name with a space',
  );
  protocolError(() => encodeReply({ type: 'insertHeader', index: 2 ** 32, name: 'X', value: 'v' }), 'index');
  protocolError(() => encodeReply({ type: 'quarantine', reason: '\0' }), 'NUL reason');
  protocolError(() => encodeReply({ type: 'nope' } as never), 'unknown reply type');
  protocolError(() => encodeCommand({ type: 'nope' } as never), 'unknown command type');
  protocolError(() => encodeFrame('ab'), 'two-character command');
  protocolError(() => encodeFrame('\u0100'), 'non-byte command');
});
