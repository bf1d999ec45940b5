/**
 * greylist: temporary refusal of the first delivery attempt of a (client network, sender,
 * recipient) triplet, as Postgrey does it, with the triplets in Redis so that a retry that
 * lands on another node behind the load balancer is recognised.
 *
 * At RCPT TO: an unknown triplet is recorded and refused `450 4.2.0`; a retry after `delay`
 * and within `retryWindow` of the first attempt passes, and the triplet is then known for
 * `maxAge` after it was last seen; a retry too early is refused again (the first attempt's
 * time stands); a retry after `retryWindow` starts over. A client network whose triplets
 * passed `autoAllowAfter` times passes without greylisting (Postgrey's auto-whitelist).
 * Time is Redis's (TIME in the script), so nodes with skewed clocks agree.
 *
 * Defaults are Postgrey's (postgrey(8), 1.37): `--delay=300` (5 min), `--retry-window=2`
 * (2 days), `--max-age=35` (days), `--auto-whitelist-clients=5`, and
 * `--lookup-by-subnet` with `--ipv4cidr=24`, `--ipv6cidr=64`. Postgrey counts an
 * auto-whitelist "delivery" per successful retry of a triplet; so does this.
 *
 * Exempt: clients in `exempt` (put mynetworks there), authenticated users (SMTP AUTH), and
 * role recipients (postmaster, by `exemptRecipients`, milters/postmaster.ts isRoleRecipient).
 *
 * When Redis fails or is slow (over `commandTimeout`), `onStoreError` decides: `'open'`
 * (default) lets the recipient through (no greylisting while Redis is away) and reports
 * it; `'closed'` answers `451 4.3.0`.
 *
 * It deliberately does not: greylist at DATA (one sender to many recipients then counts as
 * one triplet per recipient, as in Postgrey), look at the HELO name, or keep a static
 * whitelist of sender domains (use `exempt`, or a milter before it that `accept()`s).
 */
import { createHash } from 'node:crypto';
import { defineMilter, DovetailError, ErrorCodes, networkList, tempfail, type EnvelopeAddress, type MessageContext, type Milter, type SmtpReply } from '../lib/index.js';
import { clientNetwork, RedisScript, reportStoreError, storeOptions, type RedisStoreOptions } from '../lib/store/redis.js';
import { isRoleRecipient } from './postmaster.js';

/** Options of {@link greylist}. */
export interface GreylistOptions extends RedisStoreOptions {
  /** How long a new triplet is refused, ms. Default 300 000 (Postgrey --delay=300). */
  readonly delay?: number;
  /** How long after the first attempt a retry is still recognised, ms. Default 2 days (Postgrey --retry-window=2). */
  readonly retryWindow?: number;
  /** How long a passed triplet (and an auto-allowed client) is remembered after it was last seen, ms. Default 35 days (Postgrey --max-age=35). */
  readonly maxAge?: number;
  /** Passed retries after which a client network is no longer greylisted; 0: never. Default 5 (Postgrey --auto-whitelist-clients=5). */
  readonly autoAllowAfter?: number;
  /** The IPv4 prefix length a client is counted by. Default 24 (Postgrey --ipv4cidr). */
  readonly ipv4Prefix?: number;
  /** The IPv6 prefix length a client is counted by. Default 64 (Postgrey --ipv6cidr). */
  readonly ipv6Prefix?: number;
  /** Client addresses or networks never greylisted (mynetworks, known partners). Default none. */
  readonly exempt?: readonly string[];
  /** Authenticated clients (SMTP AUTH) are not greylisted. Default true. */
  readonly exemptAuthenticated?: boolean;
  /** Role recipients never greylisted (local parts, milters/postmaster.ts). Default `['postmaster', 'abuse']`. */
  readonly exemptRecipients?: readonly string[];
  /** The refusal. Default `450 4.2.0 Greylisted, please try again in <n> seconds`. */
  readonly reply?: SmtpReply;
}

/** What happened to one recipient (also given to `onDecision`, for tests and logs). */
export type GreylistDecision = 'greylisted' | 'passed' | 'known' | 'auto-allowed' | 'exempt' | 'store-error';

/**
 * KEYS: triplet, client network's pass count. ARGV: delay, retry window, max age (ms), auto-allow count.
 * Returns { code, ms }: code 0 greylisted (ms left), 1 auto-allowed, 2 known triplet, 3 passed now.
 */
