/**
 * Test helper: a raw SMTP client that can do TLS, for transcripts a mail client library
 * will not produce (AUTH before STARTTLS, MAIL before AUTH, repeated wrong passwords on one
 * connection): plain or implicit TLS (port 465) from the first byte, STARTTLS on demand,
 * from a chosen local address (Dovecot keeps its auth penalty per client address).
 * Certificates are not verified (the tests' servers use self-signed ones).
 */
import net from 'node:net';
import tls from 'node:tls';
import type { Reply } from './smtp.js';

export interface TlsClientOptions {
  readonly host?: string;
  /** TLS from the first byte (submissions, port 465). */
  readonly implicitTls?: boolean;
  /** Connect from this local address (e.g. 127.0.0.9). */
  readonly localAddress?: string;
}

export class TlsRawClient {
  private buf = '';
  private waiters: (() => void)[] = [];
  private socket: net.Socket;
  closed = false;

  private constructor(socket: net.Socket) {
    this.socket = socket;
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
  static async connect(port: number, options: TlsClientOptions = {}): Promise<TlsRawClient> {
    const host = options.host ?? '127.0.0.1';
    const local = options.localAddress ? { localAddress: options.localAddress } : {};
    const socket: net.Socket = options.implicitTls ? tls.connect({ port, host, rejectUnauthorized: false, ...local }) : net.connect({ port, host, ...local });
    await new Promise<void>((resolve, reject) => {
      socket.once(options.implicitTls ? 'secureConnect' : 'connect', () => resolve());
      socket.once('error', reject);
    });
    return new TlsRawClient(socket);
  }

  /** Connects, reads the 220 greeting and sends EHLO (expects 250). */
  static async ehlo(port: number, options: TlsClientOptions & { name?: string } = {}): Promise<{ client: TlsRawClient; ehlo: Reply }> {
    const client = await TlsRawClient.connect(port, options);
    const greeting = await client.reply();
    if (greeting.code !== 220) throw new Error(`greeting: ${greeting.text}`);
    const ehlo = await client.cmd(`EHLO ${options.name ?? 'client.example.test'}`);
    if (ehlo.code !== 250) throw new Error(`EHLO: ${ehlo.text}`);
    return { client, ehlo };
  }

  /** Reads one complete reply (multi-line replies end at `ddd `). Rejects after `ms`. */
  async reply(ms = 15_000): Promise<Reply> {
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

  /** Sends one command line and reads its reply. */
  async cmd(line: string, ms?: number): Promise<Reply> {
    this.socket.write(line + '\r\n');
    return this.reply(ms);
  }

  /** STARTTLS (expects 220), the TLS handshake, then EHLO again; returns the new EHLO reply. */
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

  /** Closes the connection (QUIT is not sent). */
  close(): void {
    this.socket.destroy();
  }
}
