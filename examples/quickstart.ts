/**
 * The quick start: a gateway on loopback with the default milter chain, delivering into a
 * local Maildir. `npm start` runs it; `npm run send` sends it a test message.
 *
 * The default chain is the bundled milters that need nothing outside this machine, in the
 * order an MX runs them — sizeLimit (at MAIL), relayControl (at RCPT: example.test is
 * ours, nothing else is relayed), a small in-process milter that refuses `nobody@` and
 * stamps each message, and spamTag (last, reads the score) — so the quick start works
 * offline. dnsbl and mailAuth need DNS: examples/mx-gateway.ts runs all five.
 */
import path from 'node:path';
import { createGateway, defineMilter, maildir, reject, type Gateway, type Milter } from '../lib/index.js';
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

/** The quick start's milter chain. */
export function defaultChain(): Milter[] {
  return [
    sizeLimit({ maxBytes: 25 * 1024 * 1024 }),
    relayControl({ localDomains: ['example.test'] }),
    stamp,
    spamTag({ requiredScore: 5 }),
  ];
}

export interface QuickstartOptions {
  readonly host?: string;
  readonly port?: number;
  /** Maildir root; default ./var/mail. */
  readonly root?: string;
  readonly hostname?: string;
}

/** Starts the quick-start gateway; resolves once it listens. */
export async function startQuickstart(options: QuickstartOptions = {}): Promise<{ gateway: Gateway; host: string; port: number; root: string }> {
  const root = path.resolve(options.root ?? 'var/mail');
  const gateway = createGateway({
    hostname: options.hostname ?? 'mx.dovetail.test',
    listen: { host: options.host ?? '127.0.0.1', port: options.port ?? 2525 },
    milters: defaultChain(),
    delivery: maildir({ root }),
    quarantine: maildir({ root: path.join(path.dirname(root), 'quarantine') }),
    resolveClientNames: false,
  });
  const [addr] = await gateway.listen();
  return { gateway, host: addr!.host, port: addr!.port, root };
}
