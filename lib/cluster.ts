/**
 * One gateway process per core (node:cluster), the way Postfix runs many smtpd processes
 * under one master: the primary owns the listening sockets (the workers share them), the
 * delivering queue and the control socket; each worker runs a gateway whose queue only
 * writes (`createQueue({ deliver: false })`) and tells the primary, through the cluster's
 * IPC channel, about every entry it committed, which the primary then
 * {@link DeliveryQueue.adopt}s. So no queue entry is ever attempted by two processes, and
 * a worker that dies takes nothing acknowledged with it: what it answered 250 is in the
 * mailstore or on disk in the queue (a notice lost with it is found by the primary's
 * adopt scan).
 *
 * The primary replaces a worker that dies (with a growing delay when one keeps dying at
 * start), restarts them one at a time on request (a new worker first, then the old one
 * drains: listeners keep accepting throughout), and drains them all at close.
 *
 * ```ts
 * import cluster from 'node:cluster';
 * if (cluster.isPrimary) {
 *   const queue = createQueue({ dir, transport });   // the delivering queue
 *   await queue.start();
 *   const pool = startWorkerPool({ workers: 2, onQueued: (id) => void queue.adopt(id) });
 *   await pool.ready();
 * } else {
 *   const worker = workerChannel();
 *   const queue = createQueue({ dir, transport, deliver: false, onCommitted: worker.queued });
 *   const gateway = createGateway({ …, queue });
 *   await gateway.listen();
 *   worker.onDrain(() => gateway.close({ sessions: 60_000 })); // clients finish, no 421
 *   worker.ready();
 * }
 * ```
 */
import cluster, { type Worker } from 'node:cluster';
import { availableParallelism } from 'node:os';
import { DovetailError, ErrorCodes } from './errors.js';

/** What the pool reports as it manages its workers (log it). */
export type WorkerPoolEvent =
  | { readonly event: 'worker-started'; readonly slot: number; readonly pid: number }
  | { readonly event: 'worker-ready'; readonly slot: number; readonly pid: number }
  | { readonly event: 'worker-exited'; readonly slot: number; readonly pid: number; readonly code: number | null; readonly signal: string | null; readonly expected: boolean }
  | { readonly event: 'worker-restarting'; readonly slot: number; readonly delay: number }
  | { readonly event: 'worker-drain-timeout'; readonly slot: number; readonly pid: number };

/** Options of {@link startWorkerPool}. */
export interface WorkerPoolOptions {
  /** How many workers. Default: os.availableParallelism(). */
  readonly workers?: number;
  /** Called with each queue id a worker committed (give it to the delivering queue's adopt()). */
  readonly onQueued?: (queueId: string) => void;
  /** Every pool event (log them). */
  readonly onEvent?: (event: WorkerPoolEvent) => void;
  /** How long a draining worker may take before it is killed, ms. Default 60 000. */
  readonly drainTimeout?: number;
  /** How long a new worker may take to say it is ready, ms. Default 30 000. */
  readonly startTimeout?: number;
  /**
   * Delay before replacing a worker that died, ms: `min` when it had run a while, doubling
   * up to `max` while replacements keep dying within `stableAfter`. Default { min: 100, max: 10 000, stableAfter: 5 000 }.
   */
  readonly restartDelay?: { readonly min?: number; readonly max?: number; readonly stableAfter?: number };
  /** Environment added to each worker's (besides `DOVETAIL_WORKER_SLOT`). */
  readonly env?: Readonly<Record<string, string>>;
}

/** A running pool, in the primary. */
export interface WorkerPool {
  /** The configured number of workers. */
  readonly size: number;
  /** The pids of the workers serving now, by slot. */
  pids(): number[];
  /** Resolves once every slot has a worker that said it is ready; rejects when one could not start. */
  ready(): Promise<void>;
  /** Sends every worker the reload message (the CLI's SIGHUP). */
  reload(): void;
  /**
   * Replaces the workers one at a time: a new worker for the slot, and once it is ready the
   * old one drains (finishes its connections) and exits. The listening sockets never close.
   */
  rollingRestart(): Promise<void>;
  /** Drains every worker and waits for them to exit; no worker is replaced afterwards. */
  close(): Promise<void>;
  /**
   * Asks every live worker a question it answers with {@link WorkerChannel.answer} (say,
   * its metrics) and resolves with the answers that came within `timeout` ms (default 5 000).
   */
  ask(topic: string, timeout?: number): Promise<unknown[]>;
}

/** The messages between the primary and a worker (an implementation detail, versioned by key). */
const MSG = { ready: 'dovetail:ready', queued: 'dovetail:queued', drain: 'dovetail:drain', reload: 'dovetail:reload', ask: 'dovetail:ask', answer: 'dovetail:answer' } as const;
interface PoolMessage {
  readonly dovetail: (typeof MSG)[keyof typeof MSG];
  readonly queueId?: string;
  readonly topic?: string;
  readonly id?: number;
  readonly value?: unknown;
}
const isPoolMessage = (m: unknown): m is PoolMessage => typeof m === 'object' && m !== null && typeof (m as { dovetail?: unknown }).dovetail === 'string';

