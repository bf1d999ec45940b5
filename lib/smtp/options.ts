/**
 * The gateway's options (what createGateway takes and what it returns), and the checks that
 * make a typo fail at start-up with the field named, not at the first DATA.
 */
import { DovetailError, ErrorCodes } from '../errors.js';
import type { Milter, MilterTimeouts } from '../milter/types.js';
import type { DeferredQueue, Transport } from '../delivery/types.js';
import type { SpoolOptions } from '../message/spool.js';
import { mayRouteOutbound } from '../handoff/handoff.js';
import type { AuthRequest } from '../auth/types.js';
import type { Anvil, ClientLimitOptions } from './anvil.js';
import { networkList } from '../networks.js';

export type { AuthRequest } from '../auth/types.js';

/**
 * One listening socket, and its profile (a master.cf line): port 25 for MTAs, submission
 * (587, STARTTLS then AUTH) and implicit TLS (465) for users, each with its own chain.
 */
export interface ListenOptions {
  /** Default 127.0.0.1. */
  readonly host?: string;
  /** 0 picks a free port (see {@link Gateway.addresses}). */
  readonly port: number;
  /** The listener's name: macro `{daemon_name}` and `ctx.server.name`. Default `'dovetail'`. */
  readonly name?: string;
  /**
   * TLS on this listener: `'starttls'` (offered after EHLO; the default when the gateway has
   * `tls`), `'implicit'` (TLS from the first byte, RFC 8314 — port 465), `'none'` (never;
   * AUTH is then never offered here unless allowInsecureAuth). Needs the gateway's `tls`.
   */
  readonly tls?: 'starttls' | 'implicit' | 'none';
  /**
   * A submission listener (RFC 6409): MAIL before AUTH gets `530 5.7.0 Authentication
   * required`, and AUTH needs TLS first (STARTTLS or implicit). Needs `authenticate`.
   * Authenticated users may relay (relayControl's permitAuthenticated).
   */
  readonly submission?: boolean;
  /**
   * Offer AUTH on this listener (when the gateway has `authenticate`). Default true; false
   * is Postfix's `-o smtpd_sasl_auth_enable=no` (port 25 of a server whose users submit on 587).
   */
  readonly auth?: boolean;
  /** This listener's milter chain (Postfix's `-o smtpd_milters=` in master.cf). Default: the gateway's `milters`. */
  readonly milters?: readonly Milter[];
  /**
   * The PROXY protocol (v1 and v2, HAProxy's `send-proxy` / `send-proxy-v2[-ssl]`) from a
   * load balancer in front of this listener (Postfix: smtpd_upstream_proxy_protocol =
   * haproxy). A peer in `trusted` (addresses or CIDR blocks, as `mynetworks`) must start
   * with a valid header within `timeout` ms (default 10 000), else the connection is
   * closed; the client it names is the client everywhere (milters' `ctx.client`, macros,
   * Received, anvil limits, diagnostics), and TLS between it and the proxy (v2 SSL TLVs)
   * is `ctx.tls` and counts as encrypted for AUTH (a submission listener behind a
   * TLS-terminating HAProxy needs no `tls` of its own). A peer not in `trusted` is an ordinary client; if it sends a PROXY
   * header it is refused and disconnected. See docs/deployment.md.
   */
  readonly proxyProtocol?: { readonly trusted: readonly string[]; readonly timeout?: number };
  /**
   * XCLIENT (Postfix's XCLIENT_README) from a front MTA in `trusted` (Postfix:
   * smtpd_authorized_xclient_hosts): NAME, ADDR, PORT and HELO replace the client's, the
   * session starts over for the milters (their close, then connect with the new client),
   * and the forwarded HELO stays the HELO name of the session. Anyone else gets
   * `550 5.7.0 Error: insufficient authorization`.
   */
  readonly xclient?: { readonly trusted: readonly string[] };
  /**
   * XFORWARD (Postfix's XFORWARD_README, smtp_send_xforward_command) from a peer in
   * `trusted` (smtpd_authorized_xforward_hosts): ADDR, NAME, PORT, HELO replace the
   * client's for the next transaction (the milters see a new session, as for XCLIENT).
   * Unlike Postfix, which resets them after each transaction, they stay until the next
   * XFORWARD on the connection (smtp-server keeps them): a front that forwards some
   * transactions and not others should not reuse the connection for both.
   * Anyone else gets `550 5.7.0 Error: insufficient authorization`.
   */
  readonly xforward?: { readonly trusted: readonly string[] };
}

