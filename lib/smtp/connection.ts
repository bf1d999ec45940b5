/**
 * The gateway's connection class on smtp-server: exact replies (ExactConnection), plus what
 * smtp-server does not do for us:
 * - AUTH exists only on an encrypted connection (unless allowInsecureAuth): smtp-server
 *   advertises and accepts AUTH in plain text whenever STARTTLS is not offered. (With AUTH
 *   "unsupported" before TLS, smtp-server also skips its authOptional check there, so the
 *   gateway enforces a submission listener's "AUTH before MAIL" itself.)
 * - a hook once HELO/EHLO has been answered (smtp-server has no HELO callback);
 * - a hook before it answers a command it does not recognise (the milters' unknown stage).
 *
 * These override smtp-server's internal methods (`_isSupported`, `_onCommand`,
 * `handler_EHLO`, `handler_HELO`): package.json pins smtp-server's exact version, and
 * test/integration/gateway-hooks.test.ts fails loudly when they change.
 */
import type { SMTPServerSession } from 'smtp-server';
import { ExactConnection, markedReply } from '../smtp-server/exact-replies.js';
import { smtpReply, type SmtpReply } from '../milter/verdict.js';

/** RFC 4954 section 6: AUTH over a connection without TLS. */
export const AUTH_NEEDS_TLS = smtpReply(538, '5.7.11', 'Encryption required for requested authentication mechanism');

/**
 * Our connection class: exact replies (ExactConnection), plus the hooks smtp-server lacks —
 * HELO/EHLO answered, and a command it does not recognise.
 */
export class GatewayConnection extends ExactConnection {
  /** True unless allowInsecureAuth: AUTH exists only once the connection is encrypted. */
  authNeedsTls = true;

  /** smtp-server advertises and dispatches AUTH on plain text when STARTTLS is not offered; we never do unless allowed. */
  override _isSupported(command: string): boolean {
    if (this.authNeedsTls && !this.secure && String(command).trim().toUpperCase() === 'AUTH') return false;
    return super._isSupported(command);
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
    const line = (command ?? '').toString();
    const name = line.split(' ', 1)[0]?.toUpperCase() ?? '';
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

const HTTP_METHODS = new Set(['OPTIONS', 'GET', 'HEAD', 'POST', 'PUT', 'DELETE', 'TRACE', 'CONNECT']);