interface Slot {
  worker: Worker | undefined;
  started: number;
  failures: number;
  timer: NodeJS.Timeout | undefined;
}

/**
 * Starts the workers (in the primary: `cluster.isPrimary`); each runs this program again
 * (`process.argv`), where `cluster.isWorker` is true and {@link workerChannel} talks back.
 */
export function startWorkerPool(options: WorkerPoolOptions = {}): WorkerPool {
  if (!cluster.isPrimary) throw new DovetailError(ErrorCodes.INVALID_OPTIONS, 'startWorkerPool() runs in the primary process');
  const size = options.workers ?? availableParallelism();
  if (!Number.isSafeInteger(size) || size < 1) throw new DovetailError(ErrorCodes.INVALID_OPTIONS, `workers must be an integer >= 1, got ${String(options.workers)}`);
  const drainTimeout = options.drainTimeout ?? 60_000;
  const startTimeout = options.startTimeout ?? 30_000;
  const delayMin = options.restartDelay?.min ?? 100;
  const delayMax = options.restartDelay?.max ?? 10_000;
  const stableAfter = options.restartDelay?.stableAfter ?? 5_000;
  const emit = (e: WorkerPoolEvent): void => options.onEvent?.(e);

  const slots: Slot[] = Array.from({ length: size }, () => ({ worker: undefined, started: 0, failures: 0, timer: undefined }));
  /** Workers on their way out (drained by a restart or close): their exit is expected. */
  const retiring = new Set<Worker>();
  const readiness = new Map<Worker, { resolve: () => void; reject: (e: Error) => void; promise: Promise<void> }>();
  let closing = false;
  let asked = 0;
  const questions = new Map<number, (value: unknown) => void>();

  function fork(slotIndex: number): Worker {
    const slot = slots[slotIndex]!;
    const worker = cluster.fork({ ...options.env, DOVETAIL_WORKER_SLOT: String(slotIndex) });
    let resolve!: () => void;
    let reject!: (e: Error) => void;
    const promise = new Promise<void>((res, rej) => {
      resolve = res;
      reject = rej;
    });
    promise.catch(() => {}); // observed by ready()/rollingRestart() when they care
    readiness.set(worker, { resolve, reject, promise });
    const timeout = setTimeout(() => reject(new DovetailError(ErrorCodes.INVALID_OPTIONS, `worker ${slotIndex} (pid ${worker.process.pid}) did not get ready in ${startTimeout} ms`)), startTimeout);
    timeout.unref();
    worker.on('message', (m: unknown) => {
      if (!isPoolMessage(m)) return;
      if (m.dovetail === MSG.ready) {
        clearTimeout(timeout);
        emit({ event: 'worker-ready', slot: slotIndex, pid: worker.process.pid ?? 0 });
        resolve();
      } else if (m.dovetail === MSG.queued && typeof m.queueId === 'string') {
        options.onQueued?.(m.queueId);
      } else if (m.dovetail === MSG.answer && typeof m.id === 'number') {
        questions.get(m.id)?.(m.value);
      }
    });
    worker.on('exit', (code, signal) => {
      clearTimeout(timeout);
      const expected = retiring.delete(worker) || closing;
      emit({ event: 'worker-exited', slot: slotIndex, pid: worker.process.pid ?? 0, code, signal, expected });
      reject(new DovetailError(ErrorCodes.INVALID_OPTIONS, `worker ${slotIndex} exited (code ${code}, signal ${signal}) before it was ready`));
      readiness.delete(worker);
      if (slot.worker !== worker) return; // replaced already (a rolling restart)
      slot.worker = undefined;
      if (expected) return;
      // Died: replace it, later each time it keeps dying young.
      slot.failures = Date.now() - slot.started < stableAfter ? slot.failures + 1 : 0;
      const delay = Math.min(delayMax, delayMin * 2 ** Math.min(slot.failures, 20));
      emit({ event: 'worker-restarting', slot: slotIndex, delay });
      slot.timer = setTimeout(() => {
        slot.timer = undefined;
        if (!closing && !slot.worker) place(slotIndex);
      }, delay);
    });
    emit({ event: 'worker-started', slot: slotIndex, pid: worker.process.pid ?? 0 });
    return worker;
  }

  function place(slotIndex: number): Worker {
    const slot = slots[slotIndex]!;
    slot.worker = fork(slotIndex);
    slot.started = Date.now();
    return slot.worker;
  }

  /** Asks a worker to drain and resolves when it has exited (killing it after drainTimeout). */
  function retire(worker: Worker, slotIndex: number): Promise<void> {
    if (worker.isDead()) return Promise.resolve();
    retiring.add(worker);
    return new Promise<void>((resolve) => {
      const kill = setTimeout(() => {
        emit({ event: 'worker-drain-timeout', slot: slotIndex, pid: worker.process.pid ?? 0 });
        worker.process.kill('SIGKILL');
      }, drainTimeout);
      worker.once('exit', () => {
        clearTimeout(kill);
        resolve();
      });
      try {
        worker.send({ dovetail: MSG.drain });
      } catch {
        worker.process.kill('SIGTERM');
      }
    });
  }

  for (let i = 0; i < size; i++) place(i);

  return {
    size,
    pids: () => slots.flatMap((s) => (s.worker?.process.pid !== undefined ? [s.worker.process.pid] : [])),
    async ready() {
      await Promise.all(
        slots.map(async (s) => {
          const w = s.worker;
          const r = w && readiness.get(w);
          if (r) await r.promise;
        }),
      );
    },
    reload() {
      for (const s of slots) {
        if (s.worker && !s.worker.isDead()) {
          try {
            s.worker.send({ dovetail: MSG.reload });
          } catch {
            // gone: its replacement reads the config when it starts
          }
        }
      }
    },
    async rollingRestart() {
      for (let i = 0; i < size; i++) {
        if (closing) return;
        const slot = slots[i]!;
        const old = slot.worker;
        if (slot.timer) {
          clearTimeout(slot.timer);
          slot.timer = undefined;
        }
        const fresh = place(i);
        await readiness.get(fresh)?.promise;
        if (old) await retire(old, i);
      }
    },
    async ask(topic, timeout = 5_000) {
      const live = slots.flatMap((s) => (s.worker && s.worker.isConnected() ? [s.worker] : []));
      const answers = await Promise.all(
        live.map(
          (w) =>
            new Promise<unknown>((resolve) => {
              const id = ++asked;
              const timer = setTimeout(() => done(undefined), timeout);
              const done = (value: unknown): void => {
                clearTimeout(timer);
                questions.delete(id);
                resolve(value);
              };
              questions.set(id, done);
              try {
                w.send({ dovetail: MSG.ask, topic, id });
              } catch {
                done(undefined);
              }
            }),
        ),
      );
      return answers.filter((a) => a !== undefined);
    },
    async close() {
      closing = true;
      for (const s of slots) if (s.timer) clearTimeout(s.timer);
      await Promise.all(slots.map((s, i) => (s.worker ? retire(s.worker, i) : Promise.resolve())));
    },
  };
}

