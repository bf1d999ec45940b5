/**
 * Byte-for-byte milter frame fixtures, built independently of lib/milter/protocol: the
 * layouts are transcribed from libmilter (mfdef.h, engine.c, smfi.c) and Postfix milter8.c
 * by hand, with plain byte arrays (no imports from the codec, no Buffer read/write helpers).
 * A few frames are also given as literal hex, and the tests check the builder against them.
 *
 * Every fixture is a complete frame: 4-byte big-endian length (command byte + data), the
 * command byte, the data.
 */

type Piece = number[] | string;

/** Bytes of an ASCII/UTF-8 string followed by NUL. */
export function z(s: string): number[] {
  return [...new TextEncoder().encode(s), 0];
}

/** Bytes of a string, no terminator. */
export function str(s: string): number[] {
  return [...new TextEncoder().encode(s)];
}

/** A uint32 in network order. */
export function u32(n: number): number[] {
  return [(n >>> 24) & 0xff, (n >>> 16) & 0xff, (n >>> 8) & 0xff, n & 0xff];
}

/** A uint16 in network order. */
export function u16(n: number): number[] {
  return [(n >>> 8) & 0xff, n & 0xff];
}

/** One frame: `cmd` is the command character, pieces are byte arrays or raw strings (no NUL added). */
export function frame(cmd: string, ...pieces: Piece[]): Buffer {
  const data: number[] = [];
  for (const p of pieces) data.push(...(typeof p === 'string' ? str(p) : p));
  return Buffer.from([...u32(data.length + 1), cmd.charCodeAt(0), ...data]);
}

/** A buffer from a hex string with optional spaces. */
export function hex(s: string): Buffer {
  return Buffer.from(s.replace(/\s+/g, ''), 'hex');
}

/** Literal hex of a few frames, written out by hand, to check `frame()` itself. */
export const literal = {
  // SMFIC_OPTNEG, version 6, actions 0x1ff, protocol 0x1fffff
  optnegV6: hex('0000000d 4f 00000006 000001ff 001fffff'),
  // SMFIC_CONNECT "mx.example" '4' port 25 "192.0.2.1"
  connect4: hex('00000019 43 6d782e6578616d706c6500 34 0019 3139322e302e322e3100'),
  // SMFIC_MACRO for 'C' with j=mx
  macroJ: hex('00000007 44 43 6a00 6d7800'),
  // SMFIR_CONTINUE
  continue: hex('00000001 63'),
  // SMFIR_INSHEADER index 0, "X-A" "b"
  insHeader: hex('0000000b 69 00000000 582d4100 6200'),
} as const;

/** Frames the MTA sends (SMFIC_*), one or more per command. */
export const commandFixtures = {
  optnegV6: frame('O', u32(6), u32(0x1ff), u32(0x1fffff)),
  optnegV2: frame('O', u32(2), u32(0x0f), u32(0x7f)),
  optnegWithMacros: frame('O', u32(6), u32(0), u32(0), u32(0), z('j {client_addr}'), u32(2), z('i')),
  macroConnect: frame('D', 'C', z('j'), z('mx.example'), z('{client_addr}'), z('192.0.2.1'), z('{daemon_name}'), z('smtpd')),
  macroEmpty: frame('D', 'C'),
  macroHeader: frame('D', 'L', z('i'), z('4AbCdE')),
  macroBody: frame('D', 'B', z('{msg_size}'), z('1234')),
  macroUnknown: frame('D', 'U', z('{cmd}'), z('')),
  macroEom: frame('D', 'E', z('i'), z('4AbCdE')),
  connect4: frame('C', z('mx.example'), '4', u16(25), z('192.0.2.1')),
  connect6: frame('C', z('[2001:db8::1]'), '6', u16(50123), z('2001:db8::1')),
  connectUnix: frame('C', z('localhost'), 'L', u16(0), z('/var/run/smtp.sock')),
  connectUnknown: frame('C', z('unknown'), 'U'),
  helo: frame('H', z('client.example')),
  mail: frame('M', z('<sender@example.org>'), z('SIZE=1024'), z('BODY=8BITMIME')),
  mailNullSender: frame('M', z('<>')),
  rcpt: frame('R', z('<rcpt@example.net>')),
  rcptArgs: frame('R', z('<rcpt@example.net>'), z('NOTIFY=NEVER')),
  header: frame('L', z('Subject'), z('Hello, wörld')),
  headerFolded: frame('L', z('Received'), z('from a\r\n\tby b')),
  headerEmptyValue: frame('L', z('X-Empty'), z('')),
  eoh: frame('N'),
  body: frame('B', 'Line one\r\nLine two\r\n'),
  bodyEmpty: frame('B'),
  bodyBinary: frame('B', [0, 1, 2, 0xff, 0xfe, 0]),
  bodyEob: frame('E'),
  bodyEobWithChunk: frame('E', 'tail\r\n'),
  abort: frame('A'),
  quit: frame('Q'),
  quitNc: frame('K'),
  unknown: frame('U', z('XFOO bar')),
  data: frame('T'),
} as const;

