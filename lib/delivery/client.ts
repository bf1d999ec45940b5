/**
 * The SMTP/LMTP client engine: one protocol implementation behind both lmtp() (hand-off to
 * a mailstore) and smtp() (delivery to the next hop), as Postfix's smtp(8) and lmtp(8) are
 * one program. They differ in the greeting command (LHLO / EHLO, with HELO as the SMTP
 * fallback) and in the replies after the final dot (LMTP: one per accepted recipient,
 * RFC 2033 4.2; SMTP: one for the whole transaction, which stands for every accepted
 * recipient).
 *
 * Implements: RFC 5321 (the client side: greeting, EHLO/HELO, MAIL, RCPT, DATA, RSET, NOOP,
 * QUIT; 4.5.2 dot-stuffing), RFC 2033 (LMTP), RFC 2920 (PIPELINING: MAIL, every RCPT and
 * DATA in one write), RFC 3207 (STARTTLS, with Postfix's smtp_tls_security_level policies
 * none / may / encrypt / verify), RFC 4954 (AUTH PLAIN and LOGIN, never before TLS),
 * RFC 1870 (SIZE), RFC 6152 (8BITMIME), RFC 6531 (SMTPUTF8), RFC 3461 (DSN parameters
 * NOTIFY, ORCPT, RET, ENVID carried on when the server offers DSN), RFC 2034/3463 (enhanced
 * status codes). Timeouts per phase follow Postfix's smtp_*_timeout / lmtp_*_timeout.
 *
 * One {@link ClientPool} talks to one server address. It keeps connections between
 * messages (maxConnections, maxTransactions, idleTimeout). A connection goes back to the
 * pool only in a known state: after a transaction whose every reply was read, or after an
 * RSET answered 250; every other connection (a timeout, a protocol error, an unsolicited
 * reply, a reply we could not read) is closed, never reused. An idle pooled connection is
 * dropped as soon as its socket closes or says anything, and is probed with NOOP before
 * reuse when it sat idle longer than `probeAfter`. A reused connection that turns out dead
 * before the server accepted anything is replaced once by a fresh one.
 *
 * Lossless by construction: a recipient is `delivered` only on a 2xx final reply read for
 * it; a connection that dies or times out before a recipient's final reply leaves that
 * recipient `deferred` (451 4.4.2), never delivered.
 *
 * It deliberately does not: pick the server (lmtp() has one; smtp() resolves MX and walks
 * the list, trying the next address when {@link Attempt.reached} is false), retry or queue
 * (the gateway's DeferredQueue does), downgrade 8-bit or UTF-8 mail for a server that lacks
 * 8BITMIME or SMTPUTF8 (it fails it, 5.6.3 / 5.6.7, RFC 6152 3 and RFC 6531 3.2), or speak
 * AUTH mechanisms other than PLAIN and LOGIN.
 */
import net from 'node:net';
import tls from 'node:tls';
import type { Readable } from 'node:stream';
import { channels } from '../diagnostics.js';
import { DovetailError, ErrorCodes } from '../errors.js';
import type { EnvelopeAddress } from '../milter/types.js';
import { MAX_REPLY_LINE_LENGTH, MAX_REPLY_LINES, smtpReply, type SmtpReply } from '../milter/verdict.js';
import type { DeliveryEnvelope, DeliveryStatus, MessageSource, RecipientResult } from './types.js';
import { drainWithin } from '../drain.js';

// ---------------------------------------------------------------- options

/** Time limits per protocol phase, in ms (Postfix's smtp_*_timeout / lmtp_*_timeout defaults). */
export interface ClientTimeouts {
  /** TCP / unix connect. Default 30 000 (Postfix smtp_connect_timeout; lmtp_connect_timeout is 0 = the OS's). */
  readonly connect: number;
  /** The 220 greeting. Default 300 000 (lmtp_lhlo_timeout covers greeting and LHLO). */
  readonly greeting: number;
  /** The EHLO / HELO / LHLO reply. Default 300 000 (smtp_helo_timeout, lmtp_lhlo_timeout). */
  readonly hello: number;
  /** STARTTLS reply and TLS handshake. Default 300 000 (lmtp_starttls_timeout). */
  readonly starttls: number;
  /** MAIL FROM reply. Default 300 000 (lmtp_mail_timeout). */
  readonly mail: number;
  /** Each RCPT TO reply. Default 300 000 (lmtp_rcpt_timeout). */
  readonly rcpt: number;
  /** The DATA command's 354. Default 120 000 (lmtp_data_init_timeout). */
  readonly dataInit: number;
  /** A stall while sending the message (the socket does not drain). Default 180 000 (lmtp_data_xfer_timeout). */
  readonly dataBlock: number;
  /** Each recipient's reply after the final dot. Default 600 000 (lmtp_data_done_timeout). */
  readonly final: number;
  /** RSET and the NOOP health probe. Default 20 000 (lmtp_rset_timeout). */
  readonly rset: number;
}

export const DEFAULT_CLIENT_TIMEOUTS: ClientTimeouts = Object.freeze({
  connect: 30_000,
  greeting: 300_000,
  hello: 300_000,
  starttls: 300_000,
  mail: 300_000,
  rcpt: 300_000,
  dataInit: 120_000,
  dataBlock: 180_000,
  final: 600_000,
  rset: 20_000,
});

/**
 * TLS policy of a client (Postfix smtp_tls_security_level):
 * - `none`: never STARTTLS;
 * - `may`: STARTTLS when the server offers it, certificate not checked; when the handshake
 *   fails the message goes over a fresh plain-text connection (opportunistic TLS);
 * - `encrypt`: STARTTLS required (a server that does not offer it, or a failed handshake,
 *   defers the mail), certificate not checked;
 * - `verify`: as `encrypt`, and the certificate must be valid for the server's name.
 */
export type TlsLevel = 'none' | 'may' | 'encrypt' | 'verify';

/** TLS settings of one client pool. */
export interface ClientTls {
  readonly level: TlsLevel;
  /** Trusted CA certificate(s), PEM, for `verify`. Default: Node's bundled roots. */
  readonly ca?: string | Buffer | readonly (string | Buffer)[];
  /** Name the certificate must be valid for (and SNI). */
  readonly servername?: string;
}

/** SMTP AUTH credentials (PLAIN, else LOGIN); only ever sent over TLS. */
export interface ClientAuth {
  readonly user: string;
  readonly pass: string;
}

