/**
 * The LMTP transport: hands a message to a mailstore (Dovecot, Cyrus, our own
 * createLmtpServer, …) over LMTP (RFC 2033) on TCP or a unix socket, and keeps the
 * mailstore's one reply per accepted recipient exactly (code, enhanced code, every line).
 * The protocol engine and the connection pool are the SMTP client's (./client.ts); this
 * module names the one server and checks the options.
 *
 * It deliberately does not: retry or queue (that is the gateway's DeferredQueue), fall back
 * to a second mailstore, speak AUTH, or downgrade a message with non-ASCII envelope
 * addresses for a mailstore that lacks SMTPUTF8 (it fails it, 5.6.7, as Postfix does; an
 * ASCII envelope just goes without the parameter).
 */
import os from 'node:os';
import { DovetailError, ErrorCodes } from '../errors.js';
import type { EnvelopeAddress } from '../milter/types.js';
import type { SmtpReply } from '../milter/verdict.js';
import { createClientPool, DEFAULT_CLIENT_TIMEOUTS, type ClientTimeouts, type PoolStats } from './client.js';
import type { DeliveryEnvelope, MessageSource, RecipientResult, Transport } from './types.js';
import { checkInteger, checkTimeouts } from './options.js';

/** Time limits per protocol phase, in ms (Postfix's lmtp_*_timeout defaults). */
export interface LmtpTimeouts extends Omit<ClientTimeouts, 'hello'> {
  /** The LHLO reply. Default 300 000 (lmtp_lhlo_timeout). */
  readonly lhlo: number;
  /** The whole of one verifyRecipient() (waiting for a connection included). Default 10 000. */
  readonly verify: number;
}

const { hello: defaultHello, ...rest } = DEFAULT_CLIENT_TIMEOUTS;
export const DEFAULT_LMTP_TIMEOUTS: LmtpTimeouts = Object.freeze({ ...rest, lhlo: defaultHello, verify: 10_000 });

/** STARTTLS settings: given, STARTTLS is required (a mailstore that does not offer it defers the mail). */
export interface LmtpTlsOptions {
  /** Check the mailstore's certificate. Default true. */
  readonly rejectUnauthorized?: boolean;
  /** Trusted CA certificate(s), PEM. Default: Node's bundled roots. */
  readonly ca?: string | Buffer | readonly (string | Buffer)[];
  /** Name to check the certificate against (and SNI). Default: `host` when it is a name, not an IP. */
  readonly servername?: string;
}

export interface LmtpOptions {
  /** TCP host. Default 127.0.0.1 (ignored with `path`). */
  readonly host?: string;
  /** TCP port. Default 24 (the LMTP port). */
  readonly port?: number;
  /** Unix socket path; when given, host and port are not used. */
  readonly path?: string;
  /** Our name in LHLO. Default os.hostname(). */
  readonly lhloName?: string;
  /** Connections open at once (busy + idle). Default 4. */
  readonly maxConnections?: number;
  /** Close a pooled connection idle this long, ms. Default 30 000. */
  readonly idleTimeout?: number;
  /** Probe (NOOP) a pooled connection idle longer than this before reusing it, ms. Default 5 000. */
  readonly probeAfter?: number;
  /** Transactions per connection before it is closed (Postfix lmtp_connection_reuse_count_limit). Default 1000. */
  readonly maxTransactions?: number;
  /** Use PIPELINING when the mailstore offers it. Default true. */
  readonly pipelining?: boolean;
  /** Require STARTTLS with these settings. Default: plain text. */
  readonly tls?: LmtpTlsOptions;
  /** Per-phase time limits, ms; those not given keep {@link DEFAULT_LMTP_TIMEOUTS}. */
  readonly timeouts?: Partial<LmtpTimeouts>;
}

/** Pool counters, for tests and metrics. */
export type LmtpPoolStats = PoolStats;

/** The lmtp() transport: a Transport with verifyRecipient, plus pool statistics. */
export interface LmtpTransport extends Transport {
  verifyRecipient(envelope: { readonly queueId: string; readonly sender: EnvelopeAddress }, recipient: EnvelopeAddress): Promise<SmtpReply | undefined>;
  /** Pool counters, for tests and metrics. */
  stats(): LmtpPoolStats;
  close(): Promise<void>;
}

/**
 * Creates the LMTP transport. See docs/delivery.md for every option and the reply mapping.
 *
 * @throws DovetailError `DOVETAIL_ERR_INVALID_OPTIONS` when the options are malformed.
 */
export function lmtp(options: LmtpOptions): LmtpTransport {
  const bad = (why: string): never => {
    throw new DovetailError(ErrorCodes.INVALID_OPTIONS, `lmtp(): ${why}`);
  };
  if (typeof options !== 'object' || options === null) throw new DovetailError(ErrorCodes.INVALID_OPTIONS, 'lmtp() needs an options object');
  if (options.path !== undefined && (typeof options.path !== 'string' || options.path === '')) bad('path must be a non-empty string');
  checkInteger(bad, 'port', options.port, 1, 65535);
  checkInteger(bad, 'maxConnections', options.maxConnections, 1);
  checkInteger(bad, 'idleTimeout', options.idleTimeout, 1);
  checkInteger(bad, 'probeAfter', options.probeAfter, 0);
  checkInteger(bad, 'maxTransactions', options.maxTransactions, 1);
  checkTimeouts(bad, options.timeouts, DEFAULT_LMTP_TIMEOUTS);
  const lhloName = options.lhloName ?? os.hostname();
  if (!/^[\x21-\x7e]+$/.test(lhloName)) bad('lhloName must be printable ASCII without spaces');
  const host = options.host ?? '127.0.0.1';
  const port = options.port ?? 24;
  const where = options.path !== undefined ? `unix:${options.path}` : `${host}:${port}`;
  const T: LmtpTimeouts = { ...DEFAULT_LMTP_TIMEOUTS, ...options.timeouts };
  const { lhlo: hello, verify, ...common } = T;
  const tls = options.tls;
  const pool = createClientPool({
    protocol: 'lmtp',
    endpoint: options.path !== undefined ? { path: options.path } : { host, port },
    label: `LMTP ${where.length > 120 ? '…' + where.slice(-119) : where}`,
    heloName: lhloName,
    maxConnections: options.maxConnections ?? 4,
    idleTimeout: options.idleTimeout ?? 30_000,
    probeAfter: options.probeAfter ?? 5_000,
    maxTransactions: options.maxTransactions ?? 1000,
    pipelining: options.pipelining ?? true,
    tls: tls
      ? {
          level: tls.rejectUnauthorized === false ? 'encrypt' : 'verify',
          ...(tls.ca !== undefined ? { ca: tls.ca } : {}),
          ...(tls.servername !== undefined ? { servername: tls.servername } : {}),
        }
      : { level: 'none' },
    auth: undefined,
    timeouts: { ...common, hello },
  });

  return Object.freeze({
    name: 'lmtp',
    async deliver(envelope: DeliveryEnvelope, message: MessageSource): Promise<RecipientResult[]> {
      const got = await pool.attempt(envelope, message);
      // For logs: which mailstore answered (only when it was reached).
      return got.reached ? got.results.map((r) => ({ ...r, relay: where })) : got.results;
    },
    verifyRecipient: (envelope: { readonly queueId: string; readonly sender: EnvelopeAddress }, recipient: EnvelopeAddress) => pool.verifyRecipient(envelope, recipient, verify),
    close: () => pool.close(),
    stats: () => pool.stats(),
  });
}
