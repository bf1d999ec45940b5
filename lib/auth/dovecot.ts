/**
 * dovecotAuth(): the gateway's `authenticate` function backed by a Dovecot auth service,
 * the SASL backend Postfix uses with `smtpd_sasl_type = dovecot`. It is the client side of
 * Dovecot's authentication protocol, version 1.2 (Dovecot's "Authentication Protocol"
 * design document; the client in src/lib-auth, the server in src/auth), spoken to the
 * service's auth-client socket (`service auth { unix_listener auth-client }` or an
 * `inet_listener`), over a unix socket or TCP:
 *
 * - Handshake: we send `VERSION 1 2` and `CPID <our pid>`; the server answers VERSION, one
 *   MECH line per mechanism, SPID, CUID, COOKIE and DONE. Its major version must be 1 and
 *   PLAIN must be among the mechanisms, or the connection is a failure.
 * - One request per authentication: `AUTH <id> PLAIN service=<service> nologin [secured]
 *   [rip=<client IP>] resp=<base64(\0user\0password)>`. Both client mechanisms (PLAIN and
 *   LOGIN) go to Dovecot as PLAIN with an initial response: the gateway has already turned
 *   LOGIN's exchange into a user name and password. `secured` is sent when the SMTP session
 *   has TLS and `rip` is the SMTP client's address, as Postfix sends them (Dovecot's passdb
 *   lookups see them, and its auth penalty is kept per `rip`). Values are tab-escaped as
 *   the protocol requires (\001 as the escape character).
 * - The answer: `OK <id> …` → true; `FAIL <id> …` → false, unless it carries `temp` or
 *   `code=temp_fail` (Dovecot could not check: its passdb failed), which rejects, so the
 *   client gets 454. A `CONT` (a challenge, which PLAIN with an initial response never
 *   gets) rejects and cancels the request.
 * - Many authentications share one connection (up to `maxConnections`), each with its own
 *   id (increasing per connection), answered in any order. A connection is opened on first
 *   use and again after it is lost; requests in flight on a lost connection reject.
 * - Every authentication has a deadline (`timeout`): when it passes the request rejects,
 *   and is cancelled (`CANCEL <id>`) if the server has answered anything since it was
 *   sent, or else the connection is dropped (a server that says nothing is stuck).
 * - A line from the server longer than 64 KiB, a line that is not in the protocol, an
 *   answer for an id never asked: protocol error, the connection is dropped and its
 *   requests reject.
 *
 * Credentials PLAIN cannot carry (a NUL in the user name or password), or so long that the
 * request would pass Dovecot's line limit, are answered false without asking. Passwords
 * never appear in errors; the rejections are DovetailErrors whose messages say what failed
 * (connection, timeout, protocol, temporary failure), never with the credentials.
 *
 * It deliberately does not: speak other mechanisms to Dovecot (CRAM-MD5, SCRAM, GSSAPI need
 * the client's own SASL exchange, which the gateway does not pass through), do userdb
 * lookups (the auth-master/auth-userdb sockets), use the login/master handover (we send
 * `nologin`), retry a request on another connection, or send `no-penalty` (Dovecot's
 * per-IP penalty stays on, as with Postfix).
 */
import net from 'node:net';
import { DovetailError, ErrorCodes } from '../errors.js';
import type { AuthRequest } from './types.js';

/** Where the Dovecot auth service listens, and how it is used. */
export interface DovecotAuthOptions {
  /** The auth-client unix socket, e.g. `/var/spool/postfix/private/auth`. Exclusive with host/port. */
  readonly path?: string;
  /** The host of an auth `inet_listener` (with `port`). Exclusive with path. */
  readonly host?: string;
  /** The port of an auth `inet_listener` (with `host`). */
  readonly port?: number;
  /**
   * Time allowed for one authentication, ms, connecting and handshake included. Default
   * 30 000: longer than Dovecot's own delays (auth_failure_delay, 2 s by default, and its
   * per-IP penalty, up to 15 s), so a guesser that Dovecot slows down still gets its `535`
   * (and counts towards the gateway's maxAuthFailures) rather than a `454`.
   */
  readonly timeout?: number;
  /** The service name Dovecot sees (`%s`, passdb `protocol` blocks). Default `smtp`. */
  readonly service?: string;
  /**
   * Connections to open at most; requests are spread over them and multiplexed on each.
   * Default 1 (one connection carries any number of concurrent requests).
   */
  readonly maxConnections?: number;
}