/** Where one pool connects. */
export type ClientEndpoint = { readonly host: string; readonly port: number } | { readonly path: string };

/** Everything one pool needs (lmtp() and smtp() fill it from their own options). */
export interface ClientConfig {
  readonly protocol: 'smtp' | 'lmtp';
  readonly endpoint: ClientEndpoint;
  /** Names the server in replies and errors, e.g. `LMTP 127.0.0.1:24`, `SMTP mx.example.com[192.0.2.1]:25`. */
  readonly label: string;
  /** Our name in EHLO / LHLO. */
  readonly heloName: string;
  readonly maxConnections: number;
  readonly idleTimeout: number;
  readonly probeAfter: number;
  readonly maxTransactions: number;
  readonly pipelining: boolean;
  readonly tls: ClientTls;
  readonly auth: ClientAuth | undefined;
  readonly timeouts: ClientTimeouts;
}

/** Pool counters, for tests and metrics. */
export interface PoolStats {
  /** Connections open now (busy + idle). */
  readonly open: number;
  readonly idle: number;
  /** Connections opened since start. */
  readonly opened: number;
  /** Times a pooled connection was reused for a transaction or a verification. */
  readonly reused: number;
  /** Most connections open at once. */
  readonly peak: number;
  /** Transactions (and verifications) waiting for a connection now. */
  readonly waiting: number;
}

/** The outcome of one delivery attempt to one server. */
export interface Attempt {
  /** One result per envelope recipient, in order. */
  readonly results: RecipientResult[];
  /**
   * False when no session came about or it broke before the server answered anything of
   * this transaction (connect, greeting, EHLO, STARTTLS, AUTH): nothing was decided there,
   * so the caller may try another server. Every result is then `deferred`.
   */
  readonly reached: boolean;
}

/** One server's connection pool and protocol engine. */
export interface ClientPool {
  attempt(envelope: DeliveryEnvelope, message: MessageSource): Promise<Attempt>;
  verifyRecipient(envelope: { readonly queueId: string; readonly sender: EnvelopeAddress }, recipient: EnvelopeAddress, ms: number): Promise<SmtpReply | undefined>;
  stats(): PoolStats;
  /** Closes idle connections now and busy ones when their transaction ends. */
  close(): Promise<void>;
}

// ---------------------------------------------------------------- replies (pure)

/** One reply as read off the wire. */
export interface WireReply {
  readonly code: number;
  /** The enhanced status code of the first line, when the server sent one. */
  readonly enhanced: string | undefined;
  /** The text of every line, enhanced codes removed. */
  readonly lines: readonly string[];
}

/** A malformed reply or connection state: the connection is closed. */
export class ReplyProtocolError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'ReplyProtocolError';
  }
}

/** Longest reply line we accept (RFC 5321 4.5.3.1.5 says 512; Postfix accepts 2048). */
const MAX_LINE = 4096;
/** Most lines in one reply (LHLO included). */
const MAX_LINES = 256;

const ENHANCED_PREFIX = /^([245])\.(\d{1,3})\.(\d{1,3})(?: |$)/;

/**
 * An incremental reply decoder: `push(chunk)` returns the complete replies in it. Lines end in
 * CRLF (a bare LF is accepted); `ddd-text` continues a reply, `ddd text` or `ddd` ends it.
 * Throws ReplyProtocolError on a malformed line, a continuation with another code, a line over
 * 4096 bytes or a reply over 256 lines; nothing it allocates is sized by the peer beyond that.
 */
export class ReplyDecoder {
  private pending = '';
  private lines: string[] = [];
  private code = 0;

  push(chunk: Buffer | string): WireReply[] {
    this.pending += typeof chunk === 'string' ? chunk : chunk.toString('latin1');
    const out: WireReply[] = [];
    let pos = 0;
    for (;;) {
      const nl = this.pending.indexOf('\n', pos);
      if (nl < 0) break;
      const end = nl > pos && this.pending.charCodeAt(nl - 1) === 0x0d ? nl - 1 : nl;
      const line = this.pending.slice(pos, end);
      pos = nl + 1;
      if (line.length > MAX_LINE) throw new ReplyProtocolError(`reply line longer than ${MAX_LINE} bytes`);
      const m = /^([2-5]\d\d)([ -]?)(.*)$/s.exec(line);
      if (!m || (m[2] === '' && m[3] !== '')) throw new ReplyProtocolError(`malformed reply line: ${JSON.stringify(line.slice(0, 80))}`);
      const code = Number(m[1]);
      if (this.lines.length && code !== this.code) throw new ReplyProtocolError(`reply continued with code ${code}, began with ${this.code}`);
      this.code = code;
      this.lines.push(m[3] ?? '');
      if (this.lines.length > MAX_LINES) throw new ReplyProtocolError(`reply longer than ${MAX_LINES} lines`);
      if (m[2] !== '-') {
        out.push(toReply(code, this.lines));
        this.lines = [];
        this.code = 0;
      }
    }
    this.pending = this.pending.slice(pos);
    if (this.pending.length > MAX_LINE) throw new ReplyProtocolError(`reply line longer than ${MAX_LINE} bytes`);
    return out;
  }

  /** True while part of a reply is buffered. */
  get partial(): boolean {
    return this.pending.length > 0 || this.lines.length > 0;
  }
}

function toReply(code: number, raw: readonly string[]): WireReply {
  const cls = String(code)[0];
  let enhanced: string | undefined;
  const lines = raw.map((text, i) => {
    const m = ENHANCED_PREFIX.exec(text);
    if (m && m[1] === cls) {
      if (i === 0) enhanced = `${m[1]}.${m[2]}.${m[3]}`;
      return text.slice(m[0].length);
    }
    return text;
  });
  return { code, enhanced, lines };
}

/**
 * The server's reply as an SmtpReply (validated): every line kept, control characters
 * replaced, lines cut at the reply-line limit, at most 32 lines; an enhanced code made up
 * from the class (`x.0.0`) when the server sent none.
 */
export function toSmtpReply(r: WireReply): SmtpReply {
  const cls = String(r.code)[0];
  const enhanced = r.enhanced ?? `${cls}.0.0`;
  const lines = r.lines.slice(0, MAX_REPLY_LINES).map((l) => clip(l.replace(/[\x00-\x1f\x7f]/g, ' ').trimEnd()));
  return smtpReply(r.code, enhanced, lines.length ? lines : ['']);
}

