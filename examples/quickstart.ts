/**
 * The quick start: a gateway on loopback with the default milter chain, delivering into a
 * local Maildir. `npm start` runs it; `npm run send` sends it a test message.
 *
 * The default chain grows as the bundled milters land (dovetail/milters); today it holds
 * one small in-process milter that shows the chain at work: it refuses a recipient whose
 * local part is `nobody`, adds a score entry, and stamps each message with a header.
 */
import path from 'node:path';
import { createGateway, defineMilter, maildir, reject, type Gateway, type Milter } from '../lib/index.js';

/** A small milter for the quick start: refuses nobody@…, stamps every message. */
export const stamp = defineMilter({
  name: 'stamp',
  async rcpt(_ctx, rcpt) {
    if (rcpt.address.toLowerCase().startsWith('nobody@')) return reject(550, '5.1.1', `<${rcpt.address}>: Recipient address rejected: no such user`);
  },
  async eom(ctx) {
    ctx.score.add(0, 'DOVETAIL_QUICKSTART');
    ctx.message.addHeader('X-Dovetail', `checked by ${ctx.server.hostname} (queue id ${ctx.queueId}, ${ctx.client.address})`);
  },
});

/** The quick start's milter chain. */
export function defaultChain(): Milter[] {
  return [stamp];
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
