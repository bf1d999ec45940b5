// Which Node versions the suite runs on, and how to get each one's binary. Shared by
// scripts/test.mjs (it runs every test file once per Node) and
// test/integration/package.test.ts (it runs the installed package on each Node).
//
// Dependency-free (node: built-ins only).

import { spawnSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import { tmpdir } from 'node:os';

/** The Node majors the suite runs on by default, after the current one. */
export const DEFAULT_EXTRA_MAJORS = [22, 24];

export const currentMajor = Number(process.versions.node.split('.')[0]);

/**
 * The Node majors to test on, in order: DOVETAIL_TEST_NODES ("20,22,24", "22") when set,
 * else the current Node's major, then 22 and 24. Throws on a token that is not a major >= 20.
 */
export function requestedMajors(raw = process.env.DOVETAIL_TEST_NODES) {
  const text = raw?.trim();
  const tokens = text ? text.split(/[\s,]+/).filter(Boolean) : [String(currentMajor), ...DEFAULT_EXTRA_MAJORS.map(String)];
  const majors = [];
  for (const token of tokens) {
    const major = Number(token.replace(/^v/, ''));
    if (!Number.isInteger(major) || major < 20) {
      throw new Error(`DOVETAIL_TEST_NODES: "${token}" is not a Node major version >= 20 (e.g. "20,22,24").`);
    }
    if (!majors.includes(major)) majors.push(major);
  }
  return majors;
}

/**
 * A Node binary of the given major: this process's for the current major, otherwise the
 * npm package node@MAJOR through npx. Returns `{ bin, version, seconds }`; throws when npx
 * cannot provide it.
 */
export function resolveNode(major) {
  if (major === currentMajor) return { bin: process.execPath, version: process.version, seconds: 0 };
  // --prefer-offline: with the package already in the npx cache this takes ~0.5s and needs
  // no network; a plain `npx -y` waits minutes on an unreachable registry before falling
  // back to the cache.
  const started = Date.now();
  const result = spawnSync(
    'npx',
    ['--prefer-offline', '-y', `node@${major}`, '-p', 'process.execPath + "\\n" + process.version'],
    { cwd: tmpdir(), encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'], shell: process.platform === 'win32', timeout: 600_000 },
  );
  const lines = (result.stdout ?? '').trim().split('\n');
  const [bin, version] = lines.slice(-2).map((l) => l.trim());
  if (result.status !== 0 || !bin || !version?.startsWith(`v${major}.`) || !existsSync(bin)) {
    throw new Error(
      `could not get Node ${major} from npm (npx node@${major} exited ${result.status}` +
        `${result.error ? `: ${result.error.message}` : ''})${result.stderr ? `: ${result.stderr.trim().slice(-500)}` : ''}`,
    );
  }
  return { bin, version, seconds: (Date.now() - started) / 1000 };
}