function clip(line: string): string {
  if (Buffer.byteLength(line) <= MAX_REPLY_LINE_LENGTH) return line;
  let s = line.slice(0, MAX_REPLY_LINE_LENGTH);
  while (Buffer.byteLength(s) > MAX_REPLY_LINE_LENGTH) s = s.slice(0, -1);
  return s;
}

function statusOf(code: number): DeliveryStatus {
  return code < 300 ? 'delivered' : code < 500 ? 'deferred' : 'failed';
}

function formatLine(r: WireReply): string {
  return `${r.code} ${r.enhanced ? r.enhanced + ' ' : ''}${r.lines.join(' / ')}`;
}

// ---------------------------------------------------------------- dot-stuffing (pure)

/**
 * RFC 5321 4.5.2 transparency, incrementally: a `.` that begins a line (at the start of the
 * message or after CRLF) is doubled. `atLineStart` carries state over chunk boundaries.
 */
export class DotStuffer {
  /** 0: mid-line, 1: after CR, 2: at line start. */
  private state = 2;
  /** Bytes seen so far; `endsWithCrlf` tells whether the last two were CRLF. */
  private last2 = 0x0d0a;
  private count = 0;

  push(chunk: Buffer): Buffer {
    let extra = 0;
    let st = this.state;
    for (let i = 0; i < chunk.length; i++) {
      const b = chunk[i]!;
      if (st === 2 && b === 0x2e) extra++;
      st = b === 0x0d ? 1 : b === 0x0a && st === 1 ? 2 : 0;
    }
    let out = chunk;
    if (extra) {
      out = Buffer.allocUnsafe(chunk.length + extra);
      let o = 0;
      st = this.state;
      for (let i = 0; i < chunk.length; i++) {
        const b = chunk[i]!;
        if (st === 2 && b === 0x2e) out[o++] = 0x2e;
        out[o++] = b;
        st = b === 0x0d ? 1 : b === 0x0a && st === 1 ? 2 : 0;
      }
    }
    this.state = st;
    for (let i = Math.max(0, chunk.length - 2); i < chunk.length; i++) this.last2 = ((this.last2 << 8) | chunk[i]!) & 0xffff;
    this.count += chunk.length;
    return out;
  }

  /** The end of data: `.CRLF`, preceded by a CRLF when the message did not end with one. */
  end(): Buffer {
    return Buffer.from(this.count > 0 && this.last2 !== 0x0d0a ? '\r\n.\r\n' : '.\r\n', 'latin1');
  }
}

/** Messages up to this size (bytes, before dot-stuffing) are sent with their final dot in one write. */
const COALESCE_BYTES = 64 * 1024;

// ---------------------------------------------------------------- errors of one connection

type Phase = 'connect' | 'greeting' | 'hello' | 'starttls' | 'auth' | 'mail' | 'rcpt' | 'data' | 'data block' | 'final' | 'rset' | 'noop';

/** The connection failed (closed, reset, timed out, spoke nonsense) in `phase`. */
class ConnectionFailure extends Error {
  constructor(
    readonly phase: Phase,
    readonly kind: 'timeout' | 'lost' | 'protocol' | 'refused',
    message: string,
    /** True when nothing of this transaction reached the server's decision (safe to retry elsewhere). */
    readonly beforeAnyReply = false,
    /** The reply the recipients get, when the server's own words should reach them (AUTH, greeting). */
    readonly reply?: SmtpReply,
  ) {
    super(message);
    this.name = 'ConnectionFailure';
  }
}

// ---------------------------------------------------------------- one connection

interface Waiter {
  resolve(r: WireReply): void;
  reject(e: Error): void;
}

/** Capabilities from EHLO / LHLO (none after HELO). */
interface Capabilities {
  readonly pipelining: boolean;
  readonly dsn: boolean;
  /** AUTH mechanisms offered, upper case. */
  readonly auth: readonly string[];
  readonly eightBitMime: boolean;
  readonly smtputf8: boolean;
  readonly enhanced: boolean;
  readonly starttls: boolean;
  /** SIZE limit; 0 = none announced. */
  readonly size: number | undefined;
}

const NO_CAPS: Capabilities = Object.freeze({ pipelining: false, dsn: false, auth: [], eightBitMime: false, smtputf8: false, enhanced: false, starttls: false, size: undefined });

class Connection {
  private decoder = new ReplyDecoder();
  /** Replies read but not yet asked for. */
  private ready: WireReply[] = [];
  /** How many replies the commands written so far still owe. */
  private owed = 0;
  private waiter: Waiter | undefined;
  private failure: ConnectionFailure | undefined;
  caps: Capabilities = NO_CAPS;
  secure = false;
  transactions = 0;
  idleSince = 0;
  idleTimer: NodeJS.Timeout | undefined;
  onDead: (() => void) | undefined;
  readonly id: number;
  private static ids = 0;

  constructor(
    public socket: net.Socket,
    readonly label: string,
  ) {
    this.id = ++Connection.ids;
    this.attach(socket);
  }

  private attach(socket: net.Socket): void {
    socket.setNoDelay(true);
    socket.on('data', (d: Buffer) => this.onData(d));
    socket.on('error', (err: Error) => this.fail(new ConnectionFailure('final', 'lost', `${this.label}: ${err.message}`)));
    socket.on('close', () => this.fail(new ConnectionFailure('final', 'lost', `${this.label}: connection closed`)));
  }

  get dead(): boolean {
    return this.failure !== undefined;
  }

  private onData(d: Buffer): void {
    let replies: WireReply[];
    try {
      replies = this.decoder.push(d);
    } catch (err) {
      this.fail(new ConnectionFailure('final', 'protocol', `${this.label}: ${(err as Error).message}`));
      return;
    }
    for (const r of replies) {
      if (this.owed <= 0) {
        // A reply nobody asked for (an idle 421, a server out of step): the state is unknown.
        this.fail(new ConnectionFailure('final', 'protocol', `${this.label}: unexpected reply ${formatLine(r).slice(0, 200)}`));
        return;
      }
      this.owed--;
      const w = this.waiter;
      if (w) {
        this.waiter = undefined;
        w.resolve(r);
      } else this.ready.push(r);
    }
  }

