/**
 * An MX gateway: the five bundled milters (dovetail/milters) in the order a real MX runs
 * its checks, delivering into a Maildir. It is what Postfix's smtpd restrictions plus
 * postscreen, OpenDKIM/OpenDMARC and SpamAssassin tagging do, in one process:
 *
 *   1. sizeLimit     MAIL FROM     SIZE= over the limit refused at once; DATA capped as it streams
 *   2. relayControl  RCPT TO       never an open relay: 554 5.7.1 Relay access denied
 *   3. dnsbl         connect→RCPT  client lists looked up at connect, verdict at RCPT
 *   4. mailAuth      MAIL, end     SPF at MAIL; DKIM, DMARC, ARC at end of message
 *   5. spamTag       end           reads every milter's score, writes X-Spam-*
 *
 * Why this order (milters run in chain order within each SMTP stage):
 *
 * - sizeLimit first: it is the cheapest check there is (a number compared at MAIL FROM) and
 *   its limit is applied by the gateway while DATA streams, before any milter sees a byte.
 *   An oversized message costs no DNS lookup and no DKIM hash.
 * - relayControl next: at RCPT it is pure computation (address parsing, a CIDR match). A
 *   relay attempt is refused with Postfix's reply before dnsbl waits for DNS, and the
 *   milters after it never see the refused recipient (Postfix's
 *   `permit_mynetworks, reject_unauth_destination` come first for the same reason).
 * - dnsbl third: its queries start when the client connects, all lists in parallel, and by
 *   RCPT they have usually answered; it gives postscreen's weighted verdict there (Postfix's
 *   delayed reject), so the client is refused at RCPT with the list named, before DATA.
 *   A hit under the threshold is not refused but goes into the spam score.
 * - mailAuth fourth: SPF needs MAIL FROM and runs there (one or a few TXT lookups); DKIM,
 *   DMARC and ARC need the whole message and run at end of DATA, after the cheaper checks
 *   above had their chance to refuse. Its lookups of one message share one memo. It writes
 *   Authentication-Results and Received-SPF and, with enforceDmarc, applies the author
 *   domain's DMARC policy (p=reject: 550 5.7.1 at end of DATA; p=quarantine: quarantine).
 *   SPF `fail` alone is not refused at MAIL: DMARC decides at end of message, because a
 *   forwarded message fails SPF but may carry an aligned DKIM signature (RFC 7489
 *   section 10.1). Note that SPF runs at MAIL, so a transaction whose recipients are all
 *   refused at RCPT has still paid for its SPF lookup.
 * - spamTag last: it reads the score every milter before it added (dnsbl hits, SPF, DKIM,
 *   DMARC results) and writes the SpamAssassin headers; nothing after it changes the
 *   message.
 *
 * Run as a script (`node dist/examples/mx-gateway.js`) it listens on 127.0.0.1:2525 with
 * the defaults below, the system's DNS resolver, and prints each connection, verdict and
 * message. Tests and the bench call {@link createMxGateway} / {@link mxMilters} with their
 * own DNS resolver (a DNS server on loopback).
 */
import fs from 'node:fs';
import path from 'node:path';
import diagnostics_channel from 'node:diagnostics_channel';
import { fileURLToPath } from 'node:url';
import { Channels, createGateway, maildir, type Gateway, type ListenOptions, type Milter, type Transport } from '../lib/index.js';
import { defaultResolver, dnsbl, mailAuth, relayControl, sizeLimit, spamTag, type DnsblZone, type DnsResolver } from '../milters/index.js';

/**
 * Default DNS lists, in postscreen_dnsbl_sites syntax, weighed against a threshold of 3:
 * a Spamhaus ZEN listing alone refuses; a DNSWL listing takes 2 points off. (Spamhaus
 * answers 127.255.255.x to queries from public resolvers: dnsbl counts that as a failed
 * lookup, not a listing. Run your own resolver for production.)
 */
export const DEFAULT_DNSBL_ZONES: readonly string[] = ['zen.spamhaus.org=127.0.0.[2..11]*3', 'bl.spamcop.net=127.0.0.2*2', 'list.dnswl.org=127.0.[0..255].[1..3]*-2'];

