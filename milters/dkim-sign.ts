/**
 * dkimSign: DKIM-signs (RFC 6376) the mail our own users send, at end of message, as
 * OpenDKIM does in signing mode behind Postfix. A message is signed when the session
 * authenticated (SMTP AUTH) or the client is in `mynetworks`, with every key of the domain
 * chosen for it: by default the From: domain, or the nearest parent domain that has a key.
 * Algorithms: rsa-sha256 (RFC 6376, RFC 8301) and ed25519-sha256 (RFC 8463), chosen by the
 * key's type; canonicalization relaxed/relaxed unless set; From is oversigned (listed in
 * h= once more than it occurs, RFC 6376 section 8.15) so that no From can be added later.
 * Each `DKIM-Signature:` is inserted first in the header block (above our Received).
 *
 * It signs the message as this milter sees it, i.e. with the edits of every milter before
 * it, so it must be the last milter of the chain that edits headers or body.
 *
 * The signature is computed here with node:crypto, in one pass over the message: the
 * header block is split into fields (raw bytes, so 8-bit headers hash as sent) and the
 * body is canonicalized and hashed chunk by chunk as it streams from the spool, never held
 * whole. mailauth 7's signer is not used because it cannot oversign (it lists in h= only
 * the fields present) and re-parses the message byte by byte; the tests check every
 * signature with mailauth's verifier and with OpenDKIM.
 *
 * What it does not do: verify (mailAuth does), ARC sealing, l= body length limits, the
 * i= tag (the identity is then `@d`), rsa-sha1, or check that an authenticated user may use
 * that From (senderLogin checks the envelope sender only; a `signingDomain` policy can).
 */
import crypto, { type KeyObject } from 'node:crypto';
import type { Readable } from 'node:stream';
import {
  canonicalDomain,
  defineMilter,
  networkList,
  DovetailError,
  ErrorCodes,
  type DefaultAction,
  type EomContext,
  type HeaderField,
  type Milter,
  type MilterTimeouts,
} from '../lib/index.js';

/** One signing key. */
export interface DkimSignKey {
  /** The signing domain (d=), U-label or A-label; published at `<selector>._domainkey.<domain>`. */
  readonly domain: string;
  /** The selector (s=). */
  readonly selector: string;
  /** The private key as PEM (PKCS#8 `PRIVATE KEY`, or PKCS#1 `RSA PRIVATE KEY`): RSA of at least 1024 bits, or Ed25519. */
  readonly privateKey: string | Buffer;
}

/** Header/body canonicalization (RFC 6376 section 3.4). */
export type DkimCanonicalization = `${'relaxed' | 'simple'}/${'relaxed' | 'simple'}`;

/** Options of {@link dkimSign}. */
export interface DkimSignOptions {
  /**
   * The keys. Several keys of one domain (an RSA and an Ed25519 key under two selectors,
   * RFC 8463 section 4) each add their own signature.
   */
  readonly keys: readonly DkimSignKey[];
  /** Clients whose mail is signed without authenticating (Postfix `mynetworks`, OpenDKIM `InternalHosts`): IP addresses or CIDR blocks. Default none. */
  readonly mynetworks?: readonly string[];
  /** Sign mail of authenticated (SMTP AUTH) sessions. Default true. */
  readonly signAuthenticated?: boolean;
  /**
   * Mail From a subdomain (`a.example.com`) without a key of its own is signed with the key
   * of the nearest parent domain that has one (`d=example.com`), which DMARC's relaxed
   * alignment accepts. Default true; false signs exact matches only (OpenDKIM's default,
   * `SubDomains no`).
   */
  readonly subdomains?: boolean;
  /**
   * Another policy for the signing domain: gets the context and the From: domain (undefined
   * when the message has no single From domain) and returns the domain whose keys sign the
   * message (matched exactly), or undefined to leave it unsigned. Replaces the From: lookup
   * and `subdomains`; who is signed is still decided by `signAuthenticated` and `mynetworks`.
   */
  readonly signingDomain?: (ctx: EomContext, fromDomain: string | undefined) => string | undefined | Promise<string | undefined>;
  /** The header fields signed, every instance present. Must include From. Default {@link DKIM_SIGN_DEFAULT_HEADERS}. */
  readonly headers?: readonly string[];
  /** Fields signed once more than they occur, so none can be added (RFC 6376 section 8.15). Default `['From']`. */
  readonly oversign?: readonly string[];
  /** Default `relaxed/relaxed`. */
  readonly canonicalization?: DkimCanonicalization;
  /** Seconds a signature is valid: adds x= (t= plus this). Default: no x=. */
  readonly signatureTtl?: number;
  /** The clock, ms since the epoch (t=). Default Date.now. */
  readonly now?: () => number;
  /** The milter's name. Default `dkim-sign`. */
  readonly name?: string;
  /** What a failure to sign does (see docs/milters/dkim-sign.md). Default `tempfail`, as OpenDKIM's On-InternalError. */
  readonly defaultAction?: DefaultAction;
  readonly timeouts?: MilterTimeouts;
}

