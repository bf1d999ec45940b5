/**
 * dovetail: build mail gateways the way Postfix and Dovecot are built.
 *
 * The public entry point. See docs/architecture.md for how the parts fit and
 * docs/writing-a-milter.md for the Milter interface.
 */
export { createGateway } from './smtp/gateway.js';
export { memoryAnvil } from './smtp/anvil.js';
export type { Anvil, AnvilRefusal, AnvilConnectResult, ClientLimitOptions } from './smtp/anvil.js';
// Shared state in Redis (the caller builds the ioredis client; ioredis is only a type here).
export { redisAnvil } from './store/redis-anvil.js';
export type { RedisAnvilOptions } from './store/redis-anvil.js';
export { clientNetwork, DEFAULT_STORE_TIMEOUT } from './store/redis.js';
export type { RedisClient, RedisStoreOptions, StoreErrorPolicy } from './store/redis.js';
export { ProxyHeaderDecoder, ProxyProtocolError, encodeProxyHeader } from './smtp/proxy.js';
export type { ProxyHeader, ProxyEndpoint, ProxyTls, ProxyDecodeResult } from './smtp/proxy.js';
export { handoff, summarize, mixed, isOutbound } from './handoff/handoff.js';
export type { HandoffConfig, HandoffOutcome } from './handoff/handoff.js';
export type { Gateway, GatewayOptions, ListenOptions, AuthRequest, CloseOptions } from './smtp/gateway.js';

export { defineMilter, validateMilter } from './milter/define.js';
export type {
  Milter,
  MilterTimeouts,
  DefaultAction,
  SessionContext,
  MessageContext,
  ContentContext,
  EomContext,
  MessageEditor,
  EnvelopeEditor,
  Envelope,
  EnvelopeAddress,
  HeaderField,
  ClientInfo,
  ServerInfo,
  TlsInfo,
  AuthInfo,
  AddressFamily,
  Score,
  ScoreEntry,
} from './milter/types.js';

export {
  accept,
  continue_,
  discard,
  quarantine,
  reject,
  skip,
  tempfail,
  smtpReply,
  formatReply,
  DEFAULT_REJECT_REPLY,
  DEFAULT_TEMPFAIL_REPLY,
} from './milter/verdict.js';
export type {
  Verdict,
  SessionVerdict,
  MessageVerdict,
  BodyVerdict,
  EomVerdict,
  SmtpReply,
  Continue,
  Accept,
  Reject,
  Tempfail,
  Discard,
  Quarantine,
  Skip,
} from './milter/verdict.js';

export { STAGES } from './milter/stages.js';
export type { Stage } from './milter/stages.js';
export { MilterChain, DEFAULT_COMMAND_TIMEOUT, DEFAULT_CONTENT_TIMEOUT, BODY_CHUNK_SIZE } from './milter/chain.js';
export type { StageOutcome, SessionFacts, ChainOptions } from './milter/chain.js';
export type { MessageEdit } from './milter/message.js';

export { maildir, defaultMailbox } from './delivery/maildir.js';
export type { MaildirOptions } from './delivery/maildir.js';
export type { Transport, DeliveryEnvelope, MessageSource, RecipientResult, DeliveryStatus, DeferredQueue } from './delivery/types.js';

export { DovetailError, ErrorCodes, isDovetailError } from './errors.js';

// SASL against a Dovecot auth service (Postfix's smtpd_sasl_type = dovecot).
export { dovecotAuth, DEFAULT_DOVECOT_AUTH_TIMEOUT } from './auth/dovecot.js';
export type { DovecotAuthOptions, DovecotAuthenticator } from './auth/dovecot.js';
export type { ErrorCode } from './errors.js';
export { Channels } from './diagnostics.js';
export type {
  ClientFacts, ConnectEvent, CloseEvent, SessionEnd, MilterDecision, TransactionRecipient, TransactionResult, TransactionOutcome,
  TransactionEvent, DeliveryRecipientResult, DeliveryEvent, MilterCallEvent, DnsEvent,
} from './diagnostics.js';
export type { SpoolOptions } from './message/spool.js';

// The Sendmail milter protocol, both sides.
export { connectMilter, POSTFIX_DEFAULT_MACROS, parseReplyCode, DEFAULT_CONNECT_TIMEOUT, DEFAULT_MILTER_COMMAND_TIMEOUT, DEFAULT_MILTER_CONTENT_TIMEOUT } from './milter/protocol/client.js';
export type { ConnectMilterOptions, MacroStageName } from './milter/protocol/client.js';
export { serveMilter } from './milter/protocol/server.js';
export type { MilterServer, ServeMilterOptions, MilterAction } from './milter/protocol/server.js';
export { parseSocketSpec } from './milter/protocol/socket.js';
export type { SocketSpec } from './milter/protocol/socket.js';
export { MilterProtocolError, isMilterProtocolError } from './milter/protocol/error.js';

// Delivery over LMTP, the embedded LMTP store, and the durable deferred queue.
export { lmtp, DEFAULT_LMTP_TIMEOUTS } from './delivery/lmtp.js';
export type { LmtpOptions, LmtpTimeouts, LmtpTlsOptions, LmtpTransport, LmtpPoolStats } from './delivery/lmtp.js';
export { smtp, DEFAULT_SMTP_TIMEOUTS } from './delivery/smtp.js';
export type { SmtpOptions, SmtpTimeouts, SmtpTlsOptions, SmtpTransport } from './delivery/smtp.js';
export { routes } from './delivery/routes.js';
export { canonicalDomain, domainSet } from './delivery/domains.js';
export { networkList } from './networks.js';
export type { RouteTable, RoutingTransport } from './delivery/routes.js';
export { parseRelayhost, resolveNextHop } from './delivery/nexthop.js';
export type { MxResolver, NextHop, NextHopHost, Destination } from './delivery/nexthop.js';
export type { TlsLevel, PoolStats } from './delivery/client.js';
export { createLmtpServer } from './delivery/lmtp-server.js';
export type { LmtpServerOptions, LmtpServer } from './delivery/lmtp-server.js';
export { createQueue, QueueChannels, queueLockHolder } from './delivery/queue.js';
export type { QueueOptions, DeliveryQueue, QueueEntry, QueuedRecipient } from './delivery/queue.js';
export { buildDsn, notifyOf, retOf, xtextDecode } from './delivery/dsn.js';
export type { DsnInput, DsnRecipient, DsnAction, Notify } from './delivery/dsn.js';

// A worker per core (node:cluster): the primary delivers, the workers serve SMTP.
export { startWorkerPool, workerChannel } from './cluster.js';
export type { WorkerPool, WorkerPoolOptions, WorkerPoolEvent, WorkerChannel } from './cluster.js';

// Logs (pino) and metrics (prom-client) from the diagnostics channels: off unless enabled.
export { enableLogging, enableMetrics, serveMetrics } from './observe/index.js';
export type { Logging, LoggingOptions, Metrics, MetricsOptions, MetricsServer, MetricsServerOptions } from './observe/index.js';

// The config file of the `dovetail` CLI (docs/configuration.md): defineConfig() and its types.
export { defineConfig } from './cli/schema.js';
export type {
  DovetailConfig,
  ListenerConfig,
  MilterConfig,
  BundledMilterConfig,
  RemoteMilterConfig,
  ModuleMilterConfig,
  RouteConfig,
  DeliveryConfig,
  QueueConfig,
  LimitsConfig,
  AuthenticateConfig,
} from './cli/schema.js';
export type { GatewayReconfiguration } from './smtp/options.js';
