/**
 * Type tests for the scale-out API (compiled by tsc, never run): the Redis-backed parts take
 * an ioredis client (standalone or cluster) the caller builds; the policies and the listener
 * trust options are typed so that a wrong shape fails to compile.
 */
import type { Cluster, Redis } from 'ioredis';
import { createGateway, maildir, redisAnvil, type Anvil, type ListenOptions } from '../../lib/index.js';
import { greylist, rateLimit } from '../../milters/index.js';

export function typeChecks(redis: Redis, cluster: Cluster): void {
  const anvil: Anvil = redisAnvil({ redis, maxConnections: 20, onStoreError: 'closed' });
  rateLimit({ redis: cluster, client: { messages: 10 }, onStoreError: 'open' });
  greylist({ redis, delay: 60_000 });
  const listen: ListenOptions = { port: 25, proxyProtocol: { trusted: ['10.0.0.0/8'] }, xclient: { trusted: ['10.0.0.1'] } };
  createGateway({ listen, anvil, delivery: maildir({ root: '/srv/mail' }) });

  // @ts-expect-error onStoreError is 'open' or 'closed'
  rateLimit({ redis, client: { messages: 1 }, onStoreError: 'ignore' });
  // @ts-expect-error the client is required
  greylist({ delay: 1 });
  // @ts-expect-error trusted is a list
  const bad: ListenOptions = { port: 25, proxyProtocol: { trusted: '10.0.0.1' } };
  void bad;
  // @ts-expect-error rules take numbers
  rateLimit({ redis, user: { messages: '5' } });
}
