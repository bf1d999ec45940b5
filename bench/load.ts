/**
 * The load generator, run in a worker thread so its CPU is not charged to the servers'
 * event loop (on a 2-core machine the servers get one core, the client the other).
 *
 * It keeps a pool of raw-socket SMTP connections per target, opened once (connect, wait
 * for the 220, EHLO) because smtp-server holds every greeting back 100 ms (early-talker
 * check); that cost is measured at open time and reported apart. A run sends M messages on
 * each of the C connections concurrently, each as one pipelined group `MAIL FROM`, `RCPT
 * TO` …, `DATA` (RFC 2920), then the content and the final dot after the 354, and records
 * the latency from writing MAIL to reading the final reply.
 *
 * Any reply other than the expected 250/250/354/250, a closed connection, or a run longer
 * than its deadline fails the run: the bench never reports numbers for messages that were
 * not accepted. It does not retry, and it does not speak TLS or AUTH.
 *
 * Protocol with the main thread: requests `{ id, op, … }`, answers `{ id, ok, result }` or
 * `{ id, ok: false, error }`; ops `open`, `message`, `run`, `close`.
 */
import net from 'node:net';
import { performance } from 'node:perf_hooks';
import { parentPort } from 'node:worker_threads';

export interface OpenRequest {
  readonly op: 'open';
  readonly target: string;
  readonly port: number;
  readonly connections: number;
}
export interface OpenResult {
  /** Per connection: ms from connect() to the 220 greeting. */
  readonly greetingMs: number[];
  /** Per connection: ms from writing EHLO to its 250. */
  readonly ehloMs: number[];
}
export interface MessageRequest {
  readonly op: 'message';
  /** The bytes to send after the 354 (dot-stuffed, with the final dot line). */
  readonly data: Uint8Array;
  /** The SIZE= parameter (the unstuffed message size). */
  readonly size: number;
  readonly recipients: number;
}
export interface RunRequest {
  readonly op: 'run';
  readonly target: string;
  /** Messages per connection. */
  readonly messages: number;
  readonly timeoutMs: number;
}
export interface RunResult {
  /** Per message: ms from writing MAIL to reading the final reply. */
  readonly latencies: Float64Array;
  /** Wall time of the whole run (all connections), ms. */
  readonly elapsedMs: number;
  /** This worker's event-loop utilisation during the run (near 1: the client is the bottleneck). */
  readonly clientElu: number;
}
export interface CloseRequest {
  readonly op: 'close';
  /** Only this target's connections (default: all). */
  readonly target?: string;
}
export type Request = OpenRequest | MessageRequest | RunRequest | CloseRequest;

/** One SMTP client connection that collects final reply lines. */
class Conn {
  private buf = '';
  private codes: number[] = [];
  private last = '';
  private want = 0;
  private settle: ((err?: Error) => void) | undefined;
  private closed = false;

  constructor(readonly socket: net.Socket) {
    socket.setNoDelay(true);
    socket.setEncoding('latin1');
    socket.on('data', (d: string) => this.onData(d));
    socket.on('error', () => undefined);
    socket.on('close', () => {
      this.closed = true;
      this.settle?.(new Error(`connection closed; last reply: ${this.last}`));
    });
  }

  private onData(d: string): void {
    this.buf += d;
    let pos = 0;
    for (;;) {
      const nl = this.buf.indexOf('\r\n', pos);
      if (nl < 0) break;
      // `250-…` continues a multi-line reply; `250 …` (or a bare code) ends it.
      if (this.buf.charCodeAt(pos + 3) !== 0x2d) {
        this.last = this.buf.slice(pos, nl);
        this.codes.push(Number(this.last.slice(0, 3)));
      }
      pos = nl + 2;
    }
    if (pos) this.buf = this.buf.slice(pos);
    if (this.settle && this.codes.length >= this.want) this.settle();
  }

  /** Resolves with the codes of the next `n` replies. */
  replies(n: number): Promise<number[]> {
    if (this.codes.length >= n) return Promise.resolve(this.codes.splice(0, n));
    if (this.closed) return Promise.reject(new Error(`connection closed; last reply: ${this.last}`));
    return new Promise((resolve, reject) => {
      this.want = n;
      this.settle = (err) => {
        this.settle = undefined;
        if (err) reject(err);
        else resolve(this.codes.splice(0, n));
      };
    });
  }

  lastReply(): string {
    return this.last;
  }
}

const pools = new Map<string, Conn[]>();
let message: { data: Buffer; envelope: Buffer; replies: number; expected: number[] } | undefined;