const DECIDE = new RedisScript(`
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local delay, retry, maxage, awl = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
if awl > 0 and tonumber(redis.call('GET', KEYS[2]) or '0') >= awl then
  redis.call('PEXPIRE', KEYS[2], maxage)
  return {1, 0}
end
if redis.call('HEXISTS', KEYS[1], 'passed') == 1 then
  redis.call('HSET', KEYS[1], 'passed', now)
  redis.call('PEXPIRE', KEYS[1], maxage)
  return {2, 0}
end
local first = tonumber(redis.call('HGET', KEYS[1], 'first') or '-1')
if first < 0 or now - first > retry then
  redis.call('HSET', KEYS[1], 'first', now)
  redis.call('PEXPIRE', KEYS[1], retry)
  return {0, delay}
end
if now - first < delay then return {0, delay - (now - first)} end
redis.call('HSET', KEYS[1], 'passed', now)
redis.call('PEXPIRE', KEYS[1], maxage)
redis.call('INCR', KEYS[2])
redis.call('PEXPIRE', KEYS[2], maxage)
return {3, 0}
`);

const DAY = 86_400_000;

/**
 * Creates the greylisting milter. Put it after relayControl (do not greylist mail you would
 * refuse anyway) and before content milters.
 *
 * @example
 * ```ts
 * greylist({ redis, exempt: ['127.0.0.0/8', '10.0.0.0/8'] })
 * ```
 */
export function greylist(options: GreylistOptions & { readonly onDecision?: (d: GreylistDecision, ctx: MessageContext, rcpt: EnvelopeAddress) => void }): Milter {
  const { redis, prefix, timeout, policy } = storeOptions('greylist', options);
  const bad = (why: string): never => {
    throw new DovetailError(ErrorCodes.INVALID_OPTIONS, `greylist: ${why}`);
  };
  const int = (name: string, v: unknown, def: number, min: number, max = Number.MAX_SAFE_INTEGER): number => {
    if (v === undefined) return def;
    if (!(typeof v === 'number' && Number.isSafeInteger(v) && v >= min && v <= max)) bad(`${name} must be an integer from ${min} to ${max}`);
    return v as number;
  };
  const delay = int('delay', options.delay, 300_000, 0);
  const retryWindow = int('retryWindow', options.retryWindow, 2 * DAY, 1);
  const maxAge = int('maxAge', options.maxAge, 35 * DAY, 1);
  if (retryWindow <= delay) bad('retryWindow must be longer than delay');
  const autoAllowAfter = int('autoAllowAfter', options.autoAllowAfter, 5, 0);
  const v4 = int('ipv4Prefix', options.ipv4Prefix, 24, 0, 32);
  const v6 = int('ipv6Prefix', options.ipv6Prefix, 64, 0, 128);
  const roles = options.exemptRecipients ?? ['postmaster', 'abuse'];
  if (!Array.isArray(roles) || roles.some((r) => typeof r !== 'string')) bad('exemptRecipients must be a list of local parts');
  if (options.reply && (options.reply.code < 400 || options.reply.code > 499)) bad('reply must be a 4xx reply');
  let exempt: (ip: string) => boolean;
  try {
    exempt = networkList(options.exempt ?? []);
  } catch (err) {
    throw bad(`exempt: ${(err as Error).message}`);
  }
  const exemptAuthenticated = options.exemptAuthenticated ?? true;
  const told = options.onDecision;

  return defineMilter({
    name: 'greylist',
    async rcpt(ctx: MessageContext, rcpt: EnvelopeAddress) {
      const decided = (d: GreylistDecision): void => told?.(d, ctx, rcpt);
      if ((exemptAuthenticated && ctx.auth) || exempt(ctx.client.address) || isRoleRecipient(rcpt, roles.map((r) => r.toLowerCase()))) {
        decided('exempt');
        return undefined;
      }
      const network = clientNetwork(ctx.client.address, v4, v6);
      const triplet = createHash('sha1').update(`${network}\0${ctx.envelope.sender.address.toLowerCase()}\0${rcpt.address.toLowerCase()}`).digest('hex');
      let answer: unknown;
      try {
        answer = await DECIDE.run(redis, [`${prefix}gl:t:${triplet}`, `${prefix}gl:c:${network}`], [delay, retryWindow, maxAge, autoAllowAfter], timeout);
      } catch (err) {
        reportStoreError('greylist', err, { sessionId: ctx.sessionId, queueId: ctx.queueId, recipient: rcpt.address });
        decided('store-error');
        return policy === 'closed' ? tempfail(451, '4.3.0', 'Error: temporary failure of a shared store, try again later') : undefined;
      }
      const [code, ms] = Array.isArray(answer) ? answer.map(Number) : [NaN, NaN];
      if (code === 0) {
        decided('greylisted');
        const r = options.reply;
        return r ? tempfail(r.code, r.enhanced, r.lines) : tempfail(450, '4.2.0', `Greylisted, please try again in ${Math.max(1, Math.ceil((ms ?? delay) / 1000))} seconds`);
      }
      decided(code === 1 ? 'auto-allowed' : code === 2 ? 'known' : 'passed');
      return undefined;
    },
  });
}
