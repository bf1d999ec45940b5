/**
 * rateLimit: messages and recipients per time window, per client address, per
 * authenticated user and per sender domain, counted in Redis so that every node behind a
 * load balancer shares one count (what Postfix's anvil does for one host, and what
 * policyd-rate-limit-style policy servers do across hosts).
 *
 * Counting is a fixed window per key (as Postfix's anvil rate counters): the first event
 * starts a window of `window` ms, the key expires with it. One Lua script checks every
 * applicable counter and increments them all only when none is over its limit, so one
 * decision is one atomic round trip, and a refused message or recipient is not counted.
 * Messages are counted at MAIL FROM, recipients at each RCPT TO; over a limit the client
 * hears `450 4.7.1` (Postfix's reply for smtpd_client_message_rate_limit) at that stage.
 *
 * When Redis fails or does not answer within `commandTimeout`, `onStoreError` decides:
 * `'open'` (default) lets the mail through and reports the error; `'closed'` answers
 * `451 4.3.0`.
 *
 * It deliberately does not: count bytes, shape traffic by delaying replies, or limit
 * connections (that is the gateway's anvil; `redisAnvil` shares it across nodes).
 */
import { defineMilter, DovetailError, ErrorCodes, networkList, tempfail, type EnvelopeAddress, type MessageContext, type Milter, type SmtpReply } from '../lib/index.js';
import { clientNetwork, RedisScript, reportStoreError, storeOptions, type RedisStoreOptions } from '../lib/store/redis.js';

/** Limits for one kind of key. 0 or absent: no limit. */
export interface RateRule {
  /** Messages (MAIL FROM) per window. */
  readonly messages?: number;
  /** Recipients (RCPT TO) per window. */
  readonly recipients?: number;
  /** The window, ms. Default: the milter's `window`. */
  readonly window?: number;
}

/** Options of {@link rateLimit}. */
export interface RateLimitOptions extends RedisStoreOptions {
  /** Per client address (IPv6 per `clientPrefix6` network). Applies to every client but `exempt`. */
  readonly client?: RateRule;
  /** Per authenticated user (SMTP AUTH), whatever its address. */
  readonly user?: RateRule;
  /** Per sender domain (the MAIL FROM domain, lower case; the null sender is not counted). */
  readonly senderDomain?: RateRule;
  /** Default window of the rules, ms. Default 60 000 (Postfix anvil_rate_time_unit). */
  readonly window?: number;
  /** Client addresses or networks no rule applies to (e.g. mynetworks). Default none. */
  readonly exempt?: readonly string[];
  /** The prefix length an IPv6 client is counted by (one host often holds a /64). Default 64. */
  readonly clientPrefix6?: number;
  /** The reply over a limit. Default `450 4.7.1 Error: too much mail from <who>`. */
  readonly reply?: SmtpReply;
}

/** The script: KEYS = counters; ARGV = increment, then (limit, window ms) per key. Returns 0, or the 1-based key over its limit. */
const CHECK_AND_COUNT = new RedisScript(`
local n = tonumber(ARGV[1])
for i, k in ipairs(KEYS) do
  local limit = tonumber(ARGV[i * 2])
  local cur = tonumber(redis.call('GET', k) or '0')
  if cur + n > limit then return i end
end
for i, k in ipairs(KEYS) do
  redis.call('INCRBY', k, n)
  if redis.call('PTTL', k) < 0 then redis.call('PEXPIRE', k, tonumber(ARGV[i * 2 + 1])) end
end
return 0
`);

/**
 * Creates the rate-limit milter.
 *
 * @example
 * ```ts
 * import { Redis } from 'ioredis';
 * const redis = new Redis({ host: '10.0.0.5', enableOfflineQueue: false });
 * rateLimit({ redis, client: { messages: 100, recipients: 500 }, user: { messages: 500 }, window: 3_600_000 })
 * ```
 */
export function rateLimit(options: RateLimitOptions): Milter {
  const { redis, prefix, timeout, policy } = storeOptions('rateLimit', options);
  const bad = (why: string): never => {
    throw new DovetailError(ErrorCodes.INVALID_OPTIONS, `rateLimit: ${why}`);
  };
  const count = (name: string, v: unknown, min: number): number => {
    if (v === undefined) return 0;
    if (!(typeof v === 'number' && Number.isSafeInteger(v) && v >= min)) bad(`${name} must be an integer >= ${min}`);
    return v as number;
  };
  const window = count('window', options.window, 1) || 60_000;
  const prefix6 = count('clientPrefix6', options.clientPrefix6, 1) || 64;
  if (prefix6 > 128) bad('clientPrefix6 must be at most 128');
  const rules = (['client', 'user', 'senderDomain'] as const).map((kind) => {
    const r = options[kind];
    return {
      kind,
      messages: count(`${kind}.messages`, r?.messages, 0),
      recipients: count(`${kind}.recipients`, r?.recipients, 0),
      window: count(`${kind}.window`, r?.window, 1) || window,
    };
  });
  if (options.reply && (options.reply.code < 400 || options.reply.code > 499)) bad('reply must be a 4xx reply');
  if (rules.every((r) => r.messages === 0 && r.recipients === 0)) bad('give at least one limit (client, user or senderDomain: messages or recipients)');
  let exempt: (ip: string) => boolean;
  try {
    exempt = networkList(options.exempt ?? []);
  } catch (err) {
    throw bad(`exempt: ${(err as Error).message}`);
  }

  /** The key each rule counts for this message, or undefined where the rule does not apply. */
  const subjects = (ctx: MessageContext): (string | undefined)[] => {
    const sender = ctx.envelope.sender.address;
    const at = sender.lastIndexOf('@');
    return rules.map((r) => {
      if (r.kind === 'client') return exempt(ctx.client.address) ? undefined : ctx.client.address.includes(':') ? clientNetwork(ctx.client.address, 32, prefix6) : ctx.client.address;
      if (r.kind === 'user') return ctx.auth ? ctx.auth.user.toLowerCase() : undefined;
      return at > 0 && !exempt(ctx.client.address) ? sender.slice(at + 1).toLowerCase() : undefined;
    });
  };

  const check = async (ctx: MessageContext, what: 'messages' | 'recipients') => {
    const keys: string[] = [];
    const args: number[] = [1];
    const who: string[] = [];
    subjects(ctx).forEach((subject, i) => {
      const r = rules[i]!;
      const limit = r[what];
      if (subject === undefined || limit === 0) return;
      keys.push(`${prefix}rl:${what}:${r.kind}:${subject}`);
      args.push(limit, r.window);
      who.push(subject);
    });
    if (keys.length === 0) return undefined;
    let over: number;
    try {
      over = Number(await CHECK_AND_COUNT.run(redis, keys, args, timeout));
    } catch (err) {
      reportStoreError('rateLimit', err, { sessionId: ctx.sessionId, queueId: ctx.queueId });
      return policy === 'closed' ? tempfail(451, '4.3.0', 'Error: temporary failure of a shared store, try again later') : undefined;
    }
    if (over === 0) return undefined;
    const reply = options.reply;
    return reply ? tempfail(reply.code, reply.enhanced, reply.lines) : tempfail(450, '4.7.1', `Error: too much mail from ${who[over - 1]}`);
  };

  return defineMilter({
    name: 'rate-limit',
    async mail(ctx: MessageContext) {
      return check(ctx, 'messages');
    },
    async rcpt(ctx: MessageContext, _rcpt: EnvelopeAddress) {
      return check(ctx, 'recipients');
    },
  });
}
