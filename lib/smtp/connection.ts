/**
 * The gateway's connection class on smtp-server: exact replies (ExactConnection), plus what
 * smtp-server does not do for us:
 * - AUTH exists only on an encrypted connection (unless allowInsecureAuth): smtp-server
 *   advertises and accepts AUTH in plain text whenever STARTTLS is not offered. (With AUTH
 *   "unsupported" before TLS, smtp-server also skips its authOptional check there, so the
 *   gateway enforces a submission listener's "AUTH before MAIL" itself.)
 * - a hook once HELO/EHLO has been answered (smtp-server has no HELO callback);
 * - a hook before it answers a command it does not recognise (the milters' unknown stage);
 * - XCLIENT / XFORWARD trusted per listener by network (smtp-server's useXClient /
 *   useXForward match exact addresses only), refused with Postfix's `550 5.7.0`, and a
 *   PROXY header from a peer not trusted to send one refused and the connection closed.
 *
 * These override smtp-server's internal methods (`_isSupported`, `_onCommand`,
 * `handler_EHLO`, `handler_HELO`, `_proxyCommandAllowed`, `handler_XCLIENT`,
 * `handler_XFORWARD`; the server's `_handleProxy`, `_expectsProxyHeader`): package.json pins
 * smtp-server's exact version, test/unit/pinned-internals.test.ts fails loudly when the
 * version or these internals change, and test/interop/proxy-protocol.test.ts and
 * scale-out.test.ts exercise the XCLIENT and PROXY ones.
 */
import type { SMTPServerSession } from 'smtp-server';
import { ExactConnection, markedReply } from '../smtp-server/exact-replies.js';
import { smtpReply, type SmtpReply } from '../milter/verdict.js';
import type { SessionEnd } from '../diagnostics.js';
import type { ProxyHeader } from './proxy.js';

/** AUTH on a listener that has none. */
export const AUTH_NOT_ENABLED = smtpReply(503, '5.5.1', 'Error: authentication not enabled');

/** RFC 4954 section 6: AUTH over a connection without TLS. */
export const AUTH_NEEDS_TLS = smtpReply(538, '5.7.11', 'Encryption required for requested authentication mechanism');

/** Postfix's reply to XCLIENT / XFORWARD from a host not in smtpd_authorized_x*_hosts. */
export const X_NOT_AUTHORIZED = smtpReply(550, '5.7.0', 'Error: insufficient authorization');

/**
 * Our connection class: exact replies (ExactConnection), plus the hooks smtp-server lacks —
 * HELO/EHLO answered, and a command it does not recognise.
 */
export class GatewayConnection extends ExactConnection {
  /** Error limits (Postfix smtpd_soft_error_limit / smtpd_hard_error_limit / smtpd_error_sleep_time). */
  errorLimits = { soft: 10, hard: 20, sleep: 1000 };
  /** 4xx/5xx replies sent on this connection so far. */
  errors = 0;
  /** Said when the hard limit is reached (our host name in it, as Postfix). */
  tooManyErrors = '4.7.0 Error: too many errors';

  /** Counts every 4xx/5xx reply but the 421 that closes the connection, and closes at the hard limit. */
  override send(code: number, data?: string | string[] | null, context?: string | false): void {
    super.send(code, data, context);
    // How the session ends, for the close event: the first reply that ends it wins.
    if (code === 221) this.ending('quit');
    else if (code === 421 && typeof data === 'string' && data.startsWith('Timeout')) this.ending('timeout');
    else if (code === 421) this.ending('shutdown');
    if (code >= 400 && code !== 421 && ++this.errors >= this.errorLimits.hard) {
      this.ending('too-many-errors');
      // smtp-server closes the connection after a 421.
      super.send(421, this.tooManyErrors, false);
    }
  }

  /** Records why the session ends (the first reason given stays); read with {@link sessionEnd}. */
  ending(end: SessionEnd): void {
    if (this.session && !ends.has(this.session)) ends.set(this.session, end);
  }

  override _onError(err: Error): void {
    this.ending('error');
    super._onError(err);
  }


  /** True unless allowInsecureAuth: AUTH exists only once the connection is encrypted. */
  authNeedsTls = true;
  /** False on a listener without AUTH (no authenticate, or `auth: false`). */
  authEnabled = true;

  /** smtp-server advertises and dispatches AUTH on plain text when STARTTLS is not offered; we never do unless allowed. */
  override _isSupported(command: string): boolean {
    if (this.authNeedsTls && !this.secure && String(command).trim().toUpperCase() === 'AUTH') return false;
    return super._isSupported(command);
  }

  /** What a trusted proxy's PROXY header said about this connection (gateway.ts reads it). */
  proxyHeader: ProxyHeader | undefined;
  /** Peers allowed to send XCLIENT / XFORWARD on this listener (by network). */
  xclientTrusted: (address: string) => boolean = () => false;
  xforwardTrusted: (address: string) => boolean = () => false;
  /** Set for a peer not trusted to send a PROXY header: reports one (and we answer 421 and close). */
  onUntrustedProxy: ((what: string) => void) | undefined;
  /** Called when a peer not trusted for it sends XCLIENT / XFORWARD. */
  onUntrustedX: ((command: string) => void) | undefined;
  /** Our greeting name, for the 421 to an untrusted PROXY header. */
  hostname = '';

