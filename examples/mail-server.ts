/**
 * A whole mail server for one domain, set up the way a Postfix + Dovecot server usually is,
 * with dovetail in Postfix's place and Dovecot left where it was (mailboxes, IMAP, SASL,
 * Sieve):
 *
 *   master.cf line                         here                     chain (per listener)
 *   smtp       inet n - y - - smtpd        listen port 25  'mx'     sizeLimit, relayControl, [dnsbl], [content filters], spamTag
 *   submission inet n - y - - smtpd        listen port 587 'submission' (STARTTLS, then AUTH)
 *     -o smtpd_tls_security_level=encrypt                             sizeLimit, senderLogin, relayControl, dkimSign
 *     -o smtpd_sasl_auth_enable=yes
 *     -o smtpd_client_restrictions=permit_sasl_authenticated,reject
 *     -o smtpd_sender_login_maps=… -o smtpd_milters=inet:…opendkim
 *   submissions inet n - y - - smtpd       listen port 465 'submissions' (TLS from the first byte)
 *     -o smtpd_tls_wrappermode=yes …                                   the same chain as 587
 *
 * - AUTH is checked by Dovecot's auth service (`smtpd_sasl_type = dovecot`,
 *   `smtpd_sasl_path = private/auth`): {@link dovecotAuth} speaks its auth-client protocol
 *   over the same socket. AUTH is offered only over TLS (smtpd_tls_auth_only = yes: an AUTH
 *   before STARTTLS gets 538 5.7.11), a wrong password gets 535 5.7.8 after a growing delay,
 *   and the connection is dropped (421 4.7.0) after `maxAuthFailures` of them. On the
 *   submission ports MAIL before AUTH gets 530 5.7.0.
 * - Our domain is delivered into Dovecot over LMTP (`virtual_transport =
 *   lmtp:unix:private/dovecot-lmtp`) before the client is answered, and recipients are
 *   asked of Dovecot at RCPT (its userdb answers 550 5.1.1 for unknown users). Everything
 *   else is written to the durable queue (250 once it is on disk) and sent on by MX lookup
 *   (smtp(): opportunistic TLS, Postfix's backoff, DSNs). `routes()` is the transport_maps;
 *   its `localDomains` is what relayControl treats as ours, so the domain is written once.
 *
 * Why these chains:
 *
 * - Port 25 (mail from the internet to us): no AUTH at all (`auth: false`, Postfix's
 *   `-o smtpd_sasl_auth_enable=no`: users submit on 587/465); sizeLimit first (a number
 *   compared at MAIL FROM, and the cap applied while DATA streams); relayControl at RCPT
 *   with `permitAuthenticated: false` as a second lock: port 25 is never a way out; then,
 *   optionally, DNS lists and
 *   content filters (rspamd or SpamAssassin through connectMilter()) adding to the score;
 *   spamTag last, turning the score into SpamAssassin's X-Spam-* headers. Nothing is signed.
 * - Ports 587 and 465 (our users' mail to anywhere): senderLogin at MAIL (Postfix's
 *   reject_authenticated_sender_login_mismatch: 553 5.7.1 for an address the login does
 *   not own; by default a login owns exactly the address it is, as with Dovecot users named
 *   by their address); relayControl (authenticated sessions may relay: it is there as the
 *   second lock should the listener ever be opened without AUTH); dkimSign last, so that
 *   it signs the message as every milter before it left it (OpenDKIM as the last
 *   smtpd_milter). No spam scoring of our own users' mail.
 *
 * Spam goes to the users' Junk folder, as the usual Dovecot setup does it: Pigeonhole Sieve
 * (Debian's dovecot-sieve) runs a global script before the users' own, {@link JUNK_SIEVE}:
 *
 *   # conf.d/20-lmtp.conf                      # conf.d/90-sieve.conf
 *   protocol lmtp {                            plugin {
 *     mail_plugins = $mail_plugins sieve         sieve_before = /etc/dovecot/sieve/junk.sieve
 *   }                                          }
 *   lda_mailbox_autocreate = yes               # (sievec /etc/dovecot/sieve/junk.sieve)
 *
 * and on the Dovecot side the two sockets dovetail uses (conf.d/10-master.conf):
 *
 *   service lmtp { unix_listener lmtp { mode = 0660 user = dovetail } }        # or an inet_listener
 *   service auth { unix_listener auth-client { mode = 0660 user = dovetail } } # or an inet_listener
 *
 * Run as a script (`node dist/examples/mail-server.js` after a build) it listens on
 * HOST (default 0.0.0.0) ports 25, 587 and 465 (MX_PORT, SUBMISSION_PORT, SUBMISSIONS_PORT)
 * for DOMAIN, with TLS_CERT and TLS_KEY (PEM files, required), Dovecot at DOVECOT_LMTP and
 * DOVECOT_AUTH (a socket path or host:port; default /run/dovecot/lmtp and
 * /run/dovecot/auth-client), and the DKIM key in DKIM_KEY (made, and its DNS record printed,
 * when the file does not exist). Tests call {@link startMailServer} with loopback peers.
 */
