/**
 * The `dovetail` command, run as a child process (`node dist/bin/dovetail.js …`): every
 * command's --help, usage errors (exit 2), check-config on good and bad configs (every
 * problem named by its field path, JSON and TS), the example configs, and `milter serve`
 * driven over the milter protocol by a gateway's connectMilter().
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { copyFile, mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { connectMilter } from '../../lib/index.js';
import { REPO, listenPort, runCli, startCli } from '../helpers/cli.js';
import { ehlo, message, send, split, startGateway, stored } from '../helpers/smtp.js';

async function tempDir(): Promise<string> {
  return mkdtemp(path.join(os.tmpdir(), 'dovetail-cli-'));
}

test('--help on every command and subcommand: usage on stdout, exit 0', async () => {
  const cases: [string[], RegExp][] = [
    [['--help'], /Usage: dovetail <command>/],
    [['-h'], /Usage: dovetail <command>/],
    [['help'], /Usage: dovetail <command>/],
    [['start', '--help'], /Usage: dovetail start/],
    [['check-config', '-h'], /Usage: dovetail check-config/],
    [['milter', '--help'], /Usage: dovetail milter serve/],
    [['milter', 'serve', '--help'], /Usage: dovetail milter serve/],
    [['queue', '--help'], /Usage: dovetail queue/],
    [['queue', 'list', '--help'], /Usage: dovetail queue/],
    [['queue', 'retry', '-h'], /Usage: dovetail queue/],
  ];
  for (const [args, usage] of cases) {
    const r = await runCli(args);
    assert.equal(r.code, 0, `${args.join(' ')}: ${r.stderr}`);
    assert.match(r.stdout, usage, args.join(' '));
    assert.equal(r.stderr, '', args.join(' '));
  }
  const v = await runCli(['--version']);
  assert.equal(v.code, 0);
  assert.match(v.stdout, /^dovetail \d+\.\d+\.\d+/);
});

test('unknown command, flag or subcommand, missing argument: usage on stderr, exit 2', async () => {
  const cases: [string[], RegExp][] = [
    [[], /missing command/],
    [['bogus'], /unknown command bogus/],
    [['start', '--bogus'], /Unknown option '--bogus'[\s\S]*Usage: dovetail start/],
    [['start', 'extra'], /unexpected argument extra/],
    [['check-config', '-x'], /Unknown option '-x'/],
    [['milter'], /missing subcommand/],
    [['milter', 'run', 'x.ts'], /unknown subcommand run/],
    [['milter', 'serve'], /needs a module file/],
    [['milter', 'serve', 'x.ts'], /needs --listen/],
    [['queue'], /missing subcommand/],
    [['queue', 'purge'], /unknown subcommand purge/],
    [['queue', 'show'], /needs a queue id/],
    [['queue', 'delete'], /needs a queue id/],
    [['queue', 'list', 'extra'], /unexpected argument extra/],
    [['queue', 'list', '--jsn'], /Unknown option '--jsn'/],
  ];
  for (const [args, why] of cases) {
    const r = await runCli(args);
    assert.equal(r.code, 2, `${args.join(' ')}: ${r.stdout} ${r.stderr}`);
    assert.match(r.stderr, why, args.join(' '));
    assert.match(r.stderr, /Usage: dovetail/, args.join(' '));
    assert.equal(r.stdout, '', args.join(' '));
  }
});

test('check-config: the example configs (TS and JSON) are valid', async () => {
  for (const f of ['examples/dovetail.config.ts', 'examples/dovetail.config.json']) {
    const r = await runCli(['check-config', '-c', f]);
    assert.equal(r.code, 0, `${f}: ${r.stderr}`);
    assert.match(r.stdout, /: ok\n$/);
  }
  // From a directory of its own, found by its default name, importing 'dovetail'.
  const dir = await tempDir();
  try {
    await copyFile(path.join(REPO, 'examples/dovetail.config.ts'), path.join(dir, 'dovetail.config.ts'));
    const r = await runCli(['check-config'], dir);
    assert.equal(r.code, 0, r.stderr);
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
});

test('check-config: a JSON config with several kinds of errors names every field', async () => {
  const dir = await tempDir();
  try {
    const file = path.join(dir, 'bad.json');
    await writeFile(
      file,
      JSON.stringify({
        hostname: 'mx.test',
        listen: [{ port: 25 }, { port: '25x' }, { port: 70000, tls: 'sometimes' }, { port: 26, hots: 'x' }],
        milters: [{ use: 'sizeLimit' }, { use: 'antivirus' }, { connect: 'nowhere' }, { use: 'relayControl', localDomains: 'example.test' }, 7],
        delivery: { routes: { 'example.test': { lmtp: { host: '127.0.0.1', port: 99999 } }, '*': { smtp: { relayhost: 25 } }, 'x.test': { ftp: 'x' } } },
        log: { level: 'loud' },
        typo: true,
      }),
    );
    const r = await runCli(['check-config', '-c', file], dir);
    assert.equal(r.code, 1, r.stderr);
    const lines = r.stderr.trim().split('\n');
    assert.match(lines[0]!, /bad\.json: \d+ problems/);
    const expected = [
      'listen[1].port: expected an integer 0..65535, got "25x"',
      'listen[2].port: expected an integer 0..65535, got 70000',
      'listen[2].tls: expected "starttls", "implicit" or "none", got "sometimes"',
      'listen[3].hots: unknown field',
      'milters[0].maxBytes: expected an integer >= 1 (missing)',
      'milters[1].use: expected one of sizeLimit, relayControl, dnsbl, mailAuth, spamTag, dkimSign, aliases, virtual, senderLogin, postmaster, masquerade, relocated, rateLimit, greylist, got "antivirus"',
      'milters[2].connect: expected a socket address ("host:port", "inet:host:port" or "unix:/path"), got "nowhere"',
      'milters[3].localDomains: expected a list of strings, got "example.test"',
      'milters[4]: expected a milter',
      'delivery.routes["example.test"].lmtp.port: expected an integer 0..65535, got 99999',
      'delivery.routes["*"].smtp.relayhost: expected a string, got 25',
      'delivery.routes["x.test"].ftp: expected one of lmtp, maildir, smtp, store, got "ftp"',
      'log.level: expected one of "fatal", "error", "warn", "info", "debug", "trace", "silent", got "loud"',
      'typo: unknown field',
    ];
    for (const e of expected) assert.ok(lines.some((l) => l.startsWith(e)), `missing: ${e}\n${r.stderr}`);
    assert.equal(lines.length, expected.length + 1, r.stderr);
    // start refuses the same config: the same lines on stderr, and a log line on stdout.
    const started = await runCli(['start', '-c', file], dir);
    assert.equal(started.code, 1);
    assert.equal(started.stderr, r.stderr);
    const log = JSON.parse(started.stdout.trim().split('\n').at(-1)!) as { event: string; problems: { path: string }[] };
    assert.equal(log.event, 'config-invalid');
    assert.equal(log.problems.length, expected.length);
    assert.ok(log.problems.some((p) => p.path === 'listen[1].port'));
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
});

test('check-config: cross-field and build errors (files, bundled milter options) name the field', async () => {
  const dir = await tempDir();
  try {
    const file = path.join(dir, 'c.json');
    await writeFile(file, JSON.stringify({ listen: [{ port: 0, tls: 'implicit', submission: true }], delivery: { routes: { 'a.test': { store: true } } } }));
    let r = await runCli(['check-config', '-c', file], dir);
    assert.equal(r.code, 1);
    assert.match(r.stderr, /^delivery\.routes\["a\.test"\]\.store: routes to the embedded store, but delivery\.store is not set$/m);
    assert.match(r.stderr, /^listen\[0\]\.tls: tls "implicit" needs the top-level tls \{ key, cert \}$/m);
    assert.match(r.stderr, /^listen\[0\]\.submission: a submission listener needs authenticate$/m);
    // Passes the schema, fails when built: a missing key file, a map file that does not parse, a missing certificate.
    await writeFile(path.join(dir, 'virtual'), 'info@example.test alice@example.test\nbroken-line-without-value\n');
    await writeFile(
      file,
      JSON.stringify({
        tls: { key: './nokey.pem', cert: './nocert.pem' },
        milters: [
          { use: 'dkimSign', keys: [{ domain: 'example.test', selector: 's1', privateKey: './missing.pem' }] },
          { use: 'virtual', file: './virtual' },
          { use: 'sizeLimit', maxBytes: 1000 },
        ],
        delivery: { maildir: './mail' },
      }),
    );
    r = await runCli(['check-config', '-c', file], dir);
    assert.equal(r.code, 1);
    assert.match(r.stderr, /^milters\[0\]: .*missing\.pem/m);
    assert.match(r.stderr, /^milters\[1\]: .*virtual, line 2: expected "key value"/m);
    assert.match(r.stderr, /^tls: .*nokey\.pem/m);
    assert.doesNotMatch(r.stderr, /milters\[2\]/);
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
});

test('check-config: TS configs (errors named too), a function export, unreadable files', async () => {
  const dir = await tempDir();
  try {
    await writeFile(
      path.join(dir, 'dovetail.config.ts'),
      `import { defineConfig } from 'dovetail';
const port: any = '25x';
export default defineConfig(async () => ({ listen: [{ port }], delivery: { maildir: './mail' }, milters: [{ use: 'spamTag', requiredScore: 'high' as unknown as number }] }));
`,
    );
    let r = await runCli(['check-config'], dir);
    assert.equal(r.code, 1, r.stderr);
    assert.match(r.stderr, /^listen\[0\]\.port: expected an integer 0\.\.65535, got "25x"$/m);
    assert.match(r.stderr, /^milters\[0\]\.requiredScore: expected a number, got "high"$/m);
    // A TS config with a Milter object and a transport object, and a function export: valid.
    await writeFile(
      path.join(dir, 'good.config.ts'),
      `import { defineConfig, defineMilter, maildir } from 'dovetail';
import { sizeLimit } from 'dovetail/milters';
const m = defineMilter({ name: 'inline', async eom(ctx) { ctx.message.addHeader('X-Inline', 'yes'); } });
export default defineConfig(() => ({ listen: [{ port: 0 }], milters: [sizeLimit({ maxBytes: 1000 }), m], delivery: { transport: maildir({ root: '${dir}/mail' }) } }));
`,
    );
    r = await runCli(['check-config', '-c', 'good.config.ts'], dir);
    assert.equal(r.code, 0, r.stderr);
    // .mjs (ESM) and .js (here CommonJS: no package.json says otherwise) configs.
    await writeFile(path.join(dir, 'esm.mjs'), "export default { listen: [{ port: 0 }], delivery: { maildir: './mail' } };\n");
    r = await runCli(['check-config', '-c', 'esm.mjs'], dir);
    assert.equal(r.code, 0, r.stderr);
    await writeFile(path.join(dir, 'cjs.js'), "module.exports = { delivery: { lmtp: '127.0.0.1:24' }, listen: [{ port: 'x' }] };\n");
    r = await runCli(['check-config', '-c', 'cjs.js'], dir);
    assert.equal(r.code, 1, r.stderr);
    assert.match(r.stderr, /^listen\[0\]\.port: expected an integer 0\.\.65535, got "x"$/m);
    // Not JSON; not there; exports nothing; throws.
    await writeFile(path.join(dir, 'broken.json'), '{ "listen": [ }');
    r = await runCli(['check-config', '-c', 'broken.json'], dir);
    assert.equal(r.code, 1);
    assert.match(r.stderr, /broken\.json: not valid JSON/);
    r = await runCli(['check-config', '-c', 'nothere.json'], dir);
    assert.equal(r.code, 1);
    assert.match(r.stderr, /nothere\.json: cannot read/);
    await writeFile(path.join(dir, 'empty.mjs'), 'export const x = 1;\n');
    r = await runCli(['check-config', '-c', 'empty.mjs'], dir);
    assert.equal(r.code, 1);
    assert.match(r.stderr, /empty\.mjs: exports no config/);
    await writeFile(path.join(dir, 'throws.mjs'), 'export default () => { throw new Error("no secrets here"); };\n');
    r = await runCli(['check-config', '-c', 'throws.mjs'], dir);
    assert.equal(r.code, 1);
    assert.match(r.stderr, /throws\.mjs: the exported function threw: no secrets here/);
    // No config at all.
    const empty = await tempDir();
    r = await runCli(['check-config'], empty);
    assert.equal(r.code, 1);
    assert.match(r.stderr, /no config file/);
    await rm(empty, { recursive: true, force: true });
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
});

test('milter serve: a TS module served over the milter protocol, driven by connectMilter (inet and unix)', async () => {
  const dir = await tempDir();
  await writeFile(
    path.join(dir, 'my-milter.ts'),
    `import { defineMilter, reject, type Milter } from 'dovetail';
export const milter: Milter = defineMilter({
  name: 'served',
  async rcpt(_ctx, rcpt) { if (rcpt.address.startsWith('nobody@')) return reject(550, '5.1.1', 'no such user here'); },
  async eom(ctx) { ctx.message.addHeader('X-Served', 'by dovetail milter serve'); },
});
`,
  );
  for (const listen of ['inet:127.0.0.1:0', `unix:${path.join(dir, 'milter.sock')}`]) {
    const served = await startCli(['milter', 'serve', './my-milter.ts', '--listen', listen], dir, 'milter-listening');
    const gw = await startGateway({ milters: [connectMilter(served.ready['listen'] as string)] });
    try {
      const c = await ehlo(gw.port);
      const r = await send(c, 'alice@outside.test', ['nobody@example.test', 'bob@example.test'], message('served'));
      assert.equal(r.rcpt[0]?.text, '550 5.1.1 no such user here');
      assert.equal(r.data?.code, 250);
      c.end();
      const [m] = await stored(gw.root, 'bob@example.test');
      assert.match(split(m!).headers, /\r\nX-Served: by dovetail milter serve\r\n/);
    } finally {
      await gw.close();
      assert.equal(await served.stop('SIGTERM'), 0);
    }
    assert.ok(served.lines.some((l) => l.event === 'stopped'));
  }
  // A module that exports no milter: exit 1, said why.
  await writeFile(path.join(dir, 'none.mjs'), 'export const x = 1;\n');
  const r = await runCli(['milter', 'serve', 'none.mjs', '--listen', 'inet:127.0.0.1:0'], dir);
  assert.equal(r.code, 1);
  assert.match(r.stderr, /none\.mjs: exports no milter/);
  await rm(dir, { recursive: true, force: true });
});

test('start: the TS example config (Milter objects, routes to the embedded store) runs from a directory of its own', async () => {
  const dir = await tempDir();
  let gw: Awaited<ReturnType<typeof startCli>> | undefined;
  try {
    const text = await readFile(path.join(REPO, 'examples/dovetail.config.ts'), 'utf8');
    assert.match(text, /port: 2525/);
    await writeFile(path.join(dir, 'dovetail.config.ts'), text.replace('port: 2525', 'port: 0'));
    gw = await startCli(['start'], dir);
    const c = await ehlo(listenPort(gw.ready));
    const r = await send(c, 'alice@sender.test', ['nobody@example.test', 'bob@example.test'], message('ts example'));
    assert.match(r.rcpt[0]!.text, /^550 5\.1\.1 <nobody@example\.test>: Recipient address rejected/);
    assert.equal(r.data?.code, 250, r.data?.text);
    c.end();
    const [m] = await stored(path.join(dir, 'var/mail'), 'bob@example.test');
    assert.match(split(m!).headers, /\r\nX-Dovetail: checked by mx\.dovetail\.test \(queue id \S+\)\r\n/);
    assert.equal(await gw.stop('SIGINT'), 0);
  } finally {
    await gw?.stop('SIGKILL');
    await rm(dir, { recursive: true, force: true });
  }
});
