/**
 * A real DNS server on loopback for tests (dns2's UDP and TCP servers on one random free
 * port, so a truncated UDP answer is retried over TCP as resolvers do), serving test zones:
 * A, AAAA, TXT, PTR, MX and CNAME records, NXDOMAIN for unknown names and NODATA for known
 * names without the asked type, with per-name delays, SERVFAIL, REFUSED and silent drops
 * (timeouts). It records every query it is asked, so tests can count lookups (caching).
 *
 * Point the code under test at it with `server.resolver()` (a node:dns/promises Resolver
 * whose only server is this one) or `setServers(server.servers)`.
 *
 * Not a recursive resolver and not authoritative for anything but what a test adds: no SOA
 * in negative answers, no wildcards, no DNSSEC.
 */
import { Resolver } from 'node:dns/promises';
import type net from 'node:net';
import dns2 from 'dns2';

const { Packet } = dns2;

export type RecordType = 'A' | 'AAAA' | 'TXT' | 'PTR' | 'MX' | 'CNAME';

export interface MxValue {
  readonly exchange: string;
  readonly priority: number;
}

/** One record. TXT values longer than 255 bytes are split into character-strings. */
export type TestRecord =
  | { readonly type: 'A' | 'AAAA' | 'PTR' | 'CNAME'; readonly value: string; readonly ttl?: number }
  | { readonly type: 'TXT'; readonly value: string | readonly string[]; readonly ttl?: number }
  | { readonly type: 'MX'; readonly value: MxValue; readonly ttl?: number };

/** How a name misbehaves: an answer after `delay` ms, SERVFAIL / REFUSED, or no answer at all. */
export interface Behaviour {
  readonly delay?: number;
  readonly fail?: 'servfail' | 'refused' | 'timeout';
}

export interface QueryLog {
  readonly name: string;
  readonly type: string;
  readonly transport: 'udp' | 'tcp';
}

export interface TestDnsServer {
  readonly port: number;
  /** `['127.0.0.1:PORT']`, for Resolver#setServers. */
  readonly servers: readonly string[];
  /** A fresh node:dns/promises Resolver that asks only this server. */
  resolver(options?: { timeout?: number; tries?: number }): Resolver;
  /** Adds records to a name (case-insensitive, without trailing dot). */
  add(name: string, ...records: TestRecord[]): void;
  /** Shorthands. */
  a(name: string, address: string, ttl?: number): void;
  txt(name: string, value: string | readonly string[], ttl?: number): void;
  /** Replaces every record of a name (none: the name stops existing). */
  set(name: string, ...records: TestRecord[]): void;
  remove(name: string): void;
  /** Makes a name misbehave (undefined: behave again). */
  behave(name: string, behaviour: Behaviour | undefined): void;
  /** Every query so far. */
  readonly queries: readonly QueryLog[];
  /** Queries for a name (and type). */
  count(name: string, type?: string): number;
  close(): Promise<void>;
}

/** RFC 1035 section 4.1.1 (dns2 has them at run time, its types do not). */
const RCODE = { FORMERR: 1, SERVFAIL: 2, NXDOMAIN: 3, REFUSED: 5 } as const;

const TYPE_NAMES = new Map<number, string>(Object.entries(Packet.TYPE).map(([k, v]) => [v as number, k]));

function key(name: string): string {
  return name.toLowerCase().replace(/\.$/, '');
}

function splitTxt(value: string | readonly string[]): Buffer[] {
  const out: Buffer[] = [];
  for (const s of typeof value === 'string' ? [value] : value) {
    const b = Buffer.from(s, 'utf8');
    if (b.length === 0) out.push(b);
    for (let i = 0; i < b.length; i += 255) out.push(b.subarray(i, i + 255));
  }
  return out;
}

