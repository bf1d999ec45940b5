/**
 * One Node system under test for bench/peers.ts, run as a child process of its own so that
 * its CPU and memory (read from /proc by the bench) are its own:
 *
 *   node dist/bench/peers-system.js <kind> [--lmtp-port N] [--sink-port N] [--dns 127.0.0.1:N]
 *     [--queue-dir DIR] [--concurrency N] [--large]
 *
 * Kinds:
 * - `smtp-server`: bare smtp-server whose onData drains the stream; no delivery (the floor).
 * - `smtp-server+lmtp`: smtp-server hand-wired to a nodemailer LMTP pool (the message is
 *   collected into a Buffer, then `sendMail({ envelope, raw })`), 250 after the LMTP 250:
 *   what a user would write without dovetail.
 * - `dovetail`, `dovetail+quickstart`, `dovetail+mx`: createGateway() delivering over
 *   `lmtp()` to --lmtp-port, with no milters, the quick start's chain
 *   (examples/quickstart.ts defaultChain()), or the five bundled milters of
 *   examples/mx-gateway.ts with their DNS asked of --dns (the bench's loopback DNS server).
 * - `dovetail-outbound`: the gateway with the durable queue relaying everything through
 *   `smtp()` to --sink-port (bench/outbound.ts's configuration).
 * - `dovetail+quickstart-workers`: the quick start's chain as `dovetail+quickstart`, run as
 *   one worker per core (startWorkerPool, node:cluster: the workers share the port; this
 *   process is the primary). `--workers N` sets how many (default: the CPU count).
 * - `milter`: serveMilter() of a filter that continues at RCPT and adds one header at eom,
 *   declaring that its eom reads neither headers nor body (`needs`), so Postfix sends
 *   neither: the same callbacks and negotiation as the libmilter one.
 *
 * Every gateway runs with `resolveClientNames: false` (no PTR lookups on loopback), as
 * Postfix with `smtpd_peername_lookup = no`; `--large` turns off the per-client
 * connection limit (every bench connection comes from 127.0.0.1) and allows 2000 clients.
 *
 * It sends `{ type: 'listening', port }` over IPC once it listens, closes (draining) on
 * `{ type: 'stop' }` and then exits, and exits at once if the bench goes away.
 */
import { Resolver } from 'node:dns/promises';
import type net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import fs from 'node:fs/promises';
import { parseArgs } from 'node:util';
import nodemailer from 'nodemailer';
import { SMTPServer } from 'smtp-server';
import cluster from 'node:cluster';
import { createServer } from 'node:net';
import { availableParallelism } from 'node:os';
import { createGateway, defineMilter, lmtp, serveMilter, startWorkerPool, workerChannel } from '../lib/index.js';
import { mxMilters } from '../examples/mx-gateway.js';
import { defaultChain } from '../examples/quickstart.js';
import { nullTransport } from './null-transport.js';
import { outboundGateway } from './outbound-gateway.js';

export const SYSTEM_KINDS = ['smtp-server', 'smtp-server+lmtp', 'dovetail', 'dovetail+quickstart', 'dovetail+quickstart-workers', 'dovetail+mx', 'dovetail-outbound', 'milter'] as const;
export type SystemKind = (typeof SYSTEM_KINDS)[number];

type FromChild = { readonly type: 'listening'; readonly port: number } | { readonly type: 'closed' };
const send = (m: FromChild): void => void process.send?.(m);

async function listenSmtpServer(server: SMTPServer): Promise<number> {
  await new Promise<void>((resolve, reject) => {
    server.server.once('error', reject);
    server.listen(0, '127.0.0.1', () => resolve());
  });
  return (server.server.address() as net.AddressInfo).port;
}