/** The function to give as the gateway's `authenticate`, with `close()` to end its connections. */
export type DovecotAuthenticator = ((request: AuthRequest) => Promise<boolean>) & {
  /** Closes the connections; requests in flight and later calls reject. */
  close(): Promise<void>;
};

/** Default time for one authentication, ms. */
export const DEFAULT_DOVECOT_AUTH_TIMEOUT = 30_000;

/** The code of the errors an authentication rejects with. */
const AUTH_UNAVAILABLE = ErrorCodes.AUTH_UNAVAILABLE;

/** A line from the server longer than this is a protocol error (Dovecot's own limit is 16 KiB). */
const MAX_LINE = 64 * 1024;
/** An AUTH line we would send longer than this is not sent (Dovecot 1.x-2.x read lines up to 8–16 KiB). */
const MAX_REQUEST_LINE = 8192;
/** Request ids are unsigned 32-bit in Dovecot; a connection retires before it runs out. */
const MAX_ID = 0xffff_ffff;

function unavailable(message: string, cause?: unknown): DovetailError {
  return new DovetailError(AUTH_UNAVAILABLE, `dovecotAuth: ${message}`, cause === undefined ? undefined : { cause });
}

/** Dovecot's tab-escaping (lib/strescape.c): \001 escapes itself, TAB, CR and LF. */
function tabEscape(value: string): string {
  return value.replace(/[\x01\t\r\n]/g, (c) => (c === '\x01' ? '\x011' : c === '\t' ? '\x01t' : c === '\r' ? '\x01r' : '\x01n'));
}

function tabUnescape(value: string): string {
  return value.replace(/\x01([\s\S]?)/g, (_m, c: string) => ({ '0': '\0', '1': '\x01', t: '\t', r: '\r', n: '\n' })[c] ?? c);
}

/** A line from the server, quoted for an error message: short, any `resp=` value hidden (a server echoing our request must not put the credentials in a log). */
function quote(line: string): string {
  return JSON.stringify(sanitize(line.replace(/resp=[^\t]*/g, 'resp=<hidden>'), 80));
}

/** A server-provided text, made safe and short for an error message. */
function sanitize(text: string, max = 200): string {
  const clean = text.replace(/[\x00-\x1f\x7f]/g, '?');
  return clean.length > max ? `${clean.slice(0, max)}…` : clean;
}

interface Pending {
  readonly line: string;
  readonly resolve: (ok: boolean) => void;
  readonly reject: (err: Error) => void;
  timer: NodeJS.Timeout | undefined;
  /** Assigned when the request is sent. */
  id: number;
  /** The connection's count of lines received when the request was sent (or queued). */
  linesAtStart: number;
  done: boolean;
}

type ConnectTarget = { readonly path: string } | { readonly host: string; readonly port: number };

/** One connection to the auth service: handshake, then AUTH requests multiplexed by id. */
class AuthConnection {
  private readonly socket: net.Socket;
  private state: 'handshake' | 'ready' | 'closed' = 'handshake';
  private versionSeen = false;
  private readonly mechs: string[] = [];
  private partial: Buffer[] = [];
  private partialLength = 0;
  /** Lines received so far: a sign of life. */
  private lines = 0;
  private lastId = 0;
  /** Requests waiting for the handshake to finish. */
  private queued: Pending[] = [];
  /** Requests sent, by id. */
  private readonly inFlight = new Map<number, Pending>();
  /** No new requests (ids running out); closes once idle. */
  retiring = false;
  readonly closed: Promise<void>;