/** Frames a filter sends (SMFIR_* and the OPTNEG reply). */
export const replyFixtures = {
  optneg: frame('O', u32(6), u32(0x1ff), u32(0x1fffff & ~0x1)),
  optnegMacros: frame('O', u32(6), u32(0x01), u32(0x80), u32(0), z('j {client_addr}'), u32(5), z('i {auth_authen}')),
  optnegEmptyList: frame('O', u32(2), u32(0), u32(0), u32(3), z('')),
  accept: frame('a'),
  continue: frame('c'),
  discard: frame('d'),
  reject: frame('r'),
  tempfail: frame('t'),
  skip: frame('s'),
  progress: frame('p'),
  connFail: frame('f'),
  shutdown: frame('4'),
  replyCode: frame('y', z('550 5.7.1 No thanks')),
  replyCodeMultiline: frame('y', z('451-4.7.1 Greylisted\r\n451 4.7.1 Try again later')),
  quarantine: frame('q', z('suspicious attachment')),
  addHeader: frame('h', z('X-Spam-Score'), z('3.5')),
  insertHeader: frame('i', u32(0), z('X-First'), z('yes')),
  changeHeader: frame('m', u32(2), z('Subject'), z('[SPAM] Hello')),
  deleteHeader: frame('m', u32(1), z('X-Drop'), z('')),
  changeFrom: frame('e', z('<new@example.org>')),
  changeFromArgs: frame('e', z('<new@example.org>'), z('SIZE=100')),
  addRcpt: frame('+', z('<added@example.net>')),
  addRcptPar: frame('2', z('<added@example.net>'), z('NOTIFY=NEVER')),
  addRcptParNoArgs: frame('2', z('<added@example.net>')),
  deleteRcpt: frame('-', z('<gone@example.net>')),
  replaceBody: frame('b', 'New body\r\n'),
  replaceBodyEmpty: frame('b'),
  setSymList: frame('l', u32(1), z('{tls_version}')),
} as const;

/** Malformed frames every decoder must reject with the protocol error, keyed by what is wrong. */
export const badCommandFrames = {
  optnegShort: frame('O', u32(6), u32(0)),
  optnegMacroNoNul: frame('O', u32(6), u32(0), u32(0), u32(1), 'j'),
  optnegMacroShortStage: frame('O', u32(6), u32(0), u32(0), [0, 1]),
  macroNoStage: frame('D'),
  macroUnknownStage: frame('D', 'x', z('j'), z('v')),
  macroNameWithoutValue: frame('D', 'C', z('j')),
  macroValueNoNul: frame('D', 'C', z('j'), 'mx'),
  connectNoNul: frame('C', 'mx.example'),
  connectNoFamily: frame('C', z('mx.example')),
  connectBadFamily: frame('C', z('mx.example'), 'X', u16(25), z('192.0.2.1')),
  connectShortPort: frame('C', z('mx.example'), '4', [0]),
  connectNoAddress: frame('C', z('mx.example'), '4', u16(25)),
  connectUnixShortPort: frame('C', z('localhost'), 'L', [0]),
  connectUnixNoAddress: frame('C', z('localhost'), 'L', u16(0)),
  connectUnknownExtra: frame('C', z('unknown'), 'U', u16(0)),
  heloEmpty: frame('H'),
  heloNoNul: frame('H', 'client'),
  heloExtra: frame('H', z('client'), 'x'),
  mailEmpty: frame('M'),
  mailArgNoNul: frame('M', z('<a@b>'), 'SIZE=1'),
  headerNoValue: frame('L', z('Subject')),
  headerExtra: frame('L', z('Subject'), z('x'), [0]),
  eohExtra: frame('N', [0]),
  abortExtra: frame('A', 'x'),
  quitExtra: frame('Q', [1]),
  quitNcExtra: frame('K', [1]),
  dataExtra: frame('T', [0]),
  unknownNoNul: frame('U', 'XFOO'),
  unknownCommand: frame('Z'),
} as const;

export const badReplyFrames = {
  optnegShort: frame('O', u32(6)),
  acceptExtra: frame('a', [0]),
  continueExtra: frame('c', 'x'),
  discardExtra: frame('d', [0]),
  rejectExtra: frame('r', [0]),
  tempfailExtra: frame('t', [0]),
  skipExtra: frame('s', [0]),
  progressExtra: frame('p', [0]),
  connFailExtra: frame('f', [0]),
  shutdownExtra: frame('4', [0]),
  replyCodeEmpty: frame('y'),
  replyCodeNoNul: frame('y', '550 5.7.1 x'),
  replyCodeExtra: frame('y', z('550 5.7.1 x'), 'y'),
  quarantineNoNul: frame('q', 'why'),
  addHeaderNoValue: frame('h', z('X-A')),
  insertHeaderShortIndex: frame('i', [0, 0, 0]),
  insertHeaderNoName: frame('i', u32(0)),
  changeHeaderNoValue: frame('m', u32(1), z('X-A')),
  changeHeaderExtra: frame('m', u32(1), z('X-A'), z('v'), [0]),
  changeFromEmpty: frame('e'),
  changeFromArgsNoNul: frame('e', z('<a@b>'), 'SIZE=1'),
  changeFromExtra: frame('e', z('<a@b>'), z('SIZE=1'), z('x')),
  addRcptExtra: frame('+', z('<a@b>'), z('x')),
  addRcptParExtra: frame('2', z('<a@b>'), z('x'), z('y')),
  deleteRcptNoNul: frame('-', '<a@b>'),
  unknownReply: frame('Z'),
  commandAsReply: frame('H', z('x')),
} as const;
