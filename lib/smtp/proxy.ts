/**
 * The PROXY protocol header a load balancer (HAProxy `send-proxy`, `send-proxy-v2`,
 * `send-proxy-v2-ssl`) writes before the client's bytes, so the server learns the real
 * client address: version 1 (one text line) and version 2 (binary, with TLVs), as
 * https://www.haproxy.org/download/2.9/doc/proxy-protocol.txt specifies them (sections 2.1,
 * 2.2, 2.2.5 for the TLS TLVs).
 *
 * The decoder is pure (bytes in, a header out; no sockets, no timers) and bounded: it never
 * waits for more than `maxBytes` (default 1024: a v1 line is at most 107 bytes and HAProxy's
 * v2 headers with TLS TLVs stay well under that) — it holds at most that plus the last chunk
 * pushed — and it never allocates by a length the peer sent before checking it against
 * that bound.
 *
 * Why not smtp-server's `useProxy`: it reads version 1 only (a v2 header is refused as
 * garbage), it carries no TLS facts, and its trust list matches exact addresses, not
 * networks. The gateway uses this decoder on listeners with `proxyProtocol` and leaves
 * smtp-server's reader off (see gateway.ts, GatewayServer._handleProxy).
 *
 * It deliberately does not: check the CRC32C TLV (HAProxy does not send it by default; the
 * header comes from a trusted peer over a connection it opened), read UNIX or UDP address
 * blocks for anything but skipping them (the connection's own address is used), or keep
 * TLVs it does not know.
 */

/** v2 signature: `\r\n\r\n\0\r\nQUIT\n` (section 2.2). */
export const PROXY_V2_SIGNATURE = Buffer.from([0x0d, 0x0a, 0x0d, 0x0a, 0x00, 0x0d, 0x0a, 0x51, 0x55, 0x49, 0x54, 0x0a]);

/** v2 TLV types we read (section 2.2.1). */
export const PP2_TYPE = {
  /** PP2_TYPE_ALPN */
  ALPN: 0x01,
  /** PP2_TYPE_AUTHORITY: the TLS SNI host name. */
  AUTHORITY: 0x02,
  /** PP2_TYPE_SSL: client flags, verify result, then sub-TLVs. */
  SSL: 0x20,
  /** PP2_SUBTYPE_SSL_VERSION: "TLSv1.3". */
  SSL_VERSION: 0x21,
  /** PP2_SUBTYPE_SSL_CN: the client certificate's common name. */
  SSL_CN: 0x22,
  /** PP2_SUBTYPE_SSL_CIPHER: "TLS_AES_256_GCM_SHA384". */
  SSL_CIPHER: 0x23,
} as const;

/** PP2_CLIENT_SSL: the client connected over TLS. */
const PP2_CLIENT_SSL = 0x01;
/** PP2_CLIENT_CERT_CONN: the client presented a certificate on this connection. */
const PP2_CLIENT_CERT_CONN = 0x02;

/** An endpoint in the header. */
export interface ProxyEndpoint {
  readonly address: string;
  readonly port: number;
}

/** TLS facts HAProxy passes on (`send-proxy-v2-ssl`, `send-proxy-v2-ssl-cn`). */
export interface ProxyTls {
  /** e.g. "TLSv1.3" (PP2_SUBTYPE_SSL_VERSION). */
  readonly version: string | undefined;
  /** e.g. "TLS_AES_256_GCM_SHA384" (PP2_SUBTYPE_SSL_CIPHER). */
  readonly cipher: string | undefined;
  /** The SNI name the client asked for (PP2_TYPE_AUTHORITY). */
  readonly sni: string | undefined;
  /** The client certificate's common name (PP2_SUBTYPE_SSL_CN). */
  readonly clientCertCN: string | undefined;
  /** The client presented a certificate and it verified (client flag CERT_CONN and verify = 0). */
  readonly clientCertVerified: boolean;
}

/** A decoded header. */
export interface ProxyHeader {
  readonly version: 1 | 2;
  /**
   * `proxy`: a relayed connection, `source` is the client. `local`: the proxy speaks for
   * itself (v2 LOCAL, e.g. a health check; v1 `UNKNOWN`): use the connection's own
   * addresses. `source` is then undefined.
   */
  readonly command: 'proxy' | 'local';
  readonly source: ProxyEndpoint | undefined;
  readonly destination: ProxyEndpoint | undefined;
  /** TLS between the client and the proxy, when the proxy said so (v2 only). */
  readonly tls: ProxyTls | undefined;
}

/** A malformed header: the connection is to be closed. */
export class ProxyProtocolError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'ProxyProtocolError';
  }
}

/** What {@link ProxyHeaderDecoder.push} returns: more bytes needed, or the header and the bytes after it. */
export type ProxyDecodeResult = { readonly done: false } | { readonly done: true; readonly header: ProxyHeader; readonly rest: Buffer };

