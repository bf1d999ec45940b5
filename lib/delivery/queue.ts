/**
 * The durable deferred queue: where the gateway puts a message whose recipients did not all
 * end alike, so the client can be told 250 while some recipients are still to be delivered
 * (issue 5, item 3). It keeps the message and its per-recipient state on disk, retries the
 * deferred recipients with Postfix's backoff until a maximal lifetime, and reports failures
 * (and, if asked, delays and successes) to the sender as RFC 3464 DSNs (./dsn.ts), which are
 * queued and retried like any message, through the `bounce` transport.
 *
 * On disk (see docs/queue.md): `<dir>/tmp/` holds files being written; `<dir>/active/<id>` is
 * a message (its bytes as received, CRLF) and `<dir>/active/<id>.json` its envelope and
 * state. A message is written to tmp/, fsynced, hard-linked into active/ (never replacing
 * another), and the directory is fsynced; then the envelope is written the same way and
 * renamed into place. The envelope file is the commit record: a message file without one
 * was never acknowledged and is deleted at start, as is everything in tmp/. State changes
 * write a new envelope file and rename it over the old one (fsync file, rename, fsync dir).
 *
 * With `lock: true` (the CLI always sets it) the directory is locked against a second process:
 * `<dir>/lock` holds the pid of the holder, created atomically (a temp file hard-linked into
 * place); a lock whose pid is no longer alive (or is our own pid but not held by a queue of
 * this process: a pid reused after a restart) is stale and taken over. Without it, one
 * queue per directory is the caller's business.
 *
 * Delivery is at least once: a crash between a transport's answer and the envelope update
 * repeats that delivery after restart (a duplicate, never a loss).
 *
 * The retry loop keeps the entries on a min-heap by the time each next wants work (its next
 * attempt, its delay notice, or now), so finding what is due costs O(log n) per event, not a
 * scan of the whole queue (a backlog of thousands for a dead destination stays cheap).
 *
 * It deliberately does not: route (every retry goes to `transport`, every DSN to `bounce`:
 * give it a routes() table), rate-limit per destination (smtp() has per-destination
 * concurrency and dead destinations), keep a separate "deferred" directory (active/ holds every entry; the due time is
 * in the envelope), or close the transports it was given (their owner does).
 */
import diagnostics_channel from 'node:diagnostics_channel';
import { createReadStream } from 'node:fs';
import { link, mkdir, open, readdir, readFile, rename, stat, unlink } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import type { Readable } from 'node:stream';
import { channels, type DeliveryEvent } from '../diagnostics.js';
import { transportOf } from './routes.js';
import { DovetailError, ErrorCodes } from '../errors.js';
import type { EnvelopeAddress } from '../milter/types.js';
import { smtpReply, type SmtpReply } from '../milter/verdict.js';
import { newQueueId } from '../message/ids.js';
import { buildDsn, headerBlock, notifyOf, retOf, type DsnAction, type DsnRecipient } from './dsn.js';
import type { DeferredQueue, DeliveryEnvelope, DeliveryStatus, MessageSource, RecipientResult, Transport } from './types.js';
import { syncDir, writeFileDurably } from './durable.js';

/** Diagnostics channels of the queue (the library never prints; subscribe to log). */
export const QueueChannels = {
  /** An entry was written: `{ queueId, kind, of?, sender, recipients: [{ address, status }] }`. */
  queued: 'dovetail:queue:queued',
  /** A delivery attempt ended: `{ queueId, kind, attempt, results, nextAttempt? }`. */
  attempt: 'dovetail:queue:attempt',
  /** A DSN was queued: `{ queueId (of the DSN), of, to, actions, recipients }`. */
  dsn: 'dovetail:queue:dsn',
  /**
   * A report that will never be sent: `{ queueId, recipients, reason }`, reason
   * `null-sender` (the message had the sender `<>`) or `dsn-undeliverable` (a DSN itself
   * failed or expired: a bounce is never bounced).
   */
  dropped: 'dovetail:queue:dropped',
  /** An entry left the queue: `{ queueId, reason: 'done' | 'removed' | 'rolled-back' }`. */
  removed: 'dovetail:queue:removed',
  /** start() loaded the queue: `{ entries, tmpRemoved, orphansRemoved, corrupt }`. */
  loaded: 'dovetail:queue:loaded',
} as const;

const queueChannels = {
  queued: diagnostics_channel.channel(QueueChannels.queued),
  attempt: diagnostics_channel.channel(QueueChannels.attempt),
  dsn: diagnostics_channel.channel(QueueChannels.dsn),
  dropped: diagnostics_channel.channel(QueueChannels.dropped),
  removed: diagnostics_channel.channel(QueueChannels.removed),
  loaded: diagnostics_channel.channel(QueueChannels.loaded),
};

