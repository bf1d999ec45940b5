/**
 * The `dovetail` config file: its types (what `defineConfig()` checks at compile time), its
 * zod schema (what `dovetail check-config` and `dovetail start` check at run time), and the
 * formatting of schema errors as `path: what was expected, got what`.
 *
 * One schema for every format: a JSON config uses the declarative forms only (`{ "use":
 * "sizeLimit", … }`, `{ "connect": "inet:…" }`, `{ "module": "./m.ts" }`, route tables of
 * `{ "lmtp": … }` / `{ "maildir": … }` / `{ "smtp": … }` / `{ "store": true }`); a TS or JS
 * config may also give objects (a Milter, a Transport, an authenticate function) where those
 * forms go. Turning the checked config into running objects is ./build.ts.
 *
 * Deliberately not here: defaults that depend on the file's location (relative paths are
 * resolved against the config file's directory by ./build.ts), or reading any file.
 */
import * as z from 'zod';
import type { Milter } from '../milter/types.js';
import type { Transport } from '../delivery/types.js';
import type { ListenOptions } from '../smtp/options.js';
import type { AuthRequest } from '../auth/types.js';

// ---- small pieces ---------------------------------------------------------------------------

const int = (min: number, max: number = Number.MAX_SAFE_INTEGER): z.ZodNumber => {
  const msg = max === Number.MAX_SAFE_INTEGER ? `expected an integer >= ${min}` : `expected an integer ${min}..${max}`;
  return z.number({ error: msg }).int({ error: msg }).min(min, { error: msg }).max(max, { error: msg });
};
const num = (min: number): z.ZodNumber => z.number({ error: `expected a number >= ${min}` }).min(min, { error: `expected a number >= ${min}` });
const str = z.string({ error: 'expected a string' }).min(1, { error: 'expected a non-empty string' });
const bool = z.boolean({ error: 'expected true or false' });
const strings = z.array(str, { error: 'expected a list of strings' });
const port = int(0, 65535);
const millis = int(1);
/** `host:port`, `inet:host:port`, `inet:port@host` or `unix:/path` (Postfix's spelling). */
const socketSpec = z.string({ error: 'expected a socket address ("host:port", "inet:host:port" or "unix:/path")' }).refine(
  (s) => /^(unix|local):.+$/i.test(s) || /^(inet6?:)?(\[[^\]]+\]|[^:@\s]+):\d{1,5}$/i.test(s) || /^inet6?:\d{1,5}@\S+$/i.test(s),
  { error: 'expected a socket address ("host:port", "inet:host:port" or "unix:/path")' },
);
const defaultAction = z.enum(['tempfail', 'accept', 'reject', 'quarantine'], { error: 'expected "tempfail", "accept", "reject" or "quarantine"' });
const milterTimeouts = z.strictObject({ command: millis.optional(), content: millis.optional() }, { error: 'expected { command?, content? } in ms' });
/** A map: an object of strings (or lists of strings) inline, or `file`: a Postfix-style table file. */
const stringMap = z.record(z.string(), z.union([z.string(), strings], { error: 'expected a string or a list of strings' }), { error: 'expected an object mapping keys to values' });

const isFunction = (v: unknown): boolean => typeof v === 'function';
/** A Milter object (TS/JS configs): a name and at least one handler. */
const isMilterObject = (v: unknown): v is Milter =>
  typeof v === 'object' && v !== null && typeof (v as { name?: unknown }).name === 'string' && !('use' in v) && !('connect' in v) && !('module' in v);
const isTransport = (v: unknown): v is Transport => typeof v === 'object' && v !== null && typeof (v as { deliver?: unknown }).deliver === 'function';

const UNKNOWN_FIELD = 'unknown field';
/** How nested parts are parsed: inputs reported, our wording of zod's messages. */
const PARSE = { reportInput: true, error: (issue: z.core.$ZodRawIssue) => defaultMessage(issue) } as const;
/** Marks an issue whose message says all (no `, got …`). */
const NO_GOT = { noGot: true } as const;

/** Passes a nested parse's issues up (under `prefix`), one per unknown key. */
function forward(ctx: z.core.$RefinementCtx, issues: readonly z.core.$ZodIssue[], prefix: readonly PropertyKey[]): void {
  for (const i of issues) {
    if (i.code === 'unrecognized_keys') {
      for (const k of i.keys) ctx.addIssue({ code: 'custom', message: UNKNOWN_FIELD, path: [...prefix, ...i.path, k] });
    } else {
      ctx.addIssue({ code: 'custom', message: i.message, path: [...prefix, ...i.path], input: (i as { input?: unknown }).input });
    }
  }
}

// ---- milters --------------------------------------------------------------------------------