const V1_MAX = 107;

/**
 * An incremental decoder for one PROXY header: push chunks until it returns `done`; it
 * throws {@link ProxyProtocolError} as soon as the bytes cannot be a valid header.
 */
export class ProxyHeaderDecoder {
  private buf: Buffer = Buffer.alloc(0);
  private finished = false;

  constructor(private readonly maxBytes = 1024) {
    if (!Number.isSafeInteger(maxBytes) || maxBytes < V1_MAX + 1) throw new RangeError('maxBytes must be an integer >= 108');
  }

  push(chunk: Buffer): ProxyDecodeResult {
    if (this.finished) throw new ProxyProtocolError('header already decoded');
    this.buf = this.buf.length === 0 ? chunk : Buffer.concat([this.buf, chunk]);
    const buf = this.buf;
    const first = buf[0];
    if (first === undefined) return { done: false };
    if (first === 0x50 /* P */) return this.finish(decodeV1(buf));
    if (first === 0x0d) {
      const n = Math.min(buf.length, PROXY_V2_SIGNATURE.length);
      if (!buf.subarray(0, n).equals(PROXY_V2_SIGNATURE.subarray(0, n))) throw new ProxyProtocolError('not a PROXY protocol header');
      return this.finish(decodeV2(buf, this.maxBytes));
    }
    throw new ProxyProtocolError('not a PROXY protocol header');
  }

  private finish(r: { header: ProxyHeader; length: number } | undefined): ProxyDecodeResult {
    if (!r) {
      if (this.buf.length >= this.maxBytes) throw new ProxyProtocolError(`no complete header within ${this.maxBytes} bytes`);
      return { done: false };
    }
    this.finished = true;
    const rest = this.buf.subarray(r.length);
    this.buf = Buffer.alloc(0);
    return { done: true, header: r.header, rest };
  }
}

const DEC_PORT = /^(0|[1-9][0-9]{0,4})$/;
const V4 = /^(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])(\.(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])){3}$/;

function port(s: string | undefined): number {
  if (s === undefined || !DEC_PORT.test(s) || Number(s) > 65535) throw new ProxyProtocolError('bad port in PROXY v1 header');
  return Number(s);
}

/** Version 1 (section 2.1): `PROXY TCP4|TCP6|UNKNOWN src dst sport dport\r\n`, at most 107 bytes. */
function decodeV1(buf: Buffer): { header: ProxyHeader; length: number } | undefined {
  const prefix = 'PROXY ';
  const n = Math.min(buf.length, prefix.length);
  if (buf.toString('latin1', 0, n) !== prefix.slice(0, n)) throw new ProxyProtocolError('not a PROXY protocol header');
  const lf = buf.indexOf(0x0a);
  if (lf < 0) {
    if (buf.length >= V1_MAX) throw new ProxyProtocolError('PROXY v1 header longer than 107 bytes');
    return undefined;
  }
  if (lf + 1 > V1_MAX) throw new ProxyProtocolError('PROXY v1 header longer than 107 bytes');
  if (buf[lf - 1] !== 0x0d) throw new ProxyProtocolError('PROXY v1 header must end with CRLF');
  const line = buf.toString('latin1', 0, lf - 1);
  const parts = line.split(' ');
  const proto = parts[1];
  if (proto === 'UNKNOWN') {
    // "the receiver must ignore anything presented before the CRLF": the proxy's own connection.
    return { header: { version: 1, command: 'local', source: undefined, destination: undefined, tls: undefined }, length: lf + 1 };
  }
  if ((proto !== 'TCP4' && proto !== 'TCP6') || parts.length !== 6) throw new ProxyProtocolError('malformed PROXY v1 header');
  const [src, dst] = [parts[2]!, parts[3]!];
  const ok = proto === 'TCP4' ? V4.test(src) && V4.test(dst) : isV6(src) && isV6(dst);
  if (!ok) throw new ProxyProtocolError(`bad ${proto} address in PROXY v1 header`);
  return {
    header: { version: 1, command: 'proxy', source: { address: src, port: port(parts[4]) }, destination: { address: dst, port: port(parts[5]) }, tls: undefined },
    length: lf + 1,
  };
}

function isV6(s: string): boolean {
  // Canonical enough for what a proxy writes; the gateway normalises it later.
  return /^[0-9a-fA-F:.]{2,45}$/.test(s) && s.includes(':') && ipv6Bytes(s) !== undefined;
}

