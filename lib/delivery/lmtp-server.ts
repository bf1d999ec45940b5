/**
 * The embedded mailstore: an LMTP server (RFC 2033, smtp-server in LMTP mode) that stores
 * each message into Maildir through maildir(), with one reply per recipient after the final
 * dot, an optional per-user quota and an unknown-user policy. With it, gateway → lmtp() →
 * mailstore runs with no outside server (the role Dovecot's LMTP plays in Postfix setups).
 *
 * Replies (exact codes, enhanced codes and texts):
 * - a domain outside `domains`: `550 5.1.1 <addr>: Recipient address rejected: this
 *   mailstore does not hold mail for its domain`, at RCPT;
 * - unknown user (with `users`, `unknownUser: 'reject'`): `550 5.1.1 <addr>: User unknown in
 *   local recipient table`, at RCPT;
 * - over quota: `552 5.2.2 <addr>: Mailbox full`, at RCPT when the mailbox is already full or
 *   MAIL FROM's SIZE= would overflow it, else per recipient after the final dot (quota = bytes
 *   already in the user's maildir new/ and cur/ plus this message);
 * - stored: `250 2.0.0 <addr> Ok: stored as <file>`; a storage failure: maildir()'s own
 *   `451 4.3.0` (or `452 4.3.1` for a full disk), per recipient;
 * - already delivered to that address (the message carries `Delivered-To: <addr>`):
 *   `554 5.4.6 <addr>: mail forwarding loop for <addr>`, per recipient after the final dot.
 *
 * It deliberately does not: authenticate, run Sieve, deduplicate, keep a quota cache (the
 * quota is the sum of file sizes, read at each check: fine for a test or small store, not
 * for a million-message mailbox), or create `root`.
 */
import { readdir, stat } from 'node:fs/promises';
import net from 'node:net';
import path from 'node:path';
import { SMTPServer, type SMTPServerAddress, type SMTPServerDataStream, type SMTPServerSession } from 'smtp-server';
import type tls from 'node:tls';
import { channels } from '../diagnostics.js';
import { DovetailError, ErrorCodes } from '../errors.js';
import type { EnvelopeAddress } from '../milter/types.js';
import { smtpReply, type SmtpReply } from '../milter/verdict.js';
import { adoptConnection, ExactConnection, isReplyError, markedReply, replyError, type ConnectionOptions } from '../smtp-server/exact-replies.js';
import { spoolFrom, type SpoolOptions } from '../message/spool.js';
import { checkDelimiter, defaultMailbox, maildir, notServed, servedDomains, withoutExtension } from './maildir.js';
import type { RecipientResult } from './types.js';

export interface LmtpServerOptions {
  /** Maildir root (must exist): one maildir per user, named as maildir()'s default (the lower-cased address). */
  readonly root: string;
  /** Where to listen: TCP (port 0 picks a free one) or a unix socket path. */
  readonly listen: { readonly host?: string; readonly port: number } | { readonly path: string };
  /** Per-user limit in bytes: one number for every user, or a function of the lower-cased address, without its extension when recipientDelimiter is set (Infinity = none). */
  readonly quota?: { readonly maxBytes: number } | ((user: string) => number);
  /**
   * The domains this store holds mail for (`example.com`, `.example.com` for subdomains):
   * a recipient of any other domain is refused at RCPT with `550 5.1.1`. Default: every
   * domain (give it whenever the gateway can relay).
   */
  readonly domains?: readonly string[];
  /** Known users: a list of addresses (case-insensitive) or a predicate. Default: everyone. */
  readonly users?: readonly string[] | ((address: string) => boolean);
  /** What to do with an address `users` does not know. Default 'reject' (550 5.1.1 at RCPT). */
  readonly unknownUser?: 'reject' | 'accept';
  /** Offer STARTTLS with this key and certificate (PEM). Default: STARTTLS not offered. */
  readonly tls?: { readonly key: string | Buffer; readonly cert: string | Buffer };
  /** Our name in the greeting and LHLO reply. Default 'localhost'. */
  readonly hostname?: string;
  /** SIZE limit announced and enforced. Default 50 MiB. */
  readonly maxMessageBytes?: number;
  /** fsync each message and new/ before answering 250. Default true. */
  readonly fsync?: boolean;
  /** Spool for incoming messages (RAM threshold, temp dir). */
  readonly spool?: SpoolOptions;
  /** Idle time before a client is disconnected, ms. Default 300 000. */
  readonly socketTimeout?: number;
  /**
   * Postfix `recipient_delimiter` (passed to maildir()): `bob+tag@example.com` is stored in
   * `bob@example.com`'s maildir, counts against bob's quota and is known when bob is (`users`
   * is asked about the full address first, then about the address without its extension).
   * Default: none.
   */
  readonly recipientDelimiter?: string;
  /**
   * Prepend `Delivered-To: <recipient>` and refuse a recipient the message was already
   * delivered to (`554 5.4.6 mail forwarding loop for <address>`), as maildir() does. Default true.
   */
  readonly deliveredTo?: boolean;
}

