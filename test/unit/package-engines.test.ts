/**
 * package.json says `engines: { node: '>=20.12' }`: this checks that it is true of what a
 * user installs. Every package of the production tree (`npm ls --omit=dev --all`, i.e.
 * `dependencies` and what they pull in; not the optional peer mailauth, which declares
 * Node >= 22.19) must accept our minimum Node and each even major since (20, 22, 24),
 * judged by its own `engines.node`.
 *
 * Ranges are compared with test/helpers/engines.ts (a small node-semver range subset: the
 * `semver` package is not in our node_modules).
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { readFile } from 'node:fs/promises';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';
import { enginesOffenders, promisedVersions, satisfies } from '../helpers/engines.js';

const repoRoot = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../..');

interface Manifest {
  name?: string;
  version?: string;
  engines?: { node?: string };
  dependencies?: Record<string, string>;
  devDependencies?: Record<string, string>;
  peerDependencies?: Record<string, string>;
  peerDependenciesMeta?: Record<string, { optional?: boolean }>;
}

async function manifest(dir: string): Promise<Manifest> {
  return JSON.parse(await readFile(path.join(dir, 'package.json'), 'utf8')) as Manifest;
}

test('the range helper agrees with node-semver on the shapes engines fields use', () => {
  const cases: [string, string, boolean][] = [
    ['20.12.0', '>=20.0.0', true],
    ['20.12.0', '>= 12', true],
    ['20.12.0', '>=22.19.0', false],
    ['21.0.0', '20 || >=22', false],
    ['22.0.0', '20 || >=22', true],
    ['20.12.0', '^16 || ^18 || >=20', true],
    ['20.12.0', '^20.19.0 || ^22.12.0 || >=23', false],
    ['22.12.0', '^20.19.0 || ^22.12.0 || >=23', true],
    ['24.0.0', '>= 10.x', true],
    ['20.12.0', '18 - 20', true],
    ['21.0.0', '18 - 20', false],
    ['20.12.0', '~20.11', false],
    ['20.11.9', '~20.11', true],
    ['20.12.0', '<20.12', false],
    ['20.12.0', '<=20.12', true],
    ['20.12.0', '>20', false],
    ['20.12.0', '*', true],
    ['20.12.0', '', true],
    ['0.2.5', '^0.2.3', true],
    ['0.3.0', '^0.2.3', false],
  ];
  for (const [version, range, expected] of cases) assert.equal(satisfies(version, range), expected, `${version} in "${range}"`);
  assert.throws(() => satisfies('20.12.0', '>=twenty'), /cannot parse/);
});

test('package.json: engines >=20.12; mailauth only an optional peer (and a dev dependency for our tests)', async () => {
  const own = await manifest(repoRoot);
  assert.equal(own.engines?.node, '>=20.12');
  assert.equal(own.dependencies?.['mailauth'], undefined, 'mailauth must not be a dependency: it declares Node >= 22.19');
  assert.equal(typeof own.peerDependencies?.['mailauth'], 'string');
  assert.equal(own.peerDependenciesMeta?.['mailauth']?.optional, true);
  assert.equal(own.devDependencies?.['mailauth'], own.peerDependencies?.['mailauth']);
});

test('every production dependency accepts the Node versions our engines field promises', { timeout: 60_000 }, async () => {
  const own = await manifest(repoRoot);
  const versions = promisedVersions(own.engines!.node!);
  // --parseable: one directory per line, the project itself first. npm ls exits non-zero
  // when the tree has problems (missing, invalid): that is a failure here too.
  const { stdout } = await promisify(execFile)('npm', ['ls', '--omit=dev', '--all', '--parseable'], { cwd: repoRoot, maxBuffer: 16 << 20 });
  const dirs = stdout.split('\n').map((l) => l.trim()).filter(Boolean).slice(1);
  const names = await Promise.all(dirs.map(async (d) => (await manifest(d)).name));
  assert.ok(dirs.length >= Object.keys(own.dependencies ?? {}).length, `npm ls listed ${dirs.length} packages`);
  for (const dep of Object.keys(own.dependencies ?? {})) assert.ok(names.includes(dep), `${dep} is in the production tree`);
  assert.ok(!names.includes('mailauth'), 'mailauth is not in the production tree');
  const offenders = await enginesOffenders(dirs, versions, repoRoot);
  assert.deepEqual(offenders, [], `production dependencies that do not run on every Node our engines field (${own.engines!.node}) promises:\n${offenders.join('\n')}`);
});