/** Options of {@link createQueue}. All times are in milliseconds. */
export interface QueueOptions {
  /** The queue directory; created (with tmp/ and active/) at start() or the first call. */
  readonly dir: string;
  /**
   * Lock the directory against other processes (`<dir>/lock` with our pid) when the queue
   * first touches it; released by close(). A directory locked by another live process makes
   * start() (and every other call) reject with `DOVETAIL_ERR_QUEUE_LOCKED`; a stale lock (its
   * process is gone) is taken over. Default false.
   */
  readonly lock?: boolean;
  /** Where retries of deferred recipients go (e.g. the gateway's own lmtp()). */
  readonly transport: Transport;
  /** Where DSNs go, addressed to the original sender (e.g. a smarthost). Default: `transport`. */
  readonly bounce?: Transport;
  /** Reporting-MTA and From of DSNs. Default os.hostname(). */
  readonly hostname?: string;
  /**
   * Time between attempts: `min` after the first, doubling up to `max` (Postfix
   * minimal_backoff_time 300 s, maximal_backoff_time 4000 s). Default { min: 300 000, max: 4 000 000 }.
   */
  readonly backoff?: { readonly min?: number; readonly max?: number };
  /** How long a message is retried before its recipients fail (Postfix maximal_queue_lifetime). Default 5 days. */
  readonly maxLifetime?: number;
  /** The same for DSNs, after which they are dropped (Postfix bounce_queue_lifetime). Default 5 days. */
  readonly bounceLifetime?: number;
  /**
   * Send one `Action: delayed` DSN per recipient still deferred this long after arrival
   * (Postfix delay_warning_time). Default 0: never.
   */
  readonly delayWarning?: number;
  /** The largest message returned whole in a DSN; larger ones return their headers (Postfix bounce_size_limit). Default 50 000 bytes. */
  readonly bounceSizeLimit?: number;
  /** Entries delivered at the same time. Default 10. */
  readonly concurrency?: number;
  /** The longest the retry loop sleeps before looking again. Default 60 000. */
  readonly scanInterval?: number;
  /** The time now, ms since the epoch. Default Date.now. */
  readonly clock?: () => number;
  /**
   * `false` makes a queue that only writes: defer() commits entries (and the DSNs they
   * need) durably, exactly as a delivering queue does, then hands each one on through
   * `onCommitted` and forgets it; it never recovers, retries or lists. This is what a
   * gateway worker runs when one process per core shares a queue directory: only the
   * delivering queue (in the primary, which {@link DeliveryQueue.adopt}s what workers
   * commit) delivers, so no entry is ever attempted by two processes. Postfix's smtpd and
   * qmgr split the same way. Default true.
   */
  readonly deliver?: boolean;
  /** With `deliver: false`: called with each committed entry's queue id (a message or a DSN), once it is complete on disk. */
  readonly onCommitted?: (queueId: string) => void;
  /**
   * A delivering queue looks in the directory this often for entries that another
   * process committed and that were never {@link DeliveryQueue.adopt}ed (say, its worker
   * died between the commit and the notice); it takes those older than `adoptAfter`.
   * Default 60 000; 0 turns the scan off.
   */
  readonly adoptScanInterval?: number;
  /** How old (by its envelope's mtime) another process's entry must be before the scan takes it. Default 30 000. */
  readonly adoptAfter?: number;
}

/** One recipient of a queue entry, as list() shows it. */
export interface QueuedRecipient {
  readonly address: string;
  readonly args: Readonly<Record<string, string | true>>;
  /** `deferred` is still to be tried; `delivered` and `failed` are final. */
  readonly status: DeliveryStatus;
  /** Delivery attempts for this recipient, the gateway's own included. */
  readonly attempts: number;
  /** When it is tried next (deferred recipients only). */
  readonly nextAttempt: Date | undefined;
  /** The last reply for this recipient. */
  readonly lastReply: SmtpReply | undefined;
  /** True when it failed because the message outlived maxLifetime. */
  readonly expired: boolean;
}

/** A queue entry, as list() shows it. */
export interface QueueEntry {
  readonly queueId: string;
  /** `message`: a deferred message; `dsn`: a delivery status notification to a sender. */
  readonly kind: 'message' | 'dsn';
  /** For a DSN: the queue id of the message it reports on. */
  readonly of: string | undefined;
  readonly sender: EnvelopeAddress;
  readonly arrival: Date;
  readonly size: number;
  readonly attempts: number;
  readonly lastAttempt: Date | undefined;
  readonly nextAttempt: Date | undefined;
  readonly lastReply: SmtpReply | undefined;
  readonly recipients: readonly QueuedRecipient[];
  /** True while a delivery attempt runs. */
  readonly inFlight: boolean;
}

/** The durable deferred queue (give it to the gateway as `queue`). */
export interface DeliveryQueue extends DeferredQueue {
  /** The queue directory (absolute). */
  readonly dir: string;
  /**
   * Makes the message and its per-recipient state durable, queues DSNs for the `failed`
   * recipients, and resolves; rejects when any of that could not be written (the gateway
   * then answers 4xx, not 250).
   */
  defer(envelope: DeliveryEnvelope, message: MessageSource, results: readonly (RecipientResult | undefined)[]): Promise<void>;
  /** Loads the queue from disk (recovering from a crash) and starts the retry loop. */
  start(): Promise<void>;
  /** Stops starting attempts (those in flight finish); start() resumes. */
  stop(): void;
  /** Stops the loop and waits for the attempts in flight; defer() rejects afterwards. */
  close(): Promise<void>;
  /** What is queued, oldest first. */
  list(): Promise<QueueEntry[]>;
  /**
   * Attempts one entry (or every entry) now, whatever its next attempt time, and resolves
   * once those attempts are done; resolves with the number of entries attempted.
   */
  retryNow(queueId?: string): Promise<number>;
  /** Deletes an entry without any DSN (postsuper -d); false when there is none. */
  remove(queueId: string): Promise<boolean>;
  /**
   * Takes on an entry another process committed to this directory (a queue with
   * `deliver: false` in a worker): reads it and schedules it. Resolves true when it was
   * taken, false when it is unknown on disk, unreadable or already known.
   */
  adopt(queueId: string): Promise<boolean>;
}

const DEFAULTS = {
  backoffMin: 300_000,
  backoffMax: 4_000_000,
  lifetime: 5 * 24 * 3600_000,
  bounceSizeLimit: 50_000,
  concurrency: 10,
  scanInterval: 60_000,
} as const;

/** Queue directories locked by queues of this process. */
const heldHere = new Set<string>();

/** The pid in a lock file, or undefined when it holds none. */
async function lockHolder(file: string): Promise<number | undefined> {
  try {
    const pid = Number((await readFile(file, 'utf8')).trim());
    return Number.isSafeInteger(pid) && pid > 0 ? pid : undefined;
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
    throw err;
  }
}

/** True while a process with this pid exists (EPERM: it exists, owned by someone else). */
function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'EPERM';
  }
}

/**
 * Who holds the lock of a queue directory: the pid of a live process other than a queue of
 * this one, or undefined (no lock, or a stale one). For the CLI, to say who holds it.
 */
export async function queueLockHolder(dir: string): Promise<number | undefined> {
  const abs = path.resolve(dir);
  const pid = await lockHolder(path.join(abs, 'lock'));
  if (pid === undefined) return undefined;
  if (pid === process.pid) return heldHere.has(abs) ? pid : undefined;
  return alive(pid) ? pid : undefined;
}

/**
 * Takes `<dir>/lock` for this process: a temp file with our pid is hard-linked into place
 * (atomic: fails when a lock exists); a stale lock is removed and the link tried again.
 * Resolves with the function that releases it.
 *
 * @throws DovetailError `DOVETAIL_ERR_QUEUE_LOCKED` when a live process holds it.
 */
