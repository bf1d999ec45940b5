/**
 * Observability through node:diagnostics_channel. The library never prints: subscribe to
 * these channels (see docs/operations.md) to log or count what happens.
 */
import diagnostics_channel from 'node:diagnostics_channel';

/** Channel names, part of the public contract. */
export const Channels = {
  /** A client connected: `{ sessionId, client }`. */
  connect: 'dovetail:gateway:connect',
  /** A session ended: `{ sessionId }`. */
  close: 'dovetail:gateway:close',
  /** A milter gave a verdict other than continue: `{ sessionId, queueId?, milter, stage, verdict }`. */
  verdict: 'dovetail:milter:verdict',
  /**
   * A milter failed or timed out and its default action was taken:
   * `{ sessionId, queueId?, milter, stage, error, action }` (`action` is `none` at abort/close).
   */
  milterError: 'dovetail:milter:error',
  /** A message was received and handed on: `{ sessionId, queueId, size, quarantine?, results, reply }`. */
  message: 'dovetail:gateway:message',
  /**
   * An internal error the client saw only as a generic reply, or a transport's local failure:
   * `{ error }` plus whatever is known of `sessionId`, `queueId`, `recipient`.
   */
  error: 'dovetail:gateway:error',
} as const;

export const channels = {
  connect: diagnostics_channel.channel(Channels.connect),
  close: diagnostics_channel.channel(Channels.close),
  verdict: diagnostics_channel.channel(Channels.verdict),
  milterError: diagnostics_channel.channel(Channels.milterError),
  message: diagnostics_channel.channel(Channels.message),
  error: diagnostics_channel.channel(Channels.error),
};