/** Starts a server on 127.0.0.1 at a random port free for both UDP and TCP. */
export async function startDnsServer(): Promise<TestDnsServer> {
  const zone = new Map<string, TestRecord[]>();
  const behaviour = new Map<string, Behaviour>();
  const queries: QueryLog[] = [];
  const timers = new Set<NodeJS.Timeout>();
  const sockets = new Set<net.Socket>();

  const handle = (transport: 'udp' | 'tcp') => (request: dns2.Packet, send: (r: dns2.Packet) => unknown) => {
    const response = Packet.createResponseFromRequest(request);
    response.header.aa = 1;
    response.header.ra = 1;
    const [question] = request.questions;
    if (!question) {
      response.header.rcode = RCODE.FORMERR;
      send(response);
      return;
    }
    const name = key(question.name);
    const qtype = TYPE_NAMES.get(question.type) ?? String(question.type);
    queries.push({ name, type: qtype, transport });
    const b = behaviour.get(name);
    if (b?.fail === 'timeout') return;
    const records = zone.get(name);
    if (b?.fail === 'servfail') response.header.rcode = RCODE.SERVFAIL;
    else if (b?.fail === 'refused') response.header.rcode = RCODE.REFUSED;
    else if (!records) response.header.rcode = RCODE.NXDOMAIN;
    else {
      for (const r of records) {
        if (r.type !== qtype && !(r.type === 'CNAME' && qtype !== 'CNAME')) continue;
        const base = { name: question.name, type: Packet.TYPE[r.type], class: Packet.CLASS.IN, ttl: r.ttl ?? 300 };
        switch (r.type) {
          case 'A':
          case 'AAAA':
            response.answers.push({ ...base, address: r.value } as dns2.Packet.Resource);
            break;
          case 'PTR':
          case 'CNAME':
            response.answers.push({ ...base, domain: r.value } as dns2.Packet.Resource);
            break;
          case 'TXT':
            response.answers.push({ ...base, data: splitTxt(r.value) } as unknown as dns2.Packet.Resource);
            break;
          case 'MX':
            response.answers.push({ ...base, exchange: r.value.exchange, priority: r.value.priority } as dns2.Packet.Resource);
            break;
        }
      }
    }
    if (b?.delay) {
      const t = setTimeout(() => {
        timers.delete(t);
        send(response);
      }, b.delay);
      timers.add(t);
    } else {
      send(response);
    }
  };

  let udp: dns2.UDPServer | undefined;
  let tcp: dns2.TCPServer | undefined;
  let port = 0;
  for (let attempt = 0; attempt < 20 && !tcp; attempt++) {
    const u = dns2.createUDPServer(handle('udp') as dns2.DnsHandler);
    u.on('error', () => undefined);
    await new Promise<void>((resolve, reject) => {
      u.once('error', reject);
      u.bind(0, '127.0.0.1', () => {
        u.off('error', reject);
        resolve();
      });
    });
    const p = u.address().port;
    const t = dns2.createTCPServer(handle('tcp') as dns2.DnsHandler);
    const ok = await new Promise<boolean>((resolve) => {
      t.once('error', () => resolve(false));
      t.listen(p, '127.0.0.1', () => resolve(true));
    });
    if (ok) {
      t.on('error', () => undefined);
      t.on('connection', (socket: net.Socket) => {
        sockets.add(socket);
        socket.on('close', () => sockets.delete(socket));
      });
      udp = u;
      tcp = t;
      port = p;
    } else {
      u.close();
    }
  }
  if (!udp || !tcp) throw new Error('no port free for both UDP and TCP on 127.0.0.1');
  const u = udp;
  const t = tcp;

  const server: TestDnsServer = {
    port,
    servers: [`127.0.0.1:${port}`],
    resolver(options = {}) {
      const r = new Resolver({ timeout: options.timeout ?? 1000, tries: options.tries ?? 1 });
      r.setServers([`127.0.0.1:${port}`]);
      return r;
    },
    add(name, ...records) {
      const k = key(name);
      zone.set(k, [...(zone.get(k) ?? []), ...records]);
    },
    a(name, address, ttl) {
      server.add(name, ttl === undefined ? { type: 'A', value: address } : { type: 'A', value: address, ttl });
    },
    txt(name, value, ttl) {
      server.add(name, ttl === undefined ? { type: 'TXT', value } : { type: 'TXT', value, ttl });
    },
    set(name, ...records) {
      if (records.length) zone.set(key(name), [...records]);
      else zone.delete(key(name));
    },
    remove(name) {
      zone.delete(key(name));
    },
    behave(name, b) {
      if (b) behaviour.set(key(name), b);
      else behaviour.delete(key(name));
    },
    queries,
    count(name, type) {
      const k = key(name);
      return queries.filter((q) => q.name === k && (type === undefined || q.type === type)).length;
    },
    async close() {
      for (const timer of timers) clearTimeout(timer);
      timers.clear();
      await Promise.all([
        new Promise<void>((resolve) => u.close(() => resolve())),
        new Promise<void>((resolve) => {
          t.close(() => resolve());
          // Close lingering TCP connections too (dns2 keeps them open for pipelining).
          for (const s of sockets) s.destroy();
        }),
      ]);
    },
  };
  return server;
}
