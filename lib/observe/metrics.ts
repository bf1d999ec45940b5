/**
 * Prometheus metrics (prom-client) fed by the diagnostics channels: counters and histograms
 * of connections, transactions, milter verdicts, errors and latency, deliveries, message
 * sizes and DNS latency, plus gauges of the deferred queues read when scraped. Labels are
 * low-cardinality only: listener, milter and stage names, transports, outcomes, status and
 * reply classes, error codes — never an address, a name from the wire or a queue id.
 * docs/operations.md lists every metric. serveMetrics() (./server.ts) serves a registry.
 *
 * It deliberately does not: enable prom-client's process metrics (call
 * collectDefaultMetrics({ register }) yourself if you want them), or push anywhere.
 */
import diagnostics_channel from 'node:diagnostics_channel';
import { Counter, Gauge, Histogram, Registry, type Metric } from 'prom-client';
import {
  Channels,
  type CloseEvent,
  type ConnectEvent,
  type DeliveryEvent,
  type DnsEvent,
  type MilterCallEvent,
  type TransactionEvent,
} from '../diagnostics.js';
import { QueueChannels, type DeliveryQueue } from '../delivery/queue.js';

export interface MetricsOptions {
  /** Default: a new Registry. */
  readonly registry?: Registry;
  /** Metric name prefix. Default `dovetail_`. */
  readonly prefix?: string;
  /** Queues whose size and age are reported. */
  readonly queues?: readonly DeliveryQueue[];
}

export interface Metrics {
  readonly registry: Registry;
  /**
   * Unsubscribes from every channel: the counters and histograms stay in the registry as
   * they are (a later enableMetrics() on the same registry carries on counting them); the
   * gauges (active connections, queues) are removed, as nothing keeps them true any more.
   */
  close(): void;
}

/** Histogram buckets, in seconds or bytes. */
const BUCKETS = {
  milter: [0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 30],
  delivery: [0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60],
  dns: [0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 5],
  transaction: [0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300],
  size: [1024, 4096, 16_384, 65_536, 262_144, 1_048_576, 4_194_304, 16_777_216, 67_108_864],
} as const;

/** An error's code as a label: a DOVETAIL_ERR_* or errno code, else `other`. */
export function codeLabel(error: unknown): string {
  const code = typeof error === 'object' && error !== null ? (error as { code?: unknown }).code : undefined;
  return typeof code === 'string' && /^[A-Z][A-Z0-9_]{0,47}$/.test(code) ? code : 'other';
}

/** `2xx`, `4xx`, `5xx`, or `none` (no reply: abandoned). */
const replyClass = (code: number | undefined): string => (code === undefined ? 'none' : `${String(code)[0]}xx`);

