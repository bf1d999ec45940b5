/**
 * The delivery interface: a transport takes one message and its envelope and returns one
 * result per recipient. The gateway answers the client's DATA only after the transport has
 * answered, so a transport must not report `delivered` before the message is durable.
 */
import type { Readable } from 'node:stream';
import type { EnvelopeAddress } from '../milter/types.js';
import type { SmtpReply } from '../milter/verdict.js';

/** The envelope handed to a transport. */
export interface DeliveryEnvelope {
  /** The gateway's queue id, for logs and file names. */
  readonly queueId: string;
  readonly sender: EnvelopeAddress;
  readonly recipients: readonly EnvelopeAddress[];
}

/** The message handed to a transport: may be read several times. */
export interface MessageSource {
  /** Size in bytes of what stream() yields. */
  readonly size: number;
  /** A fresh stream of the whole message (headers, blank line, body), CRLF line endings. */
  stream(): Readable;
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
}

/** A delivery transport (maildir(), lmtp(), or your own). */
export interface Transport {
  readonly name: string;
  /**
   * Delivers to every recipient and returns exactly one result per recipient, in envelope
   * order. Throwing means every recipient is `deferred`.
   */
  deliver(envelope: DeliveryEnvelope, message: MessageSource): Promise<RecipientResult[]>;
  /** Releases pooled connections or handles. */
  close?(): Promise<void>;
}