  constructor(
    target: ConnectTarget,
    private readonly onGone: (conn: AuthConnection) => void,
  ) {
    this.socket = 'path' in target ? net.connect({ path: target.path }) : net.connect({ host: target.host, port: target.port });
    this.closed = new Promise((resolve) => this.socket.once('close', () => resolve()));
    this.socket.setNoDelay(true);
    this.socket.on('connect', () => {
      this.socket.write(`VERSION\t1\t2\nCPID\t${process.pid}\n`);
    });
    this.socket.on('data', (chunk: Buffer) => this.onData(chunk));
    this.socket.on('error', (err) => this.fail(unavailable(`connection to the Dovecot auth service failed: ${err.message}`, err)));
    this.socket.on('close', () => this.fail(unavailable(this.state === 'handshake' ? 'the Dovecot auth service closed the connection during the handshake' : 'the Dovecot auth service closed the connection')));
    this.socket.on('end', () => this.socket.destroy());
  }

  get usable(): boolean {
    return this.state !== 'closed' && !this.retiring;
  }

  /** Requests queued or in flight. */
  get load(): number {
    return this.queued.length + this.inFlight.size;
  }

  submit(p: Pending): void {
    p.linesAtStart = this.lines;
    this.socket.ref();
    if (this.state === 'ready') this.send(p);
    else this.queued.push(p);
  }

  /** The request's deadline passed (it is already rejected). */
  timedOut(p: Pending): void {
    if (this.state === 'closed') return;
    // Nothing at all from the server since this request was sent, or a handshake that did
    // not finish in a whole timeout: the server (or the connection) is stuck.
    const stuck = this.lines === p.linesAtStart || this.state === 'handshake';
    if (p.id === 0) {
      this.queued = this.queued.filter((q) => q !== p);
    } else {
      this.inFlight.delete(p.id);
    }
    if (stuck) {
      this.fail(unavailable('the Dovecot auth service stopped answering; connection dropped'));
      return;
    }
    if (p.id !== 0) this.socket.write(`CANCEL\t${p.id}\n`);
    this.idleCheck();
  }

  destroy(err: Error): void {
    this.fail(err);
  }

  private send(p: Pending): void {
    const id = ++this.lastId;
    if (id >= MAX_ID) this.retiring = true;
    p.id = id;
    p.linesAtStart = this.lines;
    this.inFlight.set(id, p);
    this.socket.write(`AUTH\t${id}\t${p.line}\n`);
  }

  private onData(chunk: Buffer): void {
    let start = 0;
    while (this.state !== 'closed') {
      const nl = chunk.indexOf(0x0a, start);
      if (nl < 0) break;
      let line = chunk.subarray(start, nl);
      if (this.partial.length > 0) {
        line = Buffer.concat([...this.partial, line]);
        this.partial = [];
        this.partialLength = 0;
      }
      start = nl + 1;
      if (line.length > MAX_LINE) return this.protocolError(`a line longer than ${MAX_LINE} bytes`);
      this.lines++;
      this.onLine(line.toString('utf8'));
    }
    if (this.state === 'closed' || start >= chunk.length) return;
    const rest = chunk.subarray(start);
    this.partialLength += rest.length;
    if (this.partialLength > MAX_LINE) return this.protocolError(`a line longer than ${MAX_LINE} bytes`);
    // Copy: a small slice must not keep Node's whole read buffer alive.
    this.partial.push(Buffer.from(rest));
  }

  private onLine(line: string): void {
    const args = line.split('\t');
    const cmd = args[0] ?? '';
    if (this.state === 'handshake') return this.onHandshakeLine(cmd, args, line);
    switch (cmd) {
      case 'OK':
      case 'FAIL':
      case 'CONT':
      case 'CANCELLED':
        return this.onReply(cmd, args, line);
      default:
        return this.protocolError(`unexpected line ${quote(line)}`);
    }
  }

  private onHandshakeLine(cmd: string, args: string[], line: string): void {
    if (!this.versionSeen) {
      if (cmd !== 'VERSION' || !/^\d+$/.test(args[1] ?? '')) return this.protocolError(`expected VERSION, got ${quote(line)}`);
      if (args[1] !== '1') return this.protocolError(`the server speaks protocol version ${sanitize(args[1] ?? '')}.x, not 1.x`);
      this.versionSeen = true;
      return;
    }
    switch (cmd) {
      case 'MECH':
        if (!args[1]) return this.protocolError('a MECH line without a mechanism');
        this.mechs.push(args[1].toUpperCase());
        return;
      case 'SPID':
      case 'CUID':
      case 'COOKIE':
        return;
      case 'DONE':
        if (!this.mechs.includes('PLAIN')) {
          return this.fail(unavailable(`the Dovecot auth service does not offer PLAIN (it offers: ${sanitize(this.mechs.join(' ') || 'nothing')}); set auth_mechanisms = plain login`));
        }
        this.state = 'ready';
        for (const p of this.queued.splice(0)) this.send(p);
        this.idleCheck();
        return;
      default:
        return this.protocolError(`unexpected line in the handshake ${quote(line)}`);
    }
  }

