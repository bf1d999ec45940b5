/**
 * senderLogin: an authenticated user may use only its own addresses in `MAIL FROM`, as
 * Postfix's `smtpd_sender_login_maps` with `reject_authenticated_sender_login_mismatch`
 * (src/smtpd/smtpd_check.c, reject_auth_sender_login_mismatch): the map says, for a
 * sender address (or a whole `@domain`), which login names own it; a session
 * authenticated as anyone else gets Postfix's reply
 * `553 5.7.1 <addr>: Sender address rejected: not owned by user <login>`. With
 * `checkUnauthenticated` it also refuses an unauthenticated client that uses an owned
 * address (`reject_unauthenticated_sender_login_mismatch`:
 * `553 5.7.1 <addr>: Sender address rejected: not logged in`), which on a submission
 * listener never happens (AUTH comes first) but on port 25 stops outsiders from using our
 * users' addresses as envelope senders.
 *
 * Lookups: the address lower-cased exactly, then `@domain`. A recipient delimiter is not
 * stripped (give `alice+list@…` its own entry if users send with extensions). The null
 * sender `<>` (bounces) is never refused.
 *
 * What it does not do: look at the From: header (that is DMARC's business; dkimSign signs
 * only what it is configured to), or decide relaying (relayControl does).
 */
import { defineMilter, reject, DovetailError, ErrorCodes, type EnvelopeAddress, type MessageContext, type Milter } from '../lib/index.js';

/** Who owns a sender address: login names (one or several). */
export type SenderOwners = string | readonly string[];

/** Options of {@link senderLogin}. */
export interface SenderLoginOptions {
  /**
   * Sender address → the login names that may use it (Postfix smtpd_sender_login_maps):
   * keys are full addresses (`alice@example.com`) or domains (`@example.com`), case-insensitive.
   * Or a function of the lower-cased sender address (it may be async: a database lookup).
   */
  readonly map: Readonly<Record<string, SenderOwners>> | ((sender: string) => SenderOwners | undefined | Promise<SenderOwners | undefined>);
  /** Also refuse unauthenticated clients that use an address the map assigns. Default false. */
  readonly checkUnauthenticated?: boolean;
}

const bad = (why: string): never => {
  throw new DovetailError(ErrorCodes.INVALID_OPTIONS, `senderLogin: ${why}`);
};

const list = (o: SenderOwners | undefined): string[] | undefined => (o === undefined ? undefined : (typeof o === 'string' ? [o] : [...o]).map((x) => x.toLowerCase()));

/**
 * Creates the sender-ownership milter. Put it on the submission listener's chain (and,
 * with `checkUnauthenticated`, on port 25's), before relayControl.
 *
 * @example
 * ```ts
 * senderLogin({ map: { 'alice@example.com': 'alice', 'sales@example.com': ['alice', 'bob'], '@example.org': 'carol' } })
 * ```
 */
export function senderLogin(options: SenderLoginOptions): Milter {
  const map = options?.map;
  let lookup: (sender: string) => Promise<string[] | undefined>;
  if (typeof map === 'function') {
    lookup = async (sender) => list(await map(sender));
  } else if (typeof map === 'object' && map !== null) {
    const table = new Map<string, string[]>();
    for (const [key, owners] of Object.entries(map)) {
      if (!/^[^@\s]*@[^@\s]+$/.test(key)) bad(`map key ${JSON.stringify(key)} is not an address or @domain`);
      const names = list(owners);
      if (!names || names.length === 0 || names.some((n) => typeof n !== 'string' || n === '')) bad(`map ${JSON.stringify(key)} needs one or more login names`);
      table.set(key.toLowerCase(), names!);
    }
    lookup = async (sender) => table.get(sender) ?? table.get(sender.slice(sender.lastIndexOf('@')));
  } else {
    return bad('map must be an object or a function');
  }
  const checkUnauthenticated = options.checkUnauthenticated ?? false;

  return defineMilter({
    name: 'sender-login',
    async mail(ctx: MessageContext, sender: EnvelopeAddress) {
      if (sender.address === '') return undefined;
      const address = sender.address.toLowerCase();
      if (ctx.auth) {
        const owners = await lookup(address);
        if (!owners || !owners.includes(ctx.auth.user.toLowerCase())) {
          return reject(553, '5.7.1', `<${sender.address}>: Sender address rejected: not owned by user ${ctx.auth.user}`);
        }
        return undefined;
      }
      if (checkUnauthenticated && (await lookup(address))) {
        return reject(553, '5.7.1', `<${sender.address}>: Sender address rejected: not logged in`);
      }
      return undefined;
    },
  });
}