async function lockQueueDir(dir: string): Promise<() => Promise<void>> {
  const file = path.join(dir, 'lock');
  const tmp = path.join(dir, `lock.${process.pid}.${Date.now()}`);
  await writeFileDurably(tmp, [Buffer.from(`${process.pid}\n`)]);
  try {
    for (let tries = 0; ; tries++) {
      try {
        await link(tmp, file);
        break;
      } catch (err) {
        if ((err as NodeJS.ErrnoException).code !== 'EEXIST') throw err;
        const holder = await queueLockHolder(dir);
        if (holder !== undefined || tries >= 3) {
          throw new DovetailError(ErrorCodes.QUEUE_LOCKED, `the queue directory ${dir} is locked by process ${holder ?? '(unknown)'} (${file})`);
        }
        // Stale: its process is gone. Remove it and try again.
        await unlinkIfThere(file);
      }
    }
  } finally {
    await unlinkIfThere(tmp);
  }
  heldHere.add(dir);
  await syncDir(dir);
  return async () => {
    heldHere.delete(dir);
    if ((await lockHolder(file)) === process.pid) await unlinkIfThere(file);
  };
}

/** The most header bytes read back for a DSN. */
const MAX_HEADER_BYTES = 1024 * 1024;
const LOCAL_ERROR = smtpReply(451, '4.3.0', 'Error: queue delivery failed, will retry');

// ---- what is stored ---------------------------------------------------------------------

interface StoredReply {
  code: number;
  enhanced: string;
  lines: string[];
}

interface StoredRecipient {
  address: string;
  args: Record<string, string | true>;
  status: DeliveryStatus;
  attempts: number;
  reply: StoredReply | null;
  expired?: boolean;
  /** DSN actions already queued (or decided against) for this recipient. */
  reported: DsnAction[];
}

/** The envelope file `<id>.json`. */
interface StoredEntry {
  version: 1;
  id: string;
  kind: 'message' | 'dsn';
  of?: string;
  sender: { address: string; args: Record<string, string | true> };
  arrival: number;
  size: number;
  attempts: number;
  lastAttempt: number | null;
  nextAttempt: number;
  lastReply: StoredReply | null;
  recipients: StoredRecipient[];
}

interface Entry {
  stored: StoredEntry;
  flight: Promise<void> | undefined;
  removed: boolean;
  /** Bumped each time the entry is put on the schedule: older heap items of it are stale. */
  version?: number;
}

/** One place on the schedule: look at `entry` at `due` (ms), if `version` is still its latest. */
interface Slot {
  readonly due: number;
  readonly entry: Entry;
  readonly version: number;
}

/** A binary min-heap of slots by due time: the retry loop finds the next due entry in O(log n), not by scanning every entry. */
class DueHeap {
  private readonly items: Slot[] = [];

  get size(): number {
    return this.items.length;
  }

  peek(): Slot | undefined {
    return this.items[0];
  }

  push(slot: Slot): void {
    const a = this.items;
    a.push(slot);
    let i = a.length - 1;
    while (i > 0) {
      const parent = (i - 1) >> 1;
      if (a[parent]!.due <= a[i]!.due) break;
      [a[parent], a[i]] = [a[i]!, a[parent]!];
      i = parent;
    }
  }

  pop(): Slot | undefined {
    const a = this.items;
    const top = a[0];
    const last = a.pop();
    if (a.length > 0 && last) {
      a[0] = last;
      let i = 0;
      for (;;) {
        const l = 2 * i + 1;
        const r = l + 1;
        let m = i;
        if (l < a.length && a[l]!.due < a[m]!.due) m = l;
        if (r < a.length && a[r]!.due < a[m]!.due) m = r;
        if (m === i) break;
        [a[m], a[i]] = [a[i]!, a[m]!];
        i = m;
      }
    }
    return top;
  }

  clear(): void {
    this.items.length = 0;
  }
}

const QUEUE_ID = /^[0-9A-Za-z]{1,64}$/;

function storeReply(r: SmtpReply): StoredReply {
  return { code: r.code, enhanced: r.enhanced, lines: [...r.lines] };
}

function loadReply(r: StoredReply | null): SmtpReply | undefined {
  return r ? Object.freeze({ code: r.code, enhanced: r.enhanced, lines: Object.freeze([...r.lines]) }) : undefined;
}

function isArgs(v: unknown): v is Record<string, string | true> {
  return typeof v === 'object' && v !== null && Object.values(v).every((x) => typeof x === 'string' || x === true);
}

function isReply(v: unknown): v is StoredReply | null {
  if (v === null) return true;
  const r = v as StoredReply;
  return typeof r === 'object' && Number.isInteger(r.code) && typeof r.enhanced === 'string' && Array.isArray(r.lines) && r.lines.every((l) => typeof l === 'string');
}

/** Parses and checks an envelope file; undefined when it is not one. */
function parseStored(text: string, id: string): StoredEntry | undefined {
  let v: StoredEntry;
  try {
    v = JSON.parse(text) as StoredEntry;
  } catch {
    return undefined;
  }
  const statuses: string[] = ['delivered', 'deferred', 'failed'];
  const ok =
    typeof v === 'object' &&
    v !== null &&
    v.version === 1 &&
    v.id === id &&
    (v.kind === 'message' || v.kind === 'dsn') &&
    typeof v.sender?.address === 'string' &&
    isArgs(v.sender.args) &&
    [v.arrival, v.size, v.attempts, v.nextAttempt].every((n) => typeof n === 'number' && Number.isFinite(n)) &&
    (v.lastAttempt === null || typeof v.lastAttempt === 'number') &&
    isReply(v.lastReply) &&
    Array.isArray(v.recipients) &&
    v.recipients.every(
      (r) =>
        typeof r?.address === 'string' &&
        isArgs(r.args) &&
        statuses.includes(r.status) &&
        typeof r.attempts === 'number' &&
        isReply(r.reply) &&
        Array.isArray(r.reported),
    );
  return ok ? v : undefined;
}

// ---- small file helpers -----------------------------------------------------------------

function errno(err: unknown): string | undefined {
  const code = typeof err === 'object' && err !== null ? (err as { code?: unknown }).code : undefined;
  return typeof code === 'string' ? code : undefined;
}



/** Writes a new file exclusively (0600), fsyncs and closes it; removes it on any failure. Returns the bytes written. */
function writeEntryFile(file: string, content: Buffer | (() => Readable)): Promise<number> {
  return writeFileDurably(file, Buffer.isBuffer(content) ? [content] : bytesOf(content()));
}

