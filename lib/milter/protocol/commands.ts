/**
 * Payloads of the commands the MTA sends to a filter (SMFIC_*), as typed values, and their
 * encoders and decoders. Layouts from libmilter engine.c (st_* handlers) and Postfix
 * milter8.c (milter8_*_event):
 *
 *   O OPTNEG   uint32 version, uint32 actions, uint32 protocol [, macro lists] (optneg.ts)
 *   D MACRO    stage command byte, then NUL-terminated name, value pairs (may be none)
 *   C CONNECT  hostname NUL, family byte; for '4' '6' 'L': uint16 port, address NUL;
 *              for 'U' nothing more. Postfix sends port 0 and the socket path for 'L'.
 *   H HELO     helo name NUL
 *   M MAIL     address NUL, then each ESMTP argument NUL (address first, always present)
 *   R RCPT     the same
 *   L HEADER   name NUL, value NUL
 *   N EOH, T DATA, A ABORT, Q QUIT, K QUIT_NC: no data
 *   B BODY     raw chunk
 *   E BODYEOB  raw: normally empty; libmilter passes any data to xxfi_body before xxfi_eom
 *   U UNKNOWN  the SMTP command line NUL
 *
 * A decoder that finds a short field, a missing NUL or left-over bytes throws
 * MilterProtocolError. Strings are UTF-8 (fields.ts).
 *
 * Does not: check that a command is allowed at this point of the session, or that macro
 * names are known; map to SessionContext (the session layer does).
 */
import type { AddressFamily } from '../types.js';
import { encodeFrame, type Frame } from './codec.js';
import { SMFIA, SMFIC, type CommandCode } from './constants.js';
import { MilterProtocolError } from './error.js';
import { FieldReader, FieldWriter } from './fields.js';
import { readOptNeg, writeOptNeg, type OptNeg } from './optneg.js';

export interface Macro {
  readonly name: string;
  readonly value: string;
}

export type ConnectCommand =
  | { readonly type: 'connect'; readonly hostname: string; readonly family: 'unknown' }
  | {
      readonly type: 'connect';
      readonly hostname: string;
      readonly family: Exclude<AddressFamily, 'unknown'>;
      /** 0 for `unix` (Postfix) or when the MTA does not know it. */
      readonly port: number;
      /** IP address, or the socket path for `unix`. */
      readonly address: string;
    };

/** A command from the MTA, decoded. */
export type MilterCommand =
  | OptNeg // SMFIC_OPTNEG
  | { readonly type: 'macro'; readonly stage: CommandCode; readonly macros: readonly Macro[] } // SMFIC_MACRO
  | ConnectCommand // SMFIC_CONNECT
  | { readonly type: 'helo'; readonly hostname: string } // SMFIC_HELO
  | { readonly type: 'mail'; readonly address: string; readonly args: readonly string[] } // SMFIC_MAIL
  | { readonly type: 'rcpt'; readonly address: string; readonly args: readonly string[] } // SMFIC_RCPT
  | { readonly type: 'header'; readonly name: string; readonly value: string } // SMFIC_HEADER
  | { readonly type: 'eoh' } // SMFIC_EOH
  | { readonly type: 'body'; readonly chunk: Buffer } // SMFIC_BODY
  | { readonly type: 'bodyEob'; readonly chunk: Buffer } // SMFIC_BODYEOB
  | { readonly type: 'abort' } // SMFIC_ABORT
  | { readonly type: 'quit' } // SMFIC_QUIT
  | { readonly type: 'quitNc' } // SMFIC_QUIT_NC
  | { readonly type: 'unknown'; readonly command: string } // SMFIC_UNKNOWN
  | { readonly type: 'data' }; // SMFIC_DATA

export type MilterCommandType = MilterCommand['type'];

const FAMILY_BY_CODE: Readonly<Record<string, AddressFamily>> = {
  [SMFIA.INET]: 'ipv4',
  [SMFIA.INET6]: 'ipv6',
  [SMFIA.UNIX]: 'unix',
  [SMFIA.UNKNOWN]: 'unknown',
};
const CODE_BY_FAMILY: Readonly<Record<AddressFamily, string>> = {
  ipv4: SMFIA.INET,
  ipv6: SMFIA.INET6,
  unix: SMFIA.UNIX,
  unknown: SMFIA.UNKNOWN,
};
const COMMAND_CODES: ReadonlySet<string> = new Set(Object.values(SMFIC));

/** The command byte for each decoded type. */
export const COMMAND_CODE: Readonly<Record<MilterCommandType, CommandCode>> = {
  optneg: SMFIC.OPTNEG,
  macro: SMFIC.MACRO,
  connect: SMFIC.CONNECT,
  helo: SMFIC.HELO,
  mail: SMFIC.MAIL,
  rcpt: SMFIC.RCPT,
  header: SMFIC.HEADER,
  eoh: SMFIC.EOH,
  body: SMFIC.BODY,
  bodyEob: SMFIC.BODYEOB,
  abort: SMFIC.ABORT,
  quit: SMFIC.QUIT,
  quitNc: SMFIC.QUIT_NC,
  unknown: SMFIC.UNKNOWN,
  data: SMFIC.DATA,
};