export interface GatewayOptions {
  /** Our host name: the greeting, the Received header, macro `j`. Default os.hostname(). */
  readonly hostname?: string;
  /** Where to listen. Default 127.0.0.1:2525. */
  readonly listen?: ListenOptions | readonly ListenOptions[];
  /** The milter chain, in order. */
  readonly milters?: readonly Milter[];
  /**
   * Where accepted messages go: a mailstore transport (lmtp(), maildir()), or routes({ … })
   * to route each recipient by domain. Recipients routed to an outbound transport (smtp())
   * are written to `queue` before the client is answered; every other recipient is
   * delivered before the client is answered.
   */
  readonly delivery: Transport;
  /** Where quarantined messages go. Default: maildir({ root: 'var/quarantine' }). */
  readonly quarantine?: Transport;
  /**
   * Where a message goes when its recipients did not all end alike (some delivered, some
   * deferred or failed), and where recipients routed to an outbound transport go: the
   * client is then told 250 once the queue has it on disk. Required when `delivery` can
   * route outbound. Without a queue, mixed results are answered with the worst reply, so
   * the client retries (duplicates for those already delivered, never a loss).
   */
  readonly queue?: DeferredQueue;
  /** Ask the delivery transport about each recipient at RCPT (when it can: Transport.verifyRecipient). Default false. */
  readonly verifyRecipients?: boolean;
  /** Key and certificate (PEM) to offer STARTTLS. Without them STARTTLS is not offered. */
  readonly tls?: { readonly key: string | Buffer; readonly cert: string | Buffer };
  /** SMTP AUTH: return true to accept the credentials. Without it AUTH is not offered. */
  readonly authenticate?: (request: AuthRequest) => Promise<boolean>;
  /**
   * Offer and accept AUTH on connections without TLS. Default false: without TLS, EHLO
   * does not advertise AUTH and an AUTH command gets `538 5.7.11` (RFC 4954 section 6),
   * whether or not STARTTLS is offered (Postfix: smtpd_tls_auth_only = yes).
   */
  readonly allowInsecureAuth?: boolean;
  /**
   * Delay before answering a failed AUTH, ms; it grows with each failure on the connection
   * (n × delay). Default 1000 (Postfix: smtpd_error_sleep_time; Dovecot: auth_failure_delay).
   */
  readonly authFailureDelay?: number;
  /**
   * Failed AUTH attempts allowed on one connection; the last one is answered
   * `421 4.7.0` and the connection is closed. Default 5 (Postfix counts them in
   * smtpd_hard_error_limit).
   */
  readonly maxAuthFailures?: number;
  /**
   * The SIZE limit in bytes, advertised in EHLO, checked against MAIL FROM's SIZE=, and
   * enforced while DATA streams. Default 50 MiB; a milter's `limits.maxMessageBytes`
   * (sizeLimit) lowers it.
   */
  readonly maxMessageBytes?: number;
  /** The largest header block (with its empty line): larger gets 552 5.3.4. Default 102 400 (Postfix header_size_limit). */
  readonly maxHeaderBytes?: number;
  /**
   * The longest line (without CRLF) in a message: longer gets `554 5.6.0` at the end of DATA
   * (Postfix splits such lines at line_length_limit instead; we refuse rather than change the
   * message). Default 102 400.
   */
  readonly maxLineBytes?: number;
  /**
   * A message with more `Received:` headers than this is refused with `554 5.4.6` (a mail
   * loop; Postfix: hopcount_limit). Default 50.
   */
  readonly maxHops?: number;
  /**
   * Edits one milter may make at one end of message (headers, recipients, body). Past it,
   * or past maxHeaderBytes / the size limit / maxRecipients through its edits, the milter
   * fails (its default action: 451 by default). Default 1000.
   */
  readonly maxMilterEdits?: number;
  /** Recipients per message (Postfix: smtpd_recipient_limit). Default 1000. */
  readonly maxRecipients?: number;
  /**
   * Per-client limits (Postfix anvil): concurrent connections per client address (default
   * 50, smtpd_client_connection_count_limit), new connections per time unit (default off,
   * smtpd_client_connection_rate_limit), exemptions. Over a limit the client is greeted
   * `421 4.7.0 <hostname> Error: too many connections from <addr>` and disconnected.
   * `false` turns them off.
   */
  readonly clientLimits?: ClientLimitOptions | false;
  /** Where the per-client counters live: this process by default; a shared store (Redis) for several workers. */
  readonly anvil?: Anvil;
  /**
   * Errors (4xx/5xx replies) one session may collect: past `soft` each next command is
   * answered only after (errors − soft) × `sleep` ms; at `hard` the client gets
   * `421 4.7.0 <hostname> Error: too many errors` and is disconnected. Default soft 10,
   * hard 20, sleep 1000 (Postfix smtpd_soft_error_limit, smtpd_hard_error_limit,
   * smtpd_error_sleep_time).
   */
  readonly errorLimits?: { readonly soft?: number; readonly hard?: number; readonly sleep?: number };
  /** Concurrent connections per listener. Default 1000. */
  readonly maxClients?: number;
  /** Bare CR or LF in DATA: refuse the message (default) or rewrite to CRLF. */
  readonly bareLineEndings?: 'reject' | 'normalize';
  /** RAM threshold and directory of the DATA spool. */
  readonly spool?: SpoolOptions;
  /** Look up the client's host name in DNS (PTR). Default true. */
  readonly resolveClientNames?: boolean;
  /** Timeouts for milters that set none (Postfix: milter_command_timeout / milter_content_timeout). */
  readonly milterTimeouts?: MilterTimeouts;
  /** Idle time before a client is disconnected, ms. Default 300 000 (Postfix smtpd_timeout). */
  readonly socketTimeout?: number;
  /** How long close() lets transactions in flight finish before cutting them off, ms. Default 30 000. */
  readonly closeTimeout?: number;
  /** Text after `ESMTP` in the greeting. */
  readonly banner?: string;
}

