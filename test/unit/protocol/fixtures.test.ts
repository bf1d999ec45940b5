/**
 * Byte-for-byte tests of the milter codec against the independent fixtures in
 * test/helpers/milter-frames.ts: the encoder produces exactly the fixture bytes, the
 * decoder turns each fixture into the expected value, and FrameDecoder gives the same
 * frames whether a fixture arrives whole, split at any byte offset, or byte by byte.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import {
  decodeCommand,
  decodeReply,
  encodeCommand,
  encodeFrame,
  encodeReply,
  FrameDecoder,
  SMFIF,
  SMFIP,
  SMFIM,
  SMFIF_ALL,
  SMFIP_CURR_PROT,
  type Frame,
  type MilterCommand,
  type MilterReply,
} from '../../../lib/milter/protocol/index.js';
import { commandFixtures, frame, literal, replyFixtures, u16, u32, z } from '../../helpers/milter-frames.js';

const b = (s: string): Buffer => Buffer.from(s, 'utf8');

const expectedCommands: Record<keyof typeof commandFixtures, MilterCommand> = {
  optnegV6: { type: 'optneg', version: 6, actions: 0x1ff, protocol: 0x1fffff, macros: [] },
  optnegV2: { type: 'optneg', version: 2, actions: 0x0f, protocol: 0x7f, macros: [] },
  optnegWithMacros: {
    type: 'optneg',
    version: 6,
    actions: 0,
    protocol: 0,
    macros: [
      { stage: SMFIM.CONNECT, names: ['j', '{client_addr}'] },
      { stage: SMFIM.ENVFROM, names: ['i'] },
    ],
  },
  macroConnect: {
    type: 'macro',
    stage: 'C',
    macros: [
      { name: 'j', value: 'mx.example' },
      { name: '{client_addr}', value: '192.0.2.1' },
      { name: '{daemon_name}', value: 'smtpd' },
    ],
  },
  macroEmpty: { type: 'macro', stage: 'C', macros: [] },
  macroHeader: { type: 'macro', stage: 'L', macros: [{ name: 'i', value: '4AbCdE' }] },
  macroBody: { type: 'macro', stage: 'B', macros: [{ name: '{msg_size}', value: '1234' }] },
  macroUnknown: { type: 'macro', stage: 'U', macros: [{ name: '{cmd}', value: '' }] },
  macroEom: { type: 'macro', stage: 'E', macros: [{ name: 'i', value: '4AbCdE' }] },
  connect4: { type: 'connect', hostname: 'mx.example', family: 'ipv4', port: 25, address: '192.0.2.1' },
  connect6: { type: 'connect', hostname: '[2001:db8::1]', family: 'ipv6', port: 50123, address: '2001:db8::1' },
  connectUnix: { type: 'connect', hostname: 'localhost', family: 'unix', port: 0, address: '/var/run/smtp.sock' },
  connectUnknown: { type: 'connect', hostname: 'unknown', family: 'unknown' },
  helo: { type: 'helo', hostname: 'client.example' },
  mail: { type: 'mail', address: '<sender@example.org>', args: ['SIZE=1024', 'BODY=8BITMIME'] },
  mailNullSender: { type: 'mail', address: '<>', args: [] },
  rcpt: { type: 'rcpt', address: '<rcpt@example.net>', args: [] },
  rcptArgs: { type: 'rcpt', address: '<rcpt@example.net>', args: ['NOTIFY=NEVER'] },
  header: { type: 'header', name: 'Subject', value: 'Hello, wörld' },
  headerFolded: { type: 'header', name: 'Received', value: 'from a\r\n\tby b' },
  headerEmptyValue: { type: 'header', name: 'X-Empty', value: '' },
  eoh: { type: 'eoh' },
  body: { type: 'body', chunk: b('Line one\r\nLine two\r\n') },
  bodyEmpty: { type: 'body', chunk: Buffer.alloc(0) },
  bodyBinary: { type: 'body', chunk: Buffer.from([0, 1, 2, 0xff, 0xfe, 0]) },
  bodyEob: { type: 'bodyEob', chunk: Buffer.alloc(0) },
  bodyEobWithChunk: { type: 'bodyEob', chunk: b('tail\r\n') },
  abort: { type: 'abort' },
  quit: { type: 'quit' },
  quitNc: { type: 'quitNc' },
  unknown: { type: 'unknown', command: 'XFOO bar' },
  data: { type: 'data' },
};

const expectedReplies: Record<keyof typeof replyFixtures, MilterReply> = {
  optneg: { type: 'optneg', version: 6, actions: SMFIF_ALL, protocol: SMFIP_CURR_PROT & ~SMFIP.NOCONNECT, macros: [] },
  optnegMacros: {
    type: 'optneg',
    version: 6,
    actions: SMFIF.ADDHDRS,
    protocol: SMFIP.NR_HDR,
    macros: [
      { stage: SMFIM.CONNECT, names: ['j', '{client_addr}'] },
      { stage: SMFIM.EOM, names: ['i', '{auth_authen}'] },
    ],
  },
  optnegEmptyList: { type: 'optneg', version: 2, actions: 0, protocol: 0, macros: [{ stage: SMFIM.ENVRCPT, names: [] }] },
  accept: { type: 'accept' },
  continue: { type: 'continue' },
  discard: { type: 'discard' },
  reject: { type: 'reject' },
  tempfail: { type: 'tempfail' },
  skip: { type: 'skip' },
  progress: { type: 'progress' },
  connFail: { type: 'connFail' },
  shutdown: { type: 'shutdown' },
  replyCode: { type: 'replyCode', reply: '550 5.7.1 No thanks' },
  replyCodeMultiline: { type: 'replyCode', reply: '451-4.7.1 Greylisted\r\n451 4.7.1 Try again later' },
  quarantine: { type: 'quarantine', reason: 'suspicious attachment' },
  addHeader: { type: 'addHeader', name: 'X-Spam-Score', value: '3.5' },
  insertHeader: { type: 'insertHeader', index: 0, name: 'X-First', value: 'yes' },
  changeHeader: { type: 'changeHeader', index: 2, name: 'Subject', value: '[SPAM] Hello' },
  deleteHeader: { type: 'changeHeader', index: 1, name: 'X-Drop', value: '' },
  changeFrom: { type: 'changeFrom', address: '<new@example.org>' },
  changeFromArgs: { type: 'changeFrom', address: '<new@example.org>', args: 'SIZE=100' },
  addRcpt: { type: 'addRcpt', address: '<added@example.net>' },
  addRcptPar: { type: 'addRcptPar', address: '<added@example.net>', args: 'NOTIFY=NEVER' },
  addRcptParNoArgs: { type: 'addRcptPar', address: '<added@example.net>' },
  deleteRcpt: { type: 'deleteRcpt', address: '<gone@example.net>' },
  replaceBody: { type: 'replaceBody', chunk: b('New body\r\n') },
  replaceBodyEmpty: { type: 'replaceBody', chunk: Buffer.alloc(0) },
  setSymList: { type: 'setSymList', data: Buffer.from([...u32(1), ...z('{tls_version}')]) },
};

/** Plain copies, so deepEqual does not depend on Buffer views or prototypes. */
const plain = (frames: Frame[]): { command: string; data: string }[] =>
  frames.map((f) => ({ command: f.command, data: f.data.toString('hex') }));

