/**
 * The worked examples of docs/migrating-from-postfix.md and docs/migrating-from-haraka.md are
 * real: each page shows the files of its example directory exactly as they are (every
 * `<!-- example: path -->` marker is followed by a fenced block equal to that file, and
 * every file of the directory is shown); `dovetail check-config` accepts the config once the
 * operator's own secret files (TLS key and certificate, DKIM key) are next to it, and names
 * only those as missing without them; `dovetail start` runs it (ports and spool directories
 * moved to a temp dir) and its listeners behave as the page says; the Haraka page's plugin
 * rewritten as a milter refuses and stamps as the page says. Every JSON snippet in the pages'
 * prose and tables (`{ "use": "dnsbl", … }`, `"clientLimits": { … }`) is accepted by the
 * config schema in the place it belongs, so a misspelt field name fails here.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { generateKeyPairSync } from 'node:crypto';
import { cp, mkdir, mkdtemp, readFile, readdir, rm, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { importFresh } from '../../lib/cli/load.js';
import { bundledMilterSchemas, checkConfig } from '../../lib/cli/schema.js';
import type { Milter } from '../../lib/index.js';
import { runMilter } from '../../lib/testing/index.js';
import { REPO, runCli, startCli } from '../helpers/cli.js';
import { RawClient } from '../helpers/smtp.js';
import { selfSignedCert } from '../helpers/tls.js';

interface Example {
  readonly doc: string;
  readonly dir: string;
  /** The operator's files the example names but the repository does not hold. */
  readonly tls: { readonly key: string; readonly cert: string };
  readonly dkimKeys: readonly string[];
}

const EXAMPLES: readonly Example[] = [
  { doc: 'docs/migrating-from-postfix.md', dir: 'examples/from-postfix', tls: { key: 'tls/privkey.pem', cert: 'tls/fullchain.pem' }, dkimKeys: [] },
  { doc: 'docs/migrating-from-haraka.md', dir: 'examples/from-haraka', tls: { key: 'tls_key.pem', cert: 'tls_cert.pem' }, dkimKeys: ['dkim/example.com/private'] },
];

type Json = Record<string, unknown>;

/** Every `<!-- example: path -->` marker of a page with the fenced block that follows it. */
function shownFiles(markdown: string): Map<string, string> {
  const out = new Map<string, string>();
  const re = /<!-- example: (\S+) -->\n```[\w-]*\n([\s\S]*?)\n```/g;
  for (const m of markdown.matchAll(re)) {
    assert.ok(!out.has(m[1]!), `${m[1]} is shown twice`);
    out.set(m[1]!, m[2]! + '\n');
  }
  return out;
}

/** A copy of the example directory with the operator's secret files made up. */
async function withSecrets(ex: Example): Promise<string> {
  const dir = await mkdtemp(path.join(os.tmpdir(), 'dovetail-migration-'));
  await cp(path.join(REPO, ex.dir), dir, { recursive: true });
  const cert = selfSignedCert('mail.example.com');
  for (const [file, pem] of [[ex.tls.key, cert.key], [ex.tls.cert, cert.cert]] as const) {
    await mkdir(path.dirname(path.join(dir, file)), { recursive: true });
    await writeFile(path.join(dir, file), pem, { mode: 0o600 });
  }
  for (const file of ex.dkimKeys) {
    const { privateKey } = generateKeyPairSync('rsa', { modulusLength: 2048 });
    await mkdir(path.dirname(path.join(dir, file)), { recursive: true });
    await writeFile(path.join(dir, file), privateKey.export({ type: 'pkcs1', format: 'pem' }), { mode: 0o600 });
  }
  return dir;
}

