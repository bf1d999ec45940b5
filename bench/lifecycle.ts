/**
 * Everything a bench run starts (sinks, systems under test, load clients, peers), stopped
 * whatever happens: at the end of the run, on an error, on SIGINT/SIGTERM, and by a
 * watchdog. Things started are kept newest last; an entry leaves the list only once it is
 * stopped, so whatever is still there at exit (a stop cut short) gets `kill`, the
 * synchronous last resort. Stopping is shared: the run's own cleanup and a signal's wait
 * use the same promise. Used by bench/peers.ts and bench/outbound.ts.
 */

/** One thing a run started. */
export interface Started<K extends string = string> {
  readonly name: string;
  /** What it is, to stop some kinds before others. */
  readonly kind?: K;
  /** Stops it cleanly (draining). */
  stop(): Promise<void>;
  /** Kills it at once (synchronous: it runs in the exit handler). */
  kill(): void;
  stopping?: Promise<void>;
}

export interface Lifecycle<K extends string = string> {
  /** Registers something started; returns it. */
  track<S extends Started<K>>(s: S): S;
  /** Stops one (once, shared); kills it when its stop fails. */
  stopOne(s: Started<K>): Promise<void>;
  /** Stops, newest first, everything started (of the given kinds, or all). */
  stopAll(kinds?: readonly K[]): Promise<void>;
  /** Takes something off the list (it ended on its own). */
  forget(s: Started<K>): void;
  /** Stops everything and exits with `code` (after 30 s at the latest). */
  bail(why: string, code: number): void;
  /** True once bail() has begun: start nothing new. */
  stopping(): boolean;
  /** What is still running (not stopped). */
  remaining(): readonly Started<K>[];
  /** The run is over: the watchdog is off. */
  done(): void;
}

/**
 * Makes the run's lifecycle: installs the exit handler, SIGINT/SIGTERM and a watchdog of
 * `timeoutS` seconds, each stopping everything. `log` gets one line per event.
 */
export function lifecycle<K extends string = string>(log: (line: string) => void, timeoutS: number): Lifecycle<K> {
  const started: Started<K>[] = [];
  const forget = (s: Started<K>): void => {
    const i = started.indexOf(s);
    if (i >= 0) started.splice(i, 1);
  };
  const kill = (s: Started<K>): void => {
    try {
      s.kill();
    } catch {
      /* already gone */
    }
  };
  const stopOne = (s: Started<K>): Promise<void> =>
    (s.stopping ??= s
      .stop()
      .catch((err: unknown) => {
        log(`bench: stopping ${s.name}: ${err instanceof Error ? err.message : String(err)}; killing it`);
        kill(s);
      })
      .finally(() => forget(s)));
  const stopAll = async (kinds?: readonly K[]): Promise<void> => {
    for (const s of [...started].reverse()) if (!kinds || (s.kind !== undefined && kinds.includes(s.kind))) await stopOne(s);
  };
  process.on('exit', () => {
    for (const s of [...started].reverse()) kill(s);
  });
  let stopping = false;
  const bail = (why: string, code: number): void => {
    if (stopping) return;
    stopping = true;
    log(`bench: ${why}; stopping everything`);
    // Postfix takes up to ~10 s to stop, a gateway up to its closeTimeout; then the exit handler kills.
    setTimeout(() => process.exit(code), 30_000).unref();
    void stopAll().finally(() => process.exit(code));
  };
  process.once('SIGINT', () => bail('SIGINT', 130));
  process.once('SIGTERM', () => bail('SIGTERM', 143));
  const watchdog = setTimeout(() => bail(`watchdog: not done after ${timeoutS} s`, 2), timeoutS * 1000);
  watchdog.unref();
  return {
    track: (s) => (started.push(s), s),
    forget,
    stopOne,
    stopAll,
    bail,
    stopping: () => stopping,
    remaining: () => [...started],
    done: () => clearTimeout(watchdog),
  };
}