  /** Marks the connection dead (idempotent) and destroys the socket. Replies read before stay readable. */
  fail(f: ConnectionFailure): void {
    if (!this.failure) {
      this.failure = f;
      this.socket.destroy();
      clearTimeout(this.idleTimer);
      this.onDead?.();
    }
    const w = this.waiter;
    this.waiter = undefined;
    w?.reject(this.failure);
  }

  destroy(why = 'closed by the client'): void {
    this.fail(new ConnectionFailure('final', 'lost', `${this.label}: ${why}`));
  }

  /** Writes commands (or the end of a message) that owe `replies` replies. Does not wait for the socket. */
  send(text: string | Buffer, replies: number): void {
    this.owed += replies;
    if (!this.failure) this.socket.write(text);
  }

  /** Declares a reply owed without writing anything (the greeting). */
  expect(n: number): void {
    this.owed += n;
  }

  /** Reads the next reply within `ms`; a timeout kills the connection. */
  read(phase: Phase, ms: number): Promise<WireReply> {
    const r = this.ready.shift();
    if (r) return Promise.resolve(r);
    if (this.failure) return Promise.reject(withPhase(this.failure, phase));
    return new Promise<WireReply>((resolve, reject) => {
      const timer = setTimeout(() => {
        this.fail(new ConnectionFailure(phase, 'timeout', `${this.label}: no reply within ${ms} ms (${phase})`));
      }, ms);
      this.waiter = {
        resolve: (x) => {
          clearTimeout(timer);
          resolve(x);
        },
        reject: (e) => {
          clearTimeout(timer);
          reject(withPhase(e as ConnectionFailure, phase));
        },
      };
    });
  }

  /** Writes a chunk, waiting for drain within `ms` when the socket buffers too much. */
  async write(buf: Buffer, ms: number): Promise<void> {
    if (this.failure) throw withPhase(this.failure, 'data block');
    if (this.socket.write(buf)) return;
    await drainWithin(
      this.socket,
      ms,
      () => withPhase(this.failure ?? new ConnectionFailure('data block', 'lost', `${this.label}: connection closed`), 'data block'),
      () => {
        this.fail(new ConnectionFailure('data block', 'timeout', `${this.label}: sending the message stalled for ${ms} ms`));
        return withPhase(this.failure!, 'data block');
      },
    );
  }

  /** Swaps the socket for a TLS one over it (after STARTTLS's 220). */
  async upgrade(options: tls.ConnectionOptions, ms: number): Promise<void> {
    const raw = this.socket;
    raw.removeAllListeners('data');
    raw.removeAllListeners('error');
    raw.removeAllListeners('close');
    this.decoder = new ReplyDecoder();
    const secure = tls.connect({ ...options, socket: raw });
    this.socket = secure;
    await new Promise<void>((resolve, reject) => {
      const timer = setTimeout(() => {
        secure.destroy();
        reject(new ConnectionFailure('starttls', 'timeout', `${this.label}: TLS handshake not done within ${ms} ms`));
      }, ms);
      secure.once('secureConnect', () => {
        clearTimeout(timer);
        resolve();
      });
      secure.once('error', (err) => {
        clearTimeout(timer);
        reject(new ConnectionFailure('starttls', 'refused', `${this.label}: TLS handshake failed: ${err.message}`));
      });
    });
    secure.removeAllListeners('error');
    this.secure = true;
    this.attach(secure);
  }

  quit(): void {
    if (this.failure) return;
    clearTimeout(this.idleTimer);
    this.owed += 1;
    this.socket.end('QUIT\r\n');
    setTimeout(() => this.socket.destroy(), 2000).unref();
  }
}

function withPhase(e: Error, phase: Phase): Error {
  if (!(e instanceof ConnectionFailure)) return e;
  // The failure happened while `phase` waited: say so (the socket's own phase is unknown).
  return e.phase === phase || e.kind === 'timeout' ? e : new ConnectionFailure(phase, e.kind, e.message, e.beforeAnyReply, e.reply);
}

// ---------------------------------------------------------------- the pool

const RE_ADDR_BAD = /[\x00-\x20\x7f<>]/;

const nonAscii = (x: string): boolean => /[^\x00-\x7f]/.test(x);

/** RFC 3461 4.1 / 4.2: the DSN parameter values we pass on (the client's, already checked by smtp-server). */
const DSN_VALUE = /^[\x21-\x7e]{1,500}$/;

