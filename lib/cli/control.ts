/**
 * The control socket: how `dovetail queue …` talks to a running gateway instead of racing it
 * on the queue directory (Postfix's postqueue → showq/qmgr through public/ sockets). A unix
 * socket (mode 0600), one JSON object per line each way: a request
 * `{ "cmd": "list" | "show" | "retry" | "flush" | "delete" | "status", "id"?: "<queue id>" }`,
 * one reply `{ "ok": true, … }` or `{ "ok": false, "error": "…" }`.
 *
 * Hardening: a request line longer than MAX_REQUEST_BYTES gets an error and the connection
 * is closed (nothing is buffered beyond it); malformed JSON or an unknown command gets
 * `ok: false`; an idle connection is closed after IDLE_TIMEOUT.
 *
 * Does not: authenticate (the socket's file mode does: only its owner may connect), or
 * offer anything but the queue and a status line.
 */
import { chmod, unlink } from 'node:fs/promises';
import net from 'node:net';
import type { DeliveryQueue, QueueEntry } from '../delivery/queue.js';

/** The longest request line accepted, bytes. */
export const MAX_REQUEST_BYTES = 64 * 1024;
/** Requests one connection may have waiting (pipelined) at once. */
export const MAX_PENDING = 16;
/** A connection that sends nothing for this long is closed, ms. */
export const IDLE_TIMEOUT = 60_000;

/** The commands of the control socket. */
export const CONTROL_COMMANDS = ['list', 'show', 'retry', 'flush', 'delete', 'status'] as const;
export type ControlCommand = (typeof CONTROL_COMMANDS)[number];

export interface ControlRequest {
  readonly cmd: ControlCommand;
  readonly id?: string;
}

export type ControlReply =
  | { readonly ok: true; readonly entries?: QueueEntry[]; readonly entry?: QueueEntry; readonly attempted?: number; readonly removed?: boolean; readonly pid?: number }
  | { readonly ok: false; readonly error: string };

export interface ControlServer {
  readonly path: string;
  close(): Promise<void>;
}

/** Answers one request against the queue. */
export async function handleRequest(queue: DeliveryQueue, req: unknown): Promise<ControlReply> {
  if (typeof req !== 'object' || req === null) return { ok: false, error: 'expected a JSON object' };
  const { cmd, id } = req as { cmd?: unknown; id?: unknown };
  if (typeof cmd !== 'string' || !(CONTROL_COMMANDS as readonly string[]).includes(cmd)) {
    return { ok: false, error: `unknown command ${JSON.stringify(cmd)} (expected one of ${CONTROL_COMMANDS.join(', ')})` };
  }
  if (id !== undefined && (typeof id !== 'string' || !/^[A-Za-z0-9._-]{1,64}$/.test(id))) return { ok: false, error: 'id: expected a queue id' };
  const needsId = cmd === 'show' || cmd === 'delete';
  if (needsId && id === undefined) return { ok: false, error: `${cmd} needs an id` };
  switch (cmd as ControlCommand) {
    case 'status':
      return { ok: true, pid: process.pid };
    case 'list':
      return { ok: true, entries: await queue.list() };
    case 'show': {
      const entry = (await queue.list()).find((e) => e.queueId === id);
      return entry ? { ok: true, entry } : { ok: false, error: `no queue entry ${id}` };
    }
    case 'retry':
    case 'flush': {
      if (id !== undefined && !(await queue.list()).some((e) => e.queueId === id)) return { ok: false, error: `no queue entry ${id}` };
      return { ok: true, attempted: await queue.retryNow(cmd === 'flush' ? undefined : id) };
    }
    case 'delete': {
      const removed = await queue.remove(id!);
      return removed ? { ok: true, removed } : { ok: false, error: `no queue entry ${id}` };
    }
  }
}

/** True when something accepts connections on the unix socket `file`. */
export function socketAnswers(file: string): Promise<boolean> {
  return new Promise((resolve) => {
    const s = net.connect({ path: file });
    s.once('connect', () => {
      s.destroy();
      resolve(true);
    });
    s.once('error', () => resolve(false));
  });
}

