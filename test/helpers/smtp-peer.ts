/**
 * Test helper: a next-hop SMTP server on a free loopback port (smtp-server), standing in
 * for "some MTA on the Internet" in tests of smtp(): which extensions it offers, STARTTLS
 * with a given certificate, AUTH with one user, a reply per recipient, and a record of
 * every connection and transaction (envelope with ESMTP parameters, bytes as received,
 * whether the session was encrypted and authenticated). The real-Postfix versions of these
 * peers are in postfix-mta.ts.
 */
import { SMTPServer, type SMTPServerOptions } from 'smtp-server';

export interface PeerMessage {
  readonly from: string;
  readonly fromArgs: Readonly<Record<string, unknown>>;
  readonly to: readonly string[];
  readonly toArgs: readonly Readonly<Record<string, unknown>>[];
  readonly data: Buffer;
  readonly secure: boolean;
  readonly user: string | undefined;
}

export interface PeerOptions {
  /** Address to listen on. Default 127.0.0.1. */
  readonly host?: string;
  /** Port. Default: a free one. */
  readonly port?: number;
  /** Greeting/EHLO name. Default 'peer.test'. */
  readonly name?: string;
  /** PEM key and cert: STARTTLS offered. */
  readonly tls?: { readonly key: string; readonly cert: string };
  /** AUTH required for relaying: this user and password. */
  readonly auth?: { readonly user: string; readonly pass: string };
  /** Extensions not offered. */
  readonly hide?: readonly ('8BITMIME' | 'SMTPUTF8' | 'DSN' | 'PIPELINING' | 'SIZE')[];
  /** SIZE limit announced (and enforced). */
  readonly size?: number;
  /** A reply for a recipient: `[code, text]`, or undefined to accept. */
  readonly rcpt?: (address: string) => readonly [number, string] | undefined;
  /** The reply after the final dot: `[code, text]`, or undefined for 250. */
  readonly data?: (message: { from: string; to: readonly string[] }) => readonly [number, string] | undefined;
}

export interface Peer {
  readonly port: number;
  readonly messages: PeerMessage[];
  /** TCP connections accepted so far. */
  connections(): number;
  /** Most connections open at once. */
  peak(): number;
  /** Resolves when `n` messages have arrived; rejects after `ms`. */
  waitFor(n: number, ms?: number): Promise<PeerMessage[]>;
  close(): Promise<void>;
}

const err = (code: number, text: string): Error => Object.assign(new Error(text), { responseCode: code });

export async function startPeer(options: PeerOptions = {}): Promise<Peer> {
  const messages: PeerMessage[] = [];
  let connections = 0;
  let active = 0;
  let peak = 0;
  const hide = new Set(options.hide ?? []);
  const config: SMTPServerOptions = {
    name: options.name ?? 'peer.test',
    logger: false,
    authOptional: !options.auth,
    authMethods: ['PLAIN', 'LOGIN'],
    disabledCommands: [...(options.tls ? [] : ['STARTTLS']), ...(options.auth ? [] : ['AUTH'])],
    ...(options.tls ? { key: options.tls.key, cert: options.tls.cert } : {}),
    hide8BITMIME: hide.has('8BITMIME'),
    hideSMTPUTF8: hide.has('SMTPUTF8'),
    hideDSN: hide.has('DSN'),
    hidePIPELINING: hide.has('PIPELINING'),
    ...(options.size !== undefined ? { size: options.size } : {}),
    hideSize: hide.has('SIZE'),
    onConnect(_session, cb) {
      connections++;
      peak = Math.max(peak, ++active);
      cb();
    },
    onClose() {
      active--;
    },
    onAuth(auth, _session, cb) {
      const want = options.auth;
      if (want && auth.username === want.user && auth.password === want.pass) return cb(null, { user: auth.username });
      cb(err(535, '5.7.8 Error: authentication failed: bad password'));
    },
    onRcptTo(address, _session, cb) {
      const r = options.rcpt?.(address.address);
      cb(r ? err(r[0], r[1]) : undefined);
    },
    onData(stream, session, cb) {
      const parts: Buffer[] = [];
      stream.on('data', (d: Buffer) => parts.push(d));
      stream.on('end', () => {
        const from = session.envelope.mailFrom ? session.envelope.mailFrom.address : '';
        const to = session.envelope.rcptTo.map((r) => r.address);
        const r = options.data?.({ from, to });
        if (r) return cb(err(r[0], r[1]));
        messages.push({
          from,
          fromArgs: (session.envelope.mailFrom && session.envelope.mailFrom.args) || {},
          to,
          toArgs: session.envelope.rcptTo.map((x) => x.args || {}),
          data: Buffer.concat(parts),
          secure: session.secure,
          user: session.user === undefined ? undefined : String(session.user),
        });
        cb(null, `2.0.0 Ok: queued as P${messages.length}`);
      });
    },
  };
  const server = new SMTPServer(config);
  server.on('error', () => undefined);
  await new Promise<void>((resolve, reject) => {
    server.server.once('error', reject);
    server.listen(options.port ?? 0, options.host ?? '127.0.0.1', resolve);
  });
  const port = (server.server.address() as { port: number }).port;
  return {
    port,
    messages,
    connections: () => connections,
    peak: () => peak,
    async waitFor(n, ms = 15_000) {
      const deadline = Date.now() + ms;
      while (messages.length < n) {
        if (Date.now() > deadline) throw new Error(`peer on ${port}: ${messages.length} of ${n} messages within ${ms} ms`);
        await new Promise((r) => setTimeout(r, 20));
      }
      return messages;
    },
    close: () => new Promise<void>((resolve) => server.close(() => resolve())),
  };
}