const mapOrFile = <T extends z.ZodRawShape>(shape: T) => z.strictObject({ ...shape, map: stringMap.optional(), file: str.optional() });

/** messages and/or recipients per window (rateLimit). */
const rateRule = z.strictObject({ messages: int(1).optional(), recipients: int(1).optional(), window: millis.optional() });
/** What the Redis-backed parts take besides the client (lib/store/redis.ts). */
const storeFields = {
  prefix: str.optional(),
  commandTimeout: millis.optional(),
  onStoreError: z.enum(['open', 'closed'], { error: 'expected "open" or "closed"' }).optional(),
};

/** The bundled milters by name, each with its plain-data options (milters/index.ts). */
export const bundledMilterSchemas = {
  sizeLimit: z.strictObject({ use: z.literal('sizeLimit'), maxBytes: int(1) }),
  relayControl: z.strictObject({
    use: z.literal('relayControl'),
    mynetworks: strings.optional(),
    localDomains: strings.optional(),
    relayDomains: strings.optional(),
    parentDomainMatchesSubdomains: bool.optional(),
    permitAuthenticated: bool.optional(),
    localAddresses: strings.optional(),
    allowPercentHack: bool.optional(),
    swapBangPath: bool.optional(),
    allowUntrustedRouting: bool.optional(),
    rejectCode: z.union([z.literal(550), z.literal(554)], { error: 'expected 550 or 554' }).optional(),
  }),
  dnsbl: z.strictObject({
    use: z.literal('dnsbl'),
    name: str.optional(),
    zones: z.array(z.union([str, z.strictObject({ zone: str, weight: z.number().optional(), filter: z.union([str, strings]).optional(), reason: str.optional(), score: z.number().optional() })])).optional(),
    rhsbl: z.array(z.strictObject({ zone: str, target: z.enum(['sender', 'helo']), weight: z.number().optional(), filter: z.union([str, strings]).optional(), reason: str.optional(), score: z.number().optional() })).optional(),
    threshold: num(0).optional(),
    timeout: millis.optional(),
    onFailure: z.enum(['continue', 'tempfail']).optional(),
    header: z.union([str, z.literal(false)]).optional(),
    cache: z.union([z.strictObject({ max: int(1).optional(), maxTtl: millis.optional(), negativeTtl: millis.optional() }), z.literal(false)]).optional(),
    rejectCode: int(500, 599).optional(),
    defaultAction: defaultAction.optional(),
    timeouts: milterTimeouts.optional(),
    /** DNS servers to ask (`"127.0.0.1:5353"`), instead of the system's. */
    dns: z.strictObject({ servers: strings.optional(), timeout: millis.optional(), tries: int(1).optional() }).optional(),
  }),
  mailAuth: z.strictObject({
    use: z.literal('mailAuth'),
    name: str.optional(),
    authservId: str.optional(),
    dnsTimeout: millis.optional(),
    dnsCache: z.union([z.strictObject({ ttl: millis.optional(), max: int(1).optional() }), z.literal(false)]).optional(),
    spfTimeout: millis.optional(),
    rejectSpfFail: bool.optional(),
    tempfailSpfError: bool.optional(),
    enforceDmarc: bool.optional(),
    trustedArcSealers: strings.optional(),
    scores: z.record(z.string(), z.number()).optional(),
    minBitLength: int(512).optional(),
    defaultAction: defaultAction.optional(),
    timeouts: milterTimeouts.optional(),
    dns: z.strictObject({ servers: strings.optional(), timeout: millis.optional(), tries: int(1).optional() }).optional(),
  }),
  spamTag: z.strictObject({
    use: z.literal('spamTag'),
    requiredScore: z.number().optional(),
    rejectScore: z.number().optional(),
    quarantineScore: z.number().optional(),
    subjectTag: z.string().optional(),
    remoteHeaders: z.union([bool, z.array(z.enum(['rspamd', 'spamassassin']))]).optional(),
    neverRejectRoleRecipients: bool.optional(),
    rejectText: str.optional(),
  }),
  dkimSign: z.strictObject({
    use: z.literal('dkimSign'),
    /** Each key's `privateKey` is the path of a PEM file (read at start and on reload). */
    keys: z.array(z.strictObject({ domain: str, selector: str, privateKey: str }), { error: 'expected a list of { domain, selector, privateKey: path }' }).min(1, { error: 'expected at least one key' }),
    mynetworks: strings.optional(),
    signAuthenticated: bool.optional(),
    subdomains: bool.optional(),
    headers: strings.optional(),
    oversign: strings.optional(),
    canonicalization: z.string().optional(),
    signatureTtl: int(1).optional(),
    name: str.optional(),
    defaultAction: defaultAction.optional(),
    timeouts: milterTimeouts.optional(),
  }),
  aliases: mapOrFile({
    use: z.literal('aliases'),
    domains: strings.min(1, { error: 'expected at least one domain' }),
    recipientDelimiter: z.string().optional(),
    propagateExtension: bool.optional(),
    recursionLimit: int(1).optional(),
    expansionLimit: int(1).optional(),
    dsnArguments: bool.optional(),
  }),
  virtual: mapOrFile({
    use: z.literal('virtual'),
    domains: strings.optional(),
    recipientDelimiter: z.string().optional(),
    localDomains: strings.optional(),
    recursionLimit: int(1).optional(),
    expansionLimit: int(1).optional(),
    dsnArguments: bool.optional(),
  }),
  senderLogin: mapOrFile({ use: z.literal('senderLogin'), checkUnauthenticated: bool.optional() }),
  postmaster: z.strictObject({ use: z.literal('postmaster'), mailbox: str, domains: strings, names: strings.optional(), dsnArguments: bool.optional() }),
  masquerade: z.strictObject({ use: z.literal('masquerade'), domains: strings, exceptions: strings.optional(), envelopeSender: bool.optional(), headers: strings.optional() }),
  relocated: mapOrFile({ use: z.literal('relocated'), recipientDelimiter: z.string().optional(), code: z.union([z.literal(550), z.literal(551)], { error: 'expected 550 or 551' }).optional() }),
  /** Counted in Redis (the top-level `redis`), shared by every node. */
  rateLimit: z.strictObject({
    use: z.literal('rateLimit'),
    client: rateRule.optional(),
    user: rateRule.optional(),
    senderDomain: rateRule.optional(),
    window: millis.optional(),
    exempt: strings.optional(),
    clientPrefix6: int(1, 128).optional(),
    ...storeFields,
  }),
  /** Triplets in Redis (the top-level `redis`), so a retry through another node passes. */
  greylist: z.strictObject({
    use: z.literal('greylist'),
    delay: millis.optional(),
    retryWindow: millis.optional(),
    maxAge: millis.optional(),
    autoAllowAfter: int(0).optional(),
    ipv4Prefix: int(1, 32).optional(),
    ipv6Prefix: int(1, 128).optional(),
    exempt: strings.optional(),
    exemptAuthenticated: bool.optional(),
    exemptRecipients: strings.optional(),
    ...storeFields,
  }),
} as const;

