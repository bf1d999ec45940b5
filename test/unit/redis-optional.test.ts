/**
 * ioredis is loaded only by whoever builds a client: importing dovetail and dovetail/milters
 * (which export redisAnvil, rateLimit and greylist) must not load it. Checked in a fresh
 * Node process through the CommonJS module cache (ioredis is CommonJS), with a positive
 * control that the check sees it when it is loaded.
 */
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import path from 'node:path';
import { it } from 'node:test';
import { fileURLToPath, pathToFileURL } from 'node:url';

const dist = path.join(path.dirname(fileURLToPath(import.meta.url)), '..', '..');
const count = (imports: string[]): number => {
  const script = [
    "import { createRequire } from 'node:module';",
    ...imports.map((m) => `await import(${JSON.stringify(m)});`),
    'const r = createRequire(import.meta.url);',
    "console.log(Object.keys(r.cache).filter((k) => k.includes(`${'/'}ioredis${'/'}`)).length);",
  ].join('\n');
  return Number(execFileSync(process.execPath, ['--input-type=module', '-e', script], { cwd: dist, encoding: 'utf8' }).trim());
};

it('importing dovetail and dovetail/milters does not load ioredis', () => {
  const lib = pathToFileURL(path.join(dist, 'lib', 'index.js')).href;
  const milters = pathToFileURL(path.join(dist, 'milters', 'index.js')).href;
  assert.equal(count([lib, milters]), 0);
  assert.ok(count([lib, 'ioredis']) > 0, 'the check sees ioredis once it is imported');
});
