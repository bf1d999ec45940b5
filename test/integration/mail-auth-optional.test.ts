/**
 * mailauth is an optional peer dependency: importing dovetail/milters loads none of it,
 * mailAuth() loads only the parts it uses (never lib/bimi, so never undici), and without
 * the package mailAuth() throws a DovetailError that says how to install it. Each case runs
 * in a child Node process, so the module cache starts empty.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';

const run = promisify(execFile);
const dist = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
const root = path.resolve(dist, '..');

async function node(cwd: string, script: string): Promise<unknown> {
  const { stdout } = await run(process.execPath, ['--input-type=module', '-e', script], { cwd, timeout: 60_000 });
  return JSON.parse(stdout.trim().split('\n').pop()!);
}

test('importing the milters loads no mailauth; mailAuth() loads its parts but not lib/bimi or undici', async () => {
  const result = await node(
    dist,
    `import { createRequire } from 'node:module';
     const cache = createRequire(import.meta.url).cache;
     const loaded = (part) => Object.keys(cache).filter((k) => k.includes(part)).length;
     const m = await import(${JSON.stringify(path.join(dist, 'milters/index.js'))});
     const before = loaded('/mailauth/');
     m.mailAuth({ resolver: { resolve4: async () => [], resolve: async () => [] } });
     console.log(JSON.stringify({ before, after: loaded('/mailauth/') > 0, bimi: loaded('/mailauth/lib/bimi'), undici: loaded('/undici/') }));`,
  );
  assert.deepEqual(result, { before: 0, after: true, bimi: 0, undici: 0 });
});

test('without mailauth installed, mailAuth() throws a DovetailError saying npm install mailauth', async () => {
  const dir = await fs.mkdtemp(path.join(os.tmpdir(), 'dovetail-no-mailauth-'));
  try {
    await fs.cp(path.join(dist, 'lib'), path.join(dir, 'lib'), { recursive: true });
    await fs.cp(path.join(dist, 'milters'), path.join(dir, 'milters'), { recursive: true });
    await fs.writeFile(path.join(dir, 'package.json'), '{"type":"module"}');
    await fs.mkdir(path.join(dir, 'node_modules'));
    // Every installed package but mailauth.
    for (const entry of await fs.readdir(path.join(root, 'node_modules'))) {
      if (entry === 'mailauth' || entry.startsWith('.')) continue;
      await fs.symlink(path.join(root, 'node_modules', entry), path.join(dir, 'node_modules', entry));
    }
    const result = await node(
      dir,
      `const m = await import('./milters/index.js');
       let error;
       try { m.mailAuth(); } catch (err) { error = { name: err.name, code: err.code, message: err.message }; }
       console.log(JSON.stringify({ others: typeof m.dnsbl({ zones: [{ zone: 'zen.example' }] }).rcpt, error }));`,
    );
    const r = result as { others: string; error?: { name: string; code: string; message: string } };
    assert.equal(r.others, 'function', 'the other milters work without mailauth');
    assert.equal(r.error?.name, 'DovetailError');
    assert.equal(r.error?.code, 'DOVETAIL_ERR_INVALID_OPTIONS');
    assert.match(r.error?.message ?? '', /npm install mailauth/);
    assert.match(r.error?.message ?? '', /Node >= 22\.19/);
  } finally {
    await fs.rm(dir, { recursive: true, force: true });
  }
});
