/**
 * What the gateway keeps of one transaction for the `transaction` diagnostics channel
 * (lib/diagnostics.ts): made at MAIL FROM only while something subscribes, filled in at RCPT
 * and after DATA, published once when the transaction ends (its final reply, or abandoned).
 * The Postfix counterpart is the cleanup/qmgr/smtpd lines of the maillog for one queue id.
 *
 * It deliberately does not: format or write anything (lib/observe/ does), or keep anything
 * past the transaction.
 */
import { channels, type ClientFacts, type TransactionEvent, type TransactionOutcome, type TransactionRecipient, type TransactionResult } from '../diagnostics.js';
import type { MessageRun } from '../milter/chain.js';
import type { SmtpReply } from '../milter/verdict.js';

/** The session facts a transaction event repeats. */
export interface TransactionSession {
  readonly sessionId: string;
  readonly listener: string;
  readonly client: ClientFacts;
  readonly helo: string | undefined;
  readonly user: string | undefined;
}

/** One transaction being recorded. */
export class TransactionRecord {
  readonly start = Date.now();
  private readonly t0 = performance.now();
  readonly recipients: TransactionRecipient[] = [];
  size: number | undefined;
  results: readonly TransactionResult[] | undefined;
  queued = false;
  quarantined = false;
  handoffMs = 0;
  private ended = false;

  constructor(
    readonly queueId: string | undefined,
    readonly from: string,
    readonly run: MessageRun | undefined,
  ) {
    run?.observe();
  }

  /** Publishes the transaction (once): `reply` is the client's final reply, undefined when abandoned. */
  end(session: TransactionSession, reply: SmtpReply | undefined): void {
    if (this.ended) return;
    this.ended = true;
    if (!channels.transaction.hasSubscribers) return;
    const total = performance.now() - this.t0;
    const milters = this.run?.milterMs ?? 0;
    const handoff = this.handoffMs;
    const outcome: TransactionOutcome =
      reply === undefined
        ? 'abandoned'
        : reply.code >= 500
          ? 'rejected'
          : reply.code >= 400
            ? 'tempfailed'
            : this.run?.discarded
              ? 'discarded'
              : this.quarantined
                ? 'quarantined'
                : this.queued
                  ? 'queued'
                  : 'delivered';
    channels.transaction.publish({
      sessionId: session.sessionId,
      queueId: this.queueId,
      listener: session.listener,
      client: session.client,
      helo: session.helo,
      user: session.user,
      from: this.from,
      recipients: this.recipients,
      size: this.size,
      decisions: this.run?.decisions ?? [],
      outcome,
      reply,
      results: this.results,
      queued: this.queued,
      start: this.start,
      timing: { total, receive: Math.max(0, total - milters - handoff), milters, handoff },
    } satisfies TransactionEvent);
  }
}
