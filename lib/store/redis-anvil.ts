/**
 * redisAnvil: the gateway's per-client limits (lib/smtp/anvil.ts: connections at once,
 * connection rate, message rate per client and per authenticated user) with the counters
 * in Redis, so that every node behind a load balancer counts the same client once.
 *
 * Concurrent connections are a sorted set per client address: one member per open
 * connection, scored by when its lease ends (`lease`, default 30 min, renewed never); a
 * connection that ends removes its member, and a node that dies leaves members that expire
 * with their lease. A session longer than the lease stops being counted: keep `lease` above
 * the longest session you expect (Postfix's smtpd_timeout × commands). Rates are fixed
 * windows (as anvil's), one counter per key with the window as its TTL. Each decision is
 * one Lua script (atomic), bounded by `commandTimeout`; Redis's clock is used.
 *
 * When Redis fails or is slow, `onStoreError` decides: `'open'` (default) allows and
 * reports; `'closed'` refuses (`421 4.3.0` at connect, `451 4.3.0` at MAIL FROM).
 *
 * It deliberately does not: load ioredis (the caller builds the client; only its type is
 * imported), or count anything memoryAnvil does not.
 */
import crypto from 'node:crypto';
import { DovetailError, ErrorCodes } from '../errors.js';
import { networkList } from '../networks.js';
import type { Anvil, ClientLimitOptions } from '../smtp/anvil.js';
import { RedisScript, reportStoreError, storeOptions, type RedisStoreOptions } from './redis.js';

/** Options of {@link redisAnvil}: the limits of `clientLimits` (minus `clock`: Redis's clock is used), and the store's. */
export interface RedisAnvilOptions extends Omit<ClientLimitOptions, 'clock'>, RedisStoreOptions {
  /** How long one connection counts at most, ms (a node that dies leaves nothing behind longer). Default 1 800 000. */
  readonly lease?: number;
}

/** KEYS: connection set, rate counter. ARGV: member, lease, max connections, rate, window. Returns 0 ok, 1 count, 2 rate. */
const CONNECT = new RedisScript(`
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lease, max, rate, window = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
if max > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
  if redis.call('ZCARD', KEYS[1]) >= max then return 1 end
end
if rate > 0 then
  if tonumber(redis.call('GET', KEYS[2]) or '0') >= rate then return 2 end
  redis.call('INCR', KEYS[2])
  if redis.call('PTTL', KEYS[2]) < 0 then redis.call('PEXPIRE', KEYS[2], window) end
end
if max > 0 then
  redis.call('ZADD', KEYS[1], now + lease, ARGV[1])
  redis.call('PEXPIRE', KEYS[1], lease)
end
return 0
`);

const RELEASE = new RedisScript(`return redis.call('ZREM', KEYS[1], ARGV[1])`);

/** KEYS: counter. ARGV: limit, window. Returns 1 allowed (counted), 0 over. */
const MESSAGE = new RedisScript(`
if tonumber(redis.call('GET', KEYS[1]) or '0') >= tonumber(ARGV[1]) then return 0 end
redis.call('INCR', KEYS[1])
if redis.call('PTTL', KEYS[1]) < 0 then redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2])) end
return 1
`);

/**
 * Per-client limits shared through Redis: give it to the gateway as `anvil`.
 *
 * @example
 * ```ts
 * import { Redis } from 'ioredis';
 * import { createGateway, redisAnvil } from 'dovetail';
 * const redis = new Redis({ host: '10.0.0.5', enableOfflineQueue: false });
 * createGateway({ anvil: redisAnvil({ redis, maxConnections: 20, connectionRate: 60, exempt: ['10.0.0.0/8'] }), … });
 * ```
 */
export function redisAnvil(options: RedisAnvilOptions): Anvil {
  const { redis, prefix, timeout, policy } = storeOptions('redisAnvil', options);
  const int = (name: string, v: unknown, def: number, min: number): number => {
    if (v === undefined) return def;
    if (!(typeof v === 'number' && Number.isSafeInteger(v) && v >= min)) throw new DovetailError(ErrorCodes.INVALID_OPTIONS, `redisAnvil: ${name} must be an integer >= ${min}`);
    return v as number;
  };
  const maxConnections = int('maxConnections', options.maxConnections, 50, 0);
  const rate = int('connectionRate', options.connectionRate, 0, 0);
  const window = int('window', options.window, 60_000, 1);
  const messageRate = int('messageRate', options.messageRate, 0, 0);
  const userMessageRate = int('userMessageRate', options.userMessageRate, 0, 0);
  const lease = int('lease', options.lease, 1_800_000, 1);
  let exempt: (ip: string) => boolean;
  try {
    exempt = networkList(options.exempt ?? []);
  } catch (err) {
    throw new DovetailError(ErrorCodes.INVALID_OPTIONS, `redisAnvil: exempt: ${(err as Error).message}`);
  }
  const node = crypto.randomBytes(6).toString('hex');
  let seq = 0;
  const none = { ok: true as const, release: () => undefined };

  return {
    async connect(client) {
      if (exempt(client) || (maxConnections === 0 && rate === 0)) return none;
      const member = `${node}:${++seq}`;
      const set = `${prefix}anvil:conn:${client}`;
      let answer: number;
      try {
        answer = Number(await CONNECT.run(redis, [set, `${prefix}anvil:rate:${client}`], [member, lease, maxConnections, rate, window], timeout));
      } catch (err) {
        reportStoreError('redisAnvil', err, { client });
        return policy === 'closed' ? { ok: false, why: 'unavailable' } : none;
      }
      if (answer === 1) return { ok: false, why: 'count' };
      if (answer === 2) return { ok: false, why: 'rate' };
      let released = false;
      return {
        ok: true,
        release: () => {
          if (released || maxConnections === 0) return;
          released = true;
          // A release that fails is left to the lease.
          RELEASE.run(redis, [set], [member], timeout).catch((err: unknown) => reportStoreError('redisAnvil', err, { client }));
        },
      };
    },
    async message(client, user) {
      const limit = user !== undefined ? userMessageRate : messageRate;
      if (limit === 0 || (user === undefined && exempt(client))) return true;
      const key = `${prefix}anvil:msg:${user !== undefined ? `user:${user.toLowerCase()}` : client}`;
      try {
        return Number(await MESSAGE.run(redis, [key], [limit, window], timeout)) === 1;
      } catch (err) {
        reportStoreError('redisAnvil', err, { client });
        return policy === 'closed' ? 'unavailable' : true;
      }
    },
  };
}