  /** smtp-server matches useXClient / useXForward by exact address; ours are network lists per listener. */
  override _proxyCommandAllowed(command: string, option: 'useXClient' | 'useXForward'): boolean {
    const trusted = option === 'useXClient' ? this.xclientTrusted : this.xforwardTrusted;
    return !this._xClient.has('ADDR') && trusted(this._originalRemoteAddress) && this._isSupported(command);
  }

  override handler_XCLIENT(command: Buffer, callback: () => void): void {
    if (!this._proxyCommandAllowed('XCLIENT', 'useXClient')) return this.refuseX('XCLIENT', callback);
    super.handler_XCLIENT(command, callback);
  }

  override handler_XFORWARD(command: Buffer, callback: () => void): void {
    if (!this._proxyCommandAllowed('XFORWARD', 'useXForward')) return this.refuseX('XFORWARD', callback);
    super.handler_XFORWARD(command, callback);
  }

  private refuseX(command: string, callback: () => void): void {
    this.onUntrustedX?.(command);
    this.send(550, markedReply(X_NOT_AUTHORIZED));
    callback();
  }

  /** Called once smtp-server has answered a HELO/EHLO (it has no callback for it). */
  onHelo: ((session: SMTPServerSession) => void) | undefined;

  override handler_EHLO(command: Buffer, callback: () => void): void {
    super.handler_EHLO(command, callback);
    this.onHelo?.(this.session);
  }

  override handler_HELO(command: Buffer, callback: () => void): void {
    super.handler_HELO(command, callback);
    this.onHelo?.(this.session);
  }

  /** Asks the unknown stage about a command smtp-server does not recognise: a refusal to send, or undefined. */
  onUnknown: ((session: SMTPServerSession, command: string) => Promise<SmtpReply | undefined>) | undefined;

  override _onCommand(command: Buffer, callback?: () => void): void {
    // Past the soft limit each command waits longer (errors − soft) × sleep ms before it is
    // looked at, as Postfix's smtpd sleeps before its reply: a client that keeps failing slows down.
    const over = this.errors - this.errorLimits.soft;
    if (over > 0 && this.errorLimits.sleep > 0 && !this._nextHandler) {
      setTimeout(() => {
        if (!this._closed && !this._closing) this.handle(command, callback);
      }, over * this.errorLimits.sleep);
      return;
    }
    this.handle(command, callback);
  }

  private handle(command: Buffer, callback?: () => void): void {
    const line = (command ?? '').toString();
    const name = line.split(' ', 1)[0]?.toUpperCase() ?? '';
    // A PROXY v1 line, or the CRLF that starts the v2 signature before our greeting, from a
    // peer the listener does not trust for it (trusted peers' headers never reach here).
    if (this.onUntrustedProxy && !this._nextHandler && (name === 'PROXY' || line.startsWith('\0') || (!this._ready && line.trim() === ''))) {
      this.onUntrustedProxy(name === 'PROXY' ? 'PROXY v1 header' : 'PROXY v2 header (or an early empty line)');
      this.send(421, markedReply(smtpReply(421, '4.7.0', `${this.hostname} Error: PROXY protocol header from an untrusted source`)));
      callback?.();
      return;
    }
    if (name === 'AUTH' && !this.authEnabled && !this._nextHandler && this._ready && !this._upgrading) {
      // Postfix's reply with smtpd_sasl_auth_enable = no.
      this.send(503, markedReply(AUTH_NOT_ENABLED));
      callback?.();
      return;
    }
    if (name === 'AUTH' && this.authNeedsTls && !this.secure && !this._nextHandler && this._ready && !this._upgrading) {
      this.send(538, markedReply(AUTH_NEEDS_TLS));
      callback?.();
      return;
    }
    const ask = this.onUnknown;
    // Only a real command word smtp-server would answer "500 command not recognized" for;
    // everything else (AUTH continuations, TLS upgrade, early talkers, HTTP) is smtp-server's.
    if (!ask || !this._ready || this._upgrading || this._nextHandler || !/^[A-Z][A-Z0-9-]{0,31}$/.test(name) || this._isSupported(name) || HTTP_METHODS.has(name)) {
      super._onCommand(command, callback);
      return;
    }
    ask(this.session, line).then(
      (reply) => {
        if (!reply) return super._onCommand(command, callback);
        this.send(reply.code, markedReply(reply));
        callback?.();
      },
      () => super._onCommand(command, callback),
    );
  }
}

const ends = new WeakMap<object, SessionEnd>();

/** Why a session ended, when its connection said (QUIT, timeout, error limit, socket error, or as marked); else undefined (the client closed). */
export function sessionEnd(session: SMTPServerSession): SessionEnd | undefined {
  return ends.get(session);
}

const HTTP_METHODS = new Set(['OPTIONS', 'GET', 'HEAD', 'POST', 'PUT', 'DELETE', 'TRACE', 'CONNECT']);