/** The stream's chunks as Buffers; the stream is destroyed however the iteration ends. */
async function* bytesOf(stream: Readable): AsyncGenerator<Buffer> {
  try {
    for await (const chunk of stream as AsyncIterable<unknown>) {
      yield typeof chunk === 'string' ? Buffer.from(chunk, 'utf8') : Buffer.isBuffer(chunk) ? chunk : Buffer.from(chunk as Uint8Array);
    }
  } finally {
    stream.destroy();
  }
}

async function unlinkIfThere(file: string): Promise<void> {
  try {
    await unlink(file);
  } catch (err) {
    if (errno(err) !== 'ENOENT') throw err;
  }
}

/** Reads up to `max` bytes from the start of a file. */
async function readHead(file: string, max: number): Promise<Buffer> {
  const fh = await open(file, 'r');
  try {
    const buf = Buffer.alloc(max);
    let got = 0;
    while (got < max) {
      const { bytesRead } = await fh.read(buf, got, max - got, got);
      if (bytesRead === 0) break;
      got += bytesRead;
    }
    return buf.subarray(0, got);
  } finally {
    await fh.close();
  }
}

class IdTaken extends Error {}

function bad(why: string): never {
  throw new DovetailError(ErrorCodes.INVALID_OPTIONS, `createQueue(): ${why}`);
}

function checkOptions(o: QueueOptions): void {
  if (typeof o !== 'object' || o === null) bad('needs an options object');
  if (typeof o.dir !== 'string' || o.dir === '' || o.dir.includes('\0')) bad('dir must be a non-empty path');
  if (typeof o.transport?.deliver !== 'function') bad('transport must be a transport');
  if (o.bounce !== undefined && typeof o.bounce.deliver !== 'function') bad('bounce must be a transport');
  if (o.hostname !== undefined && (typeof o.hostname !== 'string' || !/^[^\s\x00-\x1f\x7f]+$/.test(o.hostname))) bad('hostname must be a host name');
  if (o.clock !== undefined && typeof o.clock !== 'function') bad('clock must be a function');
  const ms = (name: string, v: unknown, min: number): void => {
    if (v !== undefined && !(typeof v === 'number' && Number.isSafeInteger(v) && v >= min)) bad(`${name} must be an integer >= ${min}`);
  };
  ms('backoff.min', o.backoff?.min, 1);
  ms('backoff.max', o.backoff?.max, 1);
  if ((o.backoff?.max ?? DEFAULTS.backoffMax) < (o.backoff?.min ?? DEFAULTS.backoffMin)) bad('backoff.max must not be below backoff.min');
  ms('maxLifetime', o.maxLifetime, 0);
  ms('bounceLifetime', o.bounceLifetime, 0);
  ms('delayWarning', o.delayWarning, 0);
  ms('bounceSizeLimit', o.bounceSizeLimit, 0);
  ms('concurrency', o.concurrency, 1);
  ms('scanInterval', o.scanInterval, 1);
  ms('adoptScanInterval', o.adoptScanInterval, 0);
  ms('adoptAfter', o.adoptAfter, 0);
  if (o.deliver !== undefined && typeof o.deliver !== 'boolean') bad('deliver must be a boolean');
  if (o.onCommitted !== undefined && typeof o.onCommitted !== 'function') bad('onCommitted must be a function');
}

/**
 * Creates the durable deferred queue. Pass it to createGateway({ queue }) and call start()
 * (and close() at shutdown). Every file operation that acknowledges something (defer(), a
 * state change, a DSN) is fsynced before the promise resolves.
 *
 * @throws DovetailError `DOVETAIL_ERR_INVALID_OPTIONS` when the options are malformed.
 */
