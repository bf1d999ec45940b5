/**
 * Logs and metrics for operators, built on the diagnostics channels (lib/diagnostics.ts and
 * QueueChannels). Off in the library unless asked for; the CLI turns both on.
 *
 * INTERFACE STUB: the logging/metrics work fills these in; the CLI calls them as declared.
 */
import type { Server } from 'node:http';
import pino, { type Logger } from 'pino';
import { Registry } from 'prom-client';
import type { DeliveryQueue } from '../delivery/queue.js';

export interface LoggingOptions {
  /** A pino logger to write to. Default: a new one at `level` writing to `destination`. */
  readonly logger?: Logger;
  /** pino level. Default `info`. */
  readonly level?: string;
  /** A file path or file descriptor. Default 1 (stdout). */
  readonly destination?: string | number;
}

export interface Logging {
  readonly logger: Logger;
  /** Unsubscribes from every channel (and flushes a logger it made). */
  close(): void;
}

/** Subscribes a pino logger to the diagnostics channels: one line per connection, transaction and delivery attempt. */
export function enableLogging(options: LoggingOptions = {}): Logging {
  const logger = options.logger ?? pino({ level: options.level ?? 'info' }, pino.destination(options.destination ?? 1));
  return { logger, close() {} };
}

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
  close(): void;
}

/** Counts what the diagnostics channels report into prom-client counters and histograms. */
export function enableMetrics(options: MetricsOptions = {}): Metrics {
  const registry = options.registry ?? new Registry();
  return { registry, close() {} };
}

export interface MetricsServerOptions {
  readonly registry: Registry;
  /** Default 127.0.0.1. */
  readonly host?: string;
  readonly port: number;
}

export interface MetricsServer {
  readonly server: Server;
  readonly port: number;
  close(): Promise<void>;
}

/** Serves `registry` as Prometheus text at GET /metrics. */
export async function serveMetrics(options: MetricsServerOptions): Promise<MetricsServer> {
  void options;
  throw new Error('serveMetrics: not implemented yet');
}
