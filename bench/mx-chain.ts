/**
 * Bench fixture for the `gateway+mx-chain` target: the DNS the five bundled milters need,
 * and the bench message DKIM-signed for it.
 *
 * - A DNS server on loopback (test/helpers/dns-server.ts, dns2) in a worker thread of its
 *   own, so its CPU is not charged to the servers' event loop (a real MX asks a resolver in
 *   another process). It answers every query: for the bench sender's domain
 *   (`sender.example`, the load generator's MAIL FROM and the message's From) an SPF record
 *   passing 127.0.0.1, a DKIM key and a DMARC p=reject record; NXDOMAIN for everything else,
 *   so the example's DNS lists (zen.spamhaus.org …) do not list the client.
 * - An RSA-2048 key made at start-up; {@link MxChainFixture.sign} replaces the bench
 *   message's placeholder DKIM-Signature with a real one (relaxed/relaxed, mailauth's
 *   dkimSign), once per phase, before the rounds: every target gets the same signed bytes.
 * - The resolver the milters use: a node:dns/promises Resolver asking only that server.
 *
 * It does not emulate a caching resolver's latency or the internet's: every query is a
 * loopback UDP round trip to a server that answers at once.
 */
import crypto from 'node:crypto';
import { Resolver } from 'node:dns/promises';
import { isMainThread, parentPort, Worker, workerData } from 'node:worker_threads';
import { dkimSign } from 'mailauth';

/** The domain of the load generator's MAIL FROM (bench/load.ts) and of the message's From (bench/message.ts). */
export const SENDER_DOMAIN = 'sender.example';
/** The DKIM selector the key is published under. */
export const SELECTOR = 'bench2048';

interface DnsWorkerData {
  readonly role: 'mx-chain-dns';
  readonly txt: readonly (readonly [string, string])[];
}
type DnsWorkerRequest = { readonly id: number; readonly op: 'queries' | 'close' };

export interface MxChainFixture {
  /** A resolver asking only the bench's DNS server. */
  readonly resolver: Resolver;
  /** `127.0.0.1:PORT`. */
  readonly server: string;
  /** The message with its placeholder DKIM-Signature replaced by a real signature of SENDER_DOMAIN. */
  sign(message: Buffer): Promise<Buffer>;
  /** How many queries the DNS server has answered so far. */
  queries(): Promise<number>;
  close(): Promise<void>;
}

/** Drops every DKIM-Signature field (with its folded lines) from a message's header block. */
export function withoutDkimSignatures(message: Buffer): Buffer {
  const text = message.toString('latin1');
  const end = text.indexOf('\r\n\r\n');
  const head = text.slice(0, end + 2);
  const fields = head.split(/\r\n(?![ \t])/).filter((f) => f && !/^dkim-signature:/i.test(f));
  return Buffer.from(fields.join('\r\n') + '\r\n' + text.slice(end + 2), 'latin1');
}

/** Starts the DNS worker and makes the key; resolves once the server answers. */
export async function startMxChainFixture(): Promise<MxChainFixture> {
  const { publicKey, privateKey } = crypto.generateKeyPairSync('rsa', { modulusLength: 2048 });
  const p = publicKey.export({ type: 'spki', format: 'der' }).toString('base64');
  const data: DnsWorkerData = {
    role: 'mx-chain-dns',
    txt: [
      [SENDER_DOMAIN, 'v=spf1 ip4:127.0.0.1 -all'],
      [`${SELECTOR}._domainkey.${SENDER_DOMAIN}`, `v=DKIM1; k=rsa; p=${p}`],
      [`_dmarc.${SENDER_DOMAIN}`, 'v=DMARC1; p=reject'],
    ],
  };
  const worker = new Worker(new URL(import.meta.url), { workerData: data });
  const waiting = new Map<number, (v: number) => void>();
  let next = 0;
  const port = await new Promise<number>((resolve, reject) => {
    worker.once('error', reject);
    worker.once('message', (m: { port: number }) => {
      worker.off('error', reject);
      resolve(m.port);
    });
  });
  worker.on('message', (m: { id: number; value: number }) => {
    waiting.get(m.id)?.(m.value);
    waiting.delete(m.id);
  });
  const call = (op: DnsWorkerRequest['op']): Promise<number> =>
    new Promise((resolve) => {
      const id = next++;
      waiting.set(id, resolve);
      worker.postMessage({ id, op } satisfies DnsWorkerRequest);
    });

  const server = `127.0.0.1:${port}`;
  const resolver = new Resolver({ timeout: 2000, tries: 2 });
  resolver.setServers([server]);
  const key = { signingDomain: SENDER_DOMAIN, selector: SELECTOR, privateKey: privateKey.export({ type: 'pkcs8', format: 'pem' }) as string };

  return {
    resolver,
    server,
    async sign(message) {
      const unsigned = withoutDkimSignatures(message);
      const r = await dkimSign(unsigned, { ...key, canonicalization: 'relaxed/relaxed', signatureData: [key] });
      if (r.errors.length) throw new Error(`bench: DKIM signing failed: ${JSON.stringify(r.errors)}`);
      return Buffer.concat([Buffer.from(r.signatures, 'latin1'), unsigned]);
    },
    queries: () => call('queries'),
    async close() {
      resolver.cancel();
      await call('close');
      await worker.terminate();
    },
  };
}

// ---------------------------------------------------------------- the DNS worker

if (!isMainThread && (workerData as DnsWorkerData | undefined)?.role === 'mx-chain-dns' && parentPort) {
  const port = parentPort;
  const { startDnsServer } = await import('../test/helpers/dns-server.js');
  const dns = await startDnsServer();
  for (const [name, value] of (workerData as DnsWorkerData).txt) dns.txt(name, value);
  port.on('message', (m: DnsWorkerRequest) => {
    if (m.op === 'queries') port.postMessage({ id: m.id, value: dns.queries.length });
    else void dns.close().then(() => port.postMessage({ id: m.id, value: 0 }));
  });
  port.postMessage({ port: dns.port });
}