/** The 16 bytes of an IPv6 text address, or undefined. */
function ipv6Bytes(s: string): Buffer | undefined {
  let head = s;
  let v4tail: number[] = [];
  const lastColon = s.lastIndexOf(':');
  if (s.includes('.')) {
    const quad = s.slice(lastColon + 1);
    if (!V4.test(quad)) return undefined;
    v4tail = quad.split('.').map(Number);
    head = s.slice(0, lastColon + 1) + '0:0';
  }
  const halves = head.split('::');
  if (halves.length > 2) return undefined;
  const groups = (h: string): string[] => (h === '' ? [] : h.split(':'));
  const left = groups(halves[0]!);
  const right = halves.length === 2 ? groups(halves[1]!) : [];
  if (halves.length === 1 && left.length !== 8) return undefined;
  if (left.length + right.length > (halves.length === 2 ? 7 : 8)) return undefined;
  const all = [...left, ...Array<string>(8 - left.length - right.length).fill('0'), ...right];
  const out = Buffer.alloc(16);
  for (let i = 0; i < 8; i++) {
    const g = all[i]!;
    if (!/^[0-9a-fA-F]{1,4}$/.test(g)) return undefined;
    out.writeUInt16BE(parseInt(g, 16), i * 2);
  }
  if (v4tail.length) for (let i = 0; i < 4; i++) out[12 + i] = v4tail[i]!;
  return out;
}

function v6Text(b: Buffer): string {
  const groups: string[] = [];
  for (let i = 0; i < 16; i += 2) groups.push(b.readUInt16BE(i).toString(16));
  // Shorten the longest run of zero groups (RFC 5952 4.2).
  let best = -1;
  let bestLen = 1;
  for (let i = 0; i < 8; ) {
    if (groups[i] !== '0') {
      i++;
      continue;
    }
    let j = i;
    while (j < 8 && groups[j] === '0') j++;
    if (j - i > bestLen) {
      best = i;
      bestLen = j - i;
    }
    i = j;
  }
  if (best < 0) return groups.join(':');
  return `${groups.slice(0, best).join(':')}::${groups.slice(best + bestLen).join(':')}`;
}

/** Version 2 (section 2.2): 16 fixed bytes, then `len` bytes of addresses and TLVs. */
function decodeV2(buf: Buffer, maxBytes: number): { header: ProxyHeader; length: number } | undefined {
  if (buf.length < 16) return undefined;
  const verCmd = buf[12]!;
  if (verCmd >> 4 !== 2) throw new ProxyProtocolError('PROXY v2: bad version');
  const cmd = verCmd & 0x0f;
  if (cmd > 1) throw new ProxyProtocolError('PROXY v2: bad command');
  const famProto = buf[13]!;
  const len = buf.readUInt16BE(14);
  const total = 16 + len;
  if (total > maxBytes) throw new ProxyProtocolError(`PROXY v2 header of ${total} bytes is over the ${maxBytes}-byte limit`);
  if (buf.length < total) return undefined;
  const body = buf.subarray(16, total);
  const family = famProto >> 4;
  const transport = famProto & 0x0f;
  let addrLen = 0;
  let source: ProxyEndpoint | undefined;
  let destination: ProxyEndpoint | undefined;
  if (family === 0x1) {
    addrLen = 12; // AF_INET: src(4) dst(4) sport(2) dport(2)
    if (body.length < addrLen) throw new ProxyProtocolError('PROXY v2: short IPv4 address block');
    source = { address: [...body.subarray(0, 4)].join('.'), port: body.readUInt16BE(8) };
    destination = { address: [...body.subarray(4, 8)].join('.'), port: body.readUInt16BE(10) };
  } else if (family === 0x2) {
    addrLen = 36; // AF_INET6: src(16) dst(16) sport(2) dport(2)
    if (body.length < addrLen) throw new ProxyProtocolError('PROXY v2: short IPv6 address block');
    source = { address: v6Text(body.subarray(0, 16)), port: body.readUInt16BE(32) };
    destination = { address: v6Text(body.subarray(16, 32)), port: body.readUInt16BE(34) };
  } else if (family === 0x3) {
    addrLen = 216; // AF_UNIX: two 108-byte paths; not a client address we can use
    if (body.length < addrLen) throw new ProxyProtocolError('PROXY v2: short UNIX address block');
  } else if (family !== 0x0) {
    throw new ProxyProtocolError('PROXY v2: bad address family');
  }
  if (transport > 2) throw new ProxyProtocolError('PROXY v2: bad transport protocol');
  const tls = readTlvs(body.subarray(addrLen));
  // LOCAL, UNSPEC, UNIX and UDP: the connection's own addresses stand (section 2.2).
  const relayed = cmd === 1 && (family === 0x1 || family === 0x2) && transport === 0x1;
  return {
    header: { version: 2, command: relayed ? 'proxy' : 'local', source: relayed ? source : undefined, destination: relayed ? destination : undefined, tls },
    length: total,
  };
}

