/**
 * The main thread's side of the load generator (bench/load.ts): starts the worker and
 * turns its request/answer messages into promises. Shared by bench/gateway.ts and
 * bench/peers.ts. A worker error rejects every request waiting on it.
 */
import { Worker } from 'node:worker_threads';
import type { Request } from './load.js';

export class Load {
  private next = 0;
  private readonly waiting = new Map<number, { resolve: (v: unknown) => void; reject: (e: Error) => void }>();
  readonly worker: Worker;

  constructor() {
    this.worker = new Worker(new URL('./load.js', import.meta.url));
    this.worker.on('message', (m: { id: number; ok: boolean; result?: unknown; error?: string }) => {
      const w = this.waiting.get(m.id);
      this.waiting.delete(m.id);
      if (m.ok) w?.resolve(m.result);
      else w?.reject(new Error(m.error));
    });
    this.worker.on('error', (err) => {
      for (const w of this.waiting.values()) w.reject(err);
      this.waiting.clear();
    });
  }

  call<R>(req: Request): Promise<R> {
    const id = this.next++;
    return new Promise<R>((resolve, reject) => {
      this.waiting.set(id, { resolve: resolve as (v: unknown) => void, reject });
      this.worker.postMessage({ ...req, id });
    });
  }
}
