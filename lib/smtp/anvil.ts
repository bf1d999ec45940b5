/**
 * Per-client limits, as Postfix's anvil(8) keeps them for smtpd: how many connections one
 * client address holds at once (smtpd_client_connection_count_limit) and how many it opens
 * per time unit (smtpd_client_connection_rate_limit, anvil_rate_time_unit), with an
 * exemption list (smtpd_client_event_limit_exceptions). One client address can then no
 * longer take every connection slot of a listener.
 *
 * {@link Anvil} is the interface the gateway asks; {@link memoryAnvil} keeps the counters in
 * this process (a gateway, or one worker). A shared store (Redis, for several workers or
 * machines) implements the same two calls.
 *
 * Messages are counted too, per time unit, per client address (Postfix
 * smtpd_client_message_rate_limit) and per authenticated user (whatever its address), both
 * off by default.
 *
 * It deliberately does not: count recipients per client (a rate-limit milter's job), or
 * look at anything but the address (no per-network aggregation: give the network
 * as the key if you want one — `key`).
 */
import { DovetailError, ErrorCodes } from '../errors.js';
import { networkList } from '../networks.js';

/**
 * Why a connection was refused: over the count or rate limit, or (a shared store such as
 * {@link redisAnvil} with `onStoreError: 'closed'`) the store could not answer.
 */
export type AnvilRefusal = 'count' | 'rate' | 'unavailable';

/** What {@link Anvil.connect} answers. */
export type AnvilConnectResult = { readonly ok: true; readonly release: () => void } | { readonly ok: false; readonly why: AnvilRefusal };

/**
 * What the gateway asks when a client connects, and tells when it goes. The answers may be
 * promises (a shared store); the gateway awaits them.
 */
export interface Anvil {
  /** A new connection from `client`: allowed (and counted), or why not. */
  connect(client: string): AnvilConnectResult | Promise<AnvilConnectResult>;
  /**
   * A new message (at MAIL FROM) from `client`, or from the authenticated `user` when there
   * is one: allowed (and counted), refused (false: `450 4.7.1`), or `'unavailable'` (a shared
   * store that could not answer and fails closed: `451 4.3.0`). Optional: an anvil without
   * it limits no messages.
   */
  message?(client: string, user: string | undefined): boolean | 'unavailable' | Promise<boolean | 'unavailable'>;
}

/** Options of {@link memoryAnvil}, and of the gateway's `clientLimits`. */
export interface ClientLimitOptions {
  /** Connections one client address may hold at once; 0: no limit. Default 50 (Postfix). */
  readonly maxConnections?: number;
  /** New connections one client address may open per `window`; 0: no limit. Default 0 (Postfix: off). */
  readonly connectionRate?: number;
  /** Messages (MAIL FROM) one client address may start per `window`; 0: no limit. Default 0 (Postfix smtpd_client_message_rate_limit: off). */
  readonly messageRate?: number;
  /** Messages one authenticated user may start per `window`, whatever its address; 0: no limit. Default 0. */
  readonly userMessageRate?: number;
  /** The rates' time unit, ms (Postfix anvil_rate_time_unit). Default 60 000. */
  readonly window?: number;
  /** Client addresses or CIDR blocks the limits do not apply to. Default none. */
  readonly exempt?: readonly string[];
  /** The time now, ms (for tests). Default Date.now. */
  readonly clock?: () => number;
}

/** Counters kept in this process. */
export function memoryAnvil(options: ClientLimitOptions = {}): Anvil {
  const positive = (name: string, v: unknown, min: number): void => {
    if (v !== undefined && !(typeof v === 'number' && Number.isSafeInteger(v) && v >= min)) {
      throw new DovetailError(ErrorCodes.INVALID_OPTIONS, `clientLimits.${name} must be an integer >= ${min}`);
    }
  };
  positive('maxConnections', options.maxConnections, 0);
  positive('connectionRate', options.connectionRate, 0);
  positive('window', options.window, 1);
  positive('messageRate', options.messageRate, 0);
  positive('userMessageRate', options.userMessageRate, 0);
  const maxConnections = options.maxConnections ?? 50;
  const rate = options.connectionRate ?? 0;
  const window = options.window ?? 60_000;
  const clock = options.clock ?? Date.now;
  const messageRate = options.messageRate ?? 0;
  const userMessageRate = options.userMessageRate ?? 0;
  /** Per client address or `user:<name>`: the start of the current window and the messages in it. */
  const messages = new Map<string, { windowStart: number; count: number }>();
  let exempt: (address: string) => boolean;
  try {
    exempt = networkList(options.exempt ?? []);
  } catch (err) {
    throw new DovetailError(ErrorCodes.INVALID_OPTIONS, `clientLimits.exempt: ${(err as Error).message}`);
  }
  /** Per client: connections open now, and the start times of the current rate window's connections. */
  const clients = new Map<string, { open: number; windowStart: number; count: number }>();

  const forget = (client: string, c: { open: number; windowStart: number }): void => {
    if (c.open === 0 && (rate === 0 || clock() - c.windowStart >= window)) clients.delete(client);
  };

  return {
    message(client, user) {
      const limit = user !== undefined ? userMessageRate : messageRate;
      if (limit === 0 || (user === undefined && exempt(client))) return true;
      const key = user !== undefined ? `user:${user.toLowerCase()}` : client;
      const now = clock();
      if (messages.size >= 10_000) for (const [k, m] of messages) if (now - m.windowStart >= window) messages.delete(k);
      let m = messages.get(key);
      if (!m || now - m.windowStart >= window) messages.set(key, (m = { windowStart: now, count: 0 }));
      if (m.count >= limit) return false;
      m.count++;
      return true;
    },
    connect(client) {
      if (exempt(client)) return { ok: true, release: () => undefined };
      const now = clock();
      // Keep the table as small as the set of clients with something to remember.
      if (clients.size >= 10_000) for (const [k, e] of clients) forget(k, e);
      let c = clients.get(client);
      if (!c) clients.set(client, (c = { open: 0, windowStart: now, count: 0 }));
      const entry = c;
      if (maxConnections > 0 && entry.open >= maxConnections) return { ok: false, why: 'count' };
      if (rate > 0) {
        // A fixed window per client, as anvil's rate counters (reset after each time unit).
        if (now - entry.windowStart >= window) {
          entry.windowStart = now;
          entry.count = 0;
        }
        if (entry.count >= rate) return { ok: false, why: 'rate' };
        entry.count++;
      }
      entry.open++;
      let released = false;
      return {
        ok: true,
        release: () => {
          if (released) return;
          released = true;
          entry.open--;
          forget(client, entry);
        },
      };
    },
  };
}