function one(buf: Buffer): Frame {
  const frames = new FrameDecoder().push(buf);
  assert.equal(frames.length, 1);
  const [f] = frames;
  assert.ok(f);
  return f;
}

test('the fixture builder agrees with the hand-written hex', () => {
  assert.deepEqual(commandFixtures.optnegV6, literal.optnegV6);
  assert.deepEqual(commandFixtures.connect4, literal.connect4);
  assert.deepEqual(frame('D', 'C', z('j'), z('mx')), literal.macroJ);
  assert.deepEqual(replyFixtures.continue, literal.continue);
  assert.deepEqual(frame('i', u32(0), z('X-A'), z('b')), literal.insHeader);
  assert.deepEqual(frame('C', z('h'), 'L', u16(0), z('/p')), Buffer.from('00000009 43 6800 4c 0000 2f7000'.replace(/ /g, ''), 'hex'));
});

test('every command: the encoder gives the fixture bytes, the decoder the expected value', () => {
  for (const [name, bytes] of Object.entries(commandFixtures)) {
    const expected = expectedCommands[name as keyof typeof commandFixtures];
    assert.deepEqual(encodeCommand(expected), bytes, `encode ${name}`);
    assert.deepEqual(decodeCommand(one(bytes)), expected, `decode ${name}`);
  }
});

test('every reply: the encoder gives the fixture bytes, the decoder the expected value', () => {
  for (const [name, bytes] of Object.entries(replyFixtures)) {
    const expected = expectedReplies[name as keyof typeof replyFixtures];
    assert.deepEqual(encodeReply(expected), bytes, `encode ${name}`);
    assert.deepEqual(decodeReply(one(bytes)), expected, `decode ${name}`);
  }
});

test('every command and reply letter of libmilter is covered by a fixture', () => {
  const commands = new Set(Object.values(commandFixtures).map((f) => String.fromCharCode(f[4] ?? 0)));
  const replies = new Set(Object.values(replyFixtures).map((f) => String.fromCharCode(f[4] ?? 0)));
  assert.deepEqual([...commands].sort(), [...'ABCDEHKLMNOQRTU'].sort());
  assert.deepEqual([...replies].sort(), [...'+-24Oabcdefhilmpqrsty'].sort());
});

const all = [...Object.entries(commandFixtures), ...Object.entries(replyFixtures)];

test('each fixture split at every byte offset decodes to the same frame', () => {
  for (const [name, bytes] of all) {
    const whole = plain(new FrameDecoder().push(bytes));
    for (let i = 0; i <= bytes.length; i++) {
      const d = new FrameDecoder();
      const got = [...d.push(bytes.subarray(0, i)), ...d.push(bytes.subarray(i))];
      assert.deepEqual(plain(got), whole, `${name} split at ${i}`);
      assert.equal(d.buffered, 0);
      d.end();
    }
  }
});

test('each fixture fed one byte at a time decodes to the same frame', () => {
  for (const [name, bytes] of all) {
    const d = new FrameDecoder();
    const got: Frame[] = [];
    for (let i = 0; i < bytes.length; i++) {
      got.push(...d.push(bytes.subarray(i, i + 1)));
      assert.ok(d.buffered <= i + 1);
    }
    assert.deepEqual(plain(got), plain([one(bytes)]), name);
  }
});

test('all fixtures back to back, split at every offset, give the same sequence of frames', () => {
  const stream = Buffer.concat(all.map(([, bytes]) => bytes));
  const expected = all.map(([, bytes]) => ({ command: String.fromCharCode(bytes[4] ?? 0), data: bytes.subarray(5).toString('hex') }));
  for (let i = 0; i <= stream.length; i++) {
    const d = new FrameDecoder();
    const got = [...d.push(stream.subarray(0, i)), ...d.push(stream.subarray(i))];
    assert.deepEqual(plain(got), expected, `split at ${i}`);
  }
});

test('encodeFrame: length counts the command byte', () => {
  assert.deepEqual(encodeFrame('c'), Buffer.from('0000000163', 'hex'));
  assert.deepEqual(encodeFrame('B', Buffer.from('ab')), Buffer.from('000000034261 62'.replace(/ /g, ''), 'hex'));
});
