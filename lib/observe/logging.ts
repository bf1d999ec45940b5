/**
 * The operator's log: a pino logger subscribed to the diagnostics channels
 * (lib/diagnostics.ts, QueueChannels), writing Postfix-maillog-like lines as JSON — one per
 * connection (when it closes), one per transaction (when it is answered or abandoned), one
 * per delivery attempt and outcome, plus the queue's DSNs and removals, and the errors
 * (`error` at error level, `milterError` at warn). Every line has `event` and a short `msg`
 * in Postfix's words; docs/operations.md lists every field.
 *
 * It deliberately does not: rotate files (use logrotate with copytruncate, or a log
 * shipper), sample, or log message contents. Off unless enableLogging() is called.
 */
import diagnostics_channel from 'node:diagnostics_channel';
import pino, { type DestinationStream, type Logger } from 'pino';
import {
  Channels,
  type CloseEvent,
  type DeliveryEvent,
  type DeliveryRecipientResult,
  type MilterDecision,
  type TransactionEvent,
} from '../diagnostics.js';
import { QueueChannels } from '../delivery/queue.js';
import type { SmtpReply } from '../milter/verdict.js';

export interface LoggingOptions {
  /** A pino logger to write to. Default: a new one at `level` writing to `destination`. */
  readonly logger?: Logger;
  /** pino level. Default `info`. */
  readonly level?: string;
  /** A file path or file descriptor. Default 1 (stdout). Ignored when `logger` or `stream` is given. */
  readonly destination?: string | number;
  /** A stream to write the lines to instead of `destination` (anything pino takes). */
  readonly stream?: DestinationStream;
  /** Write each line before returning (pino.destination's `sync`). Default true. */
  readonly sync?: boolean;
}

export interface Logging {
  readonly logger: Logger;
  /** Unsubscribes from every channel (and flushes a logger it made). */
  close(): void;
}

/** A reply on one line, as Postfix logs it: `550 5.7.1 text text`. */
export function replyText(reply: SmtpReply | undefined): string | undefined {
  return reply ? `${reply.code} ${reply.enhanced} ${reply.lines.join(' ')}` : undefined;
}

/** Seconds with Postfix's precision (10 ms; smaller values as they are, to 3 decimals). */
const seconds = (ms: number): number => Math.round(ms) / 1000;

/** Postfix's `status=` word for a recipient's result. */
function statusWord(r: DeliveryRecipientResult): 'sent' | 'deferred' | 'bounced' | 'expired' {
  if (r.status === 'delivered') return 'sent';
  if (r.status === 'deferred') return 'deferred';
  return r.expired ? 'expired' : 'bounced';
}

function decisionOf(d: MilterDecision): Record<string, unknown> {
  return {
    milter: d.milter,
    stage: d.stage,
    verdict: d.verdict,
    ...(d.reply ? { reply: replyText(d.reply) } : {}),
    ...(d.reason !== undefined ? { reason: d.reason } : {}),
    ...(d.error !== undefined ? { error: d.error } : {}),
  };
}

/** The connection line (on close). */
export function connectionRecord(e: CloseEvent): Record<string, unknown> {
  const name = e.client?.hostname ?? 'unknown';
  const addr = e.client?.address ?? '';
  return {
    event: 'connection',
    sessionId: e.sessionId,
    listener: e.listener,
    client: addr,
    clientPort: e.client?.port,
    clientName: name,
    helo: e.helo,
    tls: e.tls ? `${e.tls.version} ${e.tls.cipher} ${e.tls.bits}` : undefined,
    user: e.user,
    transactions: e.transactions ?? 0,
    accepted: e.accepted ?? 0,
    duration: e.durationMs === undefined ? undefined : seconds(e.durationMs),
    end: e.end,
    msg: `disconnect from ${name.startsWith('[') ? `unknown${name}` : `${name}[${addr}]`} end=${e.end} transactions=${e.transactions ?? 0}`,
  };
}

/** The transaction line. */
export function transactionRecord(e: TransactionEvent): Record<string, unknown> {
  const accepted = e.recipients.filter((r) => !r.refused).map((r) => r.address);
  const refused = e.recipients.filter((r) => r.refused).map((r) => ({ to: r.address, reply: replyText(r.refused) }));
  const t = e.timing;
  const results = e.results?.map((r) => ({ to: r.recipient, status: r.status, ...(r.reply ? { reply: replyText(r.reply) } : {}) }));
  const id = e.queueId ?? 'NOQUEUE';
  const reply = replyText(e.reply);
  return {
    event: 'transaction',
    sessionId: e.sessionId,
    queueId: e.queueId,
    listener: e.listener,
    client: e.client.address,
    clientName: e.client.hostname,
    helo: e.helo,
    user: e.user,
    from: e.from,
    to: accepted,
    ...(refused.length ? { refused } : {}),
    size: e.size,
    ...(e.decisions.length ? { milters: e.decisions.map(decisionOf) } : {}),
    outcome: e.outcome,
    reply,
    ...(results ? { results } : {}),
    queued: e.queued,
    delay: seconds(t.total),
    delays: `${seconds(t.receive)}/${seconds(t.milters)}/${seconds(t.handoff)}`,
    msg: `${id}: ${e.outcome} from=<${e.from}> to=${accepted.length} size=${e.size ?? '-'}${reply ? `: ${reply}` : ''}`,
  };
}