/**
 * Serves the control socket at `file` for `queue`. A socket file left by a process that is
 * gone is replaced; one that answers belongs to a live process and makes this throw.
 */
export async function serveControl(file: string, queue: DeliveryQueue, onError: (err: unknown) => void = () => {}): Promise<ControlServer> {
  if (await socketAnswers(file)) throw new Error(`the control socket ${file} is in use by another process`);
  await unlink(file).catch((err: NodeJS.ErrnoException) => {
    if (err.code !== 'ENOENT') throw err;
  });
  const sockets = new Set<net.Socket>();
  const server = net.createServer((socket) => {
    sockets.add(socket);
    socket.setTimeout(IDLE_TIMEOUT, () => socket.destroy());
    socket.on('close', () => sockets.delete(socket));
    socket.on('error', () => socket.destroy());
    let buf = '';
    let busy = Promise.resolve();
    let pending = 0;
    const reply = (r: ControlReply): void => {
      if (!socket.destroyed) socket.write(JSON.stringify(r) + '\n');
    };
    socket.setEncoding('utf8');
    socket.on('data', (chunk: string) => {
      buf += chunk;
      for (;;) {
        const nl = buf.indexOf('\n');
        if (nl < 0) break;
        const line = buf.slice(0, nl);
        buf = buf.slice(nl + 1);
        if (++pending > MAX_PENDING) {
          reply({ ok: false, error: `more than ${MAX_PENDING} requests waiting` });
          socket.end();
          buf = '';
          return;
        }
        // One request at a time per connection, answered in order.
        busy = busy.then(async () => {
          pending--;
          let req: unknown;
          try {
            req = JSON.parse(line);
          } catch {
            return reply({ ok: false, error: 'expected one JSON object per line' });
          }
          try {
            reply(await handleRequest(queue, req));
          } catch (err) {
            onError(err);
            reply({ ok: false, error: err instanceof Error ? err.message : String(err) });
          }
        });
      }
      if (Buffer.byteLength(buf) > MAX_REQUEST_BYTES) {
        buf = '';
        reply({ ok: false, error: `request longer than ${MAX_REQUEST_BYTES} bytes` });
        socket.end();
      }
    });
  });
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen({ path: file }, () => {
      server.off('error', reject);
      resolve();
    });
  });
  server.on('error', onError);
  await chmod(file, 0o600);
  return {
    path: file,
    async close() {
      const closed = new Promise<void>((resolve) => server.close(() => resolve()));
      for (const s of sockets) s.end();
      const t = setTimeout(() => sockets.forEach((s) => s.destroy()), 5000);
      await closed;
      clearTimeout(t);
      await unlink(file).catch(() => undefined);
    },
  };
}

/**
 * Sends one request to the control socket and resolves with its reply. Rejects with the
 * socket error (`ENOENT`, `ECONNREFUSED`: no gateway there) or after `timeout` ms.
 */
export function controlRequest(file: string, req: ControlRequest, timeout = 600_000): Promise<ControlReply> {
  return new Promise((resolve, reject) => {
    const s = net.connect({ path: file });
    let buf = '';
    const timer = setTimeout(() => {
      s.destroy();
      reject(new Error(`no answer from ${file} within ${timeout} ms`));
    }, timeout);
    s.setEncoding('utf8');
    s.once('connect', () => s.write(JSON.stringify(req) + '\n'));
    s.on('data', (d: string) => {
      buf += d;
      const nl = buf.indexOf('\n');
      if (nl >= 0) {
        clearTimeout(timer);
        s.end();
        try {
          resolve(JSON.parse(buf.slice(0, nl)) as ControlReply);
        } catch (err) {
          reject(err as Error);
        }
      }
    });
    s.once('error', (err) => {
      clearTimeout(timer);
      reject(err);
    });
    s.once('close', () => {
      clearTimeout(timer);
      if (buf.indexOf('\n') < 0) reject(Object.assign(new Error(`${file} closed without an answer`), { code: 'ECONNRESET' }));
    });
  });
}