/** The bundled milters whose state is in Redis: they need the top-level `redis`. */
export const REDIS_MILTERS: readonly string[] = ['rateLimit', 'greylist'];

/** The names `{ "use": … }` takes. */
export const BUNDLED_MILTERS = Object.keys(bundledMilterSchemas) as readonly (keyof typeof bundledMilterSchemas)[];

const remoteMilterSchema = z.strictObject({
  connect: socketSpec,
  name: str.optional(),
  defaultAction: defaultAction.optional(),
  connectTimeout: millis.optional(),
  commandTimeout: millis.optional(),
  contentTimeout: millis.optional(),
  macros: z.record(z.string(), strings).optional(),
  maxReplacementBodyBytes: int(1).optional(),
});

const moduleMilterSchema = z.strictObject({
  module: str,
  /** The export to use. Default: `milter`, else the default export. */
  export: str.optional(),
  /** Given to the export when it is a function. */
  options: z.unknown().optional(),
});

/** One member of a milter chain, in any of its forms; dispatched on the form's key so errors are about that form. */
const milterEntry = z.unknown().transform((v, ctx) => {
  const issue = (message: string, path: PropertyKey[] = []): never => {
    ctx.addIssue({ code: 'custom', message, path, input: v });
    return z.NEVER;
  };
  if (typeof v !== 'object' || v === null || Array.isArray(v)) {
    return issue('expected a milter: { "use": "<bundled milter>" }, { "connect": "inet:host:port" }, { "module": "./file" } or (TS/JS) a Milter object');
  }
  let schema: z.ZodType;
  if ('use' in v) {
    const name = (v as { use: unknown }).use;
    const s = typeof name === 'string' ? (bundledMilterSchemas as Record<string, z.ZodType>)[name] : undefined;
    if (!s || !Object.hasOwn(bundledMilterSchemas, name as string)) return issue(`expected one of ${BUNDLED_MILTERS.join(', ')}, got ${show(name)}`, ['use']);
    schema = s;
  } else if ('connect' in v) schema = remoteMilterSchema;
  else if ('module' in v) schema = moduleMilterSchema;
  else if (isMilterObject(v)) return v as MilterConfig;
  else return issue('expected a milter: { "use": … }, { "connect": … }, { "module": … } or a Milter object');
  const r = schema.safeParse(v, PARSE);
  if (!r.success) {
    forward(ctx, r.error.issues, []);
    return z.NEVER;
  }
  return r.data as MilterConfig;
});

