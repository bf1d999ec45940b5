/**
 * The dovetail side of the outbound benchmarks (bench/outbound.ts, and bench/peers.ts's
 * `dovetail-outbound`): a gateway that accepts everything from loopback and relays it
 * through the durable queue with `smtp()` to a relayhost on 127.0.0.1 (the sink), with no
 * TLS. One place for the configuration, so both benchmarks measure the same thing:
 * queue backoff 1–4 s, scan every 50 ms, `concurrency` deliveries at once;
 * `resolveClientNames: false`, as Postfix with `smtpd_peername_lookup = no`.
 *
 * It builds; it does not listen (the caller calls `gateway.listen()`).
 */
import { createGateway, createQueue, routes, smtp, type Gateway, type SmtpTransport } from '../lib/index.js';
import { nullTransport } from './null-transport.js';

export interface OutboundGatewayOptions {
  /** The relayhost's port on 127.0.0.1. */
  readonly sinkPort: number;
  /** The queue's directory. */
  readonly queueDir: string;
  /** Deliveries at once (Postfix default_destination_concurrency_limit is 20). */
  readonly concurrency: number;
  /** Our name (greeting, HELO). Default mx.dovetail.test. */
  readonly hostname?: string;
}

export function outboundGateway(options: OutboundGatewayOptions): { readonly gateway: Gateway; readonly transport: SmtpTransport } {
  const hostname = options.hostname ?? 'mx.dovetail.test';
  const transport = smtp({ relayhost: `[127.0.0.1]:${options.sinkPort}`, tls: 'none', hostname });
  const table = routes({ '*': transport });
  const queue = createQueue({
    dir: options.queueDir,
    transport: table,
    hostname,
    backoff: { min: 1000, max: 4000 },
    scanInterval: 50,
    concurrency: options.concurrency,
  });
  const gateway = createGateway({
    hostname,
    listen: { host: '127.0.0.1', port: 0 },
    resolveClientNames: false,
    closeTimeout: 5_000,
    delivery: table,
    queue,
    quarantine: nullTransport('quarantine'),
  });
  return { gateway, transport };
}