/** The delivery lines of one attempt: one per group of recipients with the same transport, relay, status and reply. */
export function deliveryRecords(e: DeliveryEvent): Record<string, unknown>[] {
  const groups = new Map<string, { r: DeliveryRecipientResult; to: string[] }>();
  for (const r of e.results) {
    const key = `${r.transport}\u0000${r.relay ?? ''}\u0000${statusWord(r)}\u0000${replyText(r.reply)}`;
    const g = groups.get(key);
    if (g) g.to.push(r.recipient);
    else groups.set(key, { r, to: [r.recipient] });
  }
  const now = Date.now();
  return [...groups.values()].map(({ r, to }) => {
    const status = statusWord(r);
    const reply = replyText(r.reply);
    const relay = r.relay ?? r.transport;
    return {
      event: 'delivery',
      queueId: e.queueId,
      ...(e.sessionId !== undefined ? { sessionId: e.sessionId } : {}),
      source: e.source,
      kind: e.kind,
      attempt: e.attempt,
      to,
      transport: r.transport,
      relay,
      reply,
      dsn: r.reply.enhanced,
      status,
      delay: seconds(now - e.arrival),
      duration: seconds(e.durationMs),
      ...(e.nextAttempt !== undefined && status === 'deferred' ? { nextAttempt: new Date(e.nextAttempt).toISOString() } : {}),
      msg: `${e.queueId}: to=<${to.join('>,<')}>, relay=${relay}, status=${status} (${reply})`,
    };
  });
}

/** What of an error goes into a log line: its code and message, and pino's `err` (stack, cause). */
function errorFields(error: unknown): Record<string, unknown> {
  const code = typeof error === 'object' && error !== null ? (error as { code?: unknown }).code : undefined;
  return { ...(typeof code === 'string' ? { code } : {}), err: error };
}

/** Subscribes a pino logger to the diagnostics channels: one line per connection, transaction and delivery attempt. */
export function enableLogging(options: LoggingOptions = {}): Logging {
  let made: ReturnType<typeof pino.destination> | undefined;
  let logger = options.logger;
  if (!logger) {
    let stream = options.stream;
    if (!stream) {
      made = pino.destination({ dest: options.destination ?? 1, sync: options.sync ?? true, ...(typeof options.destination === 'string' ? { mkdir: true } : {}) });
      stream = made;
    }
    logger = pino({ level: options.level ?? 'info', timestamp: pino.stdTimeFunctions.isoTime }, stream);
  }
  const log = logger;
  const subscriptions: [string, (message: unknown, name: string | symbol) => void][] = [];
  /** A subscriber must never throw: diagnostics_channel would rethrow it as an uncaught exception. */
  const on = <T>(name: string, write: (m: T) => void): void => {
    const fn = (m: unknown): void => {
      try {
        write(m as T);
      } catch (err) {
        try {
          log.error({ event: 'log-error', channel: name, err }, `could not log ${name}`);
        } catch {
          // Nothing left to tell.
        }
      }
    };
    diagnostics_channel.subscribe(name, fn);
    subscriptions.push([name, fn]);
  };

  on<CloseEvent>(Channels.close, (e) => log.info(connectionRecord(e)));
  on<TransactionEvent>(Channels.transaction, (e) => log.info(transactionRecord(e)));
  on<DeliveryEvent>(Channels.delivery, (e) => {
    for (const r of deliveryRecords(e)) log.info(r);
  });
  on<{ sessionId?: string; queueId?: string; milter: string; stage: string; error: unknown; action: string; durationMs?: number }>(Channels.milterError, (e) =>
    log.warn({
      event: 'milter-error',
      sessionId: e.sessionId,
      queueId: e.queueId,
      milter: e.milter,
      stage: e.stage,
      action: e.action,
      ...errorFields(e.error),
      msg: `${e.error instanceof Error ? e.error.message : `milter ${e.milter} failed at ${e.stage}`}; default action ${e.action}`,
    }),
  );
  on<{ error: unknown } & Record<string, unknown>>(Channels.error, (e) => {
    const { error, ...context } = e;
    log.error({ event: 'error', ...context, ...errorFields(error), msg: error instanceof Error ? error.message : String(error) });
  });
  on<{ queueId: string; of: string; to: string; actions: string[] }>(QueueChannels.dsn, (e) =>
    log.info({ event: 'dsn', queueId: e.of, dsnQueueId: e.queueId, to: e.to, actions: e.actions, msg: `${e.of}: sender ${e.actions.join('/')} notification: ${e.queueId}` }),
  );
  on<{ queueId: string; recipients: { address: string }[]; reason: string }>(QueueChannels.dropped, (e) =>
    log.warn({ event: 'dsn-dropped', queueId: e.queueId, to: e.recipients.map((r) => r.address), reason: e.reason, msg: `${e.queueId}: notification not sent (${e.reason})` }),
  );
  on<{ queueId: string; reason: string }>(QueueChannels.removed, (e) =>
    log.info({ event: 'removed', queueId: e.queueId, reason: e.reason, msg: `${e.queueId}: removed${e.reason === 'done' ? '' : ` (${e.reason})`}` }),
  );
  on<{ entries: number; tmpRemoved: number; orphansRemoved: number; corrupt: number }>(QueueChannels.loaded, (e) =>
    log.info({ event: 'queue-loaded', ...e, msg: `queue loaded: ${e.entries} entries` }),
  );

  let closed = false;
  return {
    logger: log,
    close() {
      if (closed) return;
      closed = true;
      for (const [name, fn] of subscriptions) diagnostics_channel.unsubscribe(name, fn);
      subscriptions.length = 0;
      if (made) {
        try {
          made.flushSync();
        } catch {
          // Not open yet, or already closed: nothing buffered to lose with sync writes.
        }
        // A file it opened is closed; a descriptor it was given (stdout …) stays open.
        if (typeof options.destination === 'string') made.end();
      }
    },
  };
}
