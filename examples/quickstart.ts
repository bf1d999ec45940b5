/**
 * The quick start: a gateway on loopback with the default milter chain, handing messages
 * over LMTP to the embedded mailstore (Maildir), with recipients verified at RCPT and a
 * durable deferred queue for mixed results — the Postfix → LMTP → Dovecot path with nothing
 * outside. `npm start` runs it; `npm run send` sends it a test message.
 *
 * The default chain is the bundled milters that need nothing outside this machine, in the
 * order an MX runs them — sizeLimit (at MAIL), relayControl (at RCPT: example.test is
 * ours, nothing else is relayed), a small in-process milter that refuses `nobody@` and
 * stamps each message, and spamTag (last, reads the score) — so the quick start works
 * offline. dnsbl and mailAuth need DNS: examples/mx-gateway.ts runs all five.
 */
import { mkdir } from 'node:fs/promises';
import path from 'node:path';
import { createGateway, createLmtpServer, createQueue, defineMilter, lmtp, maildir, reject, type Gateway, type Milter } from '../lib/index.js';
import { relayControl, sizeLimit, spamTag } from '../milters/index.js';

/** A small milter for the quick start: refuses nobody@…, stamps every message. */
export const stamp = defineMilter({
  name: 'stamp',
  async rcpt(_ctx, rcpt) {
    if (rcpt.address.toLowerCase().startsWith('nobody@')) return reject(550, '5.1.1', `<${rcpt.address}>: Recipient address rejected: no such user`);
  },
  async eom(ctx) {
    ctx.score.add(0.1, 'DOVETAIL_QUICKSTART');
    ctx.message.addHeader('X-Dovetail', `checked by ${ctx.server.hostname} (queue id ${ctx.queueId}, ${ctx.client.address})`);
  },
});

/** Our domain, written down once: the store holds it, relayControl treats it as local. */
export const LOCAL_DOMAINS: readonly string[] = ['example.test'];

/** The quick start's milter chain. */
export function defaultChain(): Milter[] {
  return [
    sizeLimit({ maxBytes: 25 * 1024 * 1024 }),
    relayControl({ localDomains: LOCAL_DOMAINS }),
    stamp,
    spamTag({ requiredScore: 5 }),
  ];
}

export interface QuickstartOptions {
  readonly host?: string;
  readonly port?: number;
  /** Maildir root of the embedded store; default ./var/mail. Quarantine and queue live beside it. */
  readonly root?: string;
  readonly hostname?: string;
}

export interface Quickstart {
  readonly gateway: Gateway;
  readonly host: string;
  readonly port: number;
  readonly root: string;
  /** Where the embedded LMTP store listens. */
  readonly lmtp: { readonly host: string; readonly port: number };
  /** Closes the gateway (draining), its queue and pool, then the store. */
  close(): Promise<void>;
}

/** Starts the embedded LMTP store and the quick-start gateway in front of it. */
export async function startQuickstart(options: QuickstartOptions = {}): Promise<Quickstart> {
  const root = path.resolve(options.root ?? 'var/mail');
  const base = path.dirname(root);
  const hostname = options.hostname ?? 'mx.dovetail.test';
  await mkdir(root, { recursive: true });
  await mkdir(path.join(base, 'quarantine'), { recursive: true });
  const store = await createLmtpServer({ root, listen: { host: '127.0.0.1', port: 0 }, domains: LOCAL_DOMAINS, unknownUser: 'accept', hostname: 'store.dovetail.test' });
  const at = store.address as { host: string; port: number };
  const delivery = lmtp({ host: at.host, port: at.port });
  const gateway = createGateway({
    hostname,
    listen: { host: options.host ?? '127.0.0.1', port: options.port ?? 2525 },
    milters: defaultChain(),
    delivery,
    verifyRecipients: true,
    queue: createQueue({ dir: path.join(base, 'queue'), transport: delivery, hostname }),
    quarantine: maildir({ root: path.join(base, 'quarantine') }),
    resolveClientNames: false,
  });
  const [addr] = await gateway.listen();
  return {
    gateway,
    host: addr!.host,
    port: addr!.port,
    root,
    lmtp: { host: at.host, port: at.port },
    async close() {
      await gateway.close();
      await store.close();
    },
  };
}