// ---- delivery -------------------------------------------------------------------------------

const lmtpObject = z.strictObject({
  host: str.optional(),
  port: port.optional(),
  path: str.optional(),
  lhloName: str.optional(),
  maxConnections: int(1).optional(),
  idleTimeout: millis.optional(),
  maxTransactions: int(1).optional(),
  pipelining: bool.optional(),
  timeouts: z.record(z.string(), millis).optional(),
});
const maildirObject = z.strictObject({
  root: str,
  domains: strings.optional(),
  fsync: bool.optional(),
  returnPath: bool.optional(),
  deliveredTo: bool.optional(),
  recipientDelimiter: z.string().optional(),
  hostname: str.optional(),
});
const tlsLevel = z.enum(['none', 'may', 'encrypt', 'verify']);
const smtpObject = z.strictObject({
  relayhost: str.optional(),
  port: port.optional(),
  hostname: str.optional(),
  localAddresses: strings.optional(),
  /** TLS level (`none`, `may`, `encrypt`, `verify`), or `{ level, ca?: path, servername? }`. */
  tls: z.union([tlsLevel, z.strictObject({ level: tlsLevel, ca: str.optional(), servername: str.optional() })], { error: 'expected "none", "may", "encrypt", "verify" or { level, ca?, servername? }' }).optional(),
  /** `{ user, pass }`, or `{ user, passFile }` to read the password from a file. */
  auth: z.strictObject({ user: str, pass: z.string().optional(), passFile: str.optional() }).optional(),
  destinationConcurrency: int(1).optional(),
  maxConnections: int(1).optional(),
  maxTransactions: int(1).optional(),
  idleTimeout: millis.optional(),
  pipelining: bool.optional(),
  ipv6: bool.optional(),
  deadDestinationTime: int(0).optional(),
  timeouts: z.record(z.string(), millis).optional(),
  /** DNS servers for MX lookups (`"127.0.0.1:5353"`), instead of the system's. */
  dns: z.strictObject({ servers: strings.optional(), timeout: millis.optional(), tries: int(1).optional() }).optional(),
});

const routeEntry = z.unknown().transform((v, ctx) => {
  const issue = (message: string, path: PropertyKey[] = []): never => {
    ctx.addIssue({ code: 'custom', message, path, input: v });
    return z.NEVER;
  };
  if (isTransport(v)) return v as RouteConfig;
  if (typeof v !== 'object' || v === null || Array.isArray(v)) return issue('expected a route: { "lmtp": … }, { "maildir": … }, { "smtp": … }, { "store": true } or (TS/JS) a transport');
  const keys = Object.keys(v);
  if (keys.length !== 1) return issue(`expected exactly one of lmtp, maildir, smtp, store, got ${keys.length ? keys.join(', ') : 'none'}`);
  const kind = keys[0]!;
  const value = (v as Record<string, unknown>)[kind];
  const schemas: Record<string, z.ZodType> = {
    lmtp: z.union([socketSpec, lmtpObject], { error: 'expected "host:port", "unix:/path" or { host, port } / { path }' }),
    maildir: z.union([str, maildirObject], { error: 'expected a directory or { root, … }' }),
    smtp: z.union([z.literal(true), smtpObject], { error: 'expected true or { relayhost?, … }' }),
    store: z.literal(true, { error: 'expected true (the embedded store of delivery.store)' }),
  };
  const s = schemas[kind];
  if (!s) return issue(`expected one of lmtp, maildir, smtp, store, got ${show(kind)}`, [kind]);
  const r = s.safeParse(value, PARSE);
  if (!r.success) {
    // A union's issue says little; parse the object form again for the field-level errors.
    const objectForm = kind === 'lmtp' ? lmtpObject : kind === 'maildir' ? maildirObject : kind === 'smtp' ? smtpObject : undefined;
    const detail = objectForm && typeof value === 'object' && value !== null ? objectForm.safeParse(value, PARSE) : undefined;
    const issues = detail && !detail.success ? detail.error.issues : r.error.issues;
    forward(ctx, issues, [kind]);
    return z.NEVER;
  }
  return { [kind]: r.data } as RouteConfig;
});

/** `delivery.lmtp` / `.maildir` / `.smtp`: the value of a one-route table. */
const routeValue = (kind: 'lmtp' | 'maildir' | 'smtp') =>
  z.unknown().transform((v, ctx) => {
    const r = routeEntry.safeParse({ [kind]: v }, PARSE);
    if (!r.success) {
      for (const i of r.error.issues) ctx.addIssue({ code: 'custom', message: i.message, path: i.path.slice(1), input: (i as { input?: unknown }).input });
      return z.NEVER;
    }
    return (r.data as Record<string, unknown>)[kind];
  });

