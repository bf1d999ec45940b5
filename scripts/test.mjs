// `npm test`: installs/builds (scripts/setup.mjs), then runs every compiled test
// file dist/test/**/*.test.js with Node's built-in runner, once under each
// supported Node: the current one, then 22 and 24 (from the npm packages
// `node@22` and `node@24`; scripts/nodes.mjs).
//
//   npm test                        all test files, current Node then Node 22 and 24
//   npm test -- maildir smtp        only files whose path contains "maildir" or "smtp"
//   npm test -- --test-name-pattern=LMTP   args starting with "-" go to `node --test`
//                                   (use the --flag=value form)
//
// Environment:
//   DOVETAIL_TEST_NODES        which Node majors to run, e.g. "20", "22", "20,22,24".
//                              Default: the current Node's major, then 22 and 24.
//                              A major equal to the current Node uses it; any
//                              other is fetched with `npx node@MAJOR`.
//   DOVETAIL_TEST_RUN          set by this script for the tests: "i/n", the i-th of
//                              n runs (test/integration/package.test.ts runs the
//                              installed package on every Node itself, in run 1 only).
//   DOVETAIL_TEST_CONCURRENCY  test files run in parallel (default: CPU count;
//                              Node's own default is CPU count - 1, i.e. 1 on 2 cores).

import { spawn, spawnSync } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, readdirSync, rmSync } from 'node:fs';
import { availableParallelism, tmpdir } from 'node:os';
import { join, relative, sep } from 'node:path';
import { currentMajor, requestedMajors, resolveNode as resolveNodeBinary } from './nodes.mjs';
import { ensureSetup, repoRoot } from './setup.mjs';

if (currentMajor < 20) {
  process.stderr.write(`npm test needs Node >= 20; this is ${process.version}.\n`);
  process.exit(1);
}

function fail(message) {
  process.stderr.write(`\n[test] ERROR: ${message}\n`);
  process.exit(1);
}

function log(message) {
  process.stdout.write(`[test] ${message}\n`);
}

// ---- arguments and environment -------------------------------------------

const args = process.argv.slice(2);
const nodeArgs = args.filter((a) => a.startsWith('-'));
const filters = args.filter((a) => !a.startsWith('-'));

function concurrency() {
  const raw = process.env.DOVETAIL_TEST_CONCURRENCY?.trim();
  if (!raw) return availableParallelism();
  const n = Number(raw);
  if (!Number.isInteger(n) || n < 1) fail(`DOVETAIL_TEST_CONCURRENCY: "${raw}" is not a positive integer.`);
  return n;
}

let majors;
try {
  majors = requestedMajors();
} catch (err) {
  fail(err.message);
}
const parallel = concurrency();

// ---- setup, then find the test files --------------------------------------

// The real peers the interop tests start (Postfix, Dovecot, libmilter, opendkim …): installed
// from Debian when missing, so this command does its own set-up on a fresh machine.
if (process.env.DOVETAIL_SKIP_PEER_INSTALL !== '1') {
  const peers = spawnSync('bash', [join(repoRoot, 'scripts', 'install-peers.sh')], { stdio: 'inherit' });
  if (peers.status !== 0) {
    process.stderr.write('[test] could not install the test peers (see above); the interop tests will fail without them\n');
    process.exit(1);
  }
}
await ensureSetup();

function walk(dir, out = []) {
  let entries;
  try {
    entries = readdirSync(dir, { withFileTypes: true });
  } catch {
    return out;
  }
  for (const entry of entries) {
    const path = join(dir, entry.name);
    if (entry.isDirectory()) walk(path, out);
    else if (entry.isFile() && entry.name.endsWith('.test.js')) out.push(path);
  }
  return out;
}

// tsc never deletes outputs, so dist/ can hold tests whose source was removed
// or renamed: run only those whose .ts source still exists.
function hasSource(distFile) {
  const rel = relative(join(repoRoot, 'dist'), distFile); // test/unit/x.test.js
  const base = rel.slice(0, -'.js'.length);
  return ['.ts', '.tsx'].some((ext) => existsSync(join(repoRoot, base + ext)));
}

const all = walk(join(repoRoot, 'dist', 'test')).sort();
const stale = all.filter((f) => !hasSource(f));
for (const f of stale) log(`skipping ${relative(repoRoot, f)}: its source was removed (stale build output)`);
const fresh = all.filter(hasSource);
const files = filters.length
  ? fresh.filter((f) => {
      const rel = relative(repoRoot, f).split(sep).join('/');
      return filters.some((needle) => rel.includes(needle));
    })
  : fresh;