/** Options of {@link Gateway.close}. */
export interface CloseOptions {
  /** Wait this long (ms) for the connected clients to end their sessions before the usual close. Default 0. */
  readonly sessions?: number;
}

/** A running gateway. */
export interface Gateway {
  /** Starts listening; resolves with the bound addresses. */
  listen(): Promise<readonly { host: string; port: number }[]>;
  /**
   * Stops accepting, lets transactions in flight finish, says 421 to idle clients, then
   * resolves. With `sessions`, it first lets every connected client end its session on its
   * own (QUIT, or its idle timeout), up to that many ms, serving it normally meanwhile,
   * connections still arriving included: how a worker leaves a pool whose other workers
   * take the new connections (a rolling restart), so no client sees a 421.
   */
  close(options?: CloseOptions): Promise<void>;
  /** The bound addresses (after listen()). */
  readonly addresses: readonly { host: string; port: number }[];
  /**
   * Replaces what new connections get, without a restart (the CLI calls it on SIGHUP):
   * connections open at the time keep the milter chain (and size limit) they started with
   * until they close, and a TLS session already established keeps its certificate; a
   * STARTTLS or AUTH after the call uses the new certificate or authenticate. Checked like createGateway's options (throws
   * `DOVETAIL_ERR_INVALID_OPTIONS` and changes nothing when a part is malformed). What is
   * not here (listen addresses, delivery, queue, limits) needs a new gateway.
   */
  reconfigure(changes: GatewayReconfiguration): void;
}

/** What {@link Gateway.reconfigure} can replace; a field left out stays as it is. */
export interface GatewayReconfiguration {
  /** The gateway's milter chain (for listeners without their own). */
  readonly milters?: readonly Milter[];
  /**
   * Per listener, in the order of `listen`: its own chain, or `undefined` for the gateway's.
   * Must have one entry per listener when given.
   */
  readonly listeners?: readonly { readonly milters?: readonly Milter[] | undefined }[];
  /** New key and certificate (PEM); the gateway must have been created with `tls`. */
  readonly tls?: { readonly key: string | Buffer; readonly cert: string | Buffer };
  /** A new AUTH check; the gateway must have been created with `authenticate`. */
  readonly authenticate?: (request: AuthRequest) => Promise<boolean>;
}

