/**
 * SMTP AUTH on the gateway (RFC 4954, PLAIN and LOGIN, through smtp-server's SASL code):
 * the credentials go to the configured `authenticate` function, never over a connection
 * without TLS unless allowInsecureAuth (the connection class refuses the command; this is
 * the second lock), and guessing is slowed and stopped per connection (Postfix:
 * smtpd_error_sleep_time and smtpd_hard_error_limit; Dovecot: auth_failure_delay).
 *
 * Replies: `235` (smtp-server's), `535 5.7.8` after n × authFailureDelay for the n-th
 * failure, `421 4.7.0` and the connection closed at maxAuthFailures, `454 4.7.0` when the
 * function throws (the error goes to the diagnostics channel), `538 5.7.11` without TLS.
 */
import type { SMTPServerAuthentication, SMTPServerAuthenticationResponse, SMTPServerSession } from 'smtp-server';
import { channels } from '../diagnostics.js';
import { smtpReply } from '../milter/verdict.js';
import { replyError } from '../smtp-server/exact-replies.js';
import { AUTH_NEEDS_TLS } from './connection.js';
import type { GatewayOptions } from './options.js';

const FAILED = smtpReply(535, '5.7.8', 'Error: authentication failed');
const TOO_MANY = smtpReply(421, '4.7.0', 'Error: too many failed authentication attempts, closing connection');
const UNAVAILABLE = smtpReply(454, '4.7.0', 'Temporary authentication failure');

type AuthCallback = (err: Error | null | undefined, response?: SMTPServerAuthenticationResponse) => void;

/** smtp-server's onAuth for the gateway; `state` gives the per-connection failure counter. */
export function authHandler(
  options: Pick<GatewayOptions, 'authenticate' | 'allowInsecureAuth' | 'authFailureDelay' | 'maxAuthFailures'>,
  state: (session: SMTPServerSession) => { authFailures: number; readonly proxiedTls?: boolean } | undefined,
): (auth: SMTPServerAuthentication, session: SMTPServerSession, cb: AuthCallback) => void {
  const insecureAuth = options.allowInsecureAuth ?? false;
  const limit = options.maxAuthFailures ?? 5;
  const delay = options.authFailureDelay ?? 1000;
  return (auth, session, cb) => {
    // XCLIENT LOGIN=<name> (Postfix XCLIENT_README): the trusted front authenticated the
    // client; only reachable from a peer in the listener's xclient.trusted list.
    if (auth.method === 'XCLIENT' && auth.username) return cb(null, { user: { username: auth.username, method: 'XCLIENT' } });
    const check = options.authenticate;
    if (!check || (auth.method !== 'PLAIN' && auth.method !== 'LOGIN')) {
      return cb(Object.assign(new Error('Authentication not available'), { responseCode: 504 }));
    }
    // TLS to a trusted proxy (PROXY v2 SSL TLV) counts as TLS.
    const encrypted = session.secure || state(session)?.proxiedTls === true;
    if (!encrypted && !insecureAuth) return cb(replyError(AUTH_NEEDS_TLS));
    check({
      method: auth.method,
      username: auth.username ?? '',
      password: auth.password ?? '',
      client: { address: session.remoteAddress, tls: encrypted },
    }).then(
      (ok) => {
        if (ok) return cb(null, { user: { username: auth.username, method: auth.method } });
        // Slow down guessing, more with each failure, and stop it at the limit.
        const s = state(session);
        const failures = s ? ++s.authFailures : 1;
        setTimeout(() => cb(replyError(failures >= limit ? TOO_MANY : FAILED)), failures * delay);
      },
      (err: unknown) => {
        channels.error.publish({ sessionId: session.id, error: err });
        cb(replyError(UNAVAILABLE));
      },
    );
  };
}
