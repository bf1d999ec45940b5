/**
 * Reads a V8 `.cpuprofile` (from `node --cpu-prof`) and prints where the time went: the
 * top frames by self time, self time by file, and, for frames matching `--match`, their
 * inclusive time, all as a share of the busy (non-idle) time. For a quick look at the
 * bench's hot spots without opening DevTools:
 *
 *   node --cpu-prof --cpu-prof-dir=/tmp/prof dist/bench/gateway.js --targets gateway --rounds 4
 *   node dist/bench/cpuprofile-top.js /tmp/prof/CPU.*.0.001.cpuprofile --match dist/lib,mailsplit
 *
 * (the `.0.` profile is the main thread, where the servers run; the other is the load
 * generator). It does not merge profiles or draw flame graphs.
 */
import fs from 'node:fs';
import { parseArgs } from 'node:util';

interface ProfileNode {
  readonly id: number;
  readonly callFrame: { readonly functionName: string; readonly url: string; readonly lineNumber: number };
  readonly children?: readonly number[];
}
interface Profile {
  readonly nodes: readonly ProfileNode[];
  readonly samples: readonly number[];
  readonly timeDeltas: readonly number[];
}

const { values, positionals } = parseArgs({
  options: { top: { type: 'string', default: '30' }, match: { type: 'string' } },
  allowPositionals: true,
});
const file = positionals[0];
if (!file) {
  process.stderr.write('usage: node dist/bench/cpuprofile-top.js FILE.cpuprofile [--top 30] [--match a,b]\n');
  process.exit(64);
}
const top = Number(values.top) || 30;
const profile = JSON.parse(fs.readFileSync(file, 'utf8')) as Profile;
const cwd = `file://${process.cwd()}/`;

const nodes = new Map<number, ProfileNode>();
const parent = new Map<number, number>();
for (const n of profile.nodes) {
  nodes.set(n.id, n);
  for (const c of n.children ?? []) parent.set(c, n.id);
}
const key = (n: ProfileNode): string => {
  const cf = n.callFrame;
  return `${cf.functionName || '(anonymous)'} ${cf.url.replace(cwd, '')}:${cf.lineNumber + 1}`;
};
const fileOf = (n: ProfileNode): string => n.callFrame.url.replace(cwd, '') || n.callFrame.functionName;

const timeOf = new Map<number, number>();
profile.samples.forEach((id, i) => timeOf.set(id, (timeOf.get(id) ?? 0) + (profile.timeDeltas[i] ?? 0)));

const self = new Map<string, number>();
const byFile = new Map<string, number>();
const inclusive = new Map<string, number>();
const add = (m: Map<string, number>, k: string, t: number): void => void m.set(k, (m.get(k) ?? 0) + t);
let total = 0;
let idle = 0;
for (const [id, t] of timeOf) {
  const n = nodes.get(id)!;
  total += t;
  if (n.callFrame.functionName === '(idle)') {
    idle += t;
    continue;
  }
  add(self, key(n), t);
  add(byFile, fileOf(n), t);
  const seen = new Set<string>();
  for (let x: number | undefined = id; x !== undefined; x = parent.get(x)) {
    const k = key(nodes.get(x)!);
    if (!seen.has(k)) add(inclusive, k, t);
    seen.add(k);
  }
}
const busy = total - idle;
const pct = (t: number): string => `${((100 * t) / busy).toFixed(1).padStart(5)}%`;
const sorted = (m: Map<string, number>): [string, number][] => [...m].sort((a, b) => b[1] - a[1]);

const out: string[] = [`${file}: ${(total / 1e3).toFixed(0)} ms sampled, ${(busy / 1e3).toFixed(0)} ms busy`, '', 'self time (share of busy):'];
for (const [k, t] of sorted(self).slice(0, top)) out.push(`${pct(t)}  ${k}`);
out.push('', 'self time by file:');
for (const [k, t] of sorted(byFile).slice(0, 15)) out.push(`${pct(t)}  ${k}`);
if (values.match) {
  const needles = values.match.split(',').filter(Boolean);
  out.push('', `inclusive time, frames matching ${needles.join(', ')}:`);
  for (const [k, t] of sorted(inclusive).filter(([k]) => needles.some((s) => k.includes(s))).slice(0, top)) out.push(`${pct(t)}  ${k}`);
}
process.stdout.write(out.join('\n') + '\n');
