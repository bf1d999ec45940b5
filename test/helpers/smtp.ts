/**
 * Test helpers: a raw-socket SMTP client for transcripts (every reply line as the server
 * sent it), and a gateway on a free loopback port delivering into a fresh Maildir.
 */
import net from 'node:net';
import tls from 'node:tls';
import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { createGateway, maildir, type Gateway, type GatewayOptions, type Transport } from '../../lib/index.js';

/** One SMTP reply: the code and every line as received (`250-…`, `250 …`). */
export interface Reply {
  readonly code: number;
  readonly lines: readonly string[];
  readonly text: string;
}

/** How {@link RawClient.connect} connects. */
export interface RawConnectOptions {
  readonly host?: string;
  /** TLS from the first byte (submissions, port 465); certificates are not verified. */
  readonly implicitTls?: boolean;
  /** Connect from this local address (e.g. 127.0.0.9: per-client limits and penalties). */
  readonly localAddress?: string;
}

/** A raw SMTP client over a real socket (plain, STARTTLS or implicit TLS). */
export class RawClient {
  private buf = '';
  private waiters: (() => void)[] = [];
  closed = false;
  protected constructor(public socket: net.Socket) {
    this.attach(socket);
  }

  private attach(socket: net.Socket): void {
    socket.setEncoding('latin1');
    socket.on('data', (d: string) => {
      this.buf += d;
      this.wake();
    });
    socket.on('close', () => {
      if (socket !== this.socket) return;
      this.closed = true;
      this.wake();
    });
    socket.on('error', () => undefined);
  }

  private wake(): void {
    const w = this.waiters;
    this.waiters = [];
    for (const f of w) f();
  }

  /** True once the connection is encrypted. */
  get encrypted(): boolean {
    return this.socket instanceof tls.TLSSocket;
  }

  /** Connects and reads nothing yet (the greeting is the first reply()). */
  static async connect(port: number, hostOrOptions: string | RawConnectOptions = {}): Promise<RawClient> {
    return new RawClient(await RawClient.dial(port, hostOrOptions));
  }

  protected static async dial(port: number, hostOrOptions: string | RawConnectOptions): Promise<net.Socket> {
    const o: RawConnectOptions = typeof hostOrOptions === 'string' ? { host: hostOrOptions } : hostOrOptions;
    const host = o.host ?? '127.0.0.1';
    const local = o.localAddress ? { localAddress: o.localAddress } : {};
    const socket: net.Socket = o.implicitTls ? tls.connect({ port, host, rejectUnauthorized: false, ...local }) : net.connect({ port, host, ...local });
    await new Promise<void>((resolve, reject) => {
      socket.once(o.implicitTls ? 'secureConnect' : 'connect', () => resolve());
      socket.once('error', reject);
    });
    return socket;
  }

  /** Reads one complete reply (multi-line replies end at `ddd `). Rejects after `ms`. */
  async reply(ms = 10_000): Promise<Reply> {
    const deadline = Date.now() + ms;
    for (;;) {
      const lines: string[] = [];
      let pos = 0;
      for (;;) {
        const nl = this.buf.indexOf('\r\n', pos);
        if (nl < 0) break;
        const line = this.buf.slice(pos, nl);
        lines.push(line);
        pos = nl + 2;
        if (/^\d{3}( |$)/.test(line)) {
          this.buf = this.buf.slice(pos);
          return { code: Number(line.slice(0, 3)), lines, text: lines.join('\n') };
        }
      }
      if (this.closed) throw new Error(`connection closed; unparsed: ${JSON.stringify(this.buf)}`);
      const left = deadline - Date.now();
      if (left <= 0) throw new Error(`no reply within ${ms} ms; have ${JSON.stringify(this.buf)}`);
      await new Promise<void>((resolve) => {
        const t = setTimeout(resolve, left);
        this.waiters.push(() => {
          clearTimeout(t);
          resolve();
        });
      });
    }
  }

  write(data: string | Buffer): void {
    this.socket.write(data);
  }

  /** Sends one command line and reads its reply. */
  async cmd(line: string, ms?: number): Promise<Reply> {
    this.write(line + '\r\n');
    return this.reply(ms);
  }

  /** DATA, then the content (dot-stuffed here), then the final dot; returns the final reply. */
  async data(content: string | Buffer, ms?: number): Promise<Reply> {
    const r = await this.cmd('DATA');
    if (r.code !== 354) return r;
    const raw = Buffer.isBuffer(content) ? content : Buffer.from(content, 'utf8');
    const stuffed = Buffer.from(raw.toString('latin1').replace(/(^|\r\n)\./g, '$1..'), 'latin1');
    this.write(stuffed);
    this.write(stuffed.length && !stuffed.subarray(-2).equals(Buffer.from('\r\n')) ? '\r\n.\r\n' : '.\r\n');
    return this.reply(ms);
  }

