/**
 * What an SMTP AUTH check is asked: the gateway's `authenticate` option takes a function of
 * it (your own, or dovecotAuth()'s).
 */

/** Credentials from SMTP AUTH (PLAIN or LOGIN), offered only after STARTTLS unless allowed. */
export interface AuthRequest {
  readonly method: string;
  readonly username: string;
  readonly password: string;
  readonly client: { readonly address: string; readonly tls: boolean };
}