import crypto from 'node:crypto';
import { existsSync } from 'node:fs';
import { mkdir, readFile, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import {
  createGateway,
  createQueue,
  dovecotAuth,
  lmtp,
  maildir,
  routes,
  smtp,
  type DovecotAuthenticator,
  type Gateway,
  type Milter,
  type MxResolver,
  type SmtpTlsOptions,
} from '../lib/index.js';
import { dkimDnsRecord, dkimSign, dnsbl, relayControl, senderLogin, sizeLimit, spamTag, type DnsblOptions, type SenderOwners } from '../milters/index.js';

/**
 * The global Sieve rule of the setup (Dovecot's `sieve_before`): what spamTag marked with
 * five or more stars goes to Junk. With spamTag's default requiredScore of 5, that is exactly
 * what it flagged `X-Spam-Flag: YES`.
 */
export const JUNK_SIEVE = 'require "fileinto";\nif header :contains "X-Spam-Level" "*****" {\n  fileinto "Junk";\n}\n';

/** Where a Dovecot service listens: a unix socket, or a TCP inet_listener. */
export type DovecotEndpoint = { readonly path: string } | { readonly host: string; readonly port: number };

export interface MailServerOptions {
  /** Our domain (its mail goes into Dovecot). Default example.test. */
  readonly domain?: string;
  /** Our host name: greeting, Received, EHLO to other MTAs, DSNs. Default mail.<domain>. */
  readonly hostname?: string;
  /** Address to listen on. Default 127.0.0.1. */
  readonly host?: string;
  /** The three ports (0: a free one). Default 25, 587, 465. */
  readonly ports?: { readonly mx?: number; readonly submission?: number; readonly submissions?: number };
  /** Key and certificate (PEM): STARTTLS on 25 and 587, implicit TLS on 465. */
  readonly tls: { readonly key: string | Buffer; readonly cert: string | Buffer };
  /** Dovecot's LMTP service (delivery, recipient checks) and auth-client service (SMTP AUTH). */
  readonly dovecot: { readonly lmtp: DovecotEndpoint; readonly auth: DovecotEndpoint };
  /** Our DKIM key: d=<domain>, s=<selector>; publish {@link dkimDnsRecord}(privateKey) at `<selector>._domainkey.<domain>`. */
  readonly dkim: { readonly selector: string; readonly privateKey: string | Buffer };
  /**
   * Who may use which envelope sender on 587/465 (smtpd_sender_login_maps): address or
   * `@domain` → login names, or a function of the sender. Default: a login owns exactly the
   * address it is (`alice@example.test` logs in as `alice@example.test`).
   */
  readonly senderLogins?: Readonly<Record<string, SenderOwners>> | ((sender: string) => SenderOwners | undefined);
  /** Queue and quarantine live here. Default ./var/mail-server. */
  readonly base?: string;
  /** DNS for MX lookups. Default: the system's. */
  readonly resolver?: MxResolver;
  /** Port of the next hops found by MX. Default 25. */
  readonly smtpPort?: number;
  /** TLS policy towards other MTAs (smtp_tls_security_level). Default 'may'. */
  readonly outboundTls?: SmtpTlsOptions;
  /** Queue backoff, ms. Default Postfix's 300 s / 4000 s. */
  readonly backoff?: { readonly min: number; readonly max: number };
  /** The largest message, bytes. Default 25 MiB. */
  readonly maxMessageBytes?: number;
  /** DNS lists on port 25 (see examples/mx-gateway.ts). Default none. */
  readonly dnsbl?: DnsblOptions;
  /** Milters that add to the spam score on port 25, before spamTag (rspamd through connectMilter(), …). */
  readonly contentFilters?: readonly Milter[];
  /** The score at which spamTag flags a message (and, with JUNK_SIEVE, it is filed into Junk). Default 5. */
  readonly requiredScore?: number;
  /** Failed AUTHs allowed on one connection (the last one gets 421). Default 5. */
  readonly maxAuthFailures?: number;
  /** Delay before a failed AUTH is answered, ms, times the failures so far. Default 1000. */
  readonly authFailureDelay?: number;
  /** Look up clients' host names (PTR). Default true. */
  readonly resolveClientNames?: boolean;
}

export interface MailServer {
  readonly gateway: Gateway;
  /** The Dovecot auth client (closed by close()). */
  readonly authenticate: DovecotAuthenticator;
  readonly host: string;
  /** The bound ports. */
  readonly ports: { readonly mx: number; readonly submission: number; readonly submissions: number };
  close(): Promise<void>;
}

/** Starts the queue and the gateway's three listeners. */
export async function startMailServer(options: MailServerOptions): Promise<MailServer> {
  const domain = options.domain ?? 'example.test';
  const hostname = options.hostname ?? `mail.${domain}`;
  const host = options.host ?? '127.0.0.1';
  const base = path.resolve(options.base ?? 'var/mail-server');
  await mkdir(path.join(base, 'quarantine'), { recursive: true });
  const maxBytes = options.maxMessageBytes ?? 25 * 1024 * 1024;

  // transport_maps: our domain into Dovecot, everything else by MX through the queue.
  const table = routes({
    [domain]: lmtp({ ...options.dovecot.lmtp, lhloName: hostname }),
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

  // smtpd_sasl_type = dovecot
  const authenticate = dovecotAuth({ ...options.dovecot.auth, service: 'smtp' });

  // Port 25: mail for us, from anyone. Never a relay, whoever logged in.
  const mxChain: Milter[] = [
    sizeLimit({ maxBytes }),
    relayControl({ localDomains: table.localDomains, permitAuthenticated: false }),
    ...(options.dnsbl ? [dnsbl(options.dnsbl)] : []),
    ...(options.contentFilters ?? []),
    spamTag({ requiredScore: options.requiredScore ?? 5 }),
  ];
  // 587 and 465: our users, logged in, to anywhere; signed last.
  const submissionChain: Milter[] = [
    sizeLimit({ maxBytes }),
    senderLogin({ map: options.senderLogins ?? ((sender) => sender) }),
    relayControl({ localDomains: table.localDomains }),
    dkimSign({ keys: [{ domain, selector: options.dkim.selector, privateKey: options.dkim.privateKey }] }),
  ];

  const ports = options.ports ?? {};
  const gateway = createGateway({
    hostname,
    listen: [
      { host, port: ports.mx ?? 25, name: 'mx', tls: 'starttls', auth: false, milters: mxChain },
      { host, port: ports.submission ?? 587, name: 'submission', tls: 'starttls', submission: true, milters: submissionChain },
      { host, port: ports.submissions ?? 465, name: 'submissions', tls: 'implicit', submission: true, milters: submissionChain },
    ],
    tls: options.tls,
    authenticate,
    ...(options.maxAuthFailures !== undefined ? { maxAuthFailures: options.maxAuthFailures } : {}),
    ...(options.authFailureDelay !== undefined ? { authFailureDelay: options.authFailureDelay } : {}),
    delivery: table,
    verifyRecipients: true,
    queue,
    quarantine: maildir({ root: path.join(base, 'quarantine') }),
    ...(options.resolveClientNames !== undefined ? { resolveClientNames: options.resolveClientNames } : {}),
  });
  let bound: readonly { host: string; port: number }[];
  try {
    bound = await gateway.listen();
  } catch (err) {
    await gateway.close().catch(() => undefined); // the queue and the transports too
    await authenticate.close();
    throw err;
  }
  return {
    gateway,
    authenticate,
    host,
    ports: { mx: bound[0]!.port, submission: bound[1]!.port, submissions: bound[2]!.port },
    async close() {
      await gateway.close(); // drains, stops the queue, closes the routes' transports
      await authenticate.close();
    },
  };
}

// ---------------------------------------------------------------- as a script

/** `/path/to/socket` or `host:port`. */
function endpoint(value: string): DovecotEndpoint {
  if (value.startsWith('/')) return { path: value };
  const at = value.lastIndexOf(':');
  const port = Number(value.slice(at + 1));
  if (at <= 0 || !Number.isInteger(port)) throw new Error(`not a socket path or host:port: ${value}`);
  return { host: value.slice(0, at).replace(/^\[|\]$/g, ''), port };
}

async function main(): Promise<void> {
  const env = process.env;
  const domain = env['DOMAIN'] ?? 'example.test';
  const base = path.resolve(env['MAIL_BASE'] ?? 'var/mail-server');
  if (!env['TLS_CERT'] || !env['TLS_KEY']) throw new Error('set TLS_CERT and TLS_KEY to PEM files: AUTH is offered over TLS only');
  const selector = env['DKIM_SELECTOR'] ?? 'mail';
  const keyFile = path.resolve(env['DKIM_KEY'] ?? path.join(base, 'dkim', `${selector}.pem`));
  if (!existsSync(keyFile)) {
    await mkdir(path.dirname(keyFile), { recursive: true });
    const { privateKey } = crypto.generateKeyPairSync('rsa', { modulusLength: 2048 });
    await writeFile(keyFile, privateKey.export({ type: 'pkcs8', format: 'pem' }), { mode: 0o600 });
  }
  const privateKey = await readFile(keyFile, 'utf8');
  const port = (name: string, fallback: number): number => Number(env[name] ?? fallback);
  const m = await startMailServer({
    domain,
    ...(env['MX_HOSTNAME'] ? { hostname: env['MX_HOSTNAME'] } : {}),
    host: env['HOST'] ?? '0.0.0.0',
    ports: { mx: port('MX_PORT', 25), submission: port('SUBMISSION_PORT', 587), submissions: port('SUBMISSIONS_PORT', 465) },
    tls: { key: await readFile(env['TLS_KEY'], 'utf8'), cert: await readFile(env['TLS_CERT'], 'utf8') },
    dovecot: { lmtp: endpoint(env['DOVECOT_LMTP'] ?? '/run/dovecot/lmtp'), auth: endpoint(env['DOVECOT_AUTH'] ?? '/run/dovecot/auth-client') },
    dkim: { selector, privateKey },
    base,
  });
  console.log(`
dovetail mail server for ${domain} on ${m.host}
  port ${m.ports.mx}: MX (mail for ${domain} into Dovecot LMTP; spamTag'd, Junk by Dovecot's Sieve)
  port ${m.ports.submission}: submission (STARTTLS + AUTH against Dovecot), DKIM-signed, queued, sent on by MX
  port ${m.ports.submissions}: submissions (implicit TLS), the same

Publish the DKIM key (${keyFile}):
  ${selector}._domainkey.${domain}. IN TXT "${dkimDnsRecord(privateKey)}"
Ctrl-C stops it (messages in flight are finished first; the queue keeps the rest).
`);
  for (const signal of ['SIGINT', 'SIGTERM'] as const) {
    process.once(signal, () => void m.close().then(() => process.exit(0)));
  }
}

if (process.argv[1] && path.resolve(process.argv[1]) === fileURLToPath(import.meta.url)) await main();
