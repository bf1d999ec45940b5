/**
 * The delivery interface: a transport takes one message and its envelope and returns one
 * result per recipient. The gateway answers the client's DATA only after the transport has
 * answered, so a transport must not report `delivered` before the message is durable.
 */
import type { EnvelopeAddress } from '../milter/types.js';
import type { SmtpReply } from '../milter/verdict.js';
import type { MessageSource } from '../message/source.js';

export type { MessageSource } from '../message/source.js';

/** The envelope handed to a transport. */
export interface DeliveryEnvelope {
  /** The gateway's queue id, for logs and file names. */
  readonly queueId: string;
  readonly sender: EnvelopeAddress;
  readonly recipients: readonly EnvelopeAddress[];
}

/**
 * What became of one recipient:
 * - `delivered`: durable in the mailstore;
 * - `deferred`: a temporary failure (4xx), the sender may try again;
 * - `failed`: a permanent failure (5xx).
 */
export type DeliveryStatus = 'delivered' | 'deferred' | 'failed';

export interface RecipientResult {
  /** The recipient's address as given in the envelope. */
  readonly recipient: string;
  readonly status: DeliveryStatus;
  /** The mailstore's reply (or the transport's own, for local failures). */
  readonly reply: SmtpReply;
  /**
   * Who gave the reply, for logs: the next hop as `host[address]:port` (smtp()), the
   * mailstore as `host:port` or `unix:/path` (lmtp()). Absent when the transport does not say.
   */
  readonly relay?: string;
}

/** A delivery transport (maildir(), lmtp(), smtp(), routes(), or your own). */
export interface Transport {
  readonly name: string;
  /**
   * True for a transport that sends mail on to another MTA (smtp()): the gateway writes
   * its recipients to the durable queue and answers the client once they are on disk; the
   * queue then delivers. Otherwise (a mailstore: lmtp(), maildir()) the gateway delivers
   * before it answers. Default false.
   */
  readonly outbound?: boolean;
  /**
   * Recipient verification at RCPT (optional): asked for each recipient the milters
   * accepted, before the client is told 250. Resolve a 4xx/5xx reply to refuse the
   * recipient now (unknown user, full mailbox), or undefined to accept it. A throw
   * accepts the recipient (verification is advisory; delivery still decides).
   */
  verifyRecipient?(envelope: { readonly queueId: string; readonly sender: EnvelopeAddress }, recipient: EnvelopeAddress): Promise<SmtpReply | undefined>;
  /**
   * Delivers to every recipient and returns exactly one result per recipient, in envelope
   * order. Throwing means every recipient is `deferred`.
   */
  deliver(envelope: DeliveryEnvelope, message: MessageSource): Promise<RecipientResult[]>;
  /** Releases pooled connections or handles. */
  close?(): Promise<void>;
}

/**
 * Where the gateway puts a message whose recipients did not all end the same way (some
 * delivered, some deferred or failed), and every message with recipients routed to an
 * outbound transport: the queue must make the message and its recipients' state durable
 * (fsync) before it resolves, because the client is told 250 next. It delivers the
 * recipients not yet tried (an `undefined` result) at once, retries the deferred ones, and
 * reports failed ones to the sender (DSN). A throw makes the gateway answer 451 instead
 * (the client retries the whole message).
 */
export interface DeferredQueue {
  defer(envelope: DeliveryEnvelope, message: MessageSource, results: readonly (RecipientResult | undefined)[]): Promise<void>;
  /** Called by the gateway's listen(): load what is on disk and start retrying. */
  start?(): Promise<void> | void;
  /** Called by the gateway's close() after transactions in flight, before the transports close. */
  close?(): Promise<void>;
}