/** Counts what the diagnostics channels report into prom-client counters and histograms. */
export function enableMetrics(options: MetricsOptions = {}): Metrics {
  const registry = options.registry ?? new Registry();
  const p = options.prefix ?? 'dovetail_';
  const queues = [...(options.queues ?? [])];
  let closed = false;

  /** The registry's metric of that name if there is one (a re-enable carries on), else a new one. */
  function metric<M extends Metric<string>>(name: string, make: () => M): M {
    return (registry.getSingleMetric(name) as M | undefined) ?? make();
  }
  const counter = <L extends string>(name: string, help: string, labelNames: readonly L[]): Counter<L> =>
    metric(p + name, () => new Counter<L>({ name: p + name, help, labelNames, registers: [registry] }));
  const histogram = <L extends string>(name: string, help: string, labelNames: readonly L[], buckets: readonly number[]): Histogram<L> =>
    metric(p + name, () => new Histogram<L>({ name: p + name, help, labelNames, buckets: [...buckets], registers: [registry] }));

  const connections = counter('connections_total', 'SMTP connections accepted, by listener.', ['listener']);
  const sessionEnds = counter('connections_closed_total', 'SMTP sessions ended, by listener and how they ended.', ['listener', 'end']);
  const transactions = counter('transactions_total', 'SMTP transactions ended, by listener, outcome and reply class.', ['listener', 'outcome', 'reply_class']);
  const transactionSeconds = histogram('transaction_duration_seconds', 'From MAIL FROM to the final reply, seconds.', ['listener'], BUCKETS.transaction);
  const recipients = counter('recipients_total', 'Recipients given at RCPT TO, by listener and whether they were accepted.', ['listener', 'result']);
  const messageBytes = histogram('message_size_bytes', 'Size of messages handed on (after the milters), bytes.', ['listener'], BUCKETS.size);
  const verdicts = counter('milter_verdicts_total', 'Milter verdicts other than continue, by milter, stage and verdict.', ['milter', 'stage', 'verdict']);
  const milterErrors = counter('milter_errors_total', 'Milter failures and timeouts (the default action was taken), by milter, stage and error code.', ['milter', 'stage', 'code']);
  const milterSeconds = histogram('milter_duration_seconds', 'Time of one milter handler call, by milter and stage, seconds.', ['milter', 'stage'], BUCKETS.milter);
  const deliveries = counter('deliveries_total', 'Recipient delivery results, by transport, status (delivered, deferred, failed) and source (gateway, queue).', ['transport', 'status', 'source']);
  const deliverySeconds = histogram('delivery_duration_seconds', 'Time of one delivery attempt, by transport called and source, seconds.', ['transport', 'source'], BUCKETS.delivery);
  const dnsSeconds = histogram('dns_query_duration_seconds', 'DNS queries of the bundled milters (cache misses), by type and outcome, seconds.', ['rrtype', 'outcome'], BUCKETS.dns);
  const errors = counter('errors_total', 'Events on the error channel, by error code.', ['code']);
  const dsns = counter('dsn_total', 'DSNs queued for senders.', []);

  const gauges: string[] = [];
  const gauge = <L extends string>(name: string, help: string, labelNames: readonly L[], collect?: (g: Gauge<L>) => Promise<void>): Gauge<L> => {
    registry.removeSingleMetric(p + name);
    const g = new Gauge<L>({
      name: p + name,
      help,
      labelNames,
      registers: [registry],
      ...(collect ? { async collect(this: Gauge<L>) { await collect(this); } } : {}),
    });
    gauges.push(p + name);
    return g;
  };
  const active = gauge('connections_active', 'SMTP sessions open now, by listener.', ['listener']);
  /** Sessions counted in `active` (a session that began before enableMetrics is not). */
  const open = new Map<string, string>();

  if (queues.length > 0) {
    // Read from the queues when scraped: nothing to keep in step between scrapes.
    let snapshot: Promise<{ dir: string; entries: Awaited<ReturnType<DeliveryQueue['list']>> }[]> | undefined;
    const read = (): Promise<{ dir: string; entries: Awaited<ReturnType<DeliveryQueue['list']>> }[]> =>
      (snapshot ??= Promise.all(queues.map(async (q) => ({ dir: q.dir, entries: closed ? [] : await q.list().catch(() => []) }))).finally(() => {
        // One list() per queue per scrape, shared by the gauges below.
        setImmediate(() => (snapshot = undefined));
      }));
    gauge('queue_entries', 'Entries in the deferred queue, by queue directory and kind (message, dsn).', ['queue', 'kind'], async (g) => {
      g.reset();
      for (const { dir, entries } of await read()) {
        g.set({ queue: dir, kind: 'message' }, entries.filter((e) => e.kind === 'message').length);
        g.set({ queue: dir, kind: 'dsn' }, entries.filter((e) => e.kind === 'dsn').length);
      }
    });
    gauge('queue_recipients_deferred', 'Recipients still to be delivered by the deferred queue, by queue directory.', ['queue'], async (g) => {
      g.reset();
      for (const { dir, entries } of await read()) {
        let n = 0;
        for (const e of entries) for (const r of e.recipients) if (r.status === 'deferred') n++;
        g.set({ queue: dir }, n);
      }
    });
    gauge('queue_oldest_age_seconds', 'Age of the oldest entry in the deferred queue (0 when empty), by queue directory, seconds.', ['queue'], async (g) => {
      g.reset();
      const now = Date.now();
      for (const { dir, entries } of await read()) {
        const oldest = entries.reduce((min, e) => Math.min(min, e.arrival.getTime()), Infinity);
        g.set({ queue: dir }, oldest === Infinity ? 0 : Math.max(0, (now - oldest) / 1000));
      }
    });
  }

  const subscriptions: [string, (message: unknown) => void][] = [];
  /** A subscriber must never throw (diagnostics_channel would make it an uncaught exception). */
  const on = <T>(name: string, count: (m: T) => void): void => {
    const fn = (m: unknown): void => {
      try {
        count(m as T);
      } catch {
        // A malformed payload is not worth a crash; the metric just does not move.
      }
    };
    diagnostics_channel.subscribe(name, fn);
    subscriptions.push([name, fn]);
  };

  on<ConnectEvent>(Channels.connect, (e) => {
    const listener = e.listener ?? 'dovetail';
    connections.inc({ listener });
    active.inc({ listener });
    open.set(e.sessionId, listener);
  });
  on<CloseEvent>(Channels.close, (e) => {
    const listener = open.get(e.sessionId);
    if (listener !== undefined) {
      open.delete(e.sessionId);
      active.dec({ listener });
    }
    sessionEnds.inc({ listener: e.listener ?? listener ?? 'dovetail', end: e.end ?? 'disconnect' });
  });
  on<TransactionEvent>(Channels.transaction, (e) => {
    transactions.inc({ listener: e.listener, outcome: e.outcome, reply_class: replyClass(e.reply?.code) });
    transactionSeconds.observe({ listener: e.listener }, e.timing.total / 1000);
    for (const r of e.recipients) recipients.inc({ listener: e.listener, result: r.refused ? 'refused' : 'accepted' });
    if (e.size !== undefined && e.results !== undefined) messageBytes.observe({ listener: e.listener }, e.size);
  });
  on<{ milter: string; stage: string; verdict: { type: string } }>(Channels.verdict, (e) => verdicts.inc({ milter: e.milter, stage: e.stage, verdict: e.verdict.type }));
  on<{ milter: string; stage: string; error: unknown }>(Channels.milterError, (e) => milterErrors.inc({ milter: e.milter, stage: e.stage, code: codeLabel(e.error) }));
  on<MilterCallEvent>(Channels.milterCall, (e) => milterSeconds.observe({ milter: e.milter, stage: e.stage }, e.durationMs / 1000));
  on<DeliveryEvent>(Channels.delivery, (e) => {
    deliverySeconds.observe({ transport: e.transport, source: e.source }, e.durationMs / 1000);
    for (const r of e.results) deliveries.inc({ transport: r.transport, status: r.status, source: e.source });
  });
  on<DnsEvent>(Channels.dns, (e) => dnsSeconds.observe({ rrtype: e.rrtype, outcome: e.outcome }, e.durationMs / 1000));
  on<{ error: unknown }>(Channels.error, (e) => errors.inc({ code: codeLabel(e.error) }));
  on<unknown>(QueueChannels.dsn, () => dsns.inc());

  return {
    registry,
    close() {
      if (closed) return;
      closed = true;
      for (const [name, fn] of subscriptions) diagnostics_channel.unsubscribe(name, fn);
      subscriptions.length = 0;
      for (const name of gauges) registry.removeSingleMetric(name);
      open.clear();
    },
  };
}
