/**
 * Test helpers: real Postfix 3.7 peers for outbound-delivery interop tests (our SMTP client
 * connects to them), each in a private directory on loopback (startPostfix in postfix.ts),
 * delivering what it accepts over LMTP into an in-process sink (lmtp-sink.ts) the test reads.
 *
 * - startRemoteMx: the receiving MX of some domains. It accepts mail for those domains
 *   (relay_domains) from any client, like an MX on the internet (mynetworks holds no
 *   loopback address, so other domains get `554 5.7.1 Relay access denied`); Postfix offers
 *   what it offers by default (PIPELINING, SIZE, 8BITMIME, ENHANCEDSTATUSCODES, DSN ...),
 *   plus SMTPUTF8, and optionally STARTTLS with a self-signed certificate. `recipientAccess`
 *   makes it answer chosen recipients with a fixed 4xx/5xx reply (an access(5) map).
 * - startSmarthost: a relay that takes mail for any domain, but only from a client that has
 *   authenticated (SASL via a private Dovecot auth service, dovecot-auth.ts), and offers AUTH
 *   only after STARTTLS (self-signed certificate for smarthost.test).
 *
 * The remote MX's own bounces go nowhere (mail for other domains takes the `error`
 * transport, so nothing leaves loopback); the smarthost sends everything, bounces included,
 * to its sink. stop() stops Postfix, then Dovecot and the sink, and removes the temp files.
 */
import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { startDovecotAuth, type DovecotAuth } from './dovecot-auth.js';
import { startLmtpSink, type LmtpSink } from './lmtp-sink.js';
import { startPostfix, type Postfix } from './postfix.js';
import { selfSignedCert } from './tls.js';

export interface RemoteMxOptions {
  /** Domains this MX accepts mail for (relay_domains). */
  readonly domains: readonly string[];
  /** myhostname (in the banner and EHLO reply); default `mx.remote.test`. */
  readonly hostname?: string;
  /**
   * Fixed replies for recipients, checked at RCPT before anything else: address (or
   * domain, or `local@`, as access(5) looks them up) → action, e.g.
   * `{ 'greylist@remote.test': '450 4.7.1 try later', 'nouser@remote.test': '550 5.1.1 no such user' }`.
   */
  readonly recipientAccess?: Readonly<Record<string, string>>;
  /** Offer STARTTLS with a self-signed certificate for `hostname` (default: no STARTTLS). */
  readonly tls?: boolean;
  /** More main.cf settings (override the ones above), e.g. `message_size_limit`. */
  readonly main?: Readonly<Record<string, string>>;
}

export interface RemoteMx {
  /** Postfix smtpd's port on 127.0.0.1. */
  readonly port: number;
  readonly hostname: string;
  /** The certificate (PEM) it presents when `tls` was asked for. */
  readonly cert?: string;
  /** What Postfix delivered. */
  readonly sink: LmtpSink;
  /** The Postfix handle: log(), queue(). */
  readonly postfix: Postfix;
  stop(): Promise<void>;
}

export interface SmarthostOptions {
  /** The one SASL account (PLAIN and LOGIN). */
  readonly user: string;
  readonly password: string;
  /** myhostname; also the certificate's name. Default `smarthost.test`. */
  readonly hostname?: string;
  /** More main.cf settings (override the ones above). */
  readonly main?: Readonly<Record<string, string>>;
}

export interface Smarthost {
  /** Postfix smtpd's port on 127.0.0.1 (STARTTLS, then AUTH, then relay). */
  readonly port: number;
  readonly hostname: string;
  /** The self-signed certificate (PEM) it presents, so a client can verify it. */
  readonly cert: string;
  /** What Postfix relayed. */
  readonly sink: LmtpSink;
  readonly postfix: Postfix;
  /** The Dovecot auth service behind `smtpd_sasl_path`. */
  readonly auth: DovecotAuth;
  stop(): Promise<void>;
}

/** mynetworks holding no loopback address: no client here is "trusted" by address. */
const NO_TRUSTED_NETWORKS = '192.0.2.1/32';

/** An inline: table; each entry braced, so values may hold spaces and commas. */
function inlineMap(entries: Readonly<Record<string, string>>): string {
  const parts = Object.entries(entries).map(([k, v]) => {
    if (/[{}\n]/.test(k + v) || /[\s=]/.test(k) || k === '') throw new Error(`inline map entry not representable: ${JSON.stringify([k, v])}`);
    return `{ ${k.toLowerCase()} = ${v} }`;
  });
  return `inline:{ ${parts.join(', ')} }`;
}

/** Writes a key pair where Postfix (root at startup, user postfix later) can read it. */
async function writeCert(name: string): Promise<{ dir: string; cert: string; certFile: string; keyFile: string }> {
  const pair = selfSignedCert(name);
  const dir = await fs.mkdtemp(path.join(os.tmpdir(), 'dovetail-mta-tls-'));
  await fs.chmod(dir, 0o755);
  const certFile = path.join(dir, 'cert.pem');
  const keyFile = path.join(dir, 'key.pem');
  await fs.writeFile(certFile, pair.cert, { mode: 0o644 });
  await fs.writeFile(keyFile, pair.key, { mode: 0o600 });
  if (process.getuid?.() === 0) {
    const { uid, gid } = await postfixIds();
    await fs.chown(keyFile, uid, gid);
  }
  return { dir, cert: pair.cert, certFile, keyFile };
}