function expectCodes(got: number[], want: readonly number[], conn: Conn, what: string): void {
  for (let i = 0; i < want.length; i++) {
    if (got[i] !== want[i]) throw new Error(`${what}: expected ${want.join('/')}, got ${got.join('/')} (last reply: ${conn.lastReply()})`);
  }
}

async function open(req: OpenRequest): Promise<OpenResult> {
  const conns: Conn[] = [];
  const greetingMs: number[] = [];
  const ehloMs: number[] = [];
  await Promise.all(
    Array.from({ length: req.connections }, async (_, i) => {
      const t0 = performance.now();
      const socket = net.connect(req.port, '127.0.0.1');
      await new Promise<void>((resolve, reject) => {
        socket.once('connect', resolve);
        socket.once('error', reject);
      });
      const c = new Conn(socket);
      expectCodes(await c.replies(1), [220], c, 'greeting');
      const t1 = performance.now();
      socket.write(`EHLO client${i}.bench.test\r\n`);
      expectCodes(await c.replies(1), [250], c, 'EHLO');
      greetingMs[i] = t1 - t0;
      ehloMs[i] = performance.now() - t1;
      conns[i] = c;
    }),
  );
  pools.set(req.target, conns);
  return { greetingMs, ehloMs };
}

function setMessage(req: MessageRequest): void {
  const rcpts = Array.from({ length: req.recipients }, (_, i) => `RCPT TO:<${i === 0 ? 'bob' : `user${i}`}@example.test>\r\n`).join('');
  message = {
    data: Buffer.from(req.data.buffer, req.data.byteOffset, req.data.byteLength),
    envelope: Buffer.from(`MAIL FROM:<alice@sender.example> SIZE=${req.size}\r\n${rcpts}DATA\r\n`, 'latin1'),
    replies: req.recipients + 2,
    expected: [250, ...Array.from({ length: req.recipients }, () => 250), 354],
  };
}

async function run(req: RunRequest): Promise<RunResult> {
  const conns = pools.get(req.target);
  const m = message;
  if (!conns) throw new Error(`no connections to ${req.target}`);
  if (!m) throw new Error('no message set');
  const latencies = new Float64Array(conns.length * req.messages);
  const elu0 = performance.eventLoopUtilization();
  const t0 = performance.now();
  let timer: NodeJS.Timeout | undefined;
  const deadline = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`run on ${req.target} did not finish within ${req.timeoutMs} ms`)), req.timeoutMs);
  });
  const work = Promise.all(
    conns.map(async (c, ci) => {
      for (let i = 0; i < req.messages; i++) {
        const start = performance.now();
        c.socket.write(m.envelope);
        expectCodes(await c.replies(m.replies), m.expected, c, `${req.target} MAIL/RCPT/DATA`);
        c.socket.write(m.data);
        expectCodes(await c.replies(1), [250], c, `${req.target} end of DATA`);
        latencies[ci * req.messages + i] = performance.now() - start;
      }
    }),
  );
  try {
    await Promise.race([work, deadline]);
  } finally {
    clearTimeout(timer);
  }
  const elapsedMs = performance.now() - t0;
  const clientElu = performance.eventLoopUtilization(elu0).utilization;
  return { latencies, elapsedMs, clientElu };
}

async function closeAll(target?: string): Promise<void> {
  const all = target === undefined ? [...pools.values()].flat() : (pools.get(target) ?? []);
  if (target === undefined) pools.clear();
  else pools.delete(target);
  await Promise.all(
    all.map(
      (c) =>
        new Promise<void>((resolve) => {
          const t = setTimeout(() => {
            c.socket.destroy();
            resolve();
          }, 2000);
          c.socket.once('close', () => {
            clearTimeout(t);
            resolve();
          });
          c.socket.end('QUIT\r\n');
        }),
    ),
  );
}

async function handle(req: Request): Promise<unknown> {
  switch (req.op) {
    case 'open':
      return open(req);
    case 'message':
      setMessage(req);
      return undefined;
    case 'run':
      return run(req);
    case 'close':
      return closeAll(req.target);
  }
}

const port = parentPort;
if (port) {
  port.on('message', (msg: Request & { id: number }) => {
    handle(msg).then(
      (result) => {
        const transfer = result && typeof result === 'object' && 'latencies' in result ? [(result as RunResult).latencies.buffer as ArrayBuffer] : [];
        port.postMessage({ id: msg.id, ok: true, result }, transfer);
      },
      (err: unknown) => port.postMessage({ id: msg.id, ok: false, error: err instanceof Error ? err.message : String(err) }),
    );
  });
}
