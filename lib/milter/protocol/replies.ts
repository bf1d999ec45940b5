/**
 * Payloads of the replies and modification actions a filter sends to the MTA (SMFIR_*),
 * as typed values, and their encoders and decoders. Layouts from libmilter smfi.c /
 * engine.c (the writers) and Postfix milter8.c milter8_event (the reader):
 *
 *   O OPTNEG      as the command, plus the per-stage macro lists (optneg.ts)
 *   a c d r t s p f 4   ACCEPT CONTINUE DISCARD REJECT TEMPFAIL SKIP PROGRESS CONN_FAIL
 *                 SHUTDOWN: no data (Postfix: data on these is an error)
 *   y REPLYCODE   "xyz a.b.c text" NUL; multi-line: "xyz-a.b.c l1\r\nxyz a.b.c l2" NUL
 *   q QUARANTINE  reason NUL
 *   h ADDHEADER   name NUL, value NUL
 *   i INSHEADER   uint32 index (0 = first), name NUL, value NUL
 *   m CHGHEADER   uint32 index (1 = first occurrence; Postfix reads 0 as 1), name NUL,
 *                 value NUL (an empty value deletes)
 *   e CHGFROM     address NUL [, ESMTP args NUL]
 *   + ADDRCPT     address NUL
 *   2 ADDRCPT_PAR address NUL [, ESMTP args NUL] (libmilter omits args when NULL)
 *   - DELRCPT     address NUL
 *   b REPLBODY    raw body chunk
 *   l SETSYMLIST  raw: libmilter never sends it (macro lists travel in the OPTNEG reply)
 *                 and no MTA defines its layout, so it is passed through undecoded
 *
 * A decoder that finds a short field, a missing NUL or left-over bytes throws
 * MilterProtocolError. Strings are UTF-8 (fields.ts).
 *
 * Does not: check the reply text's syntax or class, whether an action was negotiated or is
 * allowed at this stage, or map actions to MessageEdit (the session layer does that).
 */
import { encodeFrame, type Frame } from './codec.js';
import { SMFIR, type ReplyCode } from './constants.js';
import { MilterProtocolError } from './error.js';
import { FieldReader, FieldWriter } from './fields.js';
import { readOptNeg, writeOptNeg, type OptNeg } from './optneg.js';

/** A reply or action from the filter, decoded. */
export type MilterReply =
  | OptNeg // SMFIC_OPTNEG (reply)
  | { readonly type: 'accept' } // SMFIR_ACCEPT
  | { readonly type: 'continue' } // SMFIR_CONTINUE
  | { readonly type: 'discard' } // SMFIR_DISCARD
  | { readonly type: 'reject' } // SMFIR_REJECT
  | { readonly type: 'tempfail' } // SMFIR_TEMPFAIL
  | { readonly type: 'skip' } // SMFIR_SKIP
  | { readonly type: 'progress' } // SMFIR_PROGRESS
  | { readonly type: 'connFail' } // SMFIR_CONN_FAIL
  | { readonly type: 'shutdown' } // SMFIR_SHUTDOWN
  | { readonly type: 'replyCode'; readonly reply: string } // SMFIR_REPLYCODE
  | { readonly type: 'quarantine'; readonly reason: string } // SMFIR_QUARANTINE
  | { readonly type: 'addHeader'; readonly name: string; readonly value: string } // SMFIR_ADDHEADER
  | { readonly type: 'insertHeader'; readonly index: number; readonly name: string; readonly value: string } // SMFIR_INSHEADER
  | { readonly type: 'changeHeader'; readonly index: number; readonly name: string; readonly value: string } // SMFIR_CHGHEADER
  | { readonly type: 'changeFrom'; readonly address: string; readonly args?: string } // SMFIR_CHGFROM
  | { readonly type: 'addRcpt'; readonly address: string } // SMFIR_ADDRCPT
  | { readonly type: 'addRcptPar'; readonly address: string; readonly args?: string } // SMFIR_ADDRCPT_PAR
  | { readonly type: 'deleteRcpt'; readonly address: string } // SMFIR_DELRCPT
  | { readonly type: 'replaceBody'; readonly chunk: Buffer } // SMFIR_REPLBODY
  | { readonly type: 'setSymList'; readonly data: Buffer }; // SMFIR_SETSYMLIST

export type MilterReplyType = MilterReply['type'];

/** The reply byte for each decoded type. */
export const REPLY_CODE: Readonly<Record<MilterReplyType, ReplyCode>> = {
  optneg: SMFIR.OPTNEG,
  accept: SMFIR.ACCEPT,
  continue: SMFIR.CONTINUE,
  discard: SMFIR.DISCARD,
  reject: SMFIR.REJECT,
  tempfail: SMFIR.TEMPFAIL,
  skip: SMFIR.SKIP,
  progress: SMFIR.PROGRESS,
  connFail: SMFIR.CONN_FAIL,
  shutdown: SMFIR.SHUTDOWN,
  replyCode: SMFIR.REPLYCODE,
  quarantine: SMFIR.QUARANTINE,
  addHeader: SMFIR.ADDHEADER,
  insertHeader: SMFIR.INSHEADER,
  changeHeader: SMFIR.CHGHEADER,
  changeFrom: SMFIR.CHGFROM,
  addRcpt: SMFIR.ADDRCPT,
  addRcptPar: SMFIR.ADDRCPT_PAR,
  deleteRcpt: SMFIR.DELRCPT,
  replaceBody: SMFIR.REPLBODY,
  setSymList: SMFIR.SETSYMLIST,
};