  private onReply(cmd: string, args: string[], line: string): void {
    const idText = args[1] ?? '';
    const id = /^[1-9]\d{0,9}$/.test(idText) ? Number(idText) : 0;
    if (id === 0 || id > MAX_ID) return this.protocolError(`a ${cmd} line without a valid id: ${quote(line)}`);
    const p = this.inFlight.get(id);
    if (!p) {
      // An answer to a request that timed out (and was cancelled) is late, not wrong.
      if (id <= this.lastId) return;
      return this.protocolError(`a ${cmd} for id ${id}, which was never sent`);
    }
    if (cmd === 'CANCELLED') return;
    this.inFlight.delete(id);
    const params = args.slice(2);
    if (cmd === 'OK') {
      settle(p, true);
    } else if (cmd === 'FAIL') {
      const temp = params.some((a) => a === 'temp' || a === 'code=temp_fail');
      if (temp) {
        const reason = params.find((a) => a.startsWith('reason='));
        const why = reason === undefined ? '' : `: ${sanitize(tabUnescape(reason.slice('reason='.length)))}`;
        settle(p, unavailable(`the Dovecot auth service reported a temporary failure (request ${id})${why}`));
      } else {
        settle(p, false);
      }
    } else {
      // CONT: a challenge. PLAIN with an initial response has nothing more to say.
      this.socket.write(`CANCEL\t${id}\n`);
      settle(p, unavailable(`the Dovecot auth service sent a challenge (CONT) for PLAIN with an initial response (request ${id}); cancelled`));
    }
    this.idleCheck();
  }

  private idleCheck(): void {
    if (this.load > 0 || this.state === 'closed') return;
    if (this.retiring) {
      this.socket.end();
      return;
    }
    // An idle connection does not keep the process alive.
    this.socket.unref();
  }

  private protocolError(what: string): void {
    this.fail(unavailable(`protocol error from the Dovecot auth service: ${what}; connection dropped`));
  }

  private fail(err: Error): void {
    if (this.state === 'closed') return;
    this.state = 'closed';
    this.partial = [];
    this.partialLength = 0;
    const all = [...this.queued, ...this.inFlight.values()];
    this.queued = [];
    this.inFlight.clear();
    this.socket.destroy();
    this.onGone(this);
    for (const p of all) settle(p, err);
  }
}

function settle(p: Pending, outcome: boolean | Error): void {
  if (p.done) return;
  p.done = true;
  if (p.timer) clearTimeout(p.timer);
  if (typeof outcome === 'boolean') p.resolve(outcome);
  else p.reject(outcome);
}

/** The client's address as Dovecot's `rip`: an IP address (IPv4-mapped IPv6 as IPv4), or nothing. */
function remoteIp(address: unknown): string | undefined {
  if (typeof address !== 'string') return undefined;
  const mapped = /^::ffff:(\d{1,3}(?:\.\d{1,3}){3})$/i.exec(address);
  const ip = mapped ? (mapped[1] as string) : address;
  return net.isIP(ip) ? ip : undefined;
}

/**
 * Creates an `authenticate` function for the gateway that checks credentials against a
 * Dovecot auth service (Postfix's `smtpd_sasl_type = dovecot`): resolves true when Dovecot
 * accepts them, false when it refuses them, and rejects (the client gets `454 4.7.0`) when
 * Dovecot cannot be reached, does not answer within `timeout`, breaks the protocol or
 * reports a temporary failure. Nothing connects until the first authentication. Call
 * `close()` when done.
 *
 * ```ts
 * const authenticate = dovecotAuth({ path: '/var/run/dovecot/auth-client' });
 * const gateway = createGateway({ tls, authenticate, … });
 * ```
 *
 * @throws DovetailError `DOVETAIL_ERR_INVALID_OPTIONS` when the options are malformed
 *   (not exactly one of `path` or `host`+`port`, a bad timeout, service or maxConnections).
 */