if (fresh.length === 0) fail('no test files found (expected dist/test/**/*.test.js built from test/**/*.test.ts).');
if (files.length === 0) fail(`no test file matches ${filters.map((f) => `"${f}"`).join(' or ')}.`);
log(`${files.length} test file(s)${filters.length ? ` matching ${filters.join(', ')}` : ''}`);

// ---- which node binaries ---------------------------------------------------

/** Resolves a Node binary of the given major once, via the npm package node@MAJOR. */
function resolveNode(major) {
  if (major !== currentMajor) log(`resolving Node ${major} with: npx --prefer-offline -y node@${major}`);
  try {
    const { bin, version, seconds } = resolveNodeBinary(major);
    if (major !== currentMajor) log(`Node ${major}: ${bin} (${seconds.toFixed(1)}s to resolve)`);
    return { bin, version };
  } catch (err) {
    fail(`${err.message}. Set DOVETAIL_TEST_NODES=${currentMajor} to test with the current Node only.`);
  }
}

// Resolve every binary before running anything, so a missing Node fails fast.
const nodes = majors.map(resolveNode);

// ---- run -------------------------------------------------------------------

const tapDir = mkdtempSync(join(tmpdir(), 'dovetail-test-'));
let stopping = false;
let child;
for (const signal of ['SIGINT', 'SIGTERM', 'SIGHUP']) {
  process.on(signal, () => {
    stopping = true;
    child?.kill(signal);
  });
}

function runOnce({ bin, version }, index, count) {
  const tapFile = join(tapDir, `run-${index}.tap`);
  const argv = [
    '--test',
    `--test-concurrency=${parallel}`,
    // No test may hang the run: each test gets at most this long (ms).
    `--test-timeout=${process.env.DOVETAIL_TEST_TIMEOUT ?? 120000}`,
    '--test-reporter=spec',
    '--test-reporter-destination=stdout',
    // A second reporter to a file, only to count results for the summary.
    '--test-reporter=tap',
    `--test-reporter-destination=${tapFile}`,
    ...nodeArgs,
    ...files.map((f) => relative(repoRoot, f)),
  ];
  process.stdout.write(
    `\n===== dovetail tests on Node ${version} (${bin}): ${files.length} file(s), concurrency ${parallel} =====\n`,
  );
  const started = Date.now();
  return new Promise((resolvePromise) => {
    child = spawn(bin, argv, { cwd: repoRoot, stdio: 'inherit', env: { ...process.env, DOVETAIL_TEST_RUN: `${index + 1}/${count}` } });
    child.on('error', (err) => {
      process.stderr.write(`[test] could not start ${bin}: ${err.message}\n`);
      resolvePromise({ version, code: 1, counts: undefined, seconds: 0 });
    });
    child.on('exit', (code, signal) => {
      child = undefined;
      resolvePromise({
        version,
        code: code ?? (signal ? 1 : 0),
        signal,
        counts: readCounts(tapFile),
        seconds: (Date.now() - started) / 1000,
      });
    });
  });
}

/** Reads the closing "# pass N" … lines of a TAP report. */
function readCounts(tapFile) {
  let text;
  try {
    text = readFileSync(tapFile, 'utf8');
  } catch {
    return undefined;
  }
  const counts = {};
  for (const key of ['tests', 'pass', 'fail', 'cancelled', 'skipped', 'todo']) {
    const all = [...text.matchAll(new RegExp(`^# ${key} (\\d+)$`, 'gm'))];
    const last = all.at(-1);
    if (!last) return undefined;
    counts[key] = Number(last[1]);
  }
  return counts;
}

const results = [];
for (const [i, node] of nodes.entries()) {
  if (stopping) break;
  results.push(await runOnce(node, i, nodes.length));
}
rmSync(tapDir, { recursive: true, force: true });

// ---- summary ---------------------------------------------------------------

process.stdout.write('\n===== dovetail test summary =====\n');
let passed = 0;
let failed = 0;
let skipped = 0;
let counted = true;
for (const r of results) {
  const c = r.counts;
  const detail = c
    ? `${c.pass} passed, ${c.fail} failed, ${c.cancelled} cancelled, ${c.skipped + c.todo} skipped/todo`
    : 'no result counts';
  const status = r.code === 0 ? 'OK' : `FAILED (${r.signal ?? `exit ${r.code}`})`;
  process.stdout.write(`Node ${r.version}: ${status} — ${detail} in ${r.seconds.toFixed(1)}s\n`);
  if (c) {
    passed += c.pass;
    failed += c.fail + c.cancelled;
    skipped += c.skipped + c.todo;
  } else counted = false;
}
const exitCode = stopping || results.length < nodes.length || results.some((r) => r.code !== 0) ? 1 : 0;
if (counted && results.length > 0) {
  process.stdout.write(`total: ${passed} passed, ${failed} failed, ${skipped} skipped\n`);
}
process.exitCode = exitCode;
