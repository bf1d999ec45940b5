/**
 * The pure codec of the Sendmail milter protocol (versions 2–6): wire constants, framing
 * with an incremental hardened decoder, and typed encoders/decoders for every command
 * (MTA → filter) and every reply/action (filter → MTA).
 *
 * Does not: open sockets, run timers, negotiate, or keep session state — connectMilter and
 * serveMilter build on this.
 */
export * from './constants.js';
export { MilterProtocolError, MILTER_PROTOCOL_ERROR, isMilterProtocolError } from './error.js';
export { FrameDecoder, encodeFrame, type Frame, type FrameDecoderOptions } from './codec.js';
export type { OptNeg, MacroList } from './optneg.js';
export {
  decodeCommand,
  encodeCommand,
  commandPayload,
  COMMAND_CODE,
  type MilterCommand,
  type MilterCommandType,
  type ConnectCommand,
  type Macro,
} from './commands.js';
export { decodeReply, encodeReply, replyPayload, REPLY_CODE, type MilterReply, type MilterReplyType } from './replies.js';
