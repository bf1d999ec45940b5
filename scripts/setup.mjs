// Makes a checkout ready to run: installs dependencies when they are missing or
// older than the lockfile, then builds everything (lib, milters, bench,
// examples, test) into dist/ with tsc.
//
// Dependency-free on purpose (node: built-ins only): it runs before
// node_modules exists.
//
//   import { ensureSetup } from './setup.mjs';
//   await ensureSetup();                  // install if needed + build
//   await ensureSetup({ build: false });  // install if needed only
//
// Also runnable directly: `node scripts/setup.mjs [--no-build]`.

import { spawnSync } from 'node:child_process';
import { existsSync, statSync } from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

export const repoRoot = resolve(dirname(fileURLToPath(import.meta.url)), '..');

const MIN_NODE = [20, 12];

function fail(message) {
  process.stderr.write(`\n[setup] ERROR: ${message}\n`);
  process.exit(1);
}

function log(message) {
  process.stdout.write(`[setup] ${message}\n`);
}

function mtimeMs(path) {
  try {
    return statSync(path).mtimeMs;
  } catch {
    return undefined;
  }
}

function checkNodeVersion() {
  const [major = 0, minor = 0] = process.versions.node.split('.').map(Number);
  if (major < MIN_NODE[0] || (major === MIN_NODE[0] && minor < MIN_NODE[1])) {
    fail(
      `dovetail needs Node >= ${MIN_NODE.join('.')}; this is Node ${process.version} ` +
        `(${process.execPath}).`,
    );
  }
}

/** Runs a command with inherited stdio in the repo root; exits the process on failure. */
function run(command, args, what) {
  log(`$ ${[command, ...args].join(' ')}`);
  const started = Date.now();
  const result = spawnSync(command, args, {
    cwd: repoRoot,
    stdio: 'inherit',
    // npm/npx are .cmd shims on Windows.
    shell: process.platform === 'win32',
  });
  if (result.error) {
    fail(`${what}: could not start \`${command}\`: ${result.error.message}`);
  }
  if (result.status !== 0) {
    const how = result.signal ? `killed by ${result.signal}` : `exit code ${result.status}`;
    fail(`${what} failed (${how}); see the output above.`);
  }
  log(`${what} done in ${((Date.now() - started) / 1000).toFixed(1)}s`);
}

/**
 * Decides whether node_modules must be (re)installed. npm writes
 * node_modules/.package-lock.json at the end of every `npm ci`/`npm install`,
 * so its mtime says when node_modules last matched a lockfile; a directory's
 * own mtime does not (it only changes when top-level entries come or go).
 */
function installReason(lockfile) {
  const nodeModules = join(repoRoot, 'node_modules');
  if (!existsSync(nodeModules)) return 'node_modules is missing';
  const marker = mtimeMs(join(nodeModules, '.package-lock.json'));
  if (marker === undefined) return 'node_modules was not installed by npm (no .package-lock.json)';
  const reference = mtimeMs(lockfile);
  if (reference !== undefined && marker < reference) {
    return `node_modules is older than ${lockfile.slice(repoRoot.length + 1)}`;
  }
  if (!existsSync(join(nodeModules, '.bin', 'tsc'))) return 'node_modules has no tsc';
  return undefined;
}

export async function ensureSetup({ build = true } = {}) {
  checkNodeVersion();

  const lock = join(repoRoot, 'package-lock.json');
  const hasLock = existsSync(lock);
  const reason = installReason(hasLock ? lock : join(repoRoot, 'package.json'));
  if (reason) {
    log(`installing dependencies: ${reason}`);
    if (hasLock) run('npm', ['ci'], 'npm ci');
    else run('npm', ['install'], 'npm install (no package-lock.json)');
  }

  if (build) {
    // Always build: tsc 7 compiles the whole project in well under a second
    // here, and skipping on timestamps could run stale code. `--no-install`
    // stops npx from ever fetching the unrelated "tsc" package.
    run('npx', ['--no-install', 'tsc', '-p', 'tsconfig.json'], 'TypeScript build (tsc -p tsconfig.json)');
  }
  return { root: repoRoot };
}

if (process.argv[1] && resolve(process.argv[1]) === fileURLToPath(import.meta.url)) {
  await ensureSetup({ build: !process.argv.includes('--no-build') });
}