for (const ex of EXAMPLES) {
  const name = path.basename(ex.dir);

  test(`${ex.doc} shows every file of ${ex.dir} exactly as it is`, async () => {
    const shown = shownFiles(await readFile(path.join(REPO, ex.doc), 'utf8'));
    const files = (await readdir(path.join(REPO, ex.dir), { recursive: true, withFileTypes: true }))
      .filter((e) => e.isFile())
      .map((e) => path.relative(REPO, path.join(e.parentPath, e.name)))
      .sort();
    assert.ok(files.includes(`${ex.dir}/dovetail.config.json`));
    assert.deepEqual([...shown.keys()].sort(), files, 'the markers name exactly the files of the directory');
    for (const file of files) {
      assert.equal(shown.get(file), await readFile(path.join(REPO, file), 'utf8'), `${ex.doc}: the block after <!-- example: ${file} --> differs from the file`);
    }
  });

  test(`${name}: check-config in place names only the operator's missing key and certificate files`, async () => {
    const r = await runCli(['check-config', '-c', `${ex.dir}/dovetail.config.json`]);
    assert.equal(r.code, 1, r.stderr);
    const problems = r.stderr.trim().split('\n').slice(1);
    assert.ok(problems.length > 0, r.stderr);
    const secrets = [ex.tls.key, ...ex.dkimKeys].map((f) => path.join(REPO, ex.dir, f));
    for (const p of problems) {
      assert.match(p, /ENOENT/, p);
      assert.ok(secrets.some((s) => p.includes(s)), `not a missing secret file: ${p}`);
    }
  });

  test(`${name}: check-config accepts the config with the secret files next to it`, async () => {
    const dir = await withSecrets(ex);
    try {
      const r = await runCli(['check-config', '-c', 'dovetail.config.json'], dir);
      assert.equal(r.code, 0, r.stderr);
      assert.equal(r.stdout, `${path.join(dir, 'dovetail.config.json')}: ok\n`);
      assert.equal(r.stderr, '');
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  });
}

/**
 * Starts the example with its listeners on free loopback ports and its queue, quarantine and
 * control socket in the temp dir (everything else as written), and hands the ports, in
 * `listen` order, to `check`.
 */
async function started(ex: Example, check: (ports: number[]) => Promise<void>): Promise<void> {
  const dir = await withSecrets(ex);
  const file = path.join(dir, 'dovetail.config.json');
  const config = JSON.parse(await readFile(file, 'utf8')) as Json;
  const listen = config['listen'] as Json[];
  for (const l of listen) Object.assign(l, { host: '127.0.0.1', port: 0 });
  Object.assign(config['queue'] as Json, { dir: './var/queue' });
  config['quarantine'] = './var/quarantine';
  delete config['control'];
  await writeFile(file, JSON.stringify(config, null, 2));
  const gw = await startCli(['start', '-c', 'dovetail.config.json'], dir);
  try {
    const ports = (gw.ready['listen'] as { port: number }[]).map((a) => a.port);
    assert.equal(ports.length, listen.length);
    await check(ports);
  } finally {
    assert.equal(await gw.stop(), 0, gw.stderr());
    await rm(dir, { recursive: true, force: true });
  }
}

/** EHLO's keywords on a fresh connection. */
async function keywords(c: RawClient): Promise<string[]> {
  assert.equal((await c.reply()).code, 220);
  const r = await c.cmd('EHLO client.example.test');
  assert.equal(r.code, 250, r.text);
  return r.lines.slice(1).map((l) => l.replace(/^\d{3}[- ]/, '').split(' ')[0]!.toUpperCase());
}

test('from-postfix: started, port 25 offers STARTTLS and no AUTH, 587 and 465 want AUTH first', async () => {
  await started(EXAMPLES[0]!, async ([mx, submission, smtps]) => {
    const a = await RawClient.connect(mx!);
    const k = await keywords(a);
    assert.ok(k.includes('STARTTLS'), k.join(' '));
    assert.ok(!k.some((x) => x.startsWith('AUTH')), k.join(' '));
    assert.match((await a.cmd('AUTH PLAIN AGFsaWNlAHNlY3JldA==')).text, /^503 5\.5\.1/);
    await a.cmd('QUIT');

    const b = await RawClient.connect(submission!);
    await keywords(b);
    assert.match((await b.cmd('MAIL FROM:<alice@example.com>')).text, /^530 5\.7\.0/);
    assert.match((await b.cmd('AUTH PLAIN AGFsaWNlAHNlY3JldA==')).text, /^538 5\.7\.11/, 'no AUTH before STARTTLS');
    await b.cmd('QUIT');

    const c = await RawClient.connect(smtps!, { implicitTls: true });
    assert.ok(c.encrypted);
    const k3 = await keywords(c);
    assert.ok(k3.some((x) => x.startsWith('AUTH')), k3.join(' '));
    assert.match((await c.cmd('MAIL FROM:<alice@example.com>')).text, /^530 5\.7\.0/);
    await c.cmd('QUIT');
  });
});

test('from-haraka: started, the block-senders module refuses a blocked sender at MAIL on port 25', async () => {
  await started(EXAMPLES[1]!, async ([mx, submission]) => {
    const a = await RawClient.connect(mx!);
    await keywords(a);
    assert.equal((await a.cmd('MAIL FROM:<bulk@Spam.Example>')).text, '550 5.7.1 Mail from spam.example is not accepted here');
    await a.cmd('QUIT');

    const b = await RawClient.connect(submission!);
    await keywords(b);
    assert.match((await b.cmd('MAIL FROM:<alice@example.com>')).text, /^530 5\.7\.0/);
    await b.cmd('QUIT');
  });
});

test('from-haraka: block-senders.mjs, loaded as the config loads it, refuses blocked domains and stamps the rest', async () => {
  const mod = await importFresh(path.join(REPO, 'examples/from-haraka/block-senders.mjs'));
  const make = mod['default'] as (o: unknown) => Milter;
  const milter = make({ domains: ['spam.example', 'junk.example'] });
  const refused = await runMilter(milter, { from: 'bulk@junk.example', to: 'alice@example.com', message: 'Subject: x\r\n\r\nbody\r\n' });
  assert.equal(refused.verdict.stage, 'mail');
  assert.equal(refused.verdict.type, 'reject');
  assert.deepEqual(refused.verdict.reply, { code: 550, enhanced: '5.7.1', lines: ['Mail from junk.example is not accepted here'] });

  const passed = await runMilter(milter, { from: 'bob@good.example', to: 'alice@example.com', message: 'Subject: x\r\n\r\nbody\r\n' });
  assert.equal(passed.verdict.type, 'continue');
  assert.deepEqual(passed.edits.headersAdded, [{ name: 'X-Block-Senders', value: 'checked' }]);

  const bounce = await runMilter(milter, { from: '', to: 'alice@example.com', message: 'Subject: x\r\n\r\nbody\r\n' });
  assert.equal(bounce.verdict.type, 'continue', 'the null sender is never refused');
});

/**
 * The places an inline snippet of the pages may belong in a config: a milter entry, a
 * listener, a route, a milter's or a listener's options, a part of `limits`, `queue` or
 * `delivery`, or top-level fields. A snippet passes when one of them passes the schema.
 */
function placements(v: Json): unknown[] {
  // A Redis server configured, for the snippets of rateLimit, greylist and clientLimits in Redis.
  const base = { delivery: { maildir: '/srv/mail' }, redis: { url: 'redis://127.0.0.1:6379/0' } };
  const needs: Record<string, Json> = {
    dkimSign: { keys: [{ domain: 'example.com', selector: 's', privateKey: './k.pem' }] },
    aliases: { domains: ['example.com'] },
    postmaster: { mailbox: 'admin@example.com', domains: ['example.com'] },
    masquerade: { domains: ['example.com'] },
    sizeLimit: { maxBytes: 1000 },
  };
  const auth = { tls: { key: 'k', cert: 'c' }, authenticate: { dovecot: '/run/dovecot/auth-client' } };
  if ('use' in v || 'connect' in v || 'module' in v) return [{ ...base, milters: [v] }];
  if ('port' in v) return [{ ...base, ...auth, listen: [v] }];
  return [
    { ...base, ...v },
    { ...base, limits: v },
    { ...base, limits: { clientLimits: v } },
    { ...base, limits: { errorLimits: v } },
    { ...base, queue: v },
    { ...base, queue: { backoff: v } },
    { delivery: { maildir: '/srv/mail', ...v } },
    { delivery: v },
    { delivery: { routes: v } },
    { delivery: { routes: { 'example.com': v } } },
    { delivery: { routes: { '*': { smtp: v } } } },
    { ...base, ...auth, listen: [{ port: 25, ...v }] },
    { ...base, milters: [{ use: 'dnsbl', rhsbl: [{ zone: 'dbl.example', target: 'sender', ...v }] }] },
    ...Object.keys(bundledMilterSchemas).map((use) => ({ ...base, milters: [{ use, ...needs[use], ...v }] })),
  ];
}

test('every JSON snippet in the migration pages is a valid piece of a config', async () => {
  for (const doc of EXAMPLES.map((e) => e.doc)) {
    const prose = (await readFile(path.join(REPO, doc), 'utf8')).replace(/```[\s\S]*?```/g, '');
    let checked = 0;
    for (const [, code] of prose.matchAll(/`([^`]+)`/g)) {
      if (!/^[{"]/.test(code!)) continue;
      let value: unknown;
      try {
        value = JSON.parse(code!.startsWith('{') ? code! : `{${code!}}`);
      } catch {
        continue; // not JSON (a TS call, a Haraka setting): nothing to check
      }
      checked++;
      const tries = placements(value as Json);
      assert.ok(
        tries.some((t) => checkConfig(t).problems.length === 0),
        `${doc}: \`${code}\` fits nowhere in a config: ${JSON.stringify(checkConfig(tries[0]).problems)}`,
      );
    }
    assert.ok(checked >= 30, `${doc}: only ${checked} JSON snippets found`);
  }
});
