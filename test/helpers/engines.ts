/**
 * Test helper: does a Node release version satisfy a package's `engines.node` range?
 *
 * The `semver` package is not in our node_modules (nothing we install depends on it), so
 * this is a small implementation of node-semver's range grammar, enough for `engines`
 * fields: `||`, space-separated comparators, `<` `<=` `>` `>=` `=` (with or without a space
 * after the operator), bare and partial versions and x-ranges (`20`, `20.x`, `*`), `~`,
 * `^` and hyphen ranges (`18 - 22`). It compares release versions only: a prerelease tag in
 * a range is ignored, and the versions asked about are Node releases (no tag).
 *
 * A range it cannot parse throws, so a test built on it fails rather than passes by accident.
 */
import { readFile } from 'node:fs/promises';
import path from 'node:path';

type Version = readonly [number, number, number];
type Op = '<' | '<=' | '>' | '>=' | '=';
type Comparator = readonly [Op, Version];

/** `[major, minor, patch]` of a plain release version (`v22.3.0`, `20.12.0`). */
export function parseVersion(text: string): Version {
  const m = /^v?(\d+)\.(\d+)\.(\d+)$/.exec(text.trim());
  if (!m) throw new Error(`not a release version: ${JSON.stringify(text)}`);
  return [Number(m[1]), Number(m[2]), Number(m[3])];
}

function compare(a: Version, b: Version): number {
  return a[0] - b[0] || a[1] - b[1] || a[2] - b[2];
}

/** A partial version: undefined for a missing or wildcard part (`20` → [20, u, u]). */
type Partial = [number | undefined, number | undefined, number | undefined];

function parsePartial(text: string, range: string): Partial {
  const m = /^v?(\*|x|X|\d+)(?:\.(\*|x|X|\d+)(?:\.(\*|x|X|\d+)(?:[-+][0-9A-Za-z.+-]*)?)?)?$/.exec(text);
  if (!m) throw new Error(`cannot parse ${JSON.stringify(text)} in the range ${JSON.stringify(range)}`);
  const part = (s: string | undefined): number | undefined => (s === undefined || /^[*xX]$/.test(s) ? undefined : Number(s));
  const out: Partial = [part(m[1]), part(m[2]), part(m[3])];
  // After a wildcard every later part is a wildcard too (1.x.3 means 1.x).
  if (out[0] === undefined) return [undefined, undefined, undefined];
  if (out[1] === undefined) return [out[0], undefined, undefined];
  return out;
}

const ANY: Comparator[] = [['>=', [0, 0, 0]]];
const NONE: Comparator[] = [['<', [0, 0, 0]]];

/** The comparators one simple term (`>=20`, `^18.2`, `20.x`, `~1.2.3`) stands for. */
function term(text: string, range: string): Comparator[] {
  const m = /^(<=|>=|<|>|=|~>?|\^)?(.*)$/.exec(text)!;
  const op = m[1] ?? '';
  const [M, mi, p] = parsePartial(m[2]!, range);
  if (M === undefined) return op === '<' || op === '>' ? NONE : ANY;
  const floor: Version = [M, mi ?? 0, p ?? 0];
  // The first version after the partial's range: 20 → 21.0.0, 20.3 → 20.4.0, 20.3.1 → 20.3.2 (never used for full + =).
  const next: Version = mi === undefined ? [M + 1, 0, 0] : p === undefined ? [M, mi + 1, 0] : [M, mi, p + 1];
  switch (op) {
    case '':
    case '=':
      return p !== undefined ? [['=', floor]] : [['>=', floor], ['<', next]];
    case '>':
      return p !== undefined ? [['>', floor]] : [['>=', next]];
    case '>=':
      return [['>=', floor]];
    case '<':
      return [['<', floor]];
    case '<=':
      return p !== undefined ? [['<=', floor]] : [['<', next]];
    case '~':
    case '~>':
      return [['>=', floor], ['<', mi === undefined ? [M + 1, 0, 0] : [M, mi + 1, 0]]];
    case '^': {
      if (M > 0 || mi === undefined) return [['>=', floor], ['<', [M + 1, 0, 0]]];
      if (mi > 0 || p === undefined) return [['>=', floor], ['<', [0, mi + 1, 0]]];
      return [['>=', floor], ['<', [0, 0, p + 1]]];
    }
    default:
      throw new Error(`cannot parse ${JSON.stringify(text)} in the range ${JSON.stringify(range)}`);
  }
}

function holds(v: Version, [op, w]: Comparator): boolean {
  const c = compare(v, w);
  return op === '<' ? c < 0 : op === '<=' ? c <= 0 : op === '>' ? c > 0 : op === '>=' ? c >= 0 : c === 0;
}

/** True when `version` (a Node release) satisfies the node-semver `range`. */
export function satisfies(version: string, range: string): boolean {
  const v = parseVersion(version);
  return range.split('||').some((alternative) => {
    const text = alternative.trim().replace(/(<=|>=|<|>|=|~>?|\^)\s+/g, '$1');
    if (text === '') return true; // an empty alternative is "*"
    const hyphen = /^(\S+)\s+-\s+(\S+)$/.exec(text);
    let comparators: Comparator[];
    if (hyphen) {
      // 1.2.3 - 2.3 means >=1.2.3 <2.4.0; a wildcard upper end means no upper bound.
      comparators = [...term(`>=${hyphen[1]}`, range)];
      if (parsePartial(hyphen[2]!, range)[0] !== undefined) comparators.push(...term(`<=${hyphen[2]}`, range));
    } else {
      comparators = text.split(/\s+/).flatMap((t) => term(t, range));
    }
    return comparators.every((c) => holds(v, c));
  });
}

/** The lowest release a `>=X.Y[.Z]` range allows (our own `engines.node`). */
export function minimumOf(range: string): string {
  const m = /^>=\s*v?(\d+)(?:\.(\d+))?(?:\.(\d+))?$/.exec(range.trim());
  if (!m) throw new Error(`expected a ">=X.Y" range, got ${JSON.stringify(range)}`);
  return `${m[1]}.${m[2] ?? 0}.${m[3] ?? 0}`;
}

/** Node versions our `engines` promises: its minimum, each later even major up to 24 (x.0.0), and this one. */
export function promisedVersions(engines: string): string[] {
  const min = minimumOf(engines);
  const majors = [20, 22, 24].filter((m) => m > Number(min.split('.')[0]));
  return [...new Set([min, ...majors.map((m) => `${m}.0.0`), process.versions.node])];
}

/**
 * The packages (directories `dirs`) whose engines.node excludes one of `versions`, as
 * "name@version (path): engines.node … excludes Node X" lines.
 */
export async function enginesOffenders(dirs: readonly string[], versions: readonly string[], relativeTo: string): Promise<string[]> {
  const out: string[] = [];
  for (const dir of dirs) {
    const m = JSON.parse(await readFile(path.join(dir, 'package.json'), 'utf8')) as { name?: string; version?: string; engines?: { node?: string } };
    const range = m.engines?.node;
    if (typeof range !== 'string') continue;
    const excluded = versions.filter((v) => !satisfies(v, range));
    if (excluded.length) out.push(`${m.name}@${m.version} (${path.relative(relativeTo, dir)}): engines.node "${range}" excludes Node ${excluded.join(', ')}`);
  }
  return out;
}
