/**
 * What a process tree costs, from Linux's /proc: CPU (utime + stime, with reaped children's
 * cutime + cstime) summed over a root process and all its descendants, the tree's summed
 * RSS and PSS, a process's peak RSS (VmHWM) and the bytes it has read (rchar), and the
 * machine's busy and steal time. Shared by bench/outbound.ts and bench/peers.ts.
 *
 * A child that exited was reaped by its parent (Postfix's master waits for its children),
 * so its CPU is in the parent's cutime/cstime: summing the four over the live tree counts
 * every process once. Nothing here works off Linux; nothing here samples by itself.
 */
import { spawnSync, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';

const getconf = (name: string, dflt: number): number => Number(spawnSync('getconf', [name], { encoding: 'utf8' }).stdout?.trim()) || dflt;
/** Clock ticks per second (/proc times are in ticks). */
export const CLK_TCK = getconf('CLK_TCK', 100);
/** Bytes per page (/proc/<pid>/statm is in pages). */
export const PAGE = getconf('PAGESIZE', 4096);

export interface Proc {
  readonly pid: number;
  readonly ppid: number;
  /** utime + cutime and stime + cstime, clock ticks. */
  readonly user: number;
  readonly sys: number;
}

export function readProc(pid: number): Proc | undefined {
  try {
    const s = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
    const f = s.slice(s.lastIndexOf(')') + 2).split(' ');
    // After "(comm) ": state ppid … utime(11) stime(12) cutime(13) cstime(14).
    return { pid, ppid: Number(f[1]), user: Number(f[11]) + Number(f[13]), sys: Number(f[12]) + Number(f[14]) };
  } catch {
    return undefined;
  }
}

/** The roots and all their descendants now (each process once). */
export function tree(roots: number | readonly number[]): Proc[] {
  const want = new Set(typeof roots === 'number' ? [roots] : roots);
  const kids = new Map<number, Proc[]>();
  const found: Proc[] = [];
  for (const name of fs.readdirSync('/proc')) {
    if (!/^\d+$/.test(name)) continue;
    const p = readProc(Number(name));
    if (!p) continue;
    if (want.has(p.pid)) found.push(p);
    const list = kids.get(p.ppid);
    if (list) list.push(p);
    else kids.set(p.ppid, [p]);
  }
  const out: Proc[] = [...found];
  const seen = new Set(out.map((p) => p.pid));
  for (let i = 0; i < out.length; i++) {
    for (const k of kids.get(out[i]!.pid) ?? []) {
      if (seen.has(k.pid)) continue;
      seen.add(k.pid);
      out.push(k);
    }
  }
  return out;
}

/** CPU of the tree so far, ms: user and system (kernel) time. */
export function treeCpuMs(roots: number | readonly number[]): { user: number; sys: number } {
  let user = 0;
  let sys = 0;
  for (const p of tree(roots)) {
    user += p.user;
    sys += p.sys;
  }
  return { user: (user * 1000) / CLK_TCK, sys: (sys * 1000) / CLK_TCK };
}

/** CPU so far of every thread of the tree, ms by thread id (to find the busiest one). */
export function threadCpuMs(roots: number | readonly number[]): Map<number, number> {
  const out = new Map<number, number>();
  for (const p of tree(roots)) {
    let tids: string[];
    try {
      tids = fs.readdirSync(`/proc/${p.pid}/task`);
    } catch {
      continue;
    }
    for (const tid of tids) {
      try {
        const f = fs.readFileSync(`/proc/${p.pid}/task/${tid}/stat`, 'utf8');
        const x = f.slice(f.lastIndexOf(')') + 2).split(' ');
        out.set(Number(tid), ((Number(x[11]) + Number(x[12])) * 1000) / CLK_TCK);
      } catch {
        /* exited */
      }
    }
  }
  return out;
}

/**
 * Machine-wide CPU so far (/proc/stat), ms: busy (user, nice, system, irq, softirq) and
 * steal (time the hypervisor gave to someone else).
 */
export function machineCpuMs(): { busy: number; steal: number } {
  const f = fs.readFileSync('/proc/stat', 'utf8').split('\n', 1)[0]!.trim().split(/\s+/).slice(1).map(Number);
  const [user = 0, nice = 0, system = 0, , , irq = 0, softirq = 0, steal = 0] = f;
  return { busy: ((user + nice + system + irq + softirq) * 1000) / CLK_TCK, steal: (steal * 1000) / CLK_TCK };
}

/** CPU of a single process (with its reaped children), ms. */
export function procCpuMs(pid: number): number {
  const p = readProc(pid);
  return p ? ((p.user + p.sys) * 1000) / CLK_TCK : 0;
}

/**
 * The tree's summed RSS (/proc/<pid>/statm: every process counts the shared libraries it
 * maps) and, when asked, its summed PSS (/proc/<pid>/smaps_rollup: shared pages divided
 * among the processes sharing them), bytes.
 */
export function treeMemory(roots: number | readonly number[], withPss: boolean): { rss: number; pss: number; procs: number } {
  let rss = 0;
  let pss = 0;
  const procs = tree(roots);
  for (const p of procs) {
    try {
      rss += Number(fs.readFileSync(`/proc/${p.pid}/statm`, 'utf8').split(' ')[1]) * PAGE;
      if (withPss) pss += Number(/^Pss:\s+(\d+) kB/m.exec(fs.readFileSync(`/proc/${p.pid}/smaps_rollup`, 'utf8'))?.[1] ?? 0) * 1024;
    } catch {
      /* exited */
    }
  }
  return { rss, pss, procs: procs.length };
}

/** A process's peak RSS so far (VmHWM), bytes; 0 when it is gone. */
export function peakRss(pid: number): number {
  try {
    const m = /VmHWM:\s+(\d+) kB/.exec(fs.readFileSync(`/proc/${pid}/status`, 'utf8'));
    return Number(m?.[1] ?? 0) * 1024;
  } catch {
    return 0;
  }
}

/** Bytes a process has read so far through read(2) and friends, sockets included (/proc/<pid>/io rchar); 0 when gone. */
export function bytesRead(pid: number): number {
  try {
    const m = /^rchar:\s+(\d+)/m.exec(fs.readFileSync(`/proc/${pid}/io`, 'utf8'));
    return Number(m?.[1] ?? 0);
  } catch {
    return 0;
  }
}

/** The file system type holding `dir` (Linux /proc/mounts; `unknown` elsewhere). */
export function fsType(dir: string): string {
  try {
    const real = fs.realpathSync(dir);
    let best = { mount: '', type: 'unknown' };
    for (const line of fs.readFileSync('/proc/mounts', 'utf8').split('\n')) {
      const [, mount, type] = line.split(' ');
      if (!mount || !type) continue;
      if ((real === mount || real.startsWith(mount.endsWith('/') ? mount : mount + '/')) && mount.length >= best.mount.length) best = { mount, type };
    }
    return best.type;
  } catch {
    return 'unknown';
  }
}

/** Bytes to MiB with one decimal. */
export function mib(bytes: number): number {
  return Math.round((bytes / 1024 / 1024) * 10) / 10;
}

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

/**
 * Waits up to `graceMs` for a child we started to exit by itself, then signals it (by its
 * pid) and waits for it to exit; SIGKILL after 5 s more.
 */
export async function stopChild(child: ChildProcess, signal: NodeJS.Signals, graceMs = 0): Promise<void> {
  const gone = (): boolean => child.exitCode !== null || child.signalCode !== null;
  if (gone()) return;
  const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()));
  if (graceMs > 0) await Promise.race([exited, sleep(graceMs)]);
  if (gone()) return;
  child.kill(signal);
  const t = setTimeout(() => child.kill('SIGKILL'), 5_000);
  await exited;
  clearTimeout(t);
}
