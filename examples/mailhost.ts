/**
 * A small-office mailhost: dovetail as the whole MTA of one domain, the setup Postfix's
 * documentation calls "a small office network" with Dovecot behind it:
 *
 *   - mail for our domain is delivered into the embedded mailstore (LMTP into Maildir)
 *     before the client is answered, and recipients are checked with the store at RCPT;
 *   - mail for everyone else is written to the durable queue (the client hears 250 once it
 *     is on disk) and sent on by MX lookup (smtp()), with opportunistic TLS, retries with
 *     Postfix's backoff, a delay notice after 4 hours and a bounce after 5 days;
 *   - relaying is allowed for `mynetworks` and for authenticated users only (AUTH offered
 *     only over TLS), and everyone may send to our domain;
 *   - bounces to local senders land in their local mailbox (DSNs are routed like any mail).
 *
 * The domain is written down once: the routing table's `localDomains` is what relayControl
 * treats as ours, and the store refuses any other domain, so relayed mail can never land
 * in a local folder.
 *
 * Run as a script (`node dist/examples/mailhost.js` after a build) it listens on
 * 127.0.0.1:2525 for DOMAIN (default example.test) with the system's DNS; tests call
 * {@link startMailhost} with a loopback DNS server and next-hop port.
 */
import { mkdir } from 'node:fs/promises';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { createGateway, createLmtpServer, createQueue, lmtp, maildir, routes, smtp, type AuthRequest, type Gateway, type LmtpServer, type MxResolver, type SmtpTlsOptions } from '../lib/index.js';
import { relayControl, sizeLimit, spamTag } from '../milters/index.js';

export interface MailhostOptions {
  /** Our domain. Default example.test. */
  readonly domain?: string;
  /** Our host name (greeting, Received, EHLO to other MTAs). Default mail.<domain>. */
  readonly hostname?: string;
  readonly host?: string;
  readonly port?: number;
  /** Where mail, queue and quarantine live. Default ./var/mailhost. */
  readonly base?: string;
  /** Networks that may relay without AUTH. Default 127.0.0.0/8 and ::1. */
  readonly mynetworks?: readonly string[];
  /** Users who may log in (over TLS) and relay: address → password. Default none. */
  readonly users?: Readonly<Record<string, string>>;
  /** Key and certificate for STARTTLS (needed for AUTH). */
  readonly tls?: { readonly key: string; readonly cert: string };
  /** DNS for MX lookups. Default: the system's. */
  readonly resolver?: MxResolver;
  /** Port of the next hops found by MX. Default 25. */
  readonly smtpPort?: number;
  /** TLS policy towards other MTAs. Default 'may'. */
  readonly outboundTls?: SmtpTlsOptions;
  /** Queue backoff, ms (default Postfix's 300 s / 4000 s). */
  readonly backoff?: { readonly min: number; readonly max: number };
}

export interface Mailhost {
  readonly gateway: Gateway;
  readonly store: LmtpServer;
  readonly host: string;
  readonly port: number;
  /** Maildir root of the store: `<root>/<address>/new/`. */
  readonly root: string;
  close(): Promise<void>;
}

/** Starts the store, the queue and the gateway. */
export async function startMailhost(options: MailhostOptions = {}): Promise<Mailhost> {
  const domain = options.domain ?? 'example.test';
  const hostname = options.hostname ?? `mail.${domain}`;
  const base = path.resolve(options.base ?? 'var/mailhost');
  const root = path.join(base, 'mail');
  await mkdir(root, { recursive: true });
  await mkdir(path.join(base, 'quarantine'), { recursive: true });

  // The mailstore holds our domain and nothing else.
  const store = await createLmtpServer({ root, listen: { host: '127.0.0.1', port: 0 }, domains: [domain], unknownUser: 'accept', hostname: `store.${domain}` });
  const at = store.address as { host: string; port: number };

  // Our domain once: here. Everything else goes out by MX.
  const table = routes({
    [domain]: lmtp({ host: at.host, port: at.port, lhloName: hostname }),
    '*': smtp({
      hostname,
      ...(options.resolver ? { resolver: options.resolver } : {}),
      ...(options.smtpPort ? { port: options.smtpPort } : {}),
      tls: options.outboundTls ?? 'may',
    }),
  });
  const queue = createQueue({
    dir: path.join(base, 'queue'),
    transport: table,
    hostname,
    delayWarning: 4 * 3600_000,
    ...(options.backoff ? { backoff: options.backoff } : {}),
  });

  const users = options.users ?? {};
  const authenticate = async (req: AuthRequest): Promise<boolean> => req.client.tls && Object.hasOwn(users, req.username) && users[req.username] === req.password;

  const gateway = createGateway({
    hostname,
    listen: { host: options.host ?? '127.0.0.1', port: options.port ?? 2525 },
    milters: [
      sizeLimit({ maxBytes: 25 * 1024 * 1024 }),
      relayControl({ localDomains: table.localDomains, mynetworks: options.mynetworks ?? ['127.0.0.0/8', '::1/128'] }),
      spamTag({ requiredScore: 5 }),
    ],
    delivery: table,
    verifyRecipients: true,
    queue,
    quarantine: maildir({ root: path.join(base, 'quarantine') }),
    resolveClientNames: false,
    ...(options.tls ? { tls: options.tls } : {}),
    ...(Object.keys(users).length ? { authenticate } : {}),
  });
  const [addr] = await gateway.listen();
  return {
    gateway,
    store,
    host: addr!.host,
    port: addr!.port,
    root,
    async close() {
      await gateway.close(); // drains, stops the queue, closes the routes' transports
      await store.close();
    },
  };
}

async function main(): Promise<void> {
  const env = process.env;
  const domain = env['DOMAIN'] ?? 'example.test';
  const m = await startMailhost({
    domain,
    ...(env['MX_HOSTNAME'] ? { hostname: env['MX_HOSTNAME'] } : {}),
    host: env['HOST'] ?? '127.0.0.1',
    port: Number(env['PORT'] ?? 2525),
    ...(env['MAIL_BASE'] ? { base: env['MAIL_BASE'] } : {}),
  });
  console.log(`
dovetail mailhost for ${domain} listening on ${m.host}:${m.port}
  ${domain}:       delivered into ${m.root}/<address>/new/ before the client is answered
  everything else: queued, then sent on by MX (relaying for 127.0.0.0/8 and ::1 only)

  npm run send -- --server ${m.host}:${m.port} --to bob@${domain}          # stored locally
  npm run send -- --server ${m.host}:${m.port} --to someone@elsewhere.test # queued, sent on by MX
Ctrl-C stops it (messages in flight are finished first; the queue keeps the rest).
`);
  for (const signal of ['SIGINT', 'SIGTERM'] as const) {
    process.once(signal, () => void m.close().then(() => process.exit(0)));
  }
}

if (process.argv[1] && path.resolve(process.argv[1]) === fileURLToPath(import.meta.url)) await main();