/** Options of {@link createMxGateway} (and {@link mxMilters}, which takes the chain's part). */
export interface MxGatewayOptions {
  /** Our host name: greeting, Received, and the authserv-id of Authentication-Results. Default `mx.example.test`. */
  readonly hostname?: string;
  /** Where to listen. Default 127.0.0.1:2525. */
  readonly listen?: ListenOptions | readonly ListenOptions[];
  /** Maildir root for accepted mail. Default `./var/mail`. */
  readonly root?: string;
  /** Maildir root for quarantined mail (DMARC p=quarantine). Default `quarantine` next to `root`. */
  readonly quarantineRoot?: string;
  /** Instead of the Maildirs: any transports (the bench uses a null transport). */
  readonly delivery?: Transport;
  readonly quarantine?: Transport;
  /** Domains we take mail for (relayControl localDomains). Default `['example.test']`. */
  readonly localDomains?: readonly string[];
  /** Domains we relay to a next hop (relayControl relayDomains). Default none. */
  readonly relayDomains?: readonly string[];
  /**
   * Trusted client networks that may relay anywhere (Postfix mynetworks). Default none: an
   * MX takes mail from the internet for its own domains only.
   */
  readonly mynetworks?: readonly string[];
  /** The largest message, bytes. Default 25 MiB. */
  readonly maxMessageBytes?: number;
  /** Client-IP DNS lists (dnsbl zones). Default {@link DEFAULT_DNSBL_ZONES}. */
  readonly dnsblZones?: readonly (DnsblZone | string)[];
  /** The sum of DNS list weights that refuses a client. Default 3. */
  readonly dnsblThreshold?: number;
  /** The DNS resolver of dnsbl and mailAuth. Default: node:dns/promises with the system's servers. */
  readonly resolver?: DnsResolver;
  /** How long one DNS query (and one DNS list) may take, ms. Default 5000. */
  readonly dnsTimeout?: number;
  /** Apply the author domain's DMARC policy (reject / quarantine). Default true. */
  readonly enforceDmarc?: boolean;
  /** The spam score at which X-Spam-Flag: YES is set. Default 5. */
  readonly requiredScore?: number;
  /** The spam score at which a message is refused at end of DATA. Default: never (tag only). */
  readonly rejectScore?: number;
}

/** The five milters, configured and in MX order (see the file's comment for why this order). */
export function mxMilters(options: MxGatewayOptions = {}): Milter[] {
  const dnsTimeout = options.dnsTimeout ?? 5000;
  // One resolver for both DNS users: dnsbl caches its answers, mailAuth memoises per message.
  const resolver = options.resolver ?? defaultResolver({ timeout: dnsTimeout });
  return [
    // 1. At MAIL FROM (and while DATA streams, through the gateway): the cheapest check.
    sizeLimit({ maxBytes: options.maxMessageBytes ?? 25 * 1024 * 1024 }),
    // 2. At RCPT: computation only, before anything waits on DNS.
    relayControl({
      localDomains: options.localDomains ?? ['example.test'],
      relayDomains: options.relayDomains ?? [],
      mynetworks: options.mynetworks ?? [],
    }),
    // 3. Lookups from connect, verdict at RCPT; hits under the threshold only add score.
    dnsbl({
      zones: options.dnsblZones ?? DEFAULT_DNSBL_ZONES,
      threshold: options.dnsblThreshold ?? 3,
      timeout: dnsTimeout,
      resolver,
    }),
    // 4. SPF at MAIL; DKIM, DMARC, ARC at end of message, once the cheap checks passed.
    mailAuth({
      resolver,
      dnsTimeout,
      enforceDmarc: options.enforceDmarc ?? true,
    }),
    // 5. Last: reads everyone's score.
    spamTag({
      requiredScore: options.requiredScore ?? 5,
      ...(options.rejectScore !== undefined ? { rejectScore: options.rejectScore } : {}),
    }),
  ];
}

/** Builds (does not start) the MX gateway. */
export function createMxGateway(options: MxGatewayOptions = {}): Gateway {
  const root = path.resolve(options.root ?? 'var/mail');
  const quarantineRoot = path.resolve(options.quarantineRoot ?? path.join(path.dirname(root), 'quarantine'));
  return createGateway({
    hostname: options.hostname ?? 'mx.example.test',
    listen: options.listen ?? { host: '127.0.0.1', port: 2525 },
    milters: mxMilters(options),
    delivery: options.delivery ?? maildir({ root }),
    quarantine: options.quarantine ?? maildir({ root: quarantineRoot }),
    // The clients' PTR names are not used by any of the five milters.
    resolveClientNames: false,
  });
}

// ---------------------------------------------------------------- as a script

/** True when this file is the process's entry point (`node dist/examples/mx-gateway.js`). */
function isMain(): boolean {
  const entry = process.argv[1];
  if (!entry) return false;
  try {
    return fs.realpathSync(entry) === fs.realpathSync(fileURLToPath(import.meta.url));
  } catch {
    return false;
  }
}

const list = (v: string | undefined): string[] | undefined =>
  v === undefined ? undefined : v.split(/[\s,]+/).filter(Boolean);