async function main(): Promise<void> {
  const kind = process.argv[2] as SystemKind;
  if (!(SYSTEM_KINDS as readonly string[]).includes(kind)) {
    process.stderr.write(`peers-system: unknown kind ${kind} (${SYSTEM_KINDS.join(', ')})\n`);
    process.exit(64);
  }
  const { values } = parseArgs({
    args: process.argv.slice(3),
    options: {
      'lmtp-port': { type: 'string' },
      'sink-port': { type: 'string' },
      dns: { type: 'string' },
      'queue-dir': { type: 'string' },
      concurrency: { type: 'string', default: '20' },
      large: { type: 'boolean', default: false },
      workers: { type: 'string' },
    },
    strict: true,
  });
  if (kind === 'dovetail+quickstart-workers' && cluster.isWorker) {
    // A worker: the quick-start gateway on the port the primary chose; it drains when told.
    const channel = workerChannel();
    const delivery = lmtp({ host: '127.0.0.1', port: Number(values['lmtp-port']), lhloName: 'mx.dovetail.test' });
    const gateway = createGateway({
      hostname: 'mx.dovetail.test',
      listen: { host: '127.0.0.1', port: Number(process.env['BENCH_WORKERS_PORT']) },
      resolveClientNames: false,
      closeTimeout: 5_000,
      quarantine: nullTransport('null-quarantine'),
      milters: defaultChain(),
      delivery,
    });
    await gateway.listen();
    channel.onDrain(() => gateway.close({ sessions: 5_000 }));
    channel.ready();
    return;
  }
  process.on('disconnect', () => process.exit(1)); // the bench is gone: do not linger
  const hostname = 'mx.dovetail.test';
  const lmtpPort = Number(values['lmtp-port']);
  let close: () => Promise<void>;
  let port: number;

  if (kind === 'smtp-server' || kind === 'smtp-server+lmtp') {
    // nodemailer's SMTP pool speaks LMTP with `lmtp: true` (smtp-connection); its defaults otherwise, as dovetail's lmtp() keeps its own.
    const pool =
      kind === 'smtp-server+lmtp'
        ? nodemailer.createTransport({ pool: true, lmtp: true, host: '127.0.0.1', port: lmtpPort, ignoreTLS: true, name: 'smtp-server.bench.test' } as Parameters<typeof nodemailer.createTransport>[0])
        : undefined;
    const server = new SMTPServer({
      authOptional: true,
      disabledCommands: ['AUTH', 'STARTTLS'],
      disableReverseLookup: true,
      logger: false,
      size: 50 * 1024 * 1024,
      onData(stream, session, cb) {
        if (!pool) {
          stream.resume();
          stream.on('end', () => cb());
          return;
        }
        const parts: Buffer[] = [];
        stream.on('data', (d: Buffer) => parts.push(d));
        stream.on('end', () => {
          const from = session.envelope.mailFrom ? session.envelope.mailFrom.address : '';
          pool
            .sendMail({ envelope: { from, to: session.envelope.rcptTo.map((r) => r.address) }, raw: Buffer.concat(parts) })
            .then(
              () => cb(),
              (err: unknown) => cb(Object.assign(new Error('Temporary delivery failure'), { responseCode: 451, cause: err })),
            );
        });
      },
    });
    port = await listenSmtpServer(server);
    close = async () => {
      await new Promise<void>((resolve) => server.close(() => resolve()));
      pool?.close();
    };
  } else if (kind === 'dovetail+quickstart-workers') {
    // The primary: pick a port, fork the workers onto it, wait until each listens.
    const probe = createServer();
    await new Promise<void>((resolve) => probe.listen(0, '127.0.0.1', resolve));
    port = (probe.address() as net.AddressInfo).port;
    await new Promise<void>((resolve) => probe.close(() => resolve()));
    const pool = startWorkerPool({ workers: values.workers ? Number(values.workers) : availableParallelism(), env: { BENCH_WORKERS_PORT: String(port) }, drainTimeout: 10_000 });
    await pool.ready();
    close = () => pool.close();
  } else if (kind === 'milter') {
    const filter = defineMilter({
      name: 'bench-add-header',
      // Its eom reads neither headers nor body: Postfix is asked not to send them, as the
      // libmilter filter opts out of them (SMFIP_NOHDRS / SMFIP_NOBODY).
      needs: { headers: false, body: false },
      async rcpt() {},
      async eom(ctx) {
        ctx.message.addHeader('X-Bench', 'yes');
      },
    });
    const server = await serveMilter(filter, { listen: 'inet:127.0.0.1:0' });
    port = server.port;
    close = () => server.close();
  } else {
    const common = {
      hostname,
      listen: { host: '127.0.0.1', port: 0 },
      resolveClientNames: false,
      closeTimeout: 5_000,
      quarantine: nullTransport('null-quarantine'),
      ...(values.large ? { clientLimits: false as const, maxClients: 2000 } : {}),
    };
    let extra: () => Promise<void> = async () => undefined;
    let gateway: ReturnType<typeof createGateway>;
    if (kind === 'dovetail-outbound') {
      // As bench/outbound.ts: everything through the durable queue to the sink (bench/outbound-gateway.ts).
      gateway = outboundGateway({
        sinkPort: Number(values['sink-port']),
        queueDir: values['queue-dir'] ?? (await fs.mkdtemp(path.join(os.tmpdir(), 'dovetail-bench-q-'))),
        concurrency: Number(values.concurrency),
        hostname,
      }).gateway;
    } else {
      const delivery = lmtp({ host: '127.0.0.1', port: lmtpPort, lhloName: hostname });
      let milters: ReturnType<typeof defaultChain> = [];
      if (kind === 'dovetail+quickstart') milters = defaultChain();
      if (kind === 'dovetail+mx') {
        const resolver = new Resolver({ timeout: 5000, tries: 1 });
        resolver.setServers([values.dns ?? '127.0.0.1:53']);
        // As the example: example.test is ours, nobody in mynetworks, the default DNS lists, DMARC enforced.
        milters = mxMilters({ localDomains: ['example.test'], resolver });
      }
      gateway = createGateway({ ...common, milters, delivery });
      extra = () => delivery.close();
    }
    const [addr] = await gateway.listen();
    if (!addr) throw new Error('no address');
    port = addr.port;
    close = async () => {
      await gateway.close();
      await extra();
    };
  }
  process.on('message', (m: { type: string }) => {
    if (m.type !== 'stop') return;
    void close()
      .catch((err: unknown) => process.stderr.write(`peers-system ${kind}: close: ${String(err)}\n`))
      .finally(() => {
        send({ type: 'closed' });
        process.exit(0);
      });
  });
  send({ type: 'listening', port });
}

await main();
