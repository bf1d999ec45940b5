/**
 * Logs and metrics for operators, built on the diagnostics channels (lib/diagnostics.ts and
 * QueueChannels). Off in the library unless asked for; the CLI turns both on.
 *
 * - enableLogging() (./logging.ts): pino lines per connection, transaction and delivery attempt;
 * - enableMetrics() (./metrics.ts): prom-client counters, histograms and queue gauges;
 * - serveMetrics() (./server.ts): GET /metrics on node:http.
 */
export { enableLogging, type Logging, type LoggingOptions } from './logging.js';
export { enableMetrics, type Metrics, type MetricsOptions } from './metrics.js';
export { serveMetrics, type MetricsServer, type MetricsServerOptions } from './server.js';