function readArgv(r: FieldReader, what: string): { address: string; args: string[] } {
  const address = r.cstring(`${what} address`);
  const args: string[] = [];
  while (r.remaining > 0) args.push(r.cstring(`${what} argument`));
  return { address, args };
}

function printable(code: string): string {
  const c = code.charCodeAt(0);
  return c >= 0x21 && c <= 0x7e ? `'${code}'` : `0x${c.toString(16).padStart(2, '0')}`;
}

/** Decodes a frame from the MTA. Throws MilterProtocolError. */
export function decodeCommand(frame: Frame): MilterCommand {
  const r = new FieldReader(frame.data, `command ${printable(frame.command)}`);
  let cmd: MilterCommand;
  switch (frame.command) {
    case SMFIC.OPTNEG:
      return readOptNeg(r);
    case SMFIC.MACRO: {
      const stage = String.fromCharCode(r.byte('macro stage'));
      if (!COMMAND_CODES.has(stage)) throw new MilterProtocolError(`MACRO: unknown stage ${printable(stage)}`);
      const macros: Macro[] = [];
      while (r.remaining > 0) {
        const name = r.cstring('macro name');
        if (r.remaining === 0) throw new MilterProtocolError('MACRO: a name without a value');
        macros.push({ name, value: r.cstring('macro value') });
      }
      cmd = { type: 'macro', stage: stage as CommandCode, macros };
      break;
    }
    case SMFIC.CONNECT: {
      const hostname = r.cstring('hostname');
      const code = String.fromCharCode(r.byte('family'));
      const family = FAMILY_BY_CODE[code];
      if (family === undefined) throw new MilterProtocolError(`CONNECT: unknown family ${printable(code)}`);
      if (family === 'unknown') {
        cmd = { type: 'connect', hostname, family };
      } else {
        const port = r.uint16('port');
        cmd = { type: 'connect', hostname, family, port, address: r.cstring('address') };
      }
      break;
    }
    case SMFIC.HELO:
      cmd = { type: 'helo', hostname: r.cstring('helo name') };
      break;
    case SMFIC.MAIL:
      cmd = { type: 'mail', ...readArgv(r, 'MAIL') };
      break;
    case SMFIC.RCPT:
      cmd = { type: 'rcpt', ...readArgv(r, 'RCPT') };
      break;
    case SMFIC.HEADER: {
      const name = r.cstring('header name');
      cmd = { type: 'header', name, value: r.cstring('header value') };
      break;
    }
    case SMFIC.BODY:
      cmd = { type: 'body', chunk: r.rest() };
      break;
    case SMFIC.BODYEOB:
      cmd = { type: 'bodyEob', chunk: r.rest() };
      break;
    case SMFIC.UNKNOWN:
      cmd = { type: 'unknown', command: r.cstring('command') };
      break;
    case SMFIC.EOH:
      cmd = { type: 'eoh' };
      break;
    case SMFIC.ABORT:
      cmd = { type: 'abort' };
      break;
    case SMFIC.QUIT:
      cmd = { type: 'quit' };
      break;
    case SMFIC.QUIT_NC:
      cmd = { type: 'quitNc' };
      break;
    case SMFIC.DATA:
      cmd = { type: 'data' };
      break;
    default:
      throw new MilterProtocolError(`unknown command ${printable(frame.command)}`);
  }
  r.end();
  return cmd;
}

/** The data bytes of a command (without the frame header). */
export function commandPayload(cmd: MilterCommand): Buffer {
  const w = new FieldWriter(cmd.type);
  switch (cmd.type) {
    case 'optneg':
      writeOptNeg(w, cmd);
      break;
    case 'macro':
      if (!COMMAND_CODES.has(cmd.stage)) throw new MilterProtocolError('cannot encode MACRO: unknown stage');
      w.byte('stage', cmd.stage.charCodeAt(0));
      for (const m of cmd.macros) w.cstring('macro name', m.name).cstring('macro value', m.value);
      break;
    case 'connect': {
      const code = CODE_BY_FAMILY[cmd.family];
      if (code === undefined) throw new MilterProtocolError('cannot encode CONNECT: unknown family');
      w.cstring('hostname', cmd.hostname).byte('family', code.charCodeAt(0));
      if (cmd.family !== 'unknown') w.uint16('port', cmd.port).cstring('address', cmd.address);
      break;
    }
    case 'helo':
      w.cstring('helo name', cmd.hostname);
      break;
    case 'mail':
    case 'rcpt':
      w.cstring('address', cmd.address);
      for (const a of cmd.args) w.cstring('argument', a);
      break;
    case 'header':
      w.cstring('header name', cmd.name).cstring('header value', cmd.value);
      break;
    case 'body':
    case 'bodyEob':
      w.raw(cmd.chunk);
      break;
    case 'unknown':
      w.cstring('command', cmd.command);
      break;
    case 'eoh':
    case 'abort':
    case 'quit':
    case 'quitNc':
    case 'data':
      break;
    default:
      throw new MilterProtocolError('cannot encode: unknown command type');
  }
  return w.toBuffer();
}

/** Encodes a command as a complete frame. Throws MilterProtocolError on a value that cannot be framed. */
export function encodeCommand(cmd: MilterCommand): Buffer {
  const code = COMMAND_CODE[cmd.type];
  if (code === undefined) throw new MilterProtocolError('cannot encode: unknown command type');
  return encodeFrame(code, commandPayload(cmd));
}