/** Checks the options up front, so a typo fails at start-up and not at the first DATA. */
export function validateOptions(options: GatewayOptions, listen: readonly ListenOptions[]): void {
  const bad = (why: string): never => {
    throw new DovetailError(ErrorCodes.INVALID_OPTIONS, why);
  };
  if (!options || typeof options.delivery?.deliver !== 'function') bad('createGateway needs a delivery transport');
  if (options.quarantine !== undefined && typeof options.quarantine.deliver !== 'function') bad('quarantine must be a transport');
  const positive = (name: string, v: unknown, min = 1, max = Number.MAX_SAFE_INTEGER): void => {
    if (v !== undefined && !(typeof v === 'number' && Number.isSafeInteger(v) && v >= min && v <= max)) {
      bad(`${name} must be an integer from ${min} to ${max}`);
    }
  };
  positive('maxMessageBytes', options.maxMessageBytes);
  positive('maxHeaderBytes', options.maxHeaderBytes);
  positive('maxLineBytes', options.maxLineBytes);
  positive('maxRecipients', options.maxRecipients);
  positive('maxHops', options.maxHops);
  positive('maxMilterEdits', options.maxMilterEdits);
  if (options.delivery && mayRouteOutbound(options.delivery) && !options.queue) {
    bad(`delivery ${options.delivery.name} routes recipients to an outbound transport: createGateway needs a queue (createQueue({ dir, transport }))`);
  }
  positive('maxClients', options.maxClients);
  positive('errorLimits.soft', options.errorLimits?.soft, 1);
  positive('errorLimits.hard', options.errorLimits?.hard, 1);
  positive('errorLimits.sleep', options.errorLimits?.sleep, 0);
  if ((options.errorLimits?.hard ?? 20) < (options.errorLimits?.soft ?? 10)) bad('errorLimits.hard must not be below errorLimits.soft');
  if (options.anvil !== undefined && typeof options.anvil.connect !== 'function') bad('anvil must have connect()');
  positive('socketTimeout', options.socketTimeout);
  positive('closeTimeout', options.closeTimeout, 0);
  positive('authFailureDelay', options.authFailureDelay, 0);
  positive('maxAuthFailures', options.maxAuthFailures);
  positive('spool.memoryThreshold', options.spool?.memoryThreshold, 0);
  positive('spool.memoryBudget', options.spool?.memoryBudget, 0);
  positive('milterTimeouts.command', options.milterTimeouts?.command);
  positive('milterTimeouts.content', options.milterTimeouts?.content);
  if (options.bareLineEndings !== undefined && options.bareLineEndings !== 'reject' && options.bareLineEndings !== 'normalize') {
    bad("bareLineEndings must be 'reject' or 'normalize'");
  }
  if (listen.length === 0) bad('listen needs at least one address');
  for (const l of listen) {
    if (l.port === undefined) bad('listen needs a port');
    positive('listen port', l.port, 0, 65535);
    const where = `listen ${l.host ?? '127.0.0.1'}:${l.port}`;
    if (l.tls !== undefined && l.tls !== 'starttls' && l.tls !== 'implicit' && l.tls !== 'none') bad(`${where}: tls must be 'starttls', 'implicit' or 'none'`);
    if ((l.tls === 'implicit' || l.tls === 'starttls') && !options.tls) bad(`${where}: tls '${l.tls}' needs the gateway's tls key and cert`);
    if (l.name !== undefined && !/^[\x21-\x7e]{1,64}$/.test(l.name)) bad(`${where}: name must be 1-64 printable ASCII characters`);
    if (l.milters !== undefined && !Array.isArray(l.milters)) bad(`${where}: milters must be an array`);
    for (const key of ['proxyProtocol', 'xclient', 'xforward'] as const) {
      const t = l[key];
      if (t === undefined) continue;
      if (!t || !Array.isArray(t.trusted)) bad(`${where}: ${key}.trusted must be a list of addresses or networks`);
      try {
        networkList(t.trusted);
      } catch (err) {
        bad(`${where}: ${key}.trusted: ${(err as Error).message}`);
      }
    }
    positive(`${where}: proxyProtocol.timeout`, l.proxyProtocol?.timeout);
    if (l.submission) {
      if (!options.authenticate || l.auth === false) bad(`${where}: a submission listener needs authenticate (and auth not false)`);
      const encrypted = l.tls === 'implicit' || (l.tls !== 'none' && !!options.tls);
      // Behind a TLS-terminating proxy (PROXY v2 SSL TLVs) AUTH is offered to the clients it says used TLS.
      if (!encrypted && !options.allowInsecureAuth && !l.proxyProtocol) bad(`${where}: a submission listener needs TLS (the gateway's tls, and tls 'starttls' or 'implicit') so that AUTH can be offered`);
    }
  }
  if (options.tls && (!options.tls.key || !options.tls.cert)) bad('tls needs both key and cert');
}