  /** STARTTLS (expects 220), the TLS handshake (certificate not verified), then EHLO again; returns the new EHLO reply. */
  async starttls(name = 'client.example.test'): Promise<Reply> {
    const r = await this.cmd('STARTTLS');
    if (r.code !== 220) throw new Error(`STARTTLS: ${r.text}`);
    const plain = this.socket;
    plain.removeAllListeners('data');
    const secure = tls.connect({ socket: plain, rejectUnauthorized: false });
    await new Promise<void>((resolve, reject) => {
      secure.once('secureConnect', () => resolve());
      secure.once('error', reject);
    });
    this.socket = secure;
    this.buf = '';
    this.attach(secure);
    const ehlo = await this.cmd(`EHLO ${name}`);
    if (ehlo.code !== 250) throw new Error(`EHLO after STARTTLS: ${ehlo.text}`);
    return ehlo;
  }

  /** `AUTH PLAIN <base64(\0user\0password)>` and its reply. */
  authPlain(user: string, password: string, ms?: number): Promise<Reply> {
    return this.cmd(`AUTH PLAIN ${Buffer.from(`\0${user}\0${password}`, 'utf8').toString('base64')}`, ms);
  }

  /** Waits until the server closes the connection. */
  async waitClosed(ms = 10_000): Promise<void> {
    const deadline = Date.now() + ms;
    while (!this.closed) {
      if (Date.now() > deadline) throw new Error('server did not close the connection');
      await new Promise((r) => setTimeout(r, 20));
    }
  }

  end(): void {
    this.socket.end();
  }

  /** Closes the connection at once (QUIT is not sent). */
  close(): void {
    this.socket.destroy();
  }
}

/** Opens a session up to the 250 of EHLO. */
export async function ehlo(port: number, name = 'client.example.test'): Promise<RawClient> {
  const c = await RawClient.connect(port);
  const greeting = await c.reply();
  if (greeting.code !== 220) throw new Error(`greeting: ${greeting.text}`);
  const r = await c.cmd(`EHLO ${name}`);
  if (r.code !== 250) throw new Error(`EHLO: ${r.text}`);
  return c;
}

export interface TestGateway {
  readonly gateway: Gateway;
  readonly port: number;
  readonly root: string;
  readonly quarantineRoot: string;
  close(): Promise<void>;
}

/** A gateway on 127.0.0.1:<free port> delivering into a fresh temp Maildir root. */
export async function startGateway(options: Partial<GatewayOptions> & { delivery?: Transport } = {}): Promise<TestGateway> {
  const base = await fs.mkdtemp(path.join(os.tmpdir(), 'dovetail-test-'));
  const root = path.join(base, 'mail');
  const quarantineRoot = path.join(base, 'quarantine');
  await fs.mkdir(root);
  await fs.mkdir(quarantineRoot);
  const gateway = createGateway({
    hostname: 'mx.test',
    resolveClientNames: false,
    listen: { host: '127.0.0.1', port: 0 },
    delivery: maildir({ root }),
    quarantine: maildir({ root: quarantineRoot }),
    ...options,
  });
  const [addr] = await gateway.listen();
  return {
    gateway,
    port: addr!.port,
    root,
    quarantineRoot,
    async close() {
      await gateway.close();
      await fs.rm(base, { recursive: true, force: true });
    },
  };
}

/** The messages stored for `address` in a Maildir root (default folder naming), oldest first. */
export async function stored(root: string, address: string): Promise<Buffer[]> {
  const dir = path.join(root, address.toLowerCase(), 'new');
  let names: string[];
  try {
    names = await fs.readdir(dir);
  } catch {
    return [];
  }
  // Maildir names start `<sec>.M<usec>P<pid>Q<n>`: order by those numbers (Q breaks ties).
  const key = (n: string): number[] => (/^(\d+)\.M(\d+)P\d+Q(\d+)/.exec(n)?.slice(1) ?? ['0', '0', '0']).map(Number);
  names.sort((a, b) => {
    const x = key(a);
    const y = key(b);
    return (x[0]! - y[0]!) || (x[1]! - y[1]!) || (x[2]! - y[2]!);
  });
  return Promise.all(names.map((n) => fs.readFile(path.join(dir, n))));
}

/** Splits a stored message into its header block (without the blank line) and body. */
export function split(message: Buffer): { headers: string; body: Buffer } {
  const at = message.indexOf('\r\n\r\n');
  if (at < 0) return { headers: message.toString('utf8'), body: Buffer.alloc(0) };
  return { headers: message.subarray(0, at + 2).toString('utf8'), body: message.subarray(at + 4) };
}

/** A simple message. */
export function message(subject = 'hello', body = 'Hello there.\r\n', extra = ''): string {
  return `From: Alice <alice@sender.test>\r\nTo: Bob <bob@example.test>\r\nSubject: ${subject}\r\nMessage-ID: <${Math.random().toString(36).slice(2)}@sender.test>\r\n${extra}\r\n${body}`;
}

/** Runs MAIL, the RCPTs and DATA on an open session; returns every reply. */
export async function send(
  c: RawClient,
  from: string,
  to: readonly string[],
  content: string | Buffer,
): Promise<{ mail: Reply; rcpt: Reply[]; data: Reply | undefined }> {
  const mail = await c.cmd(`MAIL FROM:<${from}>`);
  const rcpt: Reply[] = [];
  if (mail.code !== 250) return { mail, rcpt, data: undefined };
  for (const t of to) rcpt.push(await c.cmd(`RCPT TO:<${t}>`));
  if (!rcpt.some((r) => r.code === 250)) return { mail, rcpt, data: undefined };
  return { mail, rcpt, data: await c.data(content) };
}