const storeSchema = z.strictObject({
  root: str,
  listen: z.union([socketSpec, z.strictObject({ host: str.optional(), port }), z.strictObject({ path: str })], { error: 'expected "host:port", "unix:/path", { host, port } or { path }' }).optional(),
  domains: strings.optional(),
  users: strings.optional(),
  unknownUser: z.enum(['reject', 'accept']).optional(),
  quota: z.strictObject({ maxBytes: int(1) }).optional(),
  hostname: str.optional(),
  maxMessageBytes: int(1).optional(),
  fsync: bool.optional(),
  recipientDelimiter: z.string().optional(),
});

// ---- the whole file -------------------------------------------------------------------------

const listenerSchema = z.strictObject(
  {
    host: str.optional(),
    port,
    name: z.string().regex(/^[\x21-\x7e]{1,64}$/, { error: 'expected 1-64 printable ASCII characters' }).optional(),
    tls: z.enum(['starttls', 'implicit', 'none'], { error: 'expected "starttls", "implicit" or "none"' }).optional(),
    submission: bool.optional(),
    auth: bool.optional(),
    milters: z.array(milterEntry, { error: 'expected a list of milters' }).optional(),
    proxyProtocol: z.strictObject({ trusted: strings, timeout: millis.optional() }).optional(),
    xclient: z.strictObject({ trusted: strings }).optional(),
    xforward: z.strictObject({ trusted: strings }).optional(),
  },
  { error: 'expected a listener { host?, port, … }' },
);

const limitsSchema = z.strictObject({
  maxMessageBytes: int(1).optional(),
  maxHeaderBytes: int(1).optional(),
  maxLineBytes: int(1).optional(),
  maxHops: int(1).optional(),
  maxMilterEdits: int(1).optional(),
  maxRecipients: int(1).optional(),
  maxClients: int(1).optional(),
  clientLimits: z
    .union([
      z.strictObject({
        maxConnections: int(0).optional(),
        connectionRate: int(0).optional(),
        messageRate: int(0).optional(),
        userMessageRate: int(0).optional(),
        window: millis.optional(),
        exempt: strings.optional(),
        /** `redis`: counted in the top-level `redis`, shared by every node (redisAnvil). Default `memory`. */
        store: z.enum(['memory', 'redis'], { error: 'expected "memory" or "redis"' }).optional(),
        /** With store redis: how long one connection counts at most, ms. */
        lease: millis.optional(),
        ...storeFields,
      }),
      z.literal(false),
    ])
    .optional(),
  errorLimits: z.strictObject({ soft: int(1).optional(), hard: int(1).optional(), sleep: int(0).optional() }).optional(),
  socketTimeout: millis.optional(),
  closeTimeout: int(0).optional(),
  authFailureDelay: int(0).optional(),
  maxAuthFailures: int(1).optional(),
  milterTimeouts: milterTimeouts.optional(),
});

const authenticateSchema = z.unknown().transform((v, ctx) => {
  if (isFunction(v)) return v as AuthenticateConfig;
  const r = z
    .strictObject({ dovecot: z.string({ error: 'expected a socket path or "inet:host:port"' }).refine((d) => d.startsWith('/') || /^(unix|inet6?):/i.test(d), { error: 'expected a socket path ("/run/dovecot/auth-client") or "inet:host:port"' }), service: str.optional(), timeout: millis.optional(), maxConnections: int(1).optional() })
    .safeParse(v, PARSE);
  if (!r.success) {
    forward(ctx, r.error.issues, []);
    return z.NEVER;
  }
  return r.data as AuthenticateConfig;
});