/** Replies that carry no data. */
const EMPTY_REPLIES: Readonly<Record<string, MilterReplyType>> = {
  [SMFIR.ACCEPT]: 'accept',
  [SMFIR.CONTINUE]: 'continue',
  [SMFIR.DISCARD]: 'discard',
  [SMFIR.REJECT]: 'reject',
  [SMFIR.TEMPFAIL]: 'tempfail',
  [SMFIR.SKIP]: 'skip',
  [SMFIR.PROGRESS]: 'progress',
  [SMFIR.CONN_FAIL]: 'connFail',
  [SMFIR.SHUTDOWN]: 'shutdown',
};

function printable(code: string): string {
  const c = code.charCodeAt(0);
  return c >= 0x21 && c <= 0x7e ? `'${code}'` : `0x${c.toString(16).padStart(2, '0')}`;
}

/** Decodes a frame from the filter. Throws MilterProtocolError. */
export function decodeReply(frame: Frame): MilterReply {
  const r = new FieldReader(frame.data, `reply ${printable(frame.command)}`);
  let reply: MilterReply;
  const empty = Object.hasOwn(EMPTY_REPLIES, frame.command) ? EMPTY_REPLIES[frame.command] : undefined;
  if (empty !== undefined) {
    reply = { type: empty } as MilterReply;
  } else {
    switch (frame.command) {
      case SMFIR.OPTNEG:
        return readOptNeg(r);
      case SMFIR.REPLYCODE:
        reply = { type: 'replyCode', reply: r.cstring('reply text') };
        break;
      case SMFIR.QUARANTINE:
        reply = { type: 'quarantine', reason: r.cstring('reason') };
        break;
      case SMFIR.ADDHEADER: {
        const name = r.cstring('header name');
        reply = { type: 'addHeader', name, value: r.cstring('header value') };
        break;
      }
      case SMFIR.INSHEADER:
      case SMFIR.CHGHEADER: {
        const index = r.uint32('index');
        const name = r.cstring('header name');
        const value = r.cstring('header value');
        reply = { type: frame.command === SMFIR.INSHEADER ? 'insertHeader' : 'changeHeader', index, name, value };
        break;
      }
      case SMFIR.CHGFROM:
      case SMFIR.ADDRCPT_PAR: {
        const type = frame.command === SMFIR.CHGFROM ? 'changeFrom' : 'addRcptPar';
        const address = r.cstring('address');
        reply = r.remaining > 0 ? { type, address, args: r.cstring('ESMTP arguments') } : { type, address };
        break;
      }
      case SMFIR.ADDRCPT:
        reply = { type: 'addRcpt', address: r.cstring('address') };
        break;
      case SMFIR.DELRCPT:
        reply = { type: 'deleteRcpt', address: r.cstring('address') };
        break;
      case SMFIR.REPLBODY:
        reply = { type: 'replaceBody', chunk: r.rest() };
        break;
      case SMFIR.SETSYMLIST:
        reply = { type: 'setSymList', data: r.rest() };
        break;
      default:
        throw new MilterProtocolError(`unknown reply ${printable(frame.command)}`);
    }
  }
  r.end();
  return reply;
}

/** The data bytes of a reply (without the frame header). */
export function replyPayload(reply: MilterReply): Buffer {
  const w = new FieldWriter(reply.type);
  switch (reply.type) {
    case 'optneg':
      writeOptNeg(w, reply);
      break;
    case 'accept':
    case 'continue':
    case 'discard':
    case 'reject':
    case 'tempfail':
    case 'skip':
    case 'progress':
    case 'connFail':
    case 'shutdown':
      break;
    case 'replyCode':
      w.cstring('reply text', reply.reply);
      break;
    case 'quarantine':
      w.cstring('reason', reply.reason);
      break;
    case 'addHeader':
      w.cstring('header name', reply.name).cstring('header value', reply.value);
      break;
    case 'insertHeader':
    case 'changeHeader':
      w.uint32('index', reply.index).cstring('header name', reply.name).cstring('header value', reply.value);
      break;
    case 'changeFrom':
    case 'addRcptPar':
      w.cstring('address', reply.address);
      if (reply.args !== undefined) w.cstring('ESMTP arguments', reply.args);
      break;
    case 'addRcpt':
    case 'deleteRcpt':
      w.cstring('address', reply.address);
      break;
    case 'replaceBody':
      w.raw(reply.chunk);
      break;
    case 'setSymList':
      w.raw(reply.data);
      break;
    default:
      throw new MilterProtocolError('cannot encode: unknown reply type');
  }
  return w.toBuffer();
}

/** Encodes a reply as a complete frame. Throws MilterProtocolError on a value that cannot be framed. */
export function encodeReply(reply: MilterReply): Buffer {
  const code = REPLY_CODE[reply.type];
  if (code === undefined) throw new MilterProtocolError('cannot encode: unknown reply type');
  return encodeFrame(code, replyPayload(reply));
}