async function main(): Promise<void> {
  const env = process.env;
  const root = path.resolve(env['MAIL_ROOT'] ?? 'var/mail');
  const quarantineRoot = path.join(path.dirname(root), 'quarantine');
  fs.mkdirSync(root, { recursive: true });
  fs.mkdirSync(quarantineRoot, { recursive: true });
  const dnsServers = list(env['DNS_SERVERS']);
  const dnsTimeout = Number(env['DNS_TIMEOUT'] ?? 5000);
  const resolver = defaultResolver({ timeout: dnsTimeout, ...(dnsServers ? { servers: dnsServers } : {}) });
  const options: MxGatewayOptions = {
    hostname: env['MX_HOSTNAME'] ?? 'mx.example.test',
    listen: { host: env['HOST'] ?? '127.0.0.1', port: Number(env['PORT'] ?? 2525) },
    root,
    quarantineRoot,
    localDomains: list(env['LOCAL_DOMAINS']) ?? ['example.test'],
    relayDomains: list(env['RELAY_DOMAINS']) ?? [],
    mynetworks: list(env['MYNETWORKS']) ?? [],
    dnsblZones: list(env['DNSBL_ZONES']) ?? DEFAULT_DNSBL_ZONES,
    maxMessageBytes: Number(env['MAX_MESSAGE_BYTES'] ?? 25 * 1024 * 1024),
    requiredScore: Number(env['REQUIRED_SCORE'] ?? 5),
    resolver,
    dnsTimeout,
  };

  // The library never prints; the script subscribes to its diagnostics channels.
  const say = (line: string) => console.log(`${new Date().toISOString().slice(11, 23)} ${line}`);
  diagnostics_channel.subscribe(Channels.connect, (m) => {
    const { sessionId, client } = m as { sessionId: string; client: { address: string } };
    say(`[${sessionId}] connect from ${client.address}`);
  });
  diagnostics_channel.subscribe(Channels.verdict, (m) => {
    const { sessionId, milter, stage, verdict } = m as { sessionId: string; milter: string; stage: string; verdict: { type: string; reply?: { code: number; enhanced: string; lines: string[] }; reason?: string } };
    const reply = verdict.reply ? ` ${verdict.reply.code} ${verdict.reply.enhanced} ${verdict.reply.lines.join(' ')}` : verdict.reason ? ` (${verdict.reason})` : '';
    say(`[${sessionId}] ${milter} at ${stage}: ${verdict.type}${reply}`);
  });
  diagnostics_channel.subscribe(Channels.milterError, (m) => {
    const { sessionId, milter, stage, error, action } = m as { sessionId: string; milter: string; stage: string; error: unknown; action: string };
    say(`[${sessionId}] ${milter} failed at ${stage} (${error instanceof Error ? error.message : String(error)}): ${action}`);
  });
  diagnostics_channel.subscribe(Channels.message, (m) => {
    const { sessionId, queueId, size, quarantine, reply } = m as { sessionId: string; queueId: string; size: number; quarantine?: string; reply: { code: number; lines: string[] } };
    say(`[${sessionId}] message ${queueId}, ${size} bytes${quarantine ? `, quarantined (${quarantine})` : ''}: ${reply.code} ${reply.lines.join(' ')}`);
  });

  const gateway = createMxGateway(options);
  const [addr] = await gateway.listen();
  const host = addr!.host;
  const port = addr!.port;
  const chain = mxMilters({ ...options, resolver }).map((m) => m.name);
  console.log(`
dovetail MX gateway listening on ${host}:${port} as ${options.hostname}
  milter chain:  ${chain.join(' -> ')}
  local domains: ${options.localDomains!.join(', ') || '-'}   relay domains: ${options.relayDomains!.join(', ') || '-'}
  mynetworks:    ${options.mynetworks!.join(', ') || '- (nobody may relay)'}
  DNS lists:     ${options.dnsblZones!.map(String).join(', ')} (threshold 3)
  DNS servers:   ${resolver.getServers().join(', ')} (timeout ${dnsTimeout} ms)
  size limit:    ${options.maxMessageBytes} bytes;  X-Spam-Flag at score ${options.requiredScore}
  delivery:      Maildir under ${root}/<recipient>/new/ (quarantine: ${quarantineRoot})

Send it a test message (in another terminal):
  npm run send -- --to bob@example.test            # accepted (SPF/DKIM results depend on your DNS)
  npm run send -- --to someone@elsewhere.example   # 554 5.7.1 Relay access denied
Environment: HOST, PORT, MX_HOSTNAME, MAIL_ROOT, LOCAL_DOMAINS, RELAY_DOMAINS, MYNETWORKS,
  DNSBL_ZONES, DNS_SERVERS, DNS_TIMEOUT, MAX_MESSAGE_BYTES, REQUIRED_SCORE.
Ctrl-C stops it (messages in flight are finished first).
`);

  let stopping = false;
  for (const signal of ['SIGINT', 'SIGTERM'] as const) {
    process.on(signal, () => {
      if (stopping) process.exit(1);
      stopping = true;
      console.log('\nclosing: finishing messages in flight ...');
      void gateway.close().then(() => {
        console.log('closed');
        process.exit(0);
      });
    });
  }
}

if (isMain()) await main();
