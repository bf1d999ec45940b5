/**
 * routes(table): a transport that picks a transport per recipient domain, as Postfix's
 * transport_maps does: the exact domain first, then `.parent` entries from the nearest
 * parent up (`.example.com` matches `a.example.com` and `b.a.example.com`, not
 * `example.com` itself), then `'*'` for everything else. Domains are compared
 * lower-cased in their A-label (punycode) form, without a trailing dot.
 *
 * deliver() splits one envelope into one delivery per transport (in parallel), and returns
 * the results in envelope order; a transport that throws defers its own recipients
 * (`451 4.3.0`, the error on the diagnostics channel), not the others'. A recipient with no route fails (`550 5.1.2`); the gateway
 * refuses such a recipient already at RCPT.
 *
 * The table is also where our domains are written down once: `localDomains` lists the keys
 * routed to a local transport (one without `outbound: true`), in the syntax relayControl's
 * `localDomains` takes, so `relayControl({ localDomains: table.localDomains })` needs no
 * second copy.
 *
 * It deliberately does not: match whole addresses or local parts (Postfix's `user@domain`
 * keys), rewrite next hops (`smtp:[host]` values: give each route its own smtp({ relayhost })),
 * or look anything up outside the table.
 */
import { channels } from '../diagnostics.js';
import { DovetailError, ErrorCodes } from '../errors.js';
import type { EnvelopeAddress } from '../milter/types.js';
import { smtpReply, type SmtpReply } from '../milter/verdict.js';
import { canonicalDomain, domainOf } from './domains.js';
import type { DeliveryEnvelope, MessageSource, RecipientResult, Transport } from './types.js';

/** The routing table: domain → transport; `.domain` for its subdomains; `'*'` for the rest. */
export type RouteTable = Readonly<Record<string, Transport>>;

/** The routes() transport. */
export interface RoutingTransport extends Transport {
  /** The transport for an address, undefined when none is routed. */
  route(address: string): Transport | undefined;
  /** True when the address is routed to an outbound transport (queued before the client is answered). */
  isOutbound(address: string): boolean;
  /** True when any entry of the table is an outbound transport (the gateway then needs a queue). */
  readonly anyOutbound: boolean;
  /** The table's keys routed to local (not outbound) transports, `'*'` left out: for relayControl's `localDomains`. */
  readonly localDomains: readonly string[];
  /** Asks the routed transport (local ones only: an outbound next hop is not asked at RCPT). */
  verifyRecipient(envelope: { readonly queueId: string; readonly sender: EnvelopeAddress }, recipient: EnvelopeAddress): Promise<SmtpReply | undefined>;
  /** Closes each distinct transport of the table once. */
  close(): Promise<void>;
}

const TRANSPORT_FAILED = smtpReply(451, '4.3.0', 'Error: internal error, try again later');
const NO_ROUTE = smtpReply(550, '5.1.2', 'Recipient address rejected: no route to this domain (not in the routing table)');

/**
 * Creates a routing transport from a table.
 *
 * @throws DovetailError `DOVETAIL_ERR_INVALID_OPTIONS` when a key is not a domain, `.domain` or `'*'`, or a value is not a transport.
 */
export function routes(table: RouteTable): RoutingTransport {
  const bad = (why: string): never => {
    throw new DovetailError(ErrorCodes.INVALID_OPTIONS, `routes(): ${why}`);
  };
  if (typeof table !== 'object' || table === null) bad('needs a table object');
  const exact = new Map<string, Transport>();
  const parents = new Map<string, Transport>();
  let fallback: Transport | undefined;
  const localDomains: string[] = [];
  for (const [key, transport] of Object.entries(table)) {
    if (typeof transport?.deliver !== 'function') bad(`${JSON.stringify(key)} must map to a transport`);
    if (key === '*') {
      fallback = transport;
      continue;
    }
    const dotted = key.startsWith('.');
    const d = canonicalDomain(dotted ? key.slice(1) : key);
    if (d === undefined) bad(`${JSON.stringify(key)} is not a domain, .domain or '*'`);
    (dotted ? parents : exact).set(d as string, transport);
    if (transport.outbound !== true) localDomains.push(dotted ? `.${d}` : (d as string));
  }
  if (exact.size + parents.size === 0 && fallback === undefined) bad('the table is empty');

  function route(address: string): Transport | undefined {
    const d = canonicalDomain(domainOf(address));
    if (d === undefined) return fallback;
    const hit = exact.get(d);
    if (hit) return hit;
    for (let dot = d.indexOf('.'); dot >= 0; dot = d.indexOf('.', dot + 1)) {
      const parent = parents.get(d.slice(dot + 1));
      if (parent) return parent;
    }
    return fallback;
  }

  async function deliver(envelope: DeliveryEnvelope, message: MessageSource): Promise<RecipientResult[]> {
    const groups = new Map<Transport, number[]>();
    const results = new Array<RecipientResult>(envelope.recipients.length);
    envelope.recipients.forEach((r, i) => {
      const t = route(r.address);
      if (!t) results[i] = { recipient: r.address, status: 'failed', reply: NO_ROUTE };
      else groups.set(t, [...(groups.get(t) ?? []), i]);
    });
    await Promise.all(
      [...groups].map(async ([t, indexes]) => {
        const sub: DeliveryEnvelope = { ...envelope, recipients: indexes.map((i) => envelope.recipients[i]!) };
        try {
          const got = await t.deliver(sub, message);
          if (!Array.isArray(got) || got.length !== indexes.length) {
            throw new DovetailError(ErrorCodes.DELIVERY_FAILED, `transport ${t.name} returned ${Array.isArray(got) ? got.length : 'no'} results for ${indexes.length} recipients`);
          }
          indexes.forEach((i, k) => (results[i] = got[k]!));
        } catch (error) {
          // One transport failing defers its own recipients only; the others keep their results.
          channels.error.publish({ queueId: envelope.queueId, error });
          for (const i of indexes) results[i] = { recipient: envelope.recipients[i]!.address, status: 'deferred', reply: TRANSPORT_FAILED };
        }
      }),
    );
    return results;
  }

  return Object.freeze({
    name: 'routes',
    route,
    isOutbound: (address: string) => route(address)?.outbound === true,
    anyOutbound: [...exact.values(), ...parents.values(), ...(fallback ? [fallback] : [])].some((t) => t.outbound === true),
    localDomains: Object.freeze(localDomains),
    deliver,
    async verifyRecipient(envelope: { readonly queueId: string; readonly sender: EnvelopeAddress }, recipient: EnvelopeAddress) {
      const t = route(recipient.address);
      if (!t) return NO_ROUTE;
      if (t.outbound === true || !t.verifyRecipient) return undefined;
      return t.verifyRecipient(envelope, recipient);
    },
    async close() {
      const distinct = new Set<Transport>([...exact.values(), ...parents.values(), ...(fallback ? [fallback] : [])]);
      await Promise.all([...distinct].map((t) => t.close?.()));
    },
  });
}

/** True when `t` is a routes() transport (or anything with the same `route` and `isOutbound`). */
export function isRouting(t: Transport): t is RoutingTransport {
  return typeof (t as Partial<RoutingTransport>).route === 'function' && typeof (t as Partial<RoutingTransport>).isOutbound === 'function';
}

/** The name of the transport `address` goes to: the routed one for a routes() table (for logs). */
export function transportOf(t: Transport, address: string): string {
  return isRouting(t) ? (t.route(address)?.name ?? t.name) : t.name;
}
