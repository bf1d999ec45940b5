/**
 * The one error the milter codec throws: a frame or payload that breaks the wire format
 * (length < 1, over the maximum, a missing NUL, a short field, left-over bytes, an unknown
 * command), or a value our own encoder cannot put on the wire (a NUL inside a string, a
 * number out of range). Postfix treats the first kind as a communication error that takes
 * the milter's default action (milter8.c milter8_comm_error); the session layer should do
 * the same. It carries no peer data beyond a short, printable description.
 *
 * Does not: decide the default action, log, or close anything.
 */
import { DovetailError, ErrorCodes } from '../../errors.js';

/** The stable code (`ErrorCodes.MILTER_PROTOCOL`). */
export const MILTER_PROTOCOL_ERROR = ErrorCodes.MILTER_PROTOCOL;

/** A violation of the milter wire format. */
export class MilterProtocolError extends DovetailError {
  constructor(message: string, options?: { cause?: unknown }) {
    super(MILTER_PROTOCOL_ERROR, message, options);
    this.name = 'MilterProtocolError';
  }
}

/** True when `err` is a {@link MilterProtocolError}. */
export function isMilterProtocolError(err: unknown): err is MilterProtocolError {
  return err instanceof MilterProtocolError;
}
