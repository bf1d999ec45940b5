/**
 * The error registry: every error dovetail raises or reports carries one of these stable
 * codes. The codes are listed, with what they mean and what the client sees, in
 * docs/errors.md. A client never sees the message of an internal failure: the gateway
 * answers those with a generic `451 4.3.0` and reports the error on a diagnostics channel.
 */

export const ErrorCodes = {
  /** A milter handler did not settle within its command or content timeout. */
  MILTER_TIMEOUT: 'DOVETAIL_ERR_MILTER_TIMEOUT',
  /** A milter handler threw or returned a rejected promise. */
  MILTER_FAILED: 'DOVETAIL_ERR_MILTER_FAILED',
  /** A milter returned something that is not a verdict allowed at that stage. */
  INVALID_VERDICT: 'DOVETAIL_ERR_INVALID_VERDICT',
  /** An SMTP reply given to reject()/tempfail() breaks the reply rules. */
  INVALID_REPLY: 'DOVETAIL_ERR_INVALID_REPLY',
  /** An end-of-message edit is malformed (bad header name, index, address). */
  INVALID_EDIT: 'DOVETAIL_ERR_INVALID_EDIT',
  /** A milter object given to defineMilter() or the gateway is malformed. */
  INVALID_MILTER: 'DOVETAIL_ERR_INVALID_MILTER',
  /** A milter peer sent a malformed frame (bad length, missing NUL, left-over bytes, unknown command). */
  MILTER_PROTOCOL: 'DOVETAIL_ERR_MILTER_PROTOCOL',
  /** Gateway or transport options are malformed. */
  INVALID_OPTIONS: 'DOVETAIL_ERR_INVALID_OPTIONS',
  /** Writing to or reading from the spool failed. */
  SPOOL_FAILED: 'DOVETAIL_ERR_SPOOL',
  /** A transport failed as a whole (not a per-recipient refusal). */
  DELIVERY_FAILED: 'DOVETAIL_ERR_DELIVERY',
  /** A queue directory is locked by another live process (createQueue({ lock: true })). */
  QUEUE_LOCKED: 'DOVETAIL_ERR_QUEUE_LOCKED',
  /** A client went over a per-client limit (connections at once, connection rate): it was refused with 421. */
  CLIENT_LIMIT: 'DOVETAIL_ERR_CLIENT_LIMIT',
  /** The authentication backend (dovecotAuth()) could not answer: unreachable, timeout, protocol error, temporary failure. */
  AUTH_UNAVAILABLE: 'DOVETAIL_ERR_AUTH_UNAVAILABLE',
  /** A trusted proxy sent a malformed PROXY protocol header, or none in time: the connection was closed. */
  PROXY_PROTOCOL: 'DOVETAIL_ERR_PROXY_PROTOCOL',
  /** A PROXY header, XCLIENT or XFORWARD from a peer not in the listener's trusted list: refused. */
  PROXY_UNTRUSTED: 'DOVETAIL_ERR_PROXY_UNTRUSTED',
  /** A shared store (Redis: rateLimit, greylist, redisAnvil) failed or did not answer in time; onStoreError decided. */
  STORE_UNAVAILABLE: 'DOVETAIL_ERR_STORE_UNAVAILABLE',
} as const;

export type ErrorCode = (typeof ErrorCodes)[keyof typeof ErrorCodes];

/** An error with a stable `code` from {@link ErrorCodes}. */
export class DovetailError extends Error {
  readonly code: ErrorCode;

  constructor(code: ErrorCode, message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = 'DovetailError';
    this.code = code;
  }
}

/** True when `err` is a {@link DovetailError}, optionally with the given code. */
export function isDovetailError(err: unknown, code?: ErrorCode): err is DovetailError {
  return err instanceof DovetailError && (code === undefined || err.code === code);
}

/**
 * True when `err`, or an error in its `cause` chain (a spool failure wraps the fs error),
 * says the filesystem or the quota is full (ENOSPC, EDQUOT): the gateway answers those
 * with `452 4.3.1` (RFC 3463 X.3.1, insufficient system storage) instead of `451 4.3.0`.
 */
export function isNoStorage(err: unknown): boolean {
  for (let e = err, depth = 0; e !== null && typeof e === 'object' && depth < 8; e = (e as { cause?: unknown }).cause, depth++) {
    const code = (e as { code?: unknown }).code;
    if (code === 'ENOSPC' || code === 'EDQUOT') return true;
  }
  return false;
}