/** Creates the connection pool and protocol engine for one server. The caller validates the config. */
export function createClientPool(config: ClientConfig): ClientPool {
  const { protocol, endpoint, label, heloName, maxConnections, idleTimeout, probeAfter, maxTransactions, timeouts: T } = config;
  const lmtpMode = protocol === 'lmtp';
  const pipeliningAllowed = config.pipelining;
  const server = lmtpMode ? 'mailstore' : 'server';

  // ---- replies of our own
  const lost = (what: string): SmtpReply => smtpReply(451, '4.4.2', `${label}: ${what}; delivery deferred`);
  const noAnswer = (what: string): SmtpReply => smtpReply(451, '4.4.1', `${label}: ${what}; delivery deferred`);
  const localError = smtpReply(451, '4.3.0', `Local error in ${lmtpMode ? 'LMTP' : 'SMTP'} delivery; delivery deferred`);

  function failureReply(f: unknown): SmtpReply {
    if (f instanceof ConnectionFailure) {
      if (f.reply) return f.reply;
      // RFC 3463: X.4.1 no session came about (connect, greeting, EHLO, STARTTLS); X.4.2 a session broke.
      const setup = f.phase === 'connect' || f.phase === 'greeting' || f.phase === 'hello' || f.phase === 'starttls' || f.phase === 'auth';
      const how = f.kind === 'timeout' ? 'timed out' : f.kind === 'protocol' ? 'protocol error' : 'connection lost';
      const what = f.kind === 'refused' ? f.message.replace(`${label}: `, '') : `${how} ${phaseText(f.phase)}`;
      return setup ? noAnswer(what) : lost(what);
    }
    return localError;
  }

  // ---- the pool
  const idle: Connection[] = [];
  const waiters: (() => void)[] = [];
  let open = 0;
  let opened = 0;
  let reused = 0;
  let peak = 0;
  let closed = false;

  const wake = (): void => waiters.shift()?.();

  function dial(): Promise<net.Socket> {
    const socket = 'path' in endpoint ? net.connect({ path: endpoint.path }) : net.connect({ host: endpoint.host, port: endpoint.port });
    return new Promise<net.Socket>((resolve, reject) => {
      const timer = setTimeout(() => {
        socket.destroy();
        reject(new ConnectionFailure('connect', 'refused', `${label}: no connection within ${T.connect} ms`, true));
      }, T.connect);
      socket.once('connect', () => {
        clearTimeout(timer);
        socket.removeAllListeners('error');
        resolve(socket);
      });
      socket.once('error', (err: NodeJS.ErrnoException) => {
        clearTimeout(timer);
        reject(new ConnectionFailure('connect', 'refused', `${label}: cannot connect (${err.code ?? err.message})`, true));
      });
    });
  }

  /** A new session: greeting, EHLO/LHLO, STARTTLS per the policy, AUTH. `tryTls` false: the plain-text retry of `may`. */
  async function connect(tryTls = true): Promise<Connection> {
    const conn = new Connection(await dial(), label);
    const level = config.tls.level;
    try {
      conn.expect(1);
      const greeting = await conn.read('greeting', T.greeting);
      if (greeting.code !== 220) {
        throw new ConnectionFailure('greeting', 'refused', `${label}: greeted with ${formatLine(greeting).slice(0, 200)}`, true, serverSaid(greeting, 'greeting', true));
      }
      await hello(conn);
      const wantTls = level === 'encrypt' || level === 'verify' || (level === 'may' && tryTls && conn.caps.starttls);
      if (wantTls) {
        if (!conn.caps.starttls) throw new ConnectionFailure('starttls', 'refused', `${label}: STARTTLS required but not offered (TLS level ${level})`, true);
        conn.send('STARTTLS\r\n', 1);
        const r = await conn.read('starttls', T.starttls);
        if (r.code !== 220) throw new ConnectionFailure('starttls', 'refused', `${label}: STARTTLS refused: ${formatLine(r).slice(0, 200)}`, true);
        const tlsConfig = config.tls;
        const host = 'host' in endpoint ? endpoint.host : undefined;
        const servername = tlsConfig.servername ?? (host !== undefined && !isIp(host) ? host : undefined);
        await conn.upgrade(
          {
            rejectUnauthorized: level === 'verify',
            ...(tlsConfig.ca !== undefined ? { ca: tlsConfig.ca as string | Buffer | (string | Buffer)[] } : {}),
            ...(servername !== undefined ? { servername } : {}),
          },
          T.starttls,
        );
        await hello(conn);
      }
      if (config.auth) await authenticate(conn, config.auth);
    } catch (err) {
      conn.destroy('setup failed');
      // Opportunistic TLS that failed in the handshake: once more, in plain text (Postfix does the same).
      if (err instanceof ConnectionFailure && err.phase === 'starttls' && level === 'may' && tryTls) return connect(false);
      if (err instanceof ConnectionFailure) throw new ConnectionFailure(err.phase, err.kind, err.message, true, err.reply);
      throw err;
    }
    return conn;
  }

  async function hello(conn: Connection): Promise<void> {
    conn.send(`${lmtpMode ? 'LHLO' : 'EHLO'} ${heloName}\r\n`, 1);
    let r = await conn.read('hello', T.hello);
    if (!lmtpMode && r.code >= 500 && r.code < 600) {
      // RFC 5321 3.2: a server that does not know EHLO gets HELO (and no extensions).
      conn.send(`HELO ${heloName}\r\n`, 1);
      r = await conn.read('hello', T.hello);
      if (r.code === 250) {
        conn.caps = NO_CAPS;
        return;
      }
    }
    if (r.code !== 250) throw new ConnectionFailure('hello', 'refused', `${label}: ${lmtpMode ? 'LHLO' : 'EHLO'} refused: ${formatLine(r).slice(0, 200)}`, true, serverSaid(r, 'hello', true));
    const words = r.lines.slice(1).map((l) => l.trim().toUpperCase().split(/\s+/));
    const has = (k: string): boolean => words.some((w) => w[0] === k);
    const size = words.find((w) => w[0] === 'SIZE');
    const limit = size && size[1] !== undefined ? Number(size[1]) : undefined;
    conn.caps = {
      pipelining: has('PIPELINING'),
      dsn: has('DSN'),
      auth: words.filter((w) => w[0] === 'AUTH' || w[0] === 'AUTH=LOGIN').flatMap((w) => (w[0] === 'AUTH' ? w.slice(1) : ['LOGIN'])),
      eightBitMime: has('8BITMIME'),
      smtputf8: has('SMTPUTF8'),
      enhanced: has('ENHANCEDSTATUSCODES'),
      starttls: has('STARTTLS'),
      size: limit !== undefined && Number.isSafeInteger(limit) && limit > 0 ? limit : undefined,
    };
  }

  /** RFC 4954 AUTH with PLAIN (one round trip) or LOGIN; a refusal keeps the server's reply. */
  async function authenticate(conn: Connection, auth: ClientAuth): Promise<void> {
    // Credentials never cross a plain-text connection (Postfix smtp_sasl_tls_security_options).
    if (!conn.secure) throw new ConnectionFailure('auth', 'refused', `${label}: AUTH is configured but the connection is not encrypted; credentials not sent`, true, smtpReply(454, '4.7.0', `${label}: refusing to send credentials without TLS; delivery deferred`));
    // A server that offers no AUTH gets the mail without it (Postfix does the same); it decides.
    if (conn.caps.auth.length === 0) return;
    const b64 = (x: string): string => Buffer.from(x, 'utf8').toString('base64');
    let r: WireReply;
    if (conn.caps.auth.includes('PLAIN') || !conn.caps.auth.includes('LOGIN')) {
      conn.send(`AUTH PLAIN ${b64(`\0${auth.user}\0${auth.pass}`)}\r\n`, 1);
      r = await conn.read('auth', T.hello);
    } else {
      conn.send('AUTH LOGIN\r\n', 1);
      r = await conn.read('auth', T.hello);
      if (r.code === 334) {
        conn.send(`${b64(auth.user)}\r\n`, 1);
        r = await conn.read('auth', T.hello);
        if (r.code === 334) {
          conn.send(`${b64(auth.pass)}\r\n`, 1);
          r = await conn.read('auth', T.hello);
        }
      }
    }
    if (r.code !== 235) {
      // Deferred whatever the code: a wrong password is the sender's configuration, not the message's fault.
      throw new ConnectionFailure('auth', 'refused', `${label}: authentication failed: ${formatLine(r).slice(0, 200)}`, true, serverSaid(r, 'auth', true));
    }
  }

  /**
   * The server's own words as our reply for the recipients: its code and enhanced code when
   * a final failure should follow them, else turned into a temporary one (`deferAlways`),
   * with "<label> said:" in front.
   */
  function serverSaid(r: WireReply, phase: Phase, deferAlways = false): SmtpReply {
    const own = toSmtpReply(r);
    const temp = deferAlways || r.code < 500;
    const code = temp ? (r.code >= 400 && r.code < 500 ? r.code : phase === 'auth' ? 454 : 451) : r.code;
    const enhanced = temp ? `4${own.enhanced.slice(1)}` : own.enhanced;
    return smtpReply(code, enhanced, [`${label} said: ${r.code} ${own.enhanced} ${own.lines[0] ?? ''}`.slice(0, MAX_REPLY_LINE_LENGTH), ...own.lines.slice(1)].slice(0, MAX_REPLY_LINES));
  }

  function removeIdle(conn: Connection): void {
    const i = idle.indexOf(conn);
    if (i >= 0) idle.splice(i, 1);
  }

  function forget(conn: Connection): void {
    // Called once per connection, when it dies or is given up.
    conn.onDead = undefined;
    removeIdle(conn);
    open--;
    wake();
  }

  /** A connection for one transaction: an idle one (probed when idle long), a new one, or the next freed. */
  async function acquire(deadline?: number): Promise<{ conn: Connection; reused: boolean }> {
    for (;;) {
      if (closed) throw new DovetailError(ErrorCodes.DELIVERY_FAILED, `${label}: transport closed`);
      const conn = idle.pop();
      if (conn) {
        clearTimeout(conn.idleTimer);
        if (conn.dead) continue;
        if (Date.now() - conn.idleSince > probeAfter) {
          try {
            conn.send('NOOP\r\n', 1);
            const r = await conn.read('noop', T.rset);
            if (r.code !== 250) throw new Error('NOOP refused');
          } catch {
            release(conn, false);
            continue;
          }
        }
        reused++;
        return { conn, reused: true };
      }
      if (open < maxConnections) {
        open++;
        peak = Math.max(peak, open);
        let c: Connection;
        try {
          c = await connect();
        } catch (err) {
          open--;
          wake();
          throw err;
        }
        opened++;
        c.onDead = () => forget(c);
        return { conn: c, reused: false };
      }
      await new Promise<void>((resolve, reject) => {
        let timer: NodeJS.Timeout | undefined;
        const w = (): void => {
          clearTimeout(timer);
          resolve();
        };
        waiters.push(w);
        if (deadline !== undefined) {
          timer = setTimeout(() => {
            const i = waiters.indexOf(w);
            if (i >= 0) waiters.splice(i, 1);
            reject(new ConnectionFailure('connect', 'timeout', `${label}: no free connection in time`, true));
          }, Math.max(0, deadline - Date.now()));
        }
      });
    }
  }

  /**
   * Gives a connection back: pooled when its state is known clean, closed otherwise. The
   * pool's count drops when the socket is gone (onDead → forget), whichever way it goes.
   */
  function release(conn: Connection, clean: boolean): void {
    if (conn.dead) return; // already forgotten
    if (!clean || closed || conn.transactions >= maxTransactions) {
      if (clean) conn.quit();
      else conn.destroy('state unknown');
      return;
    }
    conn.idleSince = Date.now();
    conn.idleTimer = setTimeout(() => {
      removeIdle(conn);
      conn.quit();
    }, idleTimeout);
    conn.idleTimer.unref();
    idle.push(conn);
    wake();
  }

  // ---- one transaction

  function mailCommand(sender: EnvelopeAddress, caps: Capabilities, size: number | undefined): string {
    let cmd = `MAIL FROM:<${sender.address}>`;
    if (size !== undefined && caps.size !== undefined) cmd += ` SIZE=${size}`;
    const body = sender.args['BODY'];
    if (typeof body === 'string' && caps.eightBitMime && /^(8BITMIME|7BIT)$/i.test(body)) cmd += ` BODY=${body.toUpperCase()}`;
    if (sender.args['SMTPUTF8'] && caps.smtputf8) cmd += ' SMTPUTF8';
    if (caps.dsn) {
      const ret = sender.args['RET'];
      const envid = sender.args['ENVID'];
      if (typeof ret === 'string' && /^(FULL|HDRS)$/i.test(ret)) cmd += ` RET=${ret.toUpperCase()}`;
      if (typeof envid === 'string' && DSN_VALUE.test(envid)) cmd += ` ENVID=${envid}`;
    }
    return cmd + '\r\n';
  }

  function rcptCommand(rcpt: EnvelopeAddress, caps: Capabilities): string {
    let cmd = `RCPT TO:<${rcpt.address}>`;
    if (caps.dsn) {
      const notify = rcpt.args['NOTIFY'];
      const orcpt = rcpt.args['ORCPT'];
      if (typeof notify === 'string' && /^(NEVER|((SUCCESS|FAILURE|DELAY)(,(SUCCESS|FAILURE|DELAY))*))$/i.test(notify)) cmd += ` NOTIFY=${notify.toUpperCase()}`;
      if (typeof orcpt === 'string' && DSN_VALUE.test(orcpt)) cmd += ` ORCPT=${orcpt}`;
    }
    return cmd + '\r\n';
  }

  /** Why this envelope cannot go to this server at all (checked per connection: capabilities differ). */
  function unsendable(envelope: DeliveryEnvelope, message: MessageSource | undefined, caps: Capabilities): SmtpReply | undefined {
    if (RE_ADDR_BAD.test(envelope.sender.address)) return smtpReply(553, '5.1.7', `Bad sender address syntax for ${lmtpMode ? 'LMTP' : 'SMTP'}`);
    // As Postfix: only an envelope that needs SMTPUTF8 (a non-ASCII address) fails; otherwise the parameter is dropped.
    if (envelope.sender.args['SMTPUTF8'] && !caps.smtputf8 && (nonAscii(envelope.sender.address) || envelope.recipients.some((r) => nonAscii(r.address)))) {
      return smtpReply(554, '5.6.7', `${label}: SMTPUTF8 is required, but was not offered by the ${server}`);
    }
    // RFC 6152 3: 8-bit data never goes to a server that did not offer 8BITMIME (and we do not convert).
    const body = envelope.sender.args['BODY'];
    if (!lmtpMode && typeof body === 'string' && /^8BITMIME$/i.test(body) && !caps.eightBitMime) {
      return smtpReply(554, '5.6.3', `${label}: the message has 8-bit content, but 8BITMIME was not offered by the ${server}`);
    }
    if (message && caps.size !== undefined && message.size > caps.size) {
      return smtpReply(552, '5.3.4', `${label}: message of ${message.size} bytes exceeds the ${server}'s size limit of ${caps.size}`);
    }
    return undefined;
  }

  type Outcome = { results: (RecipientResult | undefined)[]; clean: boolean };

  async function transaction(conn: Connection, envelope: DeliveryEnvelope, message: MessageSource): Promise<Outcome> {
    const rcpts = envelope.recipients;
    const results: (RecipientResult | undefined)[] = new Array<RecipientResult | undefined>(rcpts.length);
    const set = (i: number, reply: SmtpReply): void => {
      results[i] = { recipient: rcpts[i]?.address ?? '', status: statusOf(reply.code), reply };
    };
    const all = (reply: SmtpReply): Outcome => {
      rcpts.forEach((_, i) => results[i] ?? set(i, reply));
      return { results, clean: true };
    };
    const refusal = unsendable(envelope, message, conn.caps);
    if (refusal) return all(refusal);
    // Recipients the server is asked about (a bad address is refused here, never sent).
    const asked: number[] = [];
    rcpts.forEach((r, i) => {
      if (RE_ADDR_BAD.test(r.address) || r.address === '') set(i, smtpReply(553, '5.1.3', `Bad recipient address syntax for ${lmtpMode ? 'LMTP' : 'SMTP'}`));
      else asked.push(i);
    });
    if (asked.length === 0) return all(smtpReply(554, '5.5.1', 'No valid recipients'));

    conn.transactions++;
    const pipelined = pipeliningAllowed && conn.caps.pipelining;
    const mail = mailCommand(envelope.sender, conn.caps, message.size);
    const rcptCmd = (i: number): string => rcptCommand(rcpts[i]!, conn.caps);
    const said = (r: WireReply): SmtpReply => (lmtpMode ? toSmtpReply(r) : serverSaid(r, 'rcpt'));
    let gotAny = false;
    const accepted: number[] = [];
    try {
      let mailReply: WireReply;
      let dataReply: WireReply | undefined;
      if (pipelined) {
        conn.send(mail + asked.map(rcptCmd).join('') + 'DATA\r\n', asked.length + 2);
        mailReply = await conn.read('mail', T.mail);
        gotAny = true;
        for (const i of asked) {
          const r = await conn.read('rcpt', T.rcpt);
          if (r.code >= 200 && r.code < 300 && mailReply.code < 300) accepted.push(i);
          else set(i, said(mailReply.code >= 300 ? mailReply : r));
        }
        dataReply = await conn.read('data', T.dataInit);
      } else {
        conn.send(mail, 1);
        mailReply = await conn.read('mail', T.mail);
        gotAny = true;
        if (mailReply.code < 300) {
          for (const i of asked) {
            conn.send(rcptCmd(i), 1);
            const r = await conn.read('rcpt', T.rcpt);
            if (r.code >= 200 && r.code < 300) accepted.push(i);
            else set(i, said(r));
          }
          if (accepted.length) {
            conn.send('DATA\r\n', 1);
            dataReply = await conn.read('data', T.dataInit);
          }
        } else {
          for (const i of asked) set(i, said(mailReply));
        }
      }

      if (dataReply && dataReply.code === 354 && accepted.length === 0) {
        // A server that says 354 with no recipient: end the data at once; what it answers then is unknowable.
        conn.send('.\r\n', 0);
        return { ...all(smtpReply(554, '5.5.1', 'No valid recipients')), clean: false };
      }
      if (!dataReply || dataReply.code !== 354) {
        // MAIL refused, every RCPT refused, or DATA refused: the refusal stands for the accepted ones.
        if (dataReply && accepted.length) for (const i of accepted) set(i, said(dataReply));
        // The transaction may still be open on the server: RSET before the connection is reused.
        conn.send('RSET\r\n', 1);
        const r = await conn.read('rset', T.rset);
        return { ...all(lost('no reply')), clean: r.code === 250 };
      }

      // The message, dot-stuffed, then the final dot. A small message is written with its
      // final dot in one write (one syscall and one segment instead of one per chunk).
      const stuffer = new DotStuffer();
      let sent = 0;
      const held: Buffer[] = [];
      const stream: Readable = message.stream();
      try {
        for await (const chunk of stream as AsyncIterable<Buffer | string>) {
          const buf = typeof chunk === 'string' ? Buffer.from(chunk, 'utf8') : chunk;
          sent += buf.length;
          const out = stuffer.push(buf);
          if (sent <= COALESCE_BYTES) {
            held.push(out);
            continue;
          }
          if (held.length) await conn.write(held.length === 1 ? held[0]! : Buffer.concat(held.splice(0)), T.dataBlock);
          held.length = 0;
          await conn.write(out, T.dataBlock);
        }
      } finally {
        stream.destroy();
      }
      if (sent !== message.size) {
        // Never end a message the source cut short: the server would keep it.
        conn.destroy('message source gave the wrong size');
        throw new DovetailError(ErrorCodes.DELIVERY_FAILED, `message stream gave ${sent} bytes, not ${message.size}`);
      }
      held.push(stuffer.end());
      // LMTP: one reply per accepted recipient (RFC 2033 4.2); SMTP: one for all of them.
      conn.send(held.length === 1 ? held[0]! : Buffer.concat(held), lmtpMode ? accepted.length : 1);
      if (lmtpMode) {
        for (const i of accepted) set(i, toSmtpReply(await conn.read('final', T.final)));
      } else {
        const r = await conn.read('final', T.final);
        const reply = r.code < 300 ? toSmtpReply(r) : said(r);
        for (const i of accepted) set(i, reply);
      }
      return { results, clean: true };
    } catch (err) {
      if (err instanceof ConnectionFailure && !gotAny) throw new ConnectionFailure(err.phase, err.kind, err.message, true);
      if (!(err instanceof ConnectionFailure)) conn.destroy('local failure');
      // Every recipient without a reply yet: deferred, never delivered.
      const reply = err instanceof ConnectionFailure ? failureReply(err) : localError;
      if (!(err instanceof ConnectionFailure)) channels.error.publish({ queueId: envelope.queueId, error: err });
      rcpts.forEach((_, i) => results[i] ?? set(i, reply));
      return { results, clean: false };
    }
  }

  async function attempt(envelope: DeliveryEnvelope, message: MessageSource): Promise<Attempt> {
    const rcpts = envelope.recipients;
    if (rcpts.length === 0) return { results: [], reached: true };
    const everyone = (err: unknown): Attempt => {
      const reply = failureReply(err);
      return { results: rcpts.map((r) => ({ recipient: r.address, status: 'deferred', reply })), reached: false };
    };
    for (let n = 0; ; n++) {
      let got: { conn: Connection; reused: boolean };
      try {
        got = await acquire();
      } catch (err) {
        if (err instanceof DovetailError) throw err;
        channels.error.publish({ queueId: envelope.queueId, error: err });
        return everyone(err);
      }
      const { conn } = got;
      try {
        const { results, clean } = await transaction(conn, envelope, message);
        release(conn, clean && !conn.dead);
        return { results: Array.from(rcpts, (r, i) => results[i] ?? { recipient: r.address, status: 'deferred', reply: lost('no reply') }), reached: true };
      } catch (err) {
        release(conn, false);
        // A reused connection that was dead before the server said anything: try once on a fresh one.
        if (err instanceof ConnectionFailure && err.beforeAnyReply && err.kind !== 'timeout' && got.reused && n === 0) continue;
        if (err instanceof DovetailError) throw err;
        channels.error.publish({ queueId: envelope.queueId, error: err });
        return everyone(err);
      }
    }
  }

  async function verifyRecipient(envelope: { readonly queueId: string; readonly sender: EnvelopeAddress }, recipient: EnvelopeAddress, ms: number): Promise<SmtpReply | undefined> {
    if (RE_ADDR_BAD.test(recipient.address) || recipient.address === '') return smtpReply(553, '5.1.3', 'Bad recipient address syntax');
    if (RE_ADDR_BAD.test(envelope.sender.address)) return undefined;
    const deadline = Date.now() + ms;
    for (let n = 0; ; n++) {
      const { conn, reused: wasReused } = await withinDeadline(acquire(deadline), deadline);
      let clean = false;
      let gotAny = false;
      const timer = setTimeout(() => conn.fail(new ConnectionFailure('rcpt', 'timeout', `${label}: verification took over ${ms} ms`)), Math.max(1, deadline - Date.now()));
      try {
        // The SIZE the client declared, so a store can refuse a message that will not fit now.
        const declared = Number(envelope.sender.args['SIZE']);
        const mail = mailCommand(envelope.sender, conn.caps, Number.isSafeInteger(declared) && declared > 0 ? declared : undefined);
        const rcpt = `RCPT TO:<${recipient.address}>\r\n`;
        let mailReply: WireReply;
        let rcptReply: WireReply | undefined;
        if (pipeliningAllowed && conn.caps.pipelining) {
          conn.send(mail + rcpt + 'RSET\r\n', 3);
          mailReply = await conn.read('mail', T.mail);
          gotAny = true;
          rcptReply = await conn.read('rcpt', T.rcpt);
        } else {
          conn.send(mail, 1);
          mailReply = await conn.read('mail', T.mail);
          gotAny = true;
          if (mailReply.code < 300) {
            conn.send(rcpt, 1);
            rcptReply = await conn.read('rcpt', T.rcpt);
          }
          conn.send('RSET\r\n', 1);
        }
        const rset = await conn.read('rset', T.rset);
        clean = rset.code === 250;
        // A refused MAIL says nothing about the recipient: verification stays advisory.
        if (mailReply.code >= 300 || !rcptReply) return undefined;
        return rcptReply.code >= 400 ? toSmtpReply(rcptReply) : undefined;
      } catch (err) {
        if (err instanceof ConnectionFailure && !gotAny && err.kind !== 'timeout' && wasReused && n === 0 && Date.now() < deadline) continue;
        throw err;
      } finally {
        clearTimeout(timer);
        release(conn, clean && !conn.dead);
      }
    }
  }

  /**
   * Bounds the wait for a connection (a new one may hang in its greeting for far longer than a
   * verification may take). A connection that arrives late is clean: it goes to the pool.
   */
  function withinDeadline(p: Promise<{ conn: Connection; reused: boolean }>, deadline: number): Promise<{ conn: Connection; reused: boolean }> {
    return new Promise((resolve, reject) => {
      let late = false;
      const timer = setTimeout(() => {
        late = true;
        reject(new ConnectionFailure('connect', 'timeout', `${label}: no connection within the verification time limit`, true));
      }, Math.max(0, deadline - Date.now()));
      p.then(
        (got) => {
          clearTimeout(timer);
          if (late) release(got.conn, true);
          else resolve(got);
        },
        (err: unknown) => {
          clearTimeout(timer);
          if (!late) reject(err as Error);
        },
      );
    });
  }

  async function close(): Promise<void> {
    closed = true;
    for (const c of idle.splice(0)) c.quit();
    for (const w of waiters.splice(0)) w();
  }

  return {
    attempt,
    verifyRecipient,
    close,
    stats: (): PoolStats => ({ open, idle: idle.length, opened, reused, peak, waiting: waiters.length }),
  };
}

function isIp(host: string): boolean {
  return net.isIP(host) !== 0;
}

function phaseText(phase: Phase): string {
  switch (phase) {
    case 'connect':
      return 'while connecting';
    case 'greeting':
      return 'while waiting for the greeting';
    case 'hello':
      return 'after EHLO/LHLO';
    case 'auth':
      return 'during AUTH';
    case 'starttls':
      return 'during STARTTLS';
    case 'mail':
      return 'after MAIL FROM';
    case 'rcpt':
      return 'after RCPT TO';
    case 'data':
      return 'after DATA';
    case 'data block':
      return 'while sending the message';
    case 'final':
      return 'while waiting for the final reply';
    case 'rset':
      return 'after RSET';
    case 'noop':
      return 'after NOOP';
  }
}