/** A worker's side of the pool (in a process started by {@link startWorkerPool}). */
export interface WorkerChannel {
  /** This worker's slot (0 … workers-1), stable across replacements. */
  readonly slot: number;
  /** Tell the primary a queue entry is committed (pass as the writer queue's `onCommitted`). */
  queued(queueId: string): void;
  /** Tell the primary this worker is serving. */
  ready(): void;
  /** What to do when the primary asks this worker to drain (close the gateway); the process then exits. */
  onDrain(handler: () => Promise<void> | void): void;
  /** What to do when the primary asks for a reload. */
  onReload(handler: () => Promise<void> | void): void;
  /** Answers the primary's {@link WorkerPool.ask} about `topic` (the value must survive IPC serialisation). */
  answer(topic: string, handler: () => Promise<unknown> | unknown): void;
}

/** The worker's side of the pool; throws outside a cluster worker. */
export function workerChannel(): WorkerChannel {
  const worker = cluster.worker;
  if (!cluster.isWorker || !worker) throw new DovetailError(ErrorCodes.INVALID_OPTIONS, 'workerChannel() runs in a cluster worker');
  const slot = Number(process.env.DOVETAIL_WORKER_SLOT ?? worker.id - 1);
  const drains: (() => Promise<void> | void)[] = [];
  const reloads: (() => Promise<void> | void)[] = [];
  const answers = new Map<string, () => Promise<unknown> | unknown>();
  let draining = false;
  const send = (m: PoolMessage): void => {
    // The primary gone means this worker is going too; a notice that cannot be sent is
    // found by the next primary's load or adopt scan.
    if (process.connected) process.send?.(m, undefined, undefined, () => {});
  };
  const drain = async (): Promise<void> => {
    if (draining) return;
    draining = true;
    let code = 0;
    for (const h of drains) {
      try {
        await h();
      } catch {
        code = 1;
      }
    }
    process.exit(code);
  };
  worker.on('message', (m: unknown) => {
    if (!isPoolMessage(m)) return;
    if (m.dovetail === MSG.drain) void drain();
    else if (m.dovetail === MSG.reload) for (const h of reloads) void Promise.resolve().then(h).catch(() => {});
    else if (m.dovetail === MSG.ask && typeof m.id === 'number') {
      const h = m.topic === undefined ? undefined : answers.get(m.topic);
      void Promise.resolve()
        .then(() => h?.())
        .catch(() => undefined)
        .then((value) => send({ dovetail: MSG.answer, id: m.id!, value: value ?? null }));
    }
  });
  // The primary died: nothing will hand this worker's connections out any more; drain.
  worker.on('disconnect', () => void drain());
  return {
    slot,
    queued: (queueId) => send({ dovetail: MSG.queued, queueId }),
    ready: () => send({ dovetail: MSG.ready }),
    onDrain: (h) => void drains.push(h),
    onReload: (h) => void reloads.push(h),
    answer: (topic, h) => void answers.set(topic, h),
  };
}