/** The schema of a config file (after a function export was called). */
export const configSchema = z.strictObject(
  {
    hostname: str.optional(),
    listen: z.array(listenerSchema, { error: 'expected a list of listeners [{ host, port, … }]' }).min(1, { error: 'expected at least one listener' }).optional(),
    tls: z.strictObject({ key: str, cert: str }, { error: 'expected { key: path, cert: path }' }).optional(),
    limits: limitsSchema.optional(),
    banner: z.string().optional(),
    allowInsecureAuth: bool.optional(),
    resolveClientNames: bool.optional(),
    bareLineEndings: z.enum(['reject', 'normalize']).optional(),
    spool: z.strictObject({ dir: str.optional(), memoryThreshold: int(0).optional() }).optional(),
    milters: z.array(milterEntry, { error: 'expected a list of milters' }).optional(),
    delivery: z.strictObject(
      {
        routes: z.record(z.string(), routeEntry, { error: 'expected a table { "<domain>": route }' }).optional(),
        lmtp: routeValue('lmtp').optional(),
        maildir: routeValue('maildir').optional(),
        smtp: routeValue('smtp').optional(),
        transport: z.custom<Transport>(isTransport, { error: 'expected a transport object (lmtp(), maildir(), routes(), …)' }).optional(),
        store: storeSchema.optional(),
        verifyRecipients: bool.optional(),
      },
      { error: 'expected { routes } or { lmtp } / { maildir } / { smtp } / { store }' },
    ),
    queue: z
      .strictObject({
        dir: str.optional(),
        backoff: z.strictObject({ min: millis.optional(), max: millis.optional() }).optional(),
        maxLifetime: millis.optional(),
        bounceLifetime: millis.optional(),
        delayWarning: int(0).optional(),
        bounceSizeLimit: int(0).optional(),
        concurrency: int(1).optional(),
        scanInterval: millis.optional(),
        hostname: str.optional(),
      })
      .optional(),
    quarantine: z.union([str, z.strictObject({ maildir: str })], { error: 'expected a Maildir directory or { maildir: dir }' }).optional(),
    authenticate: authenticateSchema.optional(),
    control: z.strictObject({ socket: str }).optional(),
    /** The Redis server shared by rateLimit, greylist and clientLimits { store: 'redis' }: ioredis's URL form. */
    redis: z.strictObject({ url: z.string().regex(/^rediss?:\/\//, { error: 'expected a redis:// or rediss:// URL' }) }).optional(),
    log: z.strictObject({ level: z.enum(['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent']).optional(), file: str.optional() }).optional(),
    metrics: z.strictObject({ listen: z.union([socketSpec, port], { error: 'expected "host:port" or a port' }) }).optional(),
  },
  { error: 'expected the config object' },
).superRefine((c, ctx) => {
  // What involves more than one field.
  const d = c.delivery;
  const kinds = (['routes', 'lmtp', 'maildir', 'smtp', 'transport'] as const).filter((k) => d[k] !== undefined);
  if (kinds.length > 1) ctx.addIssue({ code: 'custom', params: NO_GOT, message: `give one of routes, lmtp, maildir, smtp, transport, not ${kinds.join(' and ')}`, path: ['delivery'] });
  if (kinds.length === 0 && d.store === undefined) ctx.addIssue({ code: 'custom', params: NO_GOT, message: 'expected routes, lmtp, maildir, smtp, transport or store', path: ['delivery'] });
  for (const [domain, route] of Object.entries(d.routes ?? {})) {
    if (typeof route === 'object' && route !== null && 'store' in route && d.store === undefined) {
      ctx.addIssue({ code: 'custom', params: NO_GOT, message: 'routes to the embedded store, but delivery.store is not set', path: ['delivery', 'routes', domain, 'store'] });
    }
  }
  const redisNeeded = (entries: readonly unknown[] | undefined, at: PropertyKey[]): void => {
    for (const [i, m] of (entries ?? []).entries()) {
      const use = typeof m === 'object' && m !== null && 'use' in m ? (m as { use: unknown }).use : undefined;
      if (typeof use === 'string' && REDIS_MILTERS.includes(use) && !c.redis) ctx.addIssue({ code: 'custom', params: NO_GOT, message: `${use} keeps its counts in Redis: set the top-level redis { url }`, path: [...at, i, 'use'] });
    }
  };
  redisNeeded(c.milters, ['milters']);
  for (const [i, l] of (c.listen ?? []).entries()) redisNeeded(l.milters, ['listen', i, 'milters']);
  const cl = c.limits?.clientLimits;
  if (cl && cl.store === 'redis' && !c.redis) ctx.addIssue({ code: 'custom', params: NO_GOT, message: 'clientLimits in Redis: set the top-level redis { url }', path: ['limits', 'clientLimits', 'store'] });
  for (const [i, l] of (c.listen ?? []).entries()) {
    if ((l.tls === 'starttls' || l.tls === 'implicit') && !c.tls) ctx.addIssue({ code: 'custom', params: NO_GOT, message: `tls "${l.tls}" needs the top-level tls { key, cert }`, path: ['listen', i, 'tls'] });
    if (l.submission && !c.authenticate) ctx.addIssue({ code: 'custom', params: NO_GOT, message: 'a submission listener needs authenticate', path: ['listen', i, 'submission'] });
  }
});

// ---- the types a TS config sees ---------------------------------------------------------------

/** A bundled milter by name with its plain-data options, e.g. `{ use: 'sizeLimit', maxBytes: 26214400 }`. */
export type BundledMilterConfig = { [K in keyof typeof bundledMilterSchemas]: z.input<(typeof bundledMilterSchemas)[K]> }[keyof typeof bundledMilterSchemas];
/** A remote filter over the milter protocol (connectMilter), e.g. `{ connect: 'inet:127.0.0.1:11332' }`. */
export type RemoteMilterConfig = z.input<typeof remoteMilterSchema>;
/** A milter from a module: its `milter` export, else its default export (a Milter, or a function returning one, given `options`). */
export type ModuleMilterConfig = z.input<typeof moduleMilterSchema>;
/** One chain member: a Milter object (TS/JS), a bundled milter, a remote filter, or a module. */
export type MilterConfig = Milter | BundledMilterConfig | RemoteMilterConfig | ModuleMilterConfig;

/**
 * One route of the delivery table: LMTP (`"host:port"`, `"unix:/path"`, or options), a
 * Maildir directory, outbound SMTP through the queue (`true`: MX lookup; or `{ relayhost }`),
 * the embedded store (`{ store: true }`), or (TS/JS) a transport object.
 */
export type RouteConfig =
  | { readonly lmtp: string | z.input<typeof lmtpObject> }
  | { readonly maildir: string | z.input<typeof maildirObject> }
  | { readonly smtp: true | z.input<typeof smtpObject> }
  | { readonly store: true }
  | Transport;

/** Asks Dovecot's auth service (`dovecot: "/run/dovecot/auth-client"` or `"inet:host:port"`), or (TS/JS) a function. */
export type AuthenticateConfig =
  | { readonly dovecot: string; readonly service?: string; readonly timeout?: number; readonly maxConnections?: number }
  | ((request: AuthRequest) => Promise<boolean>);

/**
 * One listening socket and its profile (a master.cf line): the gateway's ListenOptions,
 * with the chain given in config form.
 */
export interface ListenerConfig extends Omit<ListenOptions, 'milters'> {
  /** This listener's own chain. Default: `milters`. */
  readonly milters?: readonly MilterConfig[];
}

/** The gateway's limits (GatewayOptions of the same names; see docs/configuration.md). */
export type LimitsConfig = z.input<typeof limitsSchema>;

/** Where accepted mail goes. */
export interface DeliveryConfig {
  /** Route per recipient domain (Postfix transport_maps): `"example.com"`, `".example.com"` (subdomains), `"*"`. */
  readonly routes?: Readonly<Record<string, RouteConfig>>;
  /** Everything over LMTP (instead of routes). */
  readonly lmtp?: string | z.input<typeof lmtpObject>;
  /** Everything into Maildir (instead of routes). */
  readonly maildir?: string | z.input<typeof maildirObject>;
  /** Everything outbound over SMTP (instead of routes). */
  readonly smtp?: true | z.input<typeof smtpObject>;
  /** (TS/JS) a transport object (instead of routes). */
  readonly transport?: Transport;
  /**
   * The embedded LMTP store (createLmtpServer) writing Maildir under `root`. Without routes
   * or another transport, everything goes to it; in routes, `{ store: true }` names it.
   */
  readonly store?: z.input<typeof storeSchema>;
  /** Ask the mailstore about each recipient at RCPT. Default false. */
  readonly verifyRecipients?: boolean;
}

/** The durable queue (createQueue options). */
export type QueueConfig = NonNullable<z.input<typeof configSchema>['queue']>;

/** A dovetail config file's default export (or what its function export returns). */
export interface DovetailConfig {
  /** Our host name: greeting, Received, macro `j`. Default os.hostname(). */
  readonly hostname?: string;
  /** Listeners. Default `[{ host: '127.0.0.1', port: 2525 }]`. */
  readonly listen?: readonly ListenerConfig[];
  /** PEM key and certificate files for STARTTLS / implicit TLS; re-read on reload. */
  readonly tls?: { readonly key: string; readonly cert: string };
  readonly limits?: LimitsConfig;
  /** Text after `ESMTP` in the greeting. */
  readonly banner?: string;
  /** Offer AUTH without TLS. Default false. */
  readonly allowInsecureAuth?: boolean;
  /** PTR lookups of clients. Default true. */
  readonly resolveClientNames?: boolean;
  /** Bare CR/LF in DATA. Default `reject`. */
  readonly bareLineEndings?: 'reject' | 'normalize';
  /** The DATA spool. */
  readonly spool?: { readonly dir?: string; readonly memoryThreshold?: number };
  /** The gateway's milter chain, in order. */
  readonly milters?: readonly MilterConfig[];
  readonly delivery: DeliveryConfig;
  /** The durable queue. Default `{ dir: './var/queue' }`. */
  readonly queue?: QueueConfig;
  /** Where quarantined messages go: a Maildir directory. Default `./var/quarantine`. */
  readonly quarantine?: string | { readonly maildir: string };
  /** SMTP AUTH. */
  readonly authenticate?: AuthenticateConfig;
  /** The control socket `dovetail queue` talks to. Default `<queue.dir>/control.sock`. */
  readonly control?: { readonly socket: string };
  /** The Redis server of rateLimit, greylist and clientLimits { store: 'redis' } (`redis://host:6379/0`). */
  readonly redis?: { readonly url: string };
  /** Logs: pino JSON lines to stdout, or to `file`. Default level `info`. */
  readonly log?: { readonly level?: 'fatal' | 'error' | 'warn' | 'info' | 'debug' | 'trace' | 'silent'; readonly file?: string };
  /** Prometheus metrics at GET /metrics on `listen` (`"127.0.0.1:9464"`). Off by default. */
  readonly metrics?: { readonly listen: string | number };
}

/** What the schema gives back: the same shape, checked. */
export type CheckedConfig = DovetailConfig;

/**
 * Identity function for a TS/JS config file, so the editor checks it and completes it:
 *
 * ```ts
 * import { defineConfig } from 'dovetail';
 * export default defineConfig({ listen: [{ port: 25 }], delivery: { maildir: '/srv/mail' } });
 * ```
 *
 * Also takes a function (sync or async) returning the config.
 */
export function defineConfig<T extends DovetailConfig | (() => DovetailConfig | Promise<DovetailConfig>)>(config: T): T {
  return config;
}

// ---- errors -----------------------------------------------------------------------------------

/** A config problem: where (`listen[1].port`) and what. */
export interface ConfigProblem {
  readonly path: string;
  readonly message: string;
}

/** `listen[1].port` from `['listen', 1, 'port']`. */
export function formatPath(path: readonly PropertyKey[]): string {
  let out = '';
  for (const p of path) {
    if (typeof p === 'number') out += `[${p}]`;
    else if (typeof p === 'string' && /^[A-Za-z_$][\w$]*$/.test(p)) out += out ? `.${p}` : p;
    else out += `[${JSON.stringify(String(p))}]`;
  }
  return out || '(config)';
}

/** A value as an error message shows it: JSON, shortened. */
export function show(v: unknown): string {
  if (v === undefined) return 'nothing';
  if (typeof v === 'function') return 'a function';
  let s: string;
  try {
    s = JSON.stringify(v) ?? String(v);
  } catch {
    s = String(v);
  }
  return s.length > 60 ? `${s.slice(0, 57)}...` : s;
}

/** Error messages for the issues zod raises without one of ours. */
function defaultMessage(issue: z.core.$ZodRawIssue): string | undefined {
  switch (issue.code) {
    case 'invalid_type':
      return `expected ${issue.expected === 'object' ? 'an object' : issue.expected === 'array' ? 'a list' : `a ${issue.expected}`}`;
    case 'invalid_value':
      return issue.values.length > 2 ? `expected one of ${issue.values.map((x) => JSON.stringify(x)).join(', ')}` : `expected ${issue.values.map((x) => JSON.stringify(x)).join(' or ')}`;
    case 'too_small':
      return issue.origin === 'array' ? `expected at least ${String(issue.minimum)} entries` : issue.origin === 'string' ? 'expected a non-empty string' : `expected at least ${String(issue.minimum)}`;
    case 'too_big':
      return `expected at most ${String(issue.maximum)}`;
    default:
      return undefined;
  }
}

/** Checks a config object; `problems` is empty when it is valid. */
export function checkConfig(input: unknown): { config: CheckedConfig | undefined; problems: ConfigProblem[] } {
  const r = configSchema.safeParse(input, { reportInput: true, error: (issue) => defaultMessage(issue) });
  if (r.success) return { config: r.data as unknown as CheckedConfig, problems: [] };
  const problems: ConfigProblem[] = [];
  for (const i of r.error.issues) {
    if (i.code === 'unrecognized_keys') {
      for (const k of i.keys) problems.push({ path: formatPath([...i.path, k]), message: UNKNOWN_FIELD });
      continue;
    }
    const input = (i as { input?: unknown }).input;
    const got = i.message === UNKNOWN_FIELD || (i.code === 'custom' && (i.params as { noGot?: boolean } | undefined)?.noGot) || (i.code === 'custom' && /, got /.test(i.message)) ? '' : input === undefined ? ' (missing)' : `, got ${show(input)}`;
    problems.push({ path: formatPath(i.path), message: `${i.message}${got}` });
  }
  return { config: undefined, problems };
}

/** One line per problem: `listen[1].port: expected an integer 0..65535, got "25x"`. */
export function formatProblems(problems: readonly ConfigProblem[]): string {
  return problems.map((p) => `${p.path}: ${p.message}`).join('\n');
}