export interface LmtpServer {
  /** Where it listens: `{ host, port }` or `{ path }`. */
  readonly address: { readonly host: string; readonly port: number } | { readonly path: string };
  /** Messages stored / recipients refused, for tests and metrics. */
  stats(): { readonly sessions: number; readonly transactions: number; readonly stored: number; readonly refused: number };
  /** Stops listening and closes every connection (transactions in flight are cut off). */
  close(): Promise<void>;
}

class ExactServer extends SMTPServer {
  override connect(socket: net.Socket | tls.TLSSocket, socketOptions: unknown): void {
    adoptConnection(this, new ExactConnection(this, socket, socketOptions as ConnectionOptions));
  }
}

/**
 * Starts the embedded LMTP mailstore; resolves once it listens.
 *
 * @throws DovetailError `DOVETAIL_ERR_INVALID_OPTIONS` when the options are malformed.
 */
export async function createLmtpServer(options: LmtpServerOptions): Promise<LmtpServer> {
  if (typeof options !== 'object' || options === null || typeof options.root !== 'string' || options.root === '') {
    throw new DovetailError(ErrorCodes.INVALID_OPTIONS, 'createLmtpServer() needs a root');
  }
  if (!options.listen || (!('path' in options.listen) && typeof options.listen.port !== 'number')) {
    throw new DovetailError(ErrorCodes.INVALID_OPTIONS, 'createLmtpServer() needs listen: { host, port } or { path }');
  }
  const root = path.resolve(options.root);
  const delimiter = checkDelimiter('createLmtpServer()', options.recipientDelimiter);
  const store = maildir({
    root,
    fsync: options.fsync ?? true,
    ...(options.domains ? { domains: options.domains } : {}),
    ...(delimiter ? { recipientDelimiter: delimiter } : {}),
    ...(options.deliveredTo !== undefined ? { deliveredTo: options.deliveredTo } : {}),
  });
  /** The mailbox owner: the address without its extension. */
  const ownerOf = (address: string): string => withoutExtension(address, delimiter);
  const serves = servedDomains('createLmtpServer()', options.domains);
  const maxBytes = options.maxMessageBytes ?? 50 * 1024 * 1024;
  const quota = options.quota;
  const limitOf = (user: string): number =>
    quota === undefined ? Infinity : typeof quota === 'function' ? quota(user) : quota.maxBytes;
  const users = options.users;
  const knownSet = Array.isArray(users) ? new Set(users.map((u) => u.toLowerCase())) : undefined;
  const knownAs = (address: string): boolean => (knownSet ? knownSet.has(address.toLowerCase()) : (users as (a: string) => boolean)(address));
  const known = (address: string): boolean =>
    users === undefined || options.unknownUser === 'accept' ? true : knownAs(address) || (ownerOf(address) !== address && knownAs(ownerOf(address)));
  const counters = { sessions: 0, transactions: 0, stored: 0, refused: 0 };

  const full = (addr: string): SmtpReply => smtpReply(552, '5.2.2', `<${addr}>: Mailbox full`);

  /** Bytes in `<root>/<mailbox>/{new,cur}`. */
  async function used(rcpt: EnvelopeAddress): Promise<number> {
    const dir = path.join(root, defaultMailbox({ address: ownerOf(rcpt.address), args: rcpt.args }));
    let total = 0;
    for (const sub of ['new', 'cur']) {
      let names: string[];
      try {
        names = await readdir(path.join(dir, sub));
      } catch {
        continue;
      }
      const sizes = await Promise.all(names.map((n) => stat(path.join(dir, sub, n)).then((s) => s.size, () => 0)));
      for (const s of sizes) total += s;
    }
    return total;
  }

  const toEnvelope = (a: SMTPServerAddress): EnvelopeAddress => {
    const args: Record<string, string | true> = {};
    if (a.args) for (const [k, v] of Object.entries(a.args)) args[k.toUpperCase()] = v === true ? true : String(v);
    return { address: a.address, args };
  };

  async function onRcptTo(address: SMTPServerAddress, session: SMTPServerSession): Promise<void> {
    const rcpt = toEnvelope(address);
    if (!serves(rcpt.address)) {
      counters.refused++;
      throw replyError(notServed(rcpt.address));
    }
    if (!known(rcpt.address)) {
      counters.refused++;
      throw replyError(smtpReply(550, '5.1.1', `<${rcpt.address}>: User unknown in local recipient table`));
    }
    const limit = limitOf(ownerOf(rcpt.address).toLowerCase());
    if (Number.isFinite(limit)) {
      const from = session.envelope.mailFrom;
      const announced = Number(from ? toEnvelope(from).args['SIZE'] ?? 0 : 0) || 0;
      const have = await used(rcpt);
      if (have >= limit || have + announced > limit) {
        counters.refused++;
        throw replyError(full(rcpt.address));
      }
    }
  }

  async function onData(stream: SMTPServerDataStream, session: SMTPServerSession): Promise<(string | Error)[]> {
    counters.transactions++;
    const spool = await spoolFrom(stream, options.spool);
    try {
      if ((stream as unknown as { sizeExceeded?: boolean }).sizeExceeded) {
        // smtp-server answers 552 for every recipient itself.
        return [];
      }
      const from = session.envelope.mailFrom;
      const sender: EnvelopeAddress = from ? toEnvelope(from) : { address: '', args: {} };
      const rcpts = session.envelope.rcptTo.map(toEnvelope);
      const out: (SmtpReply | undefined)[] = new Array<SmtpReply | undefined>(rcpts.length);
      // Quota, per recipient, with this message counted.
      const within: number[] = [];
      await Promise.all(
        rcpts.map(async (r, i) => {
          const limit = limitOf(ownerOf(r.address).toLowerCase());
          if (Number.isFinite(limit) && (await used(r)) + spool.size > limit) out[i] = full(r.address);
          else within.push(i);
        }),
      );
      within.sort((a, b) => a - b);
      if (within.length) {
        let results: RecipientResult[];
        try {
          results = await store.deliver(
            { queueId: session.id, sender, recipients: within.map((i) => rcpts[i]!) },
            { size: spool.size, stream: () => spool.createReadStream() },
          );
        } catch (error) {
          channels.error.publish({ sessionId: session.id, error });
          results = within.map((i) => ({ recipient: rcpts[i]!.address, status: 'deferred', reply: smtpReply(451, '4.3.0', 'Local delivery error') }));
        }
        within.forEach((i, k) => {
          const r = results[k];
          const reply = r?.reply ?? smtpReply(451, '4.3.0', 'Local delivery error');
          out[i] =
            r?.status === 'delivered'
              ? smtpReply(reply.code, reply.enhanced, `<${rcpts[i]!.address}> ${reply.lines.join(' ')}`)
              : smtpReply(reply.code, reply.enhanced, `<${rcpts[i]!.address}>: ${reply.lines.join(' ')}`);
        });
      }
      return out.map((reply) => {
        const r = reply ?? smtpReply(451, '4.3.0', 'Local delivery error');
        if (r.code < 300) {
          counters.stored++;
          return markedReply(r);
        }
        counters.refused++;
        return replyError(r);
      });
    } finally {
      await spool.dispose();
    }
  }

  const server = new ExactServer({
    lmtp: true,
    name: options.hostname ?? 'localhost',
    size: maxBytes,
    authOptional: true,
    disabledCommands: options.tls ? ['AUTH'] : ['AUTH', 'STARTTLS'],
    ...(options.tls ? { key: options.tls.key, cert: options.tls.cert } : {}),
    hideDSN: true,
    disableReverseLookup: true,
    socketTimeout: options.socketTimeout ?? 300_000,
    logger: false,
    onConnect(_session, cb) {
      counters.sessions++;
      cb();
    },
    onRcptTo(address, session, cb) {
      onRcptTo(address, session).then(
        () => cb(),
        (err: unknown) => {
          if (!isReplyError(err)) channels.error.publish({ sessionId: session.id, error: err });
          cb(isReplyError(err) ? err : replyError(smtpReply(451, '4.3.0', 'Local error, try again later')));
        },
      );
    },
    onData(stream, session, cb) {
      onData(stream, session).then(
        (replies) => (replies.length ? cb(null, replies as unknown as string) : cb(null)),
        (err: unknown) => {
          channels.error.publish({ sessionId: session.id, error: err });
          cb(replyError(smtpReply(451, '4.3.0', 'Local delivery error')));
        },
      );
    },
  });
  server.on('error', (err: Error) => channels.error.publish({ error: err }));

  await new Promise<void>((resolve, reject) => {
    server.server.once('error', reject);
    const done = (): void => {
      server.server.off('error', reject);
      resolve();
    };
    if ('path' in options.listen) server.server.listen(options.listen.path, done);
    else server.listen(options.listen.port, options.listen.host ?? '127.0.0.1', done);
  });
  const a = server.server.address();
  const address = typeof a === 'string' ? { path: a } : { host: a!.address, port: a!.port };

  return {
    address,
    stats: () => ({ ...counters }),
    async close() {
      // smtp-server's close() waits for clients to leave; pooled LMTP clients never do, so cut them.
      const closing = new Promise<void>((resolve) => server.close(() => resolve()));
      for (const c of (server as unknown as { connections: Set<{ close(): void; _socket?: net.Socket }> }).connections) {
        c._socket?.destroy();
        c.close();
      }
      await closing;
    },
  };
}