async function postfixIds(): Promise<{ uid: number; gid: number }> {
  // /etc/passwd: name:x:uid:gid:...
  const line = (await fs.readFile('/etc/passwd', 'utf8')).split('\n').find((l) => l.startsWith('postfix:'));
  const f = line?.split(':') ?? [];
  const uid = Number(f[2]);
  const gid = Number(f[3]);
  if (!line || !Number.isInteger(uid) || !Number.isInteger(gid)) throw new Error('user "postfix" does not exist: is the postfix package installed?');
  return { uid, gid };
}

function tlsMain(files: { certFile: string; keyFile: string }): Record<string, string> {
  return {
    smtpd_tls_security_level: 'may',
    smtpd_tls_cert_file: files.certFile,
    smtpd_tls_key_file: files.keyFile,
    smtpd_tls_loglevel: '1',
    smtpd_tls_received_header: 'yes',
  };
}

/** Runs the clean-ups in order; one failing does not stop the next; the first failure is thrown at the end. */
async function cleanup(steps: readonly (() => Promise<unknown>)[]): Promise<void> {
  let first: unknown;
  for (const step of steps) {
    try {
      await step();
    } catch (err) {
      first ??= err;
    }
  }
  if (first !== undefined) throw first;
}

/** A stop() that runs the clean-ups once (a second call waits for the first). */
function stopOnce(steps: readonly (() => Promise<unknown>)[]): () => Promise<void> {
  let done: Promise<void> | undefined;
  return () => (done ??= cleanup(steps));
}

export async function startRemoteMx(opts: RemoteMxOptions): Promise<RemoteMx> {
  if (opts.domains.length === 0) throw new Error('startRemoteMx: no domains');
  const hostname = opts.hostname ?? 'mx.remote.test';
  const sink = await startLmtpSink();
  const undo: (() => Promise<unknown>)[] = [() => sink.close()];
  try {
    const tls = opts.tls ? await writeCert(hostname) : undefined;
    if (tls) undo.push(() => fs.rm(tls.dir, { recursive: true, force: true }));
    const lmtp = `lmtp:inet:127.0.0.1:${sink.port}`;
    const restrictions = 'permit_mynetworks, reject_unauth_destination';
    const postfix = await startPostfix({
      main: {
        myhostname: hostname,
        mydomain: hostname.includes('.') ? hostname.slice(hostname.indexOf('.') + 1) : hostname,
        mynetworks: NO_TRUSTED_NETWORKS,
        relay_domains: opts.domains.join(', '),
        relay_transport: lmtp,
        // Anything else (Postfix's own bounces) is not delivered anywhere.
        default_transport: 'error:5.3.0 this test MX delivers only to its own domains',
        smtpd_relay_restrictions: restrictions,
        ...(opts.recipientAccess && Object.keys(opts.recipientAccess).length > 0
          ? { smtpd_recipient_restrictions: `check_recipient_access ${inlineMap(opts.recipientAccess)}, ${restrictions}` }
          : {}),
        smtputf8_enable: 'yes',
        ...(tls ? tlsMain(tls) : {}),
        ...opts.main,
      },
    });
    undo.unshift(() => postfix.stop());
    return {
      port: postfix.smtpPort,
      hostname,
      ...(tls ? { cert: tls.cert } : {}),
      sink,
      postfix,
      stop: stopOnce(undo),
    };
  } catch (err) {
    await cleanup(undo).catch(() => undefined);
    throw err;
  }
}

export async function startSmarthost(opts: SmarthostOptions): Promise<Smarthost> {
  const hostname = opts.hostname ?? 'smarthost.test';
  const sink = await startLmtpSink();
  const undo: (() => Promise<unknown>)[] = [() => sink.close()];
  try {
    const auth = await startDovecotAuth([{ user: opts.user, password: opts.password }]);
    undo.unshift(() => auth.stop());
    const tls = await writeCert(hostname);
    undo.push(() => fs.rm(tls.dir, { recursive: true, force: true }));
    const lmtp = `lmtp:inet:127.0.0.1:${sink.port}`;
    const postfix = await startPostfix({
      main: {
        myhostname: hostname,
        mydomain: hostname.includes('.') ? hostname.slice(hostname.indexOf('.') + 1) : hostname,
        mynetworks: NO_TRUSTED_NETWORKS,
        relay_domains: '',
        // Everything accepted (any domain) goes to the sink.
        default_transport: lmtp,
        relay_transport: lmtp,
        ...tlsMain(tls),
        smtpd_sasl_auth_enable: 'yes',
        smtpd_tls_auth_only: 'yes',
        smtpd_sasl_type: 'dovecot',
        smtpd_sasl_path: `inet:127.0.0.1:${auth.port}`,
        smtpd_relay_restrictions: 'permit_sasl_authenticated, reject_unauth_destination',
        smtputf8_enable: 'yes',
        ...opts.main,
      },
    });
    undo.unshift(() => postfix.stop());
    return { port: postfix.smtpPort, hostname, cert: tls.cert, sink, postfix, auth, stop: stopOnce(undo) };
  } catch (err) {
    await cleanup(undo).catch(() => undefined);
    throw err;
  }
}
