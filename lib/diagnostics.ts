/**
 * Observability through node:diagnostics_channel. The library never prints: subscribe to
 * these channels (see docs/operations.md) to log or count what happens, or call
 * enableLogging() / enableMetrics() (lib/observe/), which do.
 *
 * The payload types below are part of the public contract, like the channel names. The
 * channels added for logs and metrics (`transaction`, `delivery`, `milterCall`, `dns`) are
 * published only when something subscribes (`hasSubscribers`), so a gateway nobody watches
 * does not build them or read the clock for them.
 */
import diagnostics_channel from 'node:diagnostics_channel';
import type { SmtpReply } from './milter/verdict.js';
import type { DeliveryStatus } from './delivery/types.js';

/** Channel names, part of the public contract. */
export const Channels = {
  /** A client connected: {@link ConnectEvent}. */
  connect: 'dovetail:gateway:connect',
  /** A session ended: {@link CloseEvent}. */
  close: 'dovetail:gateway:close',
  /** A milter gave a verdict other than continue: `{ sessionId, queueId?, milter, stage, verdict, durationMs }`. */
  verdict: 'dovetail:milter:verdict',
  /**
   * A milter failed or timed out and its default action was taken:
   * `{ sessionId, queueId?, milter, stage, error, action, durationMs }` (`action` is `none` at abort/close).
   */
  milterError: 'dovetail:milter:error',
  /** A message was received and handed on: `{ sessionId, queueId, size, quarantine?, results, queued, reply }`. */
  message: 'dovetail:gateway:message',
  /**
   * An internal error the client saw only as a generic reply, or a transport's local failure:
   * `{ error }` plus whatever is known of `sessionId`, `queueId`, `recipient`.
   */
  error: 'dovetail:gateway:error',
  /** A transaction (MAIL FROM to its final reply, or abandoned) ended: {@link TransactionEvent}. */
  transaction: 'dovetail:gateway:transaction',
  /** A delivery attempt (the gateway's own to a local transport, or one of the queue's) ended: {@link DeliveryEvent}. */
  delivery: 'dovetail:delivery:attempt',
  /** One milter handler call ended, whatever its verdict: {@link MilterCallEvent}. */
  milterCall: 'dovetail:milter:call',
  /** A DNS query of the bundled milters' resolver (not a cache hit) ended: {@link DnsEvent}. */
  dns: 'dovetail:dns:query',
} as const;

export const channels = {
  connect: diagnostics_channel.channel(Channels.connect),
  close: diagnostics_channel.channel(Channels.close),
  verdict: diagnostics_channel.channel(Channels.verdict),
  milterError: diagnostics_channel.channel(Channels.milterError),
  message: diagnostics_channel.channel(Channels.message),
  error: diagnostics_channel.channel(Channels.error),
  transaction: diagnostics_channel.channel(Channels.transaction),
  delivery: diagnostics_channel.channel(Channels.delivery),
  milterCall: diagnostics_channel.channel(Channels.milterCall),
  dns: diagnostics_channel.channel(Channels.dns),
};

/** The client of a session. */
export interface ClientFacts {
  readonly address: string;
  readonly port: number;
  /** The name the reverse lookup found, or `[address]`. */
  readonly hostname: string;
  readonly family: string;
}

/** Payload of `Channels.connect`. */
export interface ConnectEvent {
  readonly sessionId: string;
  readonly client: ClientFacts;
  /** The listener's name (`ListenOptions.name`, default `dovetail`). */
  readonly listener: string;
}

/**
 * How a session ended:
 * - `quit`: the client said QUIT (221);
 * - `disconnect`: the client closed the connection without QUIT;
 * - `timeout`: the client was idle longer than `socketTimeout` (421);
 * - `shutdown`: the gateway closed (421 from `close()`);
 * - `too-many-errors`: the hard error limit was reached (421);
 * - `refused`: the connect stage or the client limits refused the greeting (554 / 421);
 * - `error`: a socket error (reset, broken pipe).
 */
export type SessionEnd = 'quit' | 'disconnect' | 'timeout' | 'shutdown' | 'too-many-errors' | 'refused' | 'error';

/** Payload of `Channels.close`. */
export interface CloseEvent {
  readonly sessionId: string;
  /** The fields below are absent when the session ended before its connect stage began (a client-limit refusal). */
  readonly client?: ClientFacts;
  readonly listener?: string;
  /** The last HELO/EHLO name. */
  readonly helo?: string | undefined;
  /** The negotiated TLS facts, when the session was encrypted. */
  readonly tls?: { readonly version: string; readonly cipher: string; readonly bits: number } | undefined;
  /** The authenticated user, if any. */
  readonly user?: string | undefined;
  /** MAIL FROM commands that got a queue id (transactions begun). */
  readonly transactions?: number;
  /** Of those, the ones that ended with a message accepted (2xx after DATA). */
  readonly accepted?: number;
  /** Milliseconds from connect to close. */
  readonly durationMs?: number;
  readonly end: SessionEnd;
}

/** A milter decision in a transaction: a verdict other than continue, or a default action taken for a failure. */
export interface MilterDecision {
  readonly milter: string;
  readonly stage: string;
  /** The verdict type (`accept`, `reject`, `tempfail`, `discard`, `quarantine`, `skip`), or the default action for a failure. */
  readonly verdict: string;
  readonly reply?: SmtpReply;
  /** A quarantine's reason. */
  readonly reason?: string;
  /** Set when this was the milter's default action after a failure: the error code (`DOVETAIL_ERR_MILTER_TIMEOUT` …). */
  readonly error?: string;
}

