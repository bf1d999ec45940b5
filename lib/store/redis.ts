/**
 * What the Redis-backed parts (rateLimit, greylist, redisAnvil) share: the client type
 * (ioredis, constructed by the user; only its type is imported here, so ioredis is loaded
 * only by whoever builds a client), Lua scripts run by SHA with a fallback to EVAL (one
 * atomic round trip per decision), a bounded wait for every command, and the policy for a
 * store that fails.
 *
 * It deliberately does not: connect, retry or reconnect (ioredis does, as the user
 * configured it), or queue decisions for later: a decision that cannot be made in
 * `commandTimeout` is made by `onStoreError` at once.
 */
import { createHash } from 'node:crypto';
import diagnostics_channel from 'node:diagnostics_channel';
import net from 'node:net';
import { Address6 } from 'ip-address';
import type { Cluster, Redis } from 'ioredis';
import { DovetailError, ErrorCodes } from '../errors.js';
import { Channels } from '../diagnostics.js';

/** An ioredis client (standalone or cluster), built and owned by the caller. */
export type RedisClient = Redis | Cluster;

/**
 * What to do when the store fails or does not answer within `commandTimeout`:
 * `'open'` accepts (the limit does not apply for that decision) and reports the error;
 * `'closed'` refuses for now (`451 4.3.0`, `421 4.3.0` at connect) and reports it.
 */
export type StoreErrorPolicy = 'open' | 'closed';

/** Options every Redis-backed part takes. */
export interface RedisStoreOptions {
  /** The client (ioredis). Tip: `enableOfflineQueue: false` so commands fail at once while Redis is away. */
  readonly redis: RedisClient;
  /** Prefix of every key. Default `'dovetail:'`. */
  readonly prefix?: string;
  /** The longest wait for one decision, ms: past it the store counts as failed. Default 500. */
  readonly commandTimeout?: number;
  /** What a failed store means. Default `'open'` (mail flows, unlimited, while Redis is away). */
  readonly onStoreError?: StoreErrorPolicy;
}

/** Default for {@link RedisStoreOptions.commandTimeout}. */
export const DEFAULT_STORE_TIMEOUT = 500;

/** A Lua script, run with EVALSHA (EVAL once when Redis does not have it yet). */
export class RedisScript {
  readonly sha: string;
  constructor(readonly source: string) {
    this.sha = createHash('sha1').update(source).digest('hex');
  }

  /** Runs the script; rejects with DOVETAIL_ERR_STORE_UNAVAILABLE on any failure or after `timeout` ms. */
  run(redis: RedisClient, keys: readonly string[], args: readonly (string | number)[], timeout: number): Promise<unknown> {
    type Eval = (script: string, numKeys: number, ...rest: (string | number)[]) => Promise<unknown>;
    const evalsha = (redis.evalsha as unknown as Eval).bind(redis);
    const evalScript = (redis.eval as unknown as Eval).bind(redis);
    const call = (async () => {
      try {
        return await evalsha(this.sha, keys.length, ...keys, ...args);
      } catch (err) {
        if (!/NOSCRIPT/.test(String((err as Error)?.message))) throw err;
        return await evalScript(this.source, keys.length, ...keys, ...args);
      }
    })();
    let timer: NodeJS.Timeout | undefined;
    const timedOut = new Promise<never>((_, reject) => {
      timer = setTimeout(() => reject(new DovetailError(ErrorCodes.STORE_UNAVAILABLE, `Redis did not answer within ${timeout} ms`)), timeout);
    });
    // A late answer or failure after the timeout is dropped, not left unhandled.
    call.catch(() => undefined);
    return Promise.race([call, timedOut])
      .catch((err: unknown) => {
        throw err instanceof DovetailError ? err : new DovetailError(ErrorCodes.STORE_UNAVAILABLE, `Redis failed: ${(err as Error)?.message ?? String(err)}`, { cause: err });
      })
      .finally(() => clearTimeout(timer));
  }
}

/** Checks the shared options; returns them with defaults. */
export function storeOptions(name: string, o: RedisStoreOptions): { redis: RedisClient; prefix: string; timeout: number; policy: StoreErrorPolicy } {
  const bad = (why: string): never => {
    throw new DovetailError(ErrorCodes.INVALID_OPTIONS, `${name}: ${why}`);
  };
  if (!o || !o.redis || typeof (o.redis as { evalsha?: unknown }).evalsha !== 'function') bad('redis must be an ioredis client');
  const timeout = o.commandTimeout ?? DEFAULT_STORE_TIMEOUT;
  if (!Number.isSafeInteger(timeout) || timeout < 1) bad('commandTimeout must be a positive integer (ms)');
  const policy = o.onStoreError ?? 'open';
  if (policy !== 'open' && policy !== 'closed') bad("onStoreError must be 'open' or 'closed'");
  const prefix = o.prefix ?? 'dovetail:';
  if (typeof prefix !== 'string') bad('prefix must be a string');
  return { redis: o.redis, prefix, timeout, policy };
}

/**
 * The network a client address belongs to, as a key: the first `v4` bits of an IPv4 address
 * (an IPv4-mapped IPv6 one counts as IPv4), the first `v6` bits of an IPv6 one, as
 * `a.b.c.d/n` / `x:x::/n` text. Greylisting and rate limits key on it, so a sender's pool of
 * outgoing servers counts as one client (Postgrey --lookup-by-subnet).
 */
export function clientNetwork(address: string, v4 = 24, v6 = 64): string {
  const mapped = /^::ffff:(\d+\.\d+\.\d+\.\d+)$/i.exec(address);
  const a = mapped ? mapped[1]! : address;
  if (net.isIPv4(a)) {
    const n = a.split('.').reduce((acc, o) => acc * 256 + Number(o), 0);
    const masked = v4 === 0 ? 0 : Math.floor(n / 2 ** (32 - v4)) * 2 ** (32 - v4);
    return `${[24, 16, 8, 0].map((s) => Math.floor(masked / 2 ** s) % 256).join('.')}/${v4}`;
  }
  if (net.isIPv6(a)) {
    const bytes = new Address6(a.replace(/%.*$/, '')).toByteArray();
    const full = [...Array(16 - bytes.length).fill(0), ...bytes] as number[];
    for (let i = 0; i < 16; i++) {
      const keep = Math.max(0, Math.min(8, v6 - i * 8));
      full[i] = full[i]! & ((0xff << (8 - keep)) & 0xff);
    }
    const groups: string[] = [];
    for (let i = 0; i < 16; i += 2) groups.push(((full[i]! << 8) | full[i + 1]!).toString(16));
    return `${groups.join(':')}/${v6}`;
  }
  return address;
}

/** Reports a store failure that onStoreError answered (dovetail:gateway:error). */
export function reportStoreError(where: string, err: unknown, extra: Record<string, unknown> = {}): void {
  const error = err instanceof DovetailError ? err : new DovetailError(ErrorCodes.STORE_UNAVAILABLE, `${where}: ${String((err as Error)?.message ?? err)}`, { cause: err });
  errorChannel.publish({ ...extra, where, error });
}

const errorChannel = diagnostics_channel.channel(Channels.error);