export function createQueue(options: QueueOptions): DeliveryQueue {
  checkOptions(options);
  const dir = path.resolve(options.dir);
  const tmpDir = path.join(dir, 'tmp');
  const activeDir = path.join(dir, 'active');
  const corruptDir = path.join(dir, 'corrupt');
  const transport = options.transport;
  const bounce = options.bounce ?? options.transport;
  const hostname = options.hostname ?? os.hostname();
  const backoffMin = options.backoff?.min ?? DEFAULTS.backoffMin;
  const backoffMax = options.backoff?.max ?? DEFAULTS.backoffMax;
  const maxLifetime = options.maxLifetime ?? DEFAULTS.lifetime;
  const bounceLifetime = options.bounceLifetime ?? DEFAULTS.lifetime;
  const delayWarning = options.delayWarning ?? 0;
  const bounceSizeLimit = options.bounceSizeLimit ?? DEFAULTS.bounceSizeLimit;
  const concurrency = options.concurrency ?? DEFAULTS.concurrency;
  const scanInterval = options.scanInterval ?? DEFAULTS.scanInterval;
  const clock = options.clock ?? Date.now;
  const delivers = options.deliver !== false;
  const onCommitted = options.onCommitted;
  const adoptScanInterval = options.adoptScanInterval ?? 60_000;
  const adoptAfter = options.adoptAfter ?? 30_000;
  let adoptTimer: NodeJS.Timeout | undefined;

  const entries = new Map<string, Entry>();
  /** Ids whose files are being written by defer() or a DSN: start()'s recovery leaves them alone. */
  const writing = new Set<string>();
  let loading: Promise<void> | undefined;
  let running = false;
  let closed = false;
  let timer: NodeJS.Timeout | undefined;
  let active = 0;
  let tmpCounter = 0;
  let releaseLock: (() => Promise<void>) | undefined;

  const msgPath = (id: string): string => path.join(activeDir, id);
  const envPath = (id: string): string => path.join(activeDir, `${id}.json`);
  const tmpPath = (id: string, what: string): string => path.join(tmpDir, `${id}.${what}.${process.pid}.${++tmpCounter}`);

  /** Postfix-style backoff after `attempts` attempts: min, 2·min, 4·min … up to max. */
  function backoff(attempts: number): number {
    const n = Math.max(0, attempts - 1);
    return n >= 52 ? backoffMax : Math.min(backoffMax, backoffMin * 2 ** n);
  }

  const lifetimeOf = (s: StoredEntry): number => (s.kind === 'dsn' ? bounceLifetime : maxLifetime);
  const pending = (s: StoredEntry): number => s.recipients.filter((r) => r.status === 'deferred').length;

  // ---- loading and recovery -------------------------------------------------------------

  function ready(): Promise<void> {
    if (!loading) {
      // A writer never recovers: tmp/ and active/ may hold another process's files in flight.
      const p = delivers ? load() : makeDirs();
      loading = p;
      p.catch(() => {
        if (loading === p) loading = undefined;
      });
    }
    return loading;
  }

  async function makeDirs(): Promise<void> {
    await mkdir(tmpDir, { recursive: true, mode: 0o700 });
    await mkdir(activeDir, { recursive: true, mode: 0o700 });
  }

  async function load(): Promise<void> {
    await makeDirs();
    const owned = (name: string): boolean => writing.has(name.split('.')[0] ?? '');
    // The lock first: recovery below removes files another live process may be writing.
    if (options.lock && !releaseLock) releaseLock = await lockQueueDir(dir);
    // tmp/: half-written files of a crashed process; nothing there was acknowledged.
    let tmpRemoved = 0;
    for (const name of await readdir(tmpDir)) {
      if (owned(name)) continue;
      await unlinkIfThere(path.join(tmpDir, name));
      tmpRemoved++;
    }
    const names = new Set(await readdir(activeDir));
    let orphansRemoved = 0;
    let corrupt = 0;
    const loaded: Entry[] = [];
    for (const name of names) {
      if (name.endsWith('.json')) {
        const id = name.slice(0, -5);
        if (entries.has(id) || writing.has(id)) continue;
        const stored = parseStored(await readFile(path.join(activeDir, name), 'utf8'), id);
        if (!stored || !names.has(id)) {
          // Cannot be delivered: keep it aside for a person to look at, and say so.
          await mkdir(corruptDir, { recursive: true, mode: 0o700 });
          await rename(path.join(activeDir, name), path.join(corruptDir, name));
          if (names.has(id)) await rename(msgPath(id), path.join(corruptDir, id));
          corrupt++;
          channels.error.publish({
            queueId: id,
            error: new DovetailError(ErrorCodes.DELIVERY_FAILED, `queue entry ${id} is ${stored ? 'missing its message' : 'unreadable'}; moved to ${corruptDir}`),
          });
          continue;
        }
        loaded.push({ stored, flight: undefined, removed: false });
      } else if (!names.has(`${name}.json`) && !entries.has(name) && !writing.has(name)) {
        // A message whose envelope was never committed: never acknowledged (or already done).
        await unlinkIfThere(path.join(activeDir, name));
        orphansRemoved++;
      }
    }
    if (tmpRemoved + orphansRemoved + corrupt > 0) await syncDir(activeDir);
    loaded.sort((a, b) => a.stored.arrival - b.stored.arrival);
    for (const e of loaded) {
      entries.set(e.stored.id, e);
      enqueue(e);
    }
    queueChannels.loaded.publish({ entries: loaded.length, tmpRemoved, orphansRemoved, corrupt });
  }

  // ---- writing entries --------------------------------------------------------------------

  async function writeEnvelope(stored: StoredEntry): Promise<void> {
    const tmp = tmpPath(stored.id, 'json');
    await writeEntryFile(tmp, Buffer.from(JSON.stringify(stored, null, 1) + '\n', 'utf8'));
    try {
      await rename(tmp, envPath(stored.id));
    } catch (err) {
      await unlinkIfThere(tmp).catch(() => {});
      throw err;
    }
    await syncDir(activeDir);
  }

  /**
   * Commits a new entry: the message into active/<id> (link, so an existing entry is never
   * replaced), then its envelope. Throws IdTaken when the id is in use.
   */
  async function writeNew(stored: StoredEntry, content: Buffer | (() => Readable), expectedSize: number): Promise<void> {
    const id = stored.id;
    const tmp = path.join(tmpDir, id);
    let size: number;
    try {
      size = await writeEntryFile(tmp, content);
    } catch (err) {
      if (errno(err) === 'EEXIST') throw new IdTaken();
      throw err;
    }
    try {
      if (size !== expectedSize) {
        throw new DovetailError(ErrorCodes.DELIVERY_FAILED, `the message stream gave ${size} bytes, not the announced ${expectedSize}`);
      }
      try {
        await link(tmp, msgPath(id));
      } catch (err) {
        if (errno(err) === 'EEXIST') throw new IdTaken();
        throw err;
      }
    } finally {
      await unlinkIfThere(tmp).catch(() => {});
    }
    try {
      await syncDir(activeDir);
      await writeEnvelope(stored);
    } catch (err) {
      await unlinkIfThere(msgPath(id)).catch(() => {});
      throw err;
    }
  }

  /** Writes a new entry under `preferred` if it is free, else under a fresh id; returns the entry. */
  async function commitNew(preferred: string | undefined, make: (id: string) => StoredEntry, content: Buffer | (() => Readable), size: number): Promise<Entry> {
    let id = preferred !== undefined && QUEUE_ID.test(preferred) ? preferred : newQueueId();
    for (let attempt = 1; ; attempt++) {
      if (!entries.has(id) && !writing.has(id)) {
        writing.add(id);
        const stored = make(id);
        try {
          await writeNew(stored, content, size);
          const entry: Entry = { stored, flight: undefined, removed: false };
          if (delivers) {
            entries.set(id, entry);
            enqueue(entry);
          }
          queueChannels.queued.publish({
            queueId: id,
            kind: stored.kind,
            ...(stored.of !== undefined ? { of: stored.of } : {}),
            sender: stored.sender.address,
            recipients: stored.recipients.map((r) => ({ address: r.address, status: r.status })),
          });
          return entry;
        } catch (err) {
          if (!(err instanceof IdTaken) || attempt >= 5) throw err instanceof IdTaken ? new DovetailError(ErrorCodes.DELIVERY_FAILED, 'no free queue id') : err;
        } finally {
          writing.delete(id);
        }
      }
      id = newQueueId();
    }
  }

  /** Removes an entry's files: the envelope first (the commit record), then the message. */
  async function dropFiles(id: string): Promise<void> {
    await unlinkIfThere(envPath(id));
    await syncDir(activeDir);
    await unlinkIfThere(msgPath(id));
  }

  // ---- DSNs -------------------------------------------------------------------------------

  /** The DSN actions a recipient still needs, given the state and the time. */
  function needed(s: StoredEntry, r: StoredRecipient, now: number): DsnAction | undefined {
    const notify = notifyOf(r.args);
    if (r.status === 'failed' && !r.reported.includes('failed')) return notify.failure ? 'failed' : undefined;
    if (r.status === 'delivered' && !r.reported.includes('delivered')) return notify.success ? 'delivered' : undefined;
    if (
      r.status === 'deferred' &&
      delayWarning > 0 &&
      now - s.arrival >= delayWarning &&
      notify.delay &&
      !r.reported.includes('delayed') &&
      !r.reported.includes('failed')
    ) {
      return 'delayed';
    }
    return undefined;
  }

  const needsReport = (s: StoredEntry, now: number): boolean => s.recipients.some((r) => needed(s, r, now) !== undefined);

  /**
   * Queues the DSN an entry needs (one message for all its recipients to report), durably,
   * then records that in the entry's envelope. For the null sender, and for a DSN itself,
   * nothing is sent and the drop is published instead.
   */
  async function report(entry: Entry): Promise<void> {
    const s = entry.stored;
    const now = clock();
    const due = s.recipients.map((r) => needed(s, r, now));
    if (due.every((a) => a === undefined)) return;
    const next: StoredEntry = structuredClone(s);
    const reporting = next.recipients.flatMap((r, i) => {
      const action = due[i];
      if (action === undefined) return [];
      r.reported.push(action);
      return [{ r, action }];
    });
    if (s.kind === 'dsn' || s.sender.address === '') {
      const failed = reporting.filter((x) => x.action === 'failed');
      if (failed.length > 0) {
        queueChannels.dropped.publish({
          queueId: s.id,
          recipients: failed.map(({ r }) => ({ address: r.address, reply: loadReply(r.reply) })),
          reason: s.kind === 'dsn' ? 'dsn-undeliverable' : 'null-sender',
        });
      }
    } else {
      const recipients: DsnRecipient[] = reporting.map(({ r, action }) => ({
        address: r.address,
        args: r.args,
        action,
        reply: loadReply(r.reply) ?? LOCAL_ERROR,
        ...(s.lastAttempt !== null ? { lastAttempt: s.lastAttempt } : {}),
        ...(action === 'delayed' ? { willRetryUntil: s.arrival + maxLifetime } : {}),
        ...(r.expired ? { expired: true } : {}),
      }));
      const ret = retOf(s.sender.args);
      const wantFull = ret === 'FULL' || (ret === undefined && recipients.some((r) => r.action === 'failed'));
      const whole = wantFull && s.size <= bounceSizeLimit;
      const head = await readHead(msgPath(s.id), whole ? s.size : Math.min(s.size, MAX_HEADER_BYTES));
      const dsn = buildDsn({
        reportingMta: hostname,
        queueId: s.id,
        sender: s.sender,
        arrival: s.arrival,
        date: now,
        recipients,
        headers: headerBlock(head),
        ...(whole ? { full: head } : {}),
      });
      const dsnEntry = await commitNew(
        undefined,
        (id) => ({
          version: 1,
          id,
          kind: 'dsn',
          of: s.id,
          sender: { address: '', args: {} },
          arrival: now,
          size: dsn.length,
          attempts: 0,
          lastAttempt: null,
          nextAttempt: now,
          lastReply: null,
          recipients: [{ address: s.sender.address, args: {}, status: 'deferred', attempts: 0, reply: null, reported: [] }],
        }),
        dsn,
        dsn.length,
      );
      queueChannels.dsn.publish({
        queueId: dsnEntry.stored.id,
        of: s.id,
        to: s.sender.address,
        actions: [...new Set(recipients.map((r) => r.action))],
        recipients: recipients.map((r) => r.address),
      });
      if (!delivers) onCommitted?.(dsnEntry.stored.id);
    }
    await writeEnvelope(next);
    entry.stored = next;
  }

  // ---- delivery attempts ------------------------------------------------------------------

  async function attempt(entry: Entry): Promise<void> {
    const s = entry.stored;
    const indexes = s.recipients.flatMap((r, i) => (r.status === 'deferred' ? [i] : []));
    const envelope: DeliveryEnvelope = {
      queueId: s.id,
      sender: { address: s.sender.address, args: s.sender.args },
      recipients: indexes.map((i) => ({ address: s.recipients[i]!.address, args: s.recipients[i]!.args })),
    };
    const source: MessageSource = { size: s.size, stream: () => createReadStream(msgPath(s.id)) };
    const via = s.kind === 'dsn' ? bounce : transport;
    const t0 = channels.delivery.hasSubscribers ? performance.now() : undefined;
    let results: readonly RecipientResult[];
    try {
      results = await via.deliver(envelope, source);
      if (!Array.isArray(results) || results.length !== indexes.length) {
        throw new DovetailError(ErrorCodes.DELIVERY_FAILED, `transport ${via.name} returned ${Array.isArray(results) ? results.length : 'no'} results for ${indexes.length} recipients`);
      }
    } catch (error) {
      channels.error.publish({ queueId: s.id, error });
      results = indexes.map((i) => ({ recipient: s.recipients[i]!.address, status: 'deferred', reply: LOCAL_ERROR }));
    }
    const now = clock();
    const next: StoredEntry = structuredClone(s);
    next.attempts++;
    next.lastAttempt = now;
    const expired = now - s.arrival >= lifetimeOf(s);
    indexes.forEach((i, k) => {
      const res = results[k];
      const r = next.recipients[i]!;
      r.attempts++;
      const status: DeliveryStatus = res && (res.status === 'delivered' || res.status === 'failed') ? res.status : 'deferred';
      const reply = res && typeof res.reply?.code === 'number' ? res.reply : LOCAL_ERROR;
      r.reply = storeReply(reply);
      if (status !== 'delivered') next.lastReply = storeReply(reply);
      if (status === 'deferred' && expired) {
        r.status = 'failed';
        r.expired = true;
      } else {
        r.status = status;
      }
    });
    next.nextAttempt = now + backoff(next.attempts);
    // An entry this attempt finished (nothing pending, nothing to report) is removed next, so
    // its state is not written first: a crash in between repeats the delivery (at least
    // once, as anywhere else), and the common outbound case saves an fsynced file per message.
    if (pending(next) > 0 || needsReport(next, now)) await writeEnvelope(next);
    entry.stored = next;
    queueChannels.attempt.publish({
      queueId: s.id,
      kind: s.kind,
      attempt: next.attempts,
      results: indexes.map((i) => ({ address: next.recipients[i]!.address, status: next.recipients[i]!.status, reply: loadReply(next.recipients[i]!.reply), expired: next.recipients[i]!.expired === true })),
      ...(pending(next) > 0 ? { nextAttempt: next.nextAttempt } : {}),
    });
    if (t0 !== undefined && channels.delivery.hasSubscribers) {
      channels.delivery.publish({
        queueId: s.id,
        sessionId: undefined,
        source: 'queue',
        kind: s.kind,
        attempt: next.attempts,
        transport: via.name,
        results: indexes.map((i, k) => {
          const r = next.recipients[i]!;
          const relay = results[k]?.relay;
          return {
            recipient: r.address,
            status: r.status,
            reply: loadReply(r.reply) ?? LOCAL_ERROR,
            transport: transportOf(via, r.address),
            ...(typeof relay === 'string' ? { relay } : {}),
            ...(r.expired ? { expired: true } : {}),
          };
        }),
        arrival: s.arrival,
        durationMs: performance.now() - t0,
        ...(pending(next) > 0 ? { nextAttempt: next.nextAttempt } : {}),
      } satisfies DeliveryEvent);
    }
  }

  /** Everything an entry needs now: pending reports, an attempt if due (or forced), removal when done. */
  async function work(entry: Entry, force: boolean): Promise<void> {
    if (entry.removed) return;
    await report(entry);
    if (pending(entry.stored) > 0 && (force || entry.stored.nextAttempt <= clock())) {
      await attempt(entry);
      await report(entry);
    }
    if (pending(entry.stored) === 0 && !entry.removed) {
      await dropFiles(entry.stored.id);
      entries.delete(entry.stored.id);
      queueChannels.removed.publish({ queueId: entry.stored.id, reason: 'done' });
    }
  }

  function launch(entry: Entry, force: boolean): Promise<void> {
    active++;
    const flight = work(entry, force)
      .catch((error: unknown) => {
        // A file operation failed (disk full …): the entry keeps its last durable state
        // and is looked at again after the minimal backoff.
        channels.error.publish({ queueId: entry.stored.id, error });
        entry.stored = { ...entry.stored, nextAttempt: clock() + backoffMin };
      })
      .finally(() => {
        active--;
        if (entry.flight === flight) entry.flight = undefined;
        if (entries.get(entry.stored.id) === entry) enqueue(entry);
        schedule();
      });
    entry.flight = flight;
    return flight;
  }

  const wantsWork = (e: Entry, now: number): boolean =>
    !e.flight && !e.removed && (pending(e.stored) === 0 || e.stored.nextAttempt <= now || needsReport(e.stored, now));

  /**
   * When an entry next wants work: at once when it is finished or has a failure or success
   * to report; otherwise its next attempt, or earlier the time its delay notice falls due
   * (only while one is still to be sent: an entry past its notice does not come round again).
   */
  function dueAt(s: StoredEntry): number {
    if (pending(s) === 0 || needsReport(s, s.arrival)) return 0;
    let due = s.nextAttempt;
    if (delayWarning > 0 && needsReport(s, s.arrival + delayWarning)) due = Math.min(due, s.arrival + delayWarning);
    return due;
  }

  /** The retry loop's schedule (a min-heap; an entry's older slots go stale when it is put on again). */
  const heap = new DueHeap();

  /** Puts an entry (back) on the schedule, after anything that changes when it is due. */
  function enqueue(e: Entry): void {
    if (e.removed || e.flight) return;
    e.version = (e.version ?? 0) + 1;
    heap.push({ due: dueAt(e.stored), entry: e, version: e.version });
  }

  /** The first slot that is still an entry's latest (stale ones are dropped on the way). */
  function nextSlot(): Slot | undefined {
    for (let top = heap.peek(); top; top = heap.peek()) {
      const e = top.entry;
      if (top.version === e.version && !e.removed && !e.flight && entries.get(e.stored.id) === e) return top;
      heap.pop();
    }
    return undefined;
  }

  function tick(): void {
    timer = undefined;
    if (!running) return;
    const now = clock();
    while (active < concurrency) {
      const top = nextSlot();
      if (!top || top.due > now) break;
      heap.pop();
      const e = top.entry;
      if (wantsWork(e, now)) void launch(e, false);
      else enqueue(e); // its state changed since it was put on: look again when it is due
    }
    schedule();
  }

  function schedule(): void {
    if (!running) return;
    if (timer) clearTimeout(timer);
    let wait = scanInterval;
    if (active < concurrency) {
      const top = nextSlot();
      if (top) wait = Math.min(wait, top.due - clock());
    }
    timer = setTimeout(tick, Math.max(0, wait));
  }

  function view(e: Entry): QueueEntry {
    const s = e.stored;
    const next = pending(s) > 0 ? new Date(s.nextAttempt) : undefined;
    return {
      queueId: s.id,
      kind: s.kind,
      of: s.of,
      sender: { address: s.sender.address, args: { ...s.sender.args } },
      arrival: new Date(s.arrival),
      size: s.size,
      attempts: s.attempts,
      lastAttempt: s.lastAttempt === null ? undefined : new Date(s.lastAttempt),
      nextAttempt: next,
      lastReply: loadReply(s.lastReply),
      inFlight: e.flight !== undefined,
      recipients: s.recipients.map((r) => ({
        address: r.address,
        args: { ...r.args },
        status: r.status,
        attempts: r.attempts,
        nextAttempt: r.status === 'deferred' ? next : undefined,
        lastReply: loadReply(r.reply),
        expired: r.expired === true,
      })),
    };
  }

  // ---- the API ----------------------------------------------------------------------------

  async function defer(envelope: DeliveryEnvelope, message: MessageSource, results: readonly (RecipientResult | undefined)[]): Promise<void> {
    if (closed) throw new DovetailError(ErrorCodes.DELIVERY_FAILED, 'the queue is closed');
    if (results.length !== envelope.recipients.length) {
      throw new DovetailError(ErrorCodes.DELIVERY_FAILED, `defer(): ${results.length} results for ${envelope.recipients.length} recipients`);
    }
    await ready();
    const now = clock();
    // A recipient without a result was never tried (routed outbound): it is due at once.
    const recipients: StoredRecipient[] = envelope.recipients.map((rcpt, i) => {
      const res = results[i];
      if (!res) return { address: rcpt.address, args: { ...rcpt.args }, status: 'deferred', attempts: 0, reply: null, reported: [] };
      const status: DeliveryStatus = res.status === 'delivered' || res.status === 'failed' ? res.status : 'deferred';
      return { address: rcpt.address, args: { ...rcpt.args }, status, attempts: 1, reply: storeReply(res.reply), reported: [] };
    });
    // By index: a sparse array's holes are recipients not tried too (some() would skip them).
    const untried = envelope.recipients.some((_, i) => results[i] === undefined);
    const tried = envelope.recipients.some((_, i) => results[i] !== undefined);
    const stub: StoredEntry = {
      version: 1,
      id: '',
      kind: 'message',
      sender: { address: envelope.sender.address, args: { ...envelope.sender.args } },
      arrival: now,
      size: message.size,
      attempts: tried ? 1 : 0,
      lastAttempt: tried ? now : null,
      nextAttempt: untried ? now : now + backoff(1),
      lastReply: null,
      recipients,
    };
    const worst = results.find((r) => r?.status === 'deferred') ?? results.find((r) => r?.status === 'failed');
    stub.lastReply = worst ? storeReply(worst.reply) : null;
    // Nothing to keep: every recipient delivered and none asked to hear about it.
    if (pending(stub) === 0 && !needsReport(stub, now)) return;

    const entry = await commitNew(envelope.queueId, (id) => ({ ...stub, id }), () => message.stream(), message.size);
    // The loop leaves the entry alone until its DSNs are queued.
    let settle!: () => void;
    entry.flight = new Promise<void>((resolve) => (settle = resolve));
    try {
      await report(entry);
      if (pending(entry.stored) === 0) {
        await dropFiles(entry.stored.id);
        entries.delete(entry.stored.id);
        queueChannels.removed.publish({ queueId: entry.stored.id, reason: 'done' });
      } else if (!delivers) {
        // Complete on disk (its DSNs recorded): the delivering queue may take it now.
        onCommitted?.(entry.stored.id);
      }
    } catch (err) {
      // Not acknowledged: take it back, so the client's retry does not deliver twice.
      entry.removed = true;
      entries.delete(entry.stored.id);
      await dropFiles(entry.stored.id).catch(() => {});
      queueChannels.removed.publish({ queueId: entry.stored.id, reason: 'rolled-back' });
      throw err;
    } finally {
      entry.flight = undefined;
      settle();
      if (entries.get(entry.stored.id) === entry) enqueue(entry);
      schedule();
    }
  }

  function stop(): void {
    running = false;
    if (timer) clearTimeout(timer);
    timer = undefined;
    if (adoptTimer) clearTimeout(adoptTimer);
    adoptTimer = undefined;
  }

  const writerOnly = (what: string): never => {
    throw new DovetailError(ErrorCodes.INVALID_OPTIONS, `${what}: this queue was created with deliver: false and only writes; ask the delivering queue`);
  };

  /** Reads another process's committed entry and schedules it; false when there is none or it is known. */
  async function adopt(queueId: string): Promise<boolean> {
    if (!delivers) writerOnly('adopt()');
    if (closed || !QUEUE_ID.test(queueId)) return false;
    await ready();
    if (entries.has(queueId) || writing.has(queueId)) return false;
    let text: string;
    try {
      text = await readFile(envPath(queueId), 'utf8');
      await stat(msgPath(queueId));
    } catch {
      return false; // gone already (delivered and dropped by its writer), or never complete
    }
    if (entries.has(queueId)) return false; // adopted meanwhile
    const stored = parseStored(text, queueId);
    if (!stored) return false;
    const entry: Entry = { stored, flight: undefined, removed: false };
    entries.set(queueId, entry);
    enqueue(entry);
    schedule();
    return true;
  }

  /** The safety net behind the notices: entries on disk that no one told us about. */
  async function adoptScan(): Promise<void> {
    adoptTimer = undefined;
    if (!running) return;
    try {
      const now = Date.now();
      for (const name of await readdir(activeDir)) {
        if (!name.endsWith('.json')) continue;
        const id = name.slice(0, -5);
        if (entries.has(id) || writing.has(id)) continue;
        const st = await stat(path.join(activeDir, name)).catch(() => undefined);
        if (st && now - st.mtimeMs >= adoptAfter) await adopt(id);
      }
    } catch (error) {
      channels.error.publish({ error });
    } finally {
      if (running && adoptScanInterval > 0) adoptTimer = setTimeout(() => void adoptScan(), adoptScanInterval).unref();
    }
  }

  return {
    dir,
    defer,
    async start() {
      if (closed) throw new DovetailError(ErrorCodes.DELIVERY_FAILED, 'the queue is closed');
      await ready();
      if (!delivers) return;
      running = true;
      schedule();
      if (adoptScanInterval > 0 && !adoptTimer) adoptTimer = setTimeout(() => void adoptScan(), adoptScanInterval).unref();
    },
    adopt,
    stop,
    async close() {
      closed = true;
      stop();
      for (;;) {
        const flights = [...entries.values()].flatMap((e) => (e.flight ? [e.flight] : []));
        if (flights.length === 0 && active === 0) break;
        await Promise.allSettled(flights);
        if (flights.length === 0) await new Promise((r) => setImmediate(r));
      }
      const release = releaseLock;
      releaseLock = undefined;
      await release?.();
    },
    async list() {
      if (!delivers) writerOnly('list()');
      await ready();
      return [...entries.values()].filter((e) => !e.removed).map(view);
    },
    async retryNow(queueId?: string) {
      if (!delivers) writerOnly('retryNow()');
      if (closed) throw new DovetailError(ErrorCodes.DELIVERY_FAILED, 'the queue is closed');
      await ready();
      const targets = queueId === undefined ? [...entries.values()] : [entries.get(queueId)].filter((e): e is Entry => e !== undefined);
      let attempted = 0;
      await Promise.all(
        targets.map(async (e) => {
          while (e.flight) await e.flight;
          if (e.removed || !entries.has(e.stored.id)) return;
          attempted++;
          await launch(e, true);
        }),
      );
      return attempted;
    },
    async remove(queueId: string) {
      if (!delivers) writerOnly('remove()');
      await ready();
      const e = entries.get(queueId);
      if (!e) return false;
      e.removed = true;
      while (e.flight) await e.flight;
      if (!entries.has(queueId)) return true;
      await dropFiles(queueId);
      entries.delete(queueId);
      queueChannels.removed.publish({ queueId, reason: 'removed' });
      return true;
    },
  };
}