/** Walks the TLVs (type, 16-bit length, value); any length that runs past the end is an error. */
function readTlvs(b: Buffer): ProxyTls | undefined {
  let sni: string | undefined;
  let ssl: { client: number; verify: number; version?: string; cipher?: string; cn?: string } | undefined;
  for (let i = 0; i < b.length; ) {
    if (i + 3 > b.length) throw new ProxyProtocolError('PROXY v2: truncated TLV');
    const type = b[i]!;
    const len = b.readUInt16BE(i + 1);
    if (i + 3 + len > b.length) throw new ProxyProtocolError('PROXY v2: TLV runs past the header');
    const value = b.subarray(i + 3, i + 3 + len);
    if (type === PP2_TYPE.AUTHORITY) sni = printable(value);
    else if (type === PP2_TYPE.SSL) {
      if (len < 5) throw new ProxyProtocolError('PROXY v2: short SSL TLV');
      ssl = { client: value[0]!, verify: value.readUInt32BE(1) };
      const sub = value.subarray(5);
      for (let j = 0; j < sub.length; ) {
        if (j + 3 > sub.length) throw new ProxyProtocolError('PROXY v2: truncated SSL sub-TLV');
        const t = sub[j]!;
        const l = sub.readUInt16BE(j + 1);
        if (j + 3 + l > sub.length) throw new ProxyProtocolError('PROXY v2: SSL sub-TLV runs past its TLV');
        const v = sub.subarray(j + 3, j + 3 + l);
        const text = printable(v);
        if (text === undefined) {
          // not printable: left out
        } else if (t === PP2_TYPE.SSL_VERSION) ssl.version = text;
        else if (t === PP2_TYPE.SSL_CIPHER) ssl.cipher = text;
        else if (t === PP2_TYPE.SSL_CN) ssl.cn = text;
        j += 3 + l;
      }
    }
    i += 3 + len;
  }
  if (!ssl || !(ssl.client & PP2_CLIENT_SSL)) return undefined;
  return {
    version: ssl.version,
    cipher: ssl.cipher,
    sni,
    clientCertCN: ssl.cn,
    clientCertVerified: (ssl.client & PP2_CLIENT_CERT_CONN) !== 0 && ssl.verify === 0,
  };
}

/** A TLV string as text, if it is printable ASCII (it ends up in headers and logs); else undefined. */
function printable(v: Buffer): string | undefined {
  const s = v.toString('latin1');
  return /^[\x21-\x7e]{1,255}$/.test(s) ? s : undefined;
}

/** Encodes a header (for tests and for a proxy written in Node): v1 text or v2 binary with optional TLS TLVs. */
export function encodeProxyHeader(
  version: 1 | 2,
  h: { source: ProxyEndpoint; destination: ProxyEndpoint; tls?: { version?: string; cipher?: string; sni?: string } } | 'local',
): Buffer {
  if (version === 1) {
    if (h === 'local') return Buffer.from('PROXY UNKNOWN\r\n', 'latin1');
    const fam = h.source.address.includes(':') ? 'TCP6' : 'TCP4';
    return Buffer.from(`PROXY ${fam} ${h.source.address} ${h.destination.address} ${h.source.port} ${h.destination.port}\r\n`, 'latin1');
  }
  if (h === 'local') return Buffer.concat([PROXY_V2_SIGNATURE, Buffer.from([0x20, 0x00, 0x00, 0x00])]);
  const v6 = h.source.address.includes(':');
  const addr = v6
    ? Buffer.concat([ipv6Bytes(h.source.address)!, ipv6Bytes(h.destination.address)!, u16(h.source.port), u16(h.destination.port)])
    : Buffer.concat([Buffer.from(h.source.address.split('.').map(Number)), Buffer.from(h.destination.address.split('.').map(Number)), u16(h.source.port), u16(h.destination.port)]);
  const tlvs: Buffer[] = [];
  const tlv = (t: number, v: Buffer): Buffer => Buffer.concat([Buffer.from([t]), u16(v.length), v]);
  if (h.tls) {
    if (h.tls.sni) tlvs.push(tlv(PP2_TYPE.AUTHORITY, Buffer.from(h.tls.sni)));
    const sub: Buffer[] = [];
    if (h.tls.version) sub.push(tlv(PP2_TYPE.SSL_VERSION, Buffer.from(h.tls.version)));
    if (h.tls.cipher) sub.push(tlv(PP2_TYPE.SSL_CIPHER, Buffer.from(h.tls.cipher)));
    tlvs.push(tlv(PP2_TYPE.SSL, Buffer.concat([Buffer.from([PP2_CLIENT_SSL, 0, 0, 0, 0]), ...sub])));
  }
  const body = Buffer.concat([addr, ...tlvs]);
  return Buffer.concat([PROXY_V2_SIGNATURE, Buffer.from([0x21, v6 ? 0x21 : 0x11]), u16(body.length), body]);
}

function u16(n: number): Buffer {
  const b = Buffer.alloc(2);
  b.writeUInt16BE(n);
  return b;
}