export function dovecotAuth(options: DovecotAuthOptions): DovecotAuthenticator {
  const bad = (why: string): never => {
    throw new DovetailError(ErrorCodes.INVALID_OPTIONS, `dovecotAuth(): ${why}`);
  };
  if (typeof options !== 'object' || options === null) bad('needs an options object');
  const { path, host, port } = options;
  let target: ConnectTarget;
  if (path !== undefined) {
    if (host !== undefined || port !== undefined) bad('give either path or host and port, not both');
    if (typeof path !== 'string' || path === '' || path.includes('\0')) bad('path must be a non-empty string (the auth-client socket)');
    target = { path };
  } else {
    if (host === undefined && port === undefined) bad('needs path (a unix socket) or host and port');
    if (typeof host !== 'string' || host === '' || /[\s\0]/.test(host)) bad('host must be a non-empty host name or address (with port)');
    if (!(typeof port === 'number' && Number.isInteger(port) && port >= 1 && port <= 65535)) bad('port must be an integer from 1 to 65535 (with host)');
    target = { host: host as string, port: port as number };
  }
  const timeout = options.timeout ?? DEFAULT_DOVECOT_AUTH_TIMEOUT;
  if (!(typeof timeout === 'number' && Number.isSafeInteger(timeout) && timeout >= 1 && timeout <= 2_147_483_647)) bad('timeout must be a positive integer (ms)');
  const service = options.service ?? 'smtp';
  if (typeof service !== 'string' || !/^[\x21-\x7e]{1,64}$/.test(service)) bad('service must be 1 to 64 printable ASCII characters without spaces');
  const maxConnections = options.maxConnections ?? 1;
  if (!(typeof maxConnections === 'number' && Number.isSafeInteger(maxConnections) && maxConnections >= 1 && maxConnections <= 1000)) {
    bad('maxConnections must be an integer from 1 to 1000');
  }
  const serviceParam = `service=${tabEscape(service)}`;

  const pool = new Set<AuthConnection>();
  let closed = false;

  const pick = (): AuthConnection => {
    let best: AuthConnection | undefined;
    let usable = 0;
    for (const c of pool) {
      if (!c.usable) continue;
      usable++;
      if (!best || c.load < best.load) best = c;
    }
    if (best && (best.load === 0 || usable >= maxConnections)) return best;
    const conn = new AuthConnection(target, (gone) => pool.delete(gone));
    pool.add(conn);
    return conn;
  };

  const authenticate = (request: AuthRequest): Promise<boolean> => {
    if (closed) return Promise.reject(unavailable('closed'));
    const { username, password } = request;
    if (typeof username !== 'string' || typeof password !== 'string') return Promise.resolve(false);
    // PLAIN separates its fields with NUL: such credentials cannot be asked (nor be valid).
    if (username.includes('\0') || password.includes('\0')) return Promise.resolve(false);
    const resp = Buffer.from(`\0${username}\0${password}`, 'utf8').toString('base64');
    const rip = remoteIp(request.client?.address);
    const line = ['PLAIN', serviceParam, 'nologin', ...(request.client?.tls === true ? ['secured'] : []), ...(rip ? [`rip=${rip}`] : []), `resp=${resp}`].join('\t');
    // Dovecot drops a client whose line is over its limit, and every request with it.
    if (line.length + 16 > MAX_REQUEST_LINE) return Promise.resolve(false);
    return new Promise<boolean>((resolve, reject) => {
      const p: Pending = { line, resolve, reject, timer: undefined, id: 0, linesAtStart: 0, done: false };
      const conn = pick();
      p.timer = setTimeout(() => {
        settle(p, unavailable(`no answer from the Dovecot auth service within ${timeout} ms`));
        conn.timedOut(p);
      }, timeout);
      conn.submit(p);
    });
  };

  const close = async (): Promise<void> => {
    closed = true;
    const conns = [...pool];
    for (const c of conns) c.destroy(unavailable('closed'));
    await Promise.all(conns.map((c) => c.closed));
  };

  return Object.assign(authenticate, { close });
}
