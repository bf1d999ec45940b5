/**
 * The post-DATA handoff: what happens to a message once the milters have finished with it,
 * and the one SMTP reply the client gets for it. It sits above delivery (transports, routes,
 * the queue) and below the SMTP adapter (lib/smtp/), which calls it at the end of DATA.
 *
 * The rules, per recipient (Postfix's before-queue filter for local mail, its queue for
 * everything else):
 * - quarantined: the whole message goes to the quarantine transport (every recipient, our
 *   domains or not: it is held, not delivered), and never to the queue;
 * - routed to a local transport (a mailstore: lmtp(), maildir()): delivered now, before the
 *   client is answered;
 * - routed to an outbound transport (`outbound: true`: smtp()): written to the durable queue,
 *   which delivers it; the client is answered once it is on disk.
 *
 * The one reply: every local recipient delivered and nothing outbound → `250`; every
 * recipient ended alike → that reply; anything else (mixed local results, or any outbound
 * recipient) → `250` once the queue has the message and every recipient's state on disk
 * (it retries the deferred ones, delivers the outbound ones, and sends DSNs for the
 * failed); a queue that cannot take it → `451 4.3.0`, or `452 4.3.1` when its disk or
 * quota is full (ENOSPC, EDQUOT) (either way the client retries; recipients
 * already stored may get a duplicate, none is lost). Without a queue, mixed local results
 * get the worst reply for the same reason.
 *
 * It deliberately does not: decide relaying (relayControl does, at RCPT), or retry
 * anything itself (the queue does).
 */
import { channels, type DeliveryEvent } from '../diagnostics.js';
import { DovetailError, ErrorCodes, isNoStorage } from '../errors.js';
import { formatHeader, type MessageState } from '../milter/message.js';
import { smtpReply, type SmtpReply } from '../milter/verdict.js';
import { isRouting, transportOf } from '../delivery/routes.js';
import type { DeferredQueue, DeliveryEnvelope, MessageSource, RecipientResult, Transport } from '../delivery/types.js';

/** Where handed-off messages go. */
export interface HandoffConfig {
  /** Local and outbound recipients: a transport, or a routes() table mixing both. */
  readonly delivery: Transport;
  readonly quarantine: Transport;
  /** Required when any recipient can be routed outbound (createGateway checks that). */
  readonly queue: DeferredQueue | undefined;
  /** Epoch ms the transaction began (MAIL FROM), for the delivery event's delays. */
  readonly arrival?: number;
}

/** What the client is told, and what became of each recipient (undefined: queued, not yet tried). */
export interface HandoffOutcome {
  readonly ok: boolean;
  readonly reply: SmtpReply;
  readonly results: readonly (RecipientResult | undefined)[];
  /** True when the queue took the message. */
  readonly queued: boolean;
}

const INTERNAL = smtpReply(451, '4.3.0', 'Error: internal error, try again later');
/** The queue could not take the message because its filesystem (or quota) is full. */
const NO_STORAGE = smtpReply(452, '4.3.1', 'Error: insufficient system storage');

/** True when the recipients did not all end alike (so no single SMTP reply tells the truth). */
export function mixed(results: readonly RecipientResult[]): boolean {
  return results.some((r) => r.status !== results[0]?.status);
}

/**
 * The one SMTP reply for a message's per-recipient results: all delivered → 250; otherwise
 * the reply of the first temporary failure if there is one (the client retries; recipients
 * already stored may get a duplicate, none is lost), else the first permanent failure.
 */
export function summarize(results: readonly RecipientResult[], queueId: string): { ok: boolean; reply: SmtpReply } {
  const deferred = results.find((r) => r.status === 'deferred');
  const failed = results.find((r) => r.status === 'failed');
  if (!deferred && !failed) return { ok: true, reply: queuedAs(queueId) };
  return { ok: false, reply: (deferred ?? failed)?.reply ?? INTERNAL };
}

const queuedAs = (queueId: string): SmtpReply => smtpReply(250, '2.0.0', `Ok: queued as ${queueId}`);