/** The fields signed by default (From is also oversigned). */
export const DKIM_SIGN_DEFAULT_HEADERS: readonly string[] = Object.freeze([
  'From',
  'To',
  'Cc',
  'Subject',
  'Date',
  'Message-ID',
  'Reply-To',
  'In-Reply-To',
  'References',
  'MIME-Version',
  'Content-Type',
  'Content-Transfer-Encoding',
]);

interface PreparedKey {
  readonly domain: string;
  readonly selector: string;
  readonly key: KeyObject;
  readonly algorithm: 'rsa-sha256' | 'ed25519-sha256';
}

function bad(why: string): never {
  throw new DovetailError(ErrorCodes.INVALID_OPTIONS, `dkimSign: ${why}`);
}

/** RFC 6376 section 3.1: selector = sub-domain *( "." sub-domain ) (RFC 5321 sub-domain). */
const SELECTOR = /^[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*$/;
/** RFC 5322 field name (ftext). */
const FIELD_NAME = /^[\x21-\x39\x3b-\x7e]+$/;

const lowerAscii = (s: string): string => s.replace(/[A-Z]+/g, (m) => m.toLowerCase());

function prepareKey(k: DkimSignKey, i: number): PreparedKey {
  if (typeof k !== 'object' || k === null) bad(`keys[${i}] must be an object`);
  const domain = typeof k.domain === 'string' ? canonicalDomain(k.domain) : undefined;
  if (domain === undefined) bad(`keys[${i}].domain ${JSON.stringify(k.domain)} is not a domain name`);
  if (typeof k.selector !== 'string' || !SELECTOR.test(k.selector) || k.selector.length > 253) {
    bad(`keys[${i}].selector ${JSON.stringify(k.selector)} is not a valid selector`);
  }
  if (typeof k.privateKey !== 'string' && !Buffer.isBuffer(k.privateKey)) bad(`keys[${i}].privateKey must be a PEM string`);
  let key: KeyObject;
  try {
    key = crypto.createPrivateKey({ key: k.privateKey, format: 'pem' });
  } catch (err) {
    return bad(`keys[${i}] (${k.selector}._domainkey.${domain}): privateKey is not a usable PEM private key (${(err as Error).message})`);
  }
  const type = key.asymmetricKeyType;
  if (type === 'rsa') {
    const bits = key.asymmetricKeyDetails?.modulusLength ?? 0;
    // RFC 8301 section 3.2: signers MUST use RSA keys of at least 1024 bits (2048 recommended).
    if (bits < 1024) bad(`keys[${i}] (${k.selector}._domainkey.${domain}): an RSA key needs at least 1024 bits, this one has ${bits}`);
    return { domain, selector: k.selector, key, algorithm: 'rsa-sha256' };
  }
  if (type === 'ed25519') return { domain, selector: k.selector, key, algorithm: 'ed25519-sha256' };
  return bad(`keys[${i}] (${k.selector}._domainkey.${domain}): key type ${String(type)} cannot sign DKIM (RSA or Ed25519)`);
}

/** A membership test for `mynetworks` (IPv4-mapped IPv6 clients match IPv4 networks), as relayControl's. */
function networkMatcher(list: readonly string[]): (ip: string) => boolean {
  if (!Array.isArray(list)) bad('mynetworks must be an array');
  try {
    return networkList(list);
  } catch (err) {
    return bad(`mynetworks: ${(err as Error).message}`);
  }
}

/**
 * The domains of the mailboxes of a From: value (RFC 5322 section 3.4): comments and quoted
 * strings dropped, display names and group names skipped, `<addr>` preferred. Undefined when
 * a mailbox has no usable domain (none, or a domain literal).
 */
function mailboxDomains(value: string): string[] | undefined {
  // Drop comments and the content of quoted strings (a quoted local part keeps its "").
  let clean = '';
  let depth = 0;
  let quoted = false;
  for (let i = 0; i < value.length; i++) {
    const c = value[i]!;
    if (c === '\\' && (quoted || depth > 0)) {
      i++;
      continue;
    }
    if (quoted) {
      if (c === '"') {
        quoted = false;
        clean += '"';
      }
      continue;
    }
    if (depth > 0) {
      if (c === '(') depth++;
      else if (c === ')') depth--;
      continue;
    }
    if (c === '(') depth++;
    else if (c === '"') {
      quoted = true;
      clean += '"';
    } else clean += c === '\r' || c === '\n' ? ' ' : c;
  }
  const domains = new Set<string>();
  // Mailboxes are separated by commas outside <>; a group is `name: a, b;`.
  const parts: string[] = [];
  let cur = '';
  let angle = 0;
  for (const c of clean) {
    if (c === '<') angle++;
    else if (c === '>') angle = Math.max(0, angle - 1);
    if ((c === ',' || c === ';') && angle === 0) {
      parts.push(cur);
      cur = '';
    } else cur += c;
  }
  parts.push(cur);
  for (const raw of parts) {
    let p = raw.trim();
    if (!p) continue;
    const lt = p.lastIndexOf('<');
    if (lt >= 0) {
      const gt = p.indexOf('>', lt);
      p = p.slice(lt + 1, gt < 0 ? undefined : gt);
      p = p.slice(p.lastIndexOf(':') + 1); // obsolete source route <@a,@b:user@domain>
    } else {
      p = p.slice(p.lastIndexOf(':') + 1); // `group: user@domain`
    }
    p = p.trim();
    if (!p) continue; // an empty group
    const at = p.lastIndexOf('@');
    if (at < 0) return undefined;
    const d = canonicalDomain(p.slice(at + 1).trim());
    if (d === undefined) return undefined;
    domains.add(d);
  }
  return [...domains];
}

/**
 * The message's From: field, if it has exactly one (RFC 5322 section 3.6: one From), and its
 * domain if all its mailboxes share one.
 */
function fromOf(headers: readonly HeaderField[]): { readonly domain: string | undefined } | undefined {
  let from: HeaderField | undefined;
  for (const h of headers) {
    if (h.name.length === 4 && lowerAscii(h.name) === 'from') {
      if (from) return undefined;
      from = h;
    }
  }
  if (!from) return undefined;
  const domains = mailboxDomains(from.value);
  return { domain: domains?.length === 1 ? domains[0] : undefined };
}

/**
 * Streaming DKIM body canonicalization and hash (RFC 6376 sections 3.4.3, 3.4.4): chunks
 * may split a line, a run of white space or a CRLF anywhere. Empty lines are held back until
 * content follows them, so trailing ones are never hashed.
 */
class BodyHash {
  private readonly hash = crypto.createHash('sha256');
  /** Complete empty lines not hashed yet. */
  private empties = 0;
  /** The current line has hashed content (so a CRLF ends a non-empty line). */
  private inLine = false;
  /** relaxed: white space pending in the current line (dropped if the line ends). */
  private space = false;
  /** The last chunk ended in CR: half a CRLF, maybe. */
  private cr = false;
  private hashed = false;

  constructor(private readonly relaxed: boolean) {}

  update(chunk: Buffer): void {
    let s = chunk.toString('latin1');
    if (this.cr) {
      s = '\r' + s;
      this.cr = false;
    }
    if (s.endsWith('\r')) {
      this.cr = true;
      s = s.slice(0, -1);
    }
    if (!s) return;
    if (this.relaxed) {
      // Runs of white space become one SP, then SP before CRLF goes; most lines need neither.
      if (s.includes('\t') || s.includes('  ')) s = s.replace(/[ \t]{2,}|\t/g, ' ');
      if (s.includes(' \r')) s = s.replace(/ \r\n/g, '\r\n');
      if (this.space && s.charCodeAt(0) !== 0x20 && !s.startsWith('\r\n')) s = ' ' + s;
      this.space = s.endsWith(' ');
      if (this.space) s = s.slice(0, -1);
      if (!s) return;
    }
    let end = s.length;
    let ends = 0;
    while (end >= 2 && s.charCodeAt(end - 1) === 0x0a && s.charCodeAt(end - 2) === 0x0d) {
      end -= 2;
      ends++;
    }
    if (end === 0) {
      // Only line ends: the first may end the current line; the rest are empty lines.
      if (this.inLine) {
        this.write('\r\n');
        this.inLine = false;
        ends--;
      }
      this.empties += ends;
      return;
    }
    if (this.empties > 0) {
      this.write('\r\n'.repeat(this.empties));
      this.empties = 0;
    }
    this.write(ends > 0 ? s.slice(0, end + 2) : s);
    this.inLine = ends === 0;
    this.empties = ends > 0 ? ends - 1 : 0;
  }

  digest(): string {
    if (this.cr) {
      this.cr = false;
      this.update(Buffer.from('\r', 'latin1'));
      if (this.cr) {
        // A lone CR at the very end (the gateway never stores one): hash it as content.
        this.cr = false;
        if (this.empties > 0) this.write('\r\n'.repeat(this.empties));
        this.write('\r');
        this.inLine = true;
      }
    }
    // The last line without its CRLF gets one; relaxed drops its trailing white space.
    if (this.inLine) this.write('\r\n');
    // simple: an empty body is one CRLF; relaxed: the empty string (RFC 6376 section 3.4.4, errata 3192).
    if (!this.hashed && !this.relaxed) this.write('\r\n');
    return this.hash.digest('base64');
  }

  private write(s: string): void {
    this.hash.update(s, 'latin1');
    this.hashed = true;
  }
}

/**
 * The DKIM body hash (the bh= value: SHA-256, base64) of a CRLF body given in chunks, with
 * the relaxed or simple body canonicalization. What the milter computes, for tests and tools.
 */
export function dkimBodyHash(chunks: Iterable<Buffer>, canonicalization: 'relaxed' | 'simple'): string {
  const h = new BodyHash(canonicalization === 'relaxed');
  for (const c of chunks) h.update(c);
  return h.digest();
}

const CRLFCRLF = Buffer.from('\r\n\r\n');

/**
 * Reads the message once: returns its header block (the fields with their CRLFs, without the
 * empty line) and the body hash. Only the header block is kept in memory.
 */
async function readMessage(stream: Readable, body: BodyHash, signal: AbortSignal): Promise<Buffer> {
  let head: Buffer | undefined;
  let acc: Buffer = Buffer.alloc(0);
  try {
    for await (const c of stream) {
      signal.throwIfAborted();
      const chunk: Buffer = Buffer.isBuffer(c) ? c : Buffer.from(c as string);
      if (head) {
        body.update(chunk);
        continue;
      }
      const from = Math.max(0, acc.length - 3);
      acc = acc.length ? Buffer.concat([acc, chunk]) : chunk;
      // An empty header block: the message starts with the empty line.
      const at = acc.length >= 2 && acc[0] === 0x0d && acc[1] === 0x0a ? -2 : acc.indexOf(CRLFCRLF, from);
      if (at === -1) continue;
      head = acc.subarray(0, at + 2);
      const rest = acc.subarray(at + 4);
      if (rest.length) body.update(rest);
    }
  } finally {
    stream.destroy();
  }
  // No empty line at all: the whole message is header.
  return head ?? acc;
}

/** The fields of a header block, each as a latin1 string (one char per byte), folding kept, without the final CRLF. */
function splitFields(head: Buffer): string[] {
  if (head.length === 0) return [];
  return head
    .toString('latin1')
    .split(/\r\n(?![ \t])/)
    .filter((f) => f.length > 0);
}

const fieldName = (field: string): string => lowerAscii(field.slice(0, Math.max(0, field.indexOf(':'))).replace(/[ \t]+$/, ''));

/** RFC 6376 section 3.4.2 (relaxed) or 3.4.1 (simple), with the final CRLF when `crlf`. */
function canonHeader(field: string, relaxed: boolean, crlf: boolean): string {
  if (!relaxed) return crlf ? field + '\r\n' : field;
  const colon = field.indexOf(':');
  const value = field
    .slice(colon + 1)
    .replace(/\r\n/g, '')
    .replace(/[ \t]+/g, ' ')
    .replace(/^ | $/g, '');
  return `${fieldName(field)}:${value}${crlf ? '\r\n' : ''}`;
}

/** Folds `items` into lines of about 76 characters joined by `sep`, continuation lines starting with a tab. */
function fold(items: readonly string[], sep: string, first: number): string {
  let out = '';
  let col = first;
  for (let i = 0; i < items.length; i++) {
    const item = items[i]! + (i < items.length - 1 ? sep : '');
    if (i > 0 && col + item.length > 76) {
      out += '\r\n\t';
      col = 1;
    }
    out += item;
    col += item.length;
  }
  return out;
}

/** The TXT record to publish at `<selector>._domainkey.<domain>` for a private key (RFC 6376 section 3.6.1; RFC 8463 for Ed25519). */
export function dkimDnsRecord(privateKey: string | Buffer): string {
  let key: KeyObject;
  try {
    key = crypto.createPublicKey(crypto.createPrivateKey({ key: privateKey, format: 'pem' }));
  } catch (err) {
    throw new DovetailError(ErrorCodes.INVALID_OPTIONS, `dkimDnsRecord: not a usable PEM private key (${(err as Error).message})`);
  }
  if (key.asymmetricKeyType === 'ed25519') {
    // RFC 8463 section 4.2: the raw 32-byte public key, not an SPKI structure.
    const x = key.export({ format: 'jwk' }).x ?? '';
    return `v=DKIM1; k=ed25519; p=${Buffer.from(x, 'base64url').toString('base64')}`;
  }
  if (key.asymmetricKeyType === 'rsa') {
    return `v=DKIM1; k=rsa; p=${key.export({ type: 'spki', format: 'der' }).toString('base64')}`;
  }
  throw new DovetailError(ErrorCodes.INVALID_OPTIONS, `dkimDnsRecord: key type ${String(key.asymmetricKeyType)} cannot sign DKIM`);
}

function signAsync(algorithm: string | null, data: Buffer, key: KeyObject): Promise<Buffer> {
  // The callback form runs in libuv's thread pool: an RSA signature does not hold the event loop.
  return new Promise((resolve, reject) => {
    crypto.sign(algorithm, data, key, (err, sig) => (err ? reject(err) : resolve(sig)));
  });
}

/**
 * Creates the milter. Put it last in the chain: it signs the message as the milters
 * before it left it, and an edit after it would break the signature.
 *
 * @example
 * ```ts
 * dkimSign({
 *   keys: [{ domain: 'example.com', selector: '2024', privateKey: fs.readFileSync('/etc/dkim/2024.pem', 'utf8') }],
 *   mynetworks: ['127.0.0.0/8', '::1/128'],
 * })
 * ```
 */
export function dkimSign(options: DkimSignOptions): Milter {
  if (typeof options !== 'object' || options === null) bad('options must be an object');
  if (!Array.isArray(options.keys) || options.keys.length === 0) bad('keys must be a non-empty array');
  const byDomain = new Map<string, PreparedKey[]>();
  options.keys.forEach((k, i) => {
    const p = prepareKey(k, i);
    const list = byDomain.get(p.domain) ?? [];
    if (list.some((q) => q.selector.toLowerCase() === p.selector.toLowerCase())) bad(`keys: ${p.selector}._domainkey.${p.domain} is given twice`);
    list.push(p);
    byDomain.set(p.domain, list);
  });
  const trusted = networkMatcher(options.mynetworks ?? []);
  const signAuthenticated = options.signAuthenticated ?? true;
  const subdomains = options.subdomains ?? true;
  if (options.signingDomain !== undefined && typeof options.signingDomain !== 'function') bad('signingDomain must be a function');

  const names = (list: unknown, what: string): string[] => {
    if (!Array.isArray(list)) bad(`${what} must be an array of header field names`);
    for (const n of list as unknown[]) if (typeof n !== 'string' || !FIELD_NAME.test(n)) bad(`${what}: ${JSON.stringify(n)} is not a header field name`);
    return list as string[];
  };
  const oversign = names(options.oversign ?? ['From'], 'oversign');
  // The fields to sign, each once, in the order given; oversigned ones are signed too.
  const signed: string[] = [];
  const seen = new Set<string>();
  for (const n of [...names(options.headers ?? DKIM_SIGN_DEFAULT_HEADERS, 'headers'), ...oversign]) {
    const l = lowerAscii(n);
    if (l === 'dkim-signature') bad('headers: signing DKIM-Signature fields is not supported');
    if (!seen.has(l)) signed.push(n);
    seen.add(l);
  }
  // RFC 6376 section 5.4: the From header field MUST be signed.
  if (!seen.has('from')) bad('headers must include From (RFC 6376 section 5.4)');
  const oversigned = new Set(oversign.map(lowerAscii));

  const canonicalization = options.canonicalization ?? 'relaxed/relaxed';
  const canon = /^(relaxed|simple)\/(relaxed|simple)$/.exec(String(canonicalization));
  if (!canon) bad(`canonicalization must be relaxed/relaxed, relaxed/simple, simple/relaxed or simple/simple, not ${JSON.stringify(canonicalization)}`);
  const relaxedHeaders = canon[1] === 'relaxed';
  const relaxedBody = canon[2] === 'relaxed';
  const ttl = options.signatureTtl;
  if (ttl !== undefined && !(Number.isSafeInteger(ttl) && ttl > 0)) bad('signatureTtl must be a positive whole number of seconds');
  const now = options.now ?? Date.now;
  if (typeof now !== 'function') bad('now must be a function');

  /** The keys for a From domain: its own, else (with subdomains) the nearest parent's. */
  const keysForFrom = (domain: string): PreparedKey[] | undefined => {
    let d = domain;
    for (;;) {
      const hit = byDomain.get(d);
      if (hit) return hit;
      const dot = d.indexOf('.');
      if (!subdomains || dot < 0) return undefined;
      d = d.slice(dot + 1);
    }
  };

  return defineMilter({
    name: options.name ?? 'dkim-sign',
    ...(options.defaultAction ? { defaultAction: options.defaultAction } : {}),
    ...(options.timeouts ? { timeouts: options.timeouts } : {}),

    async eom(ctx) {
      if (!((signAuthenticated && ctx.auth !== undefined) || trusted(ctx.client.address))) return;
      // No From, or several: nothing to sign (From MUST be signed, RFC 6376 section 5.4).
      const from = fromOf(ctx.headers);
      if (!from) return;
      let keys: PreparedKey[] | undefined;
      if (options.signingDomain) {
        const chosen = await options.signingDomain(ctx, from.domain);
        const d = typeof chosen === 'string' ? canonicalDomain(chosen) : undefined;
        keys = d === undefined ? undefined : byDomain.get(d);
      } else if (from.domain !== undefined) {
        keys = keysForFrom(from.domain);
      }
      if (!keys) return;

      const body = new BodyHash(relaxedBody);
      const head = await readMessage(ctx.message.stream(), body, ctx.signal);
      const bh = body.digest();

      // h=: every instance of each field, last to first (RFC 6376 section 5.4.2), then the
      // oversigned names once more (a field that is not there hashes as nothing).
      const byName = new Map<string, string[]>();
      for (const f of splitFields(head)) {
        const n = fieldName(f);
        if (!seen.has(n)) continue;
        const list = byName.get(n);
        if (list) list.push(f);
        else byName.set(n, [f]);
      }
      const h: string[] = [];
      const parts: string[] = [];
      for (const name of signed) {
        const l = lowerAscii(name);
        const fields = byName.get(l) ?? [];
        for (let i = fields.length - 1; i >= 0; i--) {
          h.push(name);
          parts.push(canonHeader(fields[i]!, relaxedHeaders, true));
        }
        if (oversigned.has(l)) h.push(name);
      }
      const signedHeaders = parts.join('');
      const t = Math.floor(now() / 1000);
      const times = ttl === undefined ? `t=${t};` : `t=${t}; x=${t + ttl};`;

      const signatures: string[] = [];
      for (const k of keys) {
        const value =
          `v=1; a=${k.algorithm}; c=${canonicalization}; d=${k.domain}; s=${k.selector};\r\n` +
          `\t${times} h=${fold(h, ':', times.length + 4)};\r\n` +
          `\tbh=${bh};\r\n` +
          '\tb=';
        // The signature covers the signed fields, then this field with an empty b= and no CRLF (RFC 6376 section 3.7).
        const data = Buffer.from(signedHeaders + canonHeader(`DKIM-Signature: ${value}`, relaxedHeaders, false), 'latin1');
        const sig =
          k.algorithm === 'rsa-sha256'
            ? await signAsync('sha256', data, k.key)
            : // RFC 8463 section 3: Ed25519 (PureEdDSA) over the SHA-256 hash of the data.
              await signAsync(null, crypto.createHash('sha256').update(data).digest(), k.key);
        const b64 = sig.toString('base64');
        const lines: string[] = [];
        for (let i = 0; i < b64.length; i += 72) lines.push(b64.slice(i, i + 72));
        signatures.push(value + lines.join('\r\n\t'));
      }
      // First in the header block, in key order (RFC 6376 section 5.6: prepended).
      for (let i = signatures.length - 1; i >= 0; i--) ctx.message.insertHeader(1, 'DKIM-Signature', signatures[i]!);
    },
  });
}
