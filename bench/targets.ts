/**
 * Bench targets: the servers the load generator talks to, each on its own free port on
 * 127.0.0.1, all in this process so a CPU profile of the bench shows the server side.
 *
 * - `smtp-server`: bare smtp-server that reads and drops DATA: the floor every gateway
 *   target is compared with.
 * - `gateway`: createGateway() with no milters, delivering to the null transport.
 * - `gateway+milters`: the same with the four bench milters (bench/milters.ts).
 * - `gateway+maildir`: no milters, the real maildir() transport with fsync into a temp dir:
 *   it measures the disk as much as the gateway, so it is reported apart.
 * - `gateway+mx-chain`: the five bundled milters configured as in examples/mx-gateway.ts
 *   (sizeLimit, relayControl, dnsbl, mailAuth, spamTag), null transport, their DNS answered
 *   by a loopback DNS server in a worker thread (bench/mx-chain.ts); the message is
 *   DKIM-signed once per phase by the target's prepareMessage.
 *
 * It does not tune anything the library does not expose; every gateway target uses the
 * library's defaults except `resolveClientNames: false` (no PTR lookups on loopback).
 */
import fs from 'node:fs/promises';
import type net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { SMTPServer } from 'smtp-server';
import { createGateway, maildir } from '../lib/index.js';
import { mxMilters } from '../examples/mx-gateway.js';
import { benchMilters } from './milters.js';
import { startMxChainFixture } from './mx-chain.js';
import { nullTransport } from './null-transport.js';

export const TARGETS = ['smtp-server', 'gateway', 'gateway+milters', 'gateway+maildir', 'gateway+mx-chain'] as const;
export type TargetName = (typeof TARGETS)[number];

/** What the floor is: the target every ratio is taken against. */
export const BASELINE: TargetName = 'smtp-server';
/** The plain gateway: the targets that add something to it are also compared with it. */
export const GATEWAY: TargetName = 'gateway';

export interface Target {
  readonly name: TargetName;
  readonly port: number;
  /** What it is, for the report. */
  readonly description: string;
  /**
   * Turns the bench message into what this target needs (gateway+mx-chain: DKIM-signs it).
   * Applied once per phase, before the rounds; every target then gets the same bytes.
   */
  readonly prepareMessage?: (message: Buffer) => Promise<Buffer>;
  /** DNS queries this target's milters have caused so far (gateway+mx-chain). */
  readonly dnsQueries?: () => Promise<number>;
  close(): Promise<void>;
}

export interface TargetOptions {
  /** Parent directory of the maildir root (default os.tmpdir()). */
  readonly maildirParent?: string;
}

async function bare(): Promise<Target> {
  const server = new SMTPServer({
    authOptional: true,
    disabledCommands: ['AUTH', 'STARTTLS'],
    // The gateway runs with resolveClientNames: false; the floor does the same.
    disableReverseLookup: true,
    logger: false,
    onData(stream, _session, cb) {
      stream.resume();
      stream.on('end', () => cb());
    },
  });
  await new Promise<void>((resolve, reject) => {
    server.server.once('error', reject);
    server.listen(0, '127.0.0.1', () => resolve());
  });
  const port = (server.server.address() as net.AddressInfo).port;
  return {
    name: 'smtp-server',
    port,
    description: 'bare smtp-server, onData drains the stream (the floor)',
    close: () => new Promise<void>((resolve) => server.close(() => resolve())),
  };
}

async function gateway(name: TargetName, description: string, extra: Parameters<typeof createGateway>[0], cleanup?: () => Promise<void>): Promise<Target> {
  const gw = createGateway(extra);
  const [addr] = await gw.listen();
  if (!addr) throw new Error(`${name}: no address`);
  return {
    name,
    port: addr.port,
    description,
    async close() {
      await gw.close();
      await cleanup?.();
    },
  };
}

/** Starts one target. */
export async function startTarget(name: TargetName, options: TargetOptions = {}): Promise<Target> {
  const common = {
    hostname: 'mx.bench.test',
    listen: { host: '127.0.0.1', port: 0 },
    resolveClientNames: false,
    // Never used (nothing quarantines); keeps the default maildir('var/quarantine') out of the picture.
    quarantine: nullTransport('null-quarantine'),
  } as const;
  switch (name) {
    case 'smtp-server':
      return bare();
    case 'gateway':
      return gateway(name, 'createGateway(), no milters, null transport', { ...common, delivery: nullTransport() });
    case 'gateway+milters':
      return gateway(name, 'createGateway(), 4 in-process milters (rcpt, header+eoh, body, eom addHeader), null transport', {
        ...common,
        milters: benchMilters(),
        delivery: nullTransport(),
      });
    case 'gateway+maildir': {
      const base = await fs.mkdtemp(path.join(options.maildirParent ?? os.tmpdir(), 'dovetail-bench-'));
      const root = path.join(base, 'mail');
      await fs.mkdir(root);
      return gateway(
        name,
        `createGateway(), no milters, maildir({ fsync: true }) under ${base}`,
        { ...common, delivery: maildir({ root, fsync: true, hostname: 'mx.bench.test' }) },
        () => fs.rm(base, { recursive: true, force: true }),
      );
    }
    case 'gateway+mx-chain': {
      const fixture = await startMxChainFixture();
      try {
        const target = await gateway(
          name,
          `createGateway(), the 5 bundled milters as in examples/mx-gateway.ts, DNS on loopback (${fixture.server}, worker thread), null transport`,
          {
            ...common,
            // As the example: local domain example.test (the bench's RCPT), nobody in mynetworks, the
            // default DNS lists (not listing 127.0.0.1), DMARC enforced; only the resolver differs.
            milters: mxMilters({ localDomains: ['example.test'], resolver: fixture.resolver }),
            delivery: nullTransport(),
          },
          () => fixture.close(),
        );
        return { ...target, prepareMessage: (m) => fixture.sign(m), dnsQueries: () => fixture.queries() };
      } catch (err) {
        await fixture.close();
        throw err;
      }
    }
  }
}