/** True when `address` goes through the queue to an outbound transport. */
export function isOutbound(delivery: Transport, address: string): boolean {
  return isRouting(delivery) ? delivery.isOutbound(address) : delivery.outbound === true;
}

/** True when any recipient could be routed outbound (so the gateway needs a queue). */
export function mayRouteOutbound(delivery: Transport): boolean {
  return isRouting(delivery) ? delivery.anyOutbound : delivery.outbound === true;
}

/** Runs a transport; a throw or a wrong number of results defers every recipient (reported on the error channel). */
async function deliverSafely(t: Transport, envelope: DeliveryEnvelope, source: MessageSource, sessionId: string, kind: 'message' | 'quarantine', arrival: number | undefined): Promise<RecipientResult[]> {
  const t0 = channels.delivery.hasSubscribers ? performance.now() : undefined;
  let results: RecipientResult[];
  try {
    results = await t.deliver(envelope, source);
    if (!Array.isArray(results) || results.length !== envelope.recipients.length) {
      throw new DovetailError(ErrorCodes.DELIVERY_FAILED, `transport ${t.name} returned ${Array.isArray(results) ? results.length : 'no'} results for ${envelope.recipients.length} recipients`);
    }
  } catch (err) {
    channels.error.publish({ sessionId, queueId: envelope.queueId, error: err });
    results = envelope.recipients.map((r) => ({ recipient: r.address, status: 'deferred', reply: INTERNAL }));
  }
  if (t0 !== undefined && channels.delivery.hasSubscribers) {
    channels.delivery.publish({
      queueId: envelope.queueId,
      sessionId,
      source: 'gateway',
      kind,
      attempt: 1,
      transport: t.name,
      results: results.map((r) => ({ ...r, transport: transportOf(t, r.recipient) })),
      arrival: arrival ?? Date.now(),
      durationMs: performance.now() - t0,
    } satisfies DeliveryEvent);
  }
  return results;
}

/** Hands a finished message on (see the file header) and returns the reply for the client. */
export async function handoff(sessionId: string, queueId: string, state: MessageState, config: HandoffConfig): Promise<HandoffOutcome> {
  const envelope: DeliveryEnvelope = { queueId, sender: state.sender, recipients: state.recipients };
  if (state.quarantine !== undefined) {
    state.headers.unshift(formatHeader('X-Dovetail-Quarantine', state.quarantine));
    const results = await deliverSafely(config.quarantine, envelope, state.source(), sessionId, 'quarantine', config.arrival);
    return { ...summarize(results, queueId), results, queued: false };
  }
  const outbound = envelope.recipients.map((r) => isOutbound(config.delivery, r.address));
  const local = envelope.recipients.flatMap((r, i) => (outbound[i] ? [] : [i]));
  const results: (RecipientResult | undefined)[] = envelope.recipients.map(() => undefined);
  if (local.length > 0) {
    const sub: DeliveryEnvelope = { ...envelope, recipients: local.map((i) => envelope.recipients[i]!) };
    const got = await deliverSafely(config.delivery, sub, state.source(), sessionId, 'message', config.arrival);
    local.forEach((i, k) => (results[i] = got[k]));
  }
  if (local.length === envelope.recipients.length) {
    const done = results as RecipientResult[];
    const summary = summarize(done, queueId);
    if (summary.ok || !config.queue || !mixed(done)) return { ...summary, results, queued: false };
  }
  if (!config.queue) {
    // createGateway refuses outbound routes without a queue; a custom transport that says
    // `outbound` only at run time still never gets a 250 it cannot keep.
    return { ok: false, reply: INTERNAL, results, queued: false };
  }
  try {
    await config.queue.defer(envelope, state.source(), results);
    return { ok: true, reply: queuedAs(queueId), results, queued: true };
  } catch (err) {
    // Not on disk: the client must keep the message and retry (a 5xx here would bounce
    // recipients that were delivered or only deferred).
    // A full disk or quota is said as such (452 4.3.1); anything else is internal.
    channels.error.publish({ sessionId, queueId, error: err });
    return { ok: false, reply: isNoStorage(err) ? NO_STORAGE : INTERNAL, results, queued: false };
  }
}