/** One recipient of a transaction, as the client gave it at RCPT TO. */
export interface TransactionRecipient {
  readonly address: string;
  /** The refusal the client got at RCPT TO; undefined when it was accepted. */
  readonly refused?: SmtpReply;
}

/**
 * How a transaction ended:
 * - `delivered`: every recipient stored before the reply (local transports);
 * - `queued`: 250 with the queue holding the message (outbound recipients, or mixed results);
 * - `quarantined`: 250, the message is in quarantine;
 * - `discarded`: 250, a milter discarded it;
 * - `rejected` / `tempfailed`: a 5xx / 4xx reply at MAIL FROM or after DATA (a milter, a data rule, the mailstore);
 * - `abandoned`: no DATA was completed (RSET, QUIT, another MAIL FROM, the connection lost).
 */
export type TransactionOutcome = 'delivered' | 'queued' | 'quarantined' | 'discarded' | 'rejected' | 'tempfailed' | 'abandoned';

/** What became of one recipient when the gateway handed the message on. */
export interface TransactionResult {
  readonly recipient: string;
  readonly status: DeliveryStatus | 'queued';
  readonly reply?: SmtpReply;
}

/** Payload of `Channels.transaction`. */
export interface TransactionEvent {
  readonly sessionId: string;
  /** Undefined for a MAIL FROM refused before a queue id was given (HELO refused, AUTH required, rate limit, shutting down). */
  readonly queueId: string | undefined;
  readonly listener: string;
  readonly client: ClientFacts;
  readonly helo: string | undefined;
  readonly user: string | undefined;
  readonly from: string;
  readonly recipients: readonly TransactionRecipient[];
  /** Message bytes as handed on (after the milters' edits), when the data was received. */
  readonly size: number | undefined;
  readonly decisions: readonly MilterDecision[];
  readonly outcome: TransactionOutcome;
  /** The final reply the client got (undefined for `abandoned`). */
  readonly reply: SmtpReply | undefined;
  /**
   * Where each recipient went, after the milters' edits: its local delivery result, or
   * `queued` (routed outbound, or held by the queue after a mixed result: see `queued`)
   * without a reply; only when the message was handed on.
   */
  readonly results: readonly TransactionResult[] | undefined;
  /** True when the queue took the message. */
  readonly queued: boolean;
  /** Epoch ms of MAIL FROM. */
  readonly start: number;
  /** Milliseconds: `total` from MAIL FROM to the reply = `receive` (the client and the gateway) + `milters` + `handoff` (delivery/queue). */
  readonly timing: { readonly total: number; readonly receive: number; readonly milters: number; readonly handoff: number };
}

/** One recipient's result in a delivery attempt. */
export interface DeliveryRecipientResult {
  readonly recipient: string;
  readonly status: DeliveryStatus;
  readonly reply: SmtpReply;
  /** The transport that delivered it (the routed one for a routes() table). */
  readonly transport: string;
  /** The next hop or mailstore, as `host[address]:port` or `unix:/path`, when the transport says. */
  readonly relay?: string | undefined;
  /** True when the queue gave up on it (maximal lifetime): `failed` without a permanent reply. */
  readonly expired?: boolean;
}

/** Payload of `Channels.delivery`. */
export interface DeliveryEvent {
  readonly queueId: string;
  /** The session for the gateway's own attempts; undefined for the queue's. */
  readonly sessionId: string | undefined;
  /** `gateway`: local delivery before the reply; `queue`: an attempt of the queue. */
  readonly source: 'gateway' | 'queue';
  /** `message`, `dsn` (a notification to a sender), or `quarantine` (the quarantine transport). */
  readonly kind: 'message' | 'dsn' | 'quarantine';
  /** The attempt number (1 for the gateway's own). */
  readonly attempt: number;
  /** The transport called (`routes` for a table: see each result's `transport`). */
  readonly transport: string;
  readonly results: readonly DeliveryRecipientResult[];
  /** Epoch ms the message arrived (its MAIL FROM; a DSN: when it was made). */
  readonly arrival: number;
  /** Milliseconds the attempt took. */
  readonly durationMs: number;
  /** Epoch ms of the next attempt, when recipients are still deferred in the queue. */
  readonly nextAttempt?: number;
}

/** Payload of `Channels.milterCall`. */
export interface MilterCallEvent {
  readonly sessionId: string;
  readonly queueId: string | undefined;
  readonly milter: string;
  readonly stage: string;
  /** The verdict type (of the last call), or `error` when the handler failed (its default action was taken). */
  readonly verdict: string;
  /** Milliseconds in the handler (summed over the calls). */
  readonly durationMs: number;
  /** Handler calls this event stands for: 1, or for `header` and `body` every header / body chunk of the message. */
  readonly calls: number;
}

/** Payload of `Channels.dns`. */
export interface DnsEvent {
  readonly name: string;
  readonly rrtype: string;
  /** `ok`, `notfound` (NXDOMAIN/NODATA) or `error` (SERVFAIL, timeout …). */
  readonly outcome: 'ok' | 'notfound' | 'error';
  readonly durationMs: number;
}
