/**
 * Interop: messages signed by the dkimSign milter in a running gateway verify with OpenDKIM
 * itself. The keys are made the way docs/milters/dkim-sign.md tells operators to: RSA 2048
 * with `opendkim-genkey` (its TXT record published as opendkim-genkey writes it), Ed25519
 * with `openssl genpkey` (the raw public key, RFC 8463). Both records are served by a DNS
 * server on loopback; OpenDKIM (the `opendkim` filter in test mode, `opendkim -t FILE`, with
 * `Mode v`) asks it through libunbound (`ResolverConfiguration`: a forward zone to that
 * server), so the keys really come from DNS. Debian's opendkim is built with libunbound; one
 * built without it gets the same records through `TestDNSData` instead.
 *
 * Checked: relaxed/relaxed and simple/simple, RSA-SHA256 and Ed25519-SHA256 (opendkim 2.11
 * verifies both), after other milters edited the message; a tampered copy fails.
 *
 * The binaries are Debian's opendkim and opendkim-tools (CI installs them). A missing binary
 * fails this test; it is never skipped.
 */
import { test, after, before } from 'node:test';
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { constants as fsConstants } from 'node:fs';
import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { defineMilter } from '../../lib/index.js';
import { dkimDnsRecord, dkimSign, type DkimCanonicalization } from '../../milters/dkim-sign.js';
import { spamTag } from '../../milters/spam-tag.js';
import { startDnsServer, type TestDnsServer } from '../helpers/dns-server.js';
import { ehlo, send, startGateway, stored } from '../helpers/smtp.js';

let dns: TestDnsServer;
let dir: string;

before(async () => {
  dns = await startDnsServer();
  dir = await fs.mkdtemp(path.join(os.tmpdir(), 'dovetail-opendkim-sign-'));
  await fs.chmod(dir, 0o700);
});
after(async () => {
  await dns.close();
  await fs.rm(dir, { recursive: true, force: true });
});

/** Finds a binary on PATH or in the sbin directories Debian puts opendkim in; throws if absent. */
async function which(name: string): Promise<string> {
  const dirs = [...(process.env['PATH'] ?? '').split(path.delimiter), '/usr/sbin', '/usr/bin', '/sbin', '/usr/local/sbin'];
  for (const d of dirs.filter(Boolean)) {
    const p = path.join(d, name);
    try {
      await fs.access(p, fsConstants.X_OK);
      return p;
    } catch {
      // next
    }
  }
  throw new Error(`${name} is not installed (Debian: apt-get install opendkim opendkim-tools openssl); this interop test needs it`);
}

function run(file: string, args: readonly string[], encoding: 'utf8' | 'buffer' = 'utf8'): Promise<{ stdout: string | Buffer; stderr: string | Buffer }> {
  return new Promise((resolve, reject) => {
    execFile(file, [...args], { timeout: 30_000, cwd: dir, encoding }, (err, stdout, stderr) => {
      if (err) reject(new Error(`${file} ${args.join(' ')} failed: ${err.message}\n${String(stderr)}`));
      else resolve({ stdout, stderr });
    });
  });
}

/** The record text of an opendkim-genkey `.txt` file: its quoted strings, joined. */
function recordOf(zoneFile: string): string {
  const strings = [...zoneFile.matchAll(/"((?:[^"\\]|\\.)*)"/g)].map((m) => m[1]!);
  assert.ok(strings.length > 0, `no TXT data in ${zoneFile}`);
  return strings.join('');
}

/** Runs opendkim in test mode as a verifier over a message file; returns the Authentication-Results it would add, unfolded. */
async function opendkimVerify(opendkim: string, conf: string, message: Buffer, label: string): Promise<string> {
  const file = path.join(dir, `${label}.eml`);
  await fs.writeFile(file, message);
  const { stdout, stderr } = await run(opendkim, ['-x', conf, '-vvv', '-t', file]);
  const out = String(stdout) + String(stderr);
  const m = /hname='Authentication-Results' hvalue='([^']*)'/.exec(out);
  assert.ok(m, `opendkim added no Authentication-Results:\n${out}`);
  return m[1]!.replace(/\r?\n[ \t]+/g, ' ');
}

test('messages signed by dkimSign (RSA from opendkim-genkey, Ed25519 from openssl) verify with OpenDKIM; a tampered copy fails', async () => {
  const opendkim = await which('opendkim');
  const genkey = await which('opendkim-genkey');
  const openssl = await which('openssl');

  // RSA: opendkim-genkey -b 2048 -d example.test -s odk → odk.private, odk.txt
  await run(genkey, ['-b', '2048', '-d', 'example.test', '-s', 'odk', '-D', dir]);
  const rsaPem = await fs.readFile(path.join(dir, 'odk.private'), 'utf8');
  const rsaRecord = recordOf(await fs.readFile(path.join(dir, 'odk.txt'), 'utf8'));
  dns.txt('odk._domainkey.example.test', rsaRecord);
  // Ed25519: openssl genpkey -algorithm ed25519; the record's p= is the last 32 bytes of the DER public key.
  await run(openssl, ['genpkey', '-algorithm', 'ed25519', '-out', path.join(dir, 'ed.pem')]);
  const edPem = await fs.readFile(path.join(dir, 'ed.pem'), 'utf8');
  const der = (await run(openssl, ['pkey', '-in', path.join(dir, 'ed.pem'), '-pubout', '-outform', 'DER'], 'buffer')).stdout as Buffer;
  const edRecord = `v=DKIM1; k=ed25519; p=${der.subarray(-32).toString('base64')}`;
  assert.equal(dkimDnsRecord(edPem), edRecord, 'dkimDnsRecord gives the record the documented openssl commands make');
  dns.txt('ed._domainkey.example.test', edRecord);

  // How opendkim reaches the records: libunbound forwarding to the loopback server, or TestDNSData.
  const v = await run(opendkim, ['-V']);
  const version = String(v.stdout) + String(v.stderr);
  const unbound = /USE_UNBOUND/.test(version);
  assert.match(version, /ed25519-sha256/, 'this opendkim verifies Ed25519 signatures');
  const conf = path.join(dir, 'verify.conf');
  const lines = ['Mode v', 'Syslog no'];
  if (unbound) {
    const ub = path.join(dir, 'unbound.conf');
    await fs.writeFile(
      ub,
      [
        'server:',
        '  do-not-query-localhost: no',
        '  module-config: "iterator"',
        '  chroot: ""',
        '  username: ""',
        '  use-syslog: no',
        '  local-zone: "test." nodefault', // unbound answers .test (RFC 6761) itself otherwise
        'forward-zone:',
        '  name: "."',
        `  forward-addr: 127.0.0.1@${dns.port}`,
        '',
      ].join('\n'),
    );
    lines.push(`ResolverConfiguration ${ub}`);
  } else {
    const data = path.join(dir, 'dns.data');
    await fs.writeFile(data, `odk._domainkey.example.test ${rsaRecord}\ned._domainkey.example.test ${edRecord}\n`);
    lines.push(`TestDNSData file:${data}`);
  }
  await fs.writeFile(conf, lines.join('\n') + '\n', { mode: 0o600 });

  const scorer = defineMilter({
    name: 'scorer',
    async eom(ctx) {
      ctx.score.add(6, 'TEST_RULE');
      ctx.message.addHeader('Reply-To', 'help@example.test');
    },
  });
  for (const canonicalization of ['relaxed/relaxed', 'simple/simple'] as DkimCanonicalization[]) {
    const gw = await startGateway({
      milters: [
        scorer,
        spamTag({ requiredScore: 5, subjectTag: '[SPAM]' }),
        dkimSign({
          keys: [
            { domain: 'example.test', selector: 'odk', privateKey: rsaPem },
            { domain: 'example.test', selector: 'ed', privateKey: edPem },
          ],
          mynetworks: ['127.0.0.0/8', '::1/128'],
          canonicalization,
        }),
      ],
    });
    try {
      const c = await ehlo(gw.port);
      const message =
        'From: Alice <alice@example.test>\r\nTo: Bob <bob@dest.test>\r\nCc: carol@dest.test\r\n' +
        `Subject:  signed by dkimSign,\t${canonicalization} \r\n  folded\r\nDate: Mon, 01 Jan 2024 10:00:00 +0000\r\n` +
        `Message-ID: <dks-${canonicalization.replace('/', '-')}@example.test>\r\nMIME-Version: 1.0\r\n` +
        'Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n' +
        'Hello Bob,  \r\n\r\n\tthis was signed by the dkimSign milter. Caf\u00e9.\t\r\n \r\n\r\n\r\n';
      const r = await send(c, 'alice@example.test', ['bob@dest.test'], message);
      assert.equal(r.data?.code, 250, r.data?.text);
      c.end();
      const [m] = await stored(gw.root, 'bob@dest.test');
      assert.ok(m, 'stored');
      assert.match(m.toString('utf8'), /\r\nSubject: \[SPAM\] /, 'edited by spamTag before it was signed');
      const label = canonicalization.replace('/', '-');

      const ar = await opendkimVerify(opendkim, conf, m, label);
      assert.match(ar, /dkim=pass \(2048-bit key[^)]*\) header\.d=example\.test header\.i=@example\.test header\.a=rsa-sha256 header\.s=odk/, `${canonicalization}: ${ar}`);
      assert.match(ar, /dkim=pass header\.d=example\.test header\.i=@example\.test header\.a=ed25519-sha256 header\.s=ed/, `${canonicalization}: ${ar}`);

      const tampered = Buffer.from(m.toString('latin1').replace('signed by the dkimSign milter', 'signed by somebody else'), 'latin1');
      const bad = await opendkimVerify(opendkim, conf, tampered, `${label}-tampered`);
      assert.doesNotMatch(bad, /dkim=pass/, `${canonicalization} tampered: ${bad}`);
      assert.match(bad, /dkim=fail .*header\.s=odk/);
      assert.match(bad, /dkim=fail .*header\.s=ed/);
    } finally {
      await gw.close();
    }
  }
  if (unbound) {
    assert.ok(dns.count('odk._domainkey.example.test', 'TXT') >= 1, 'opendkim fetched the RSA key from the loopback DNS server');
    assert.ok(dns.count('ed._domainkey.example.test', 'TXT') >= 1, 'opendkim fetched the Ed25519 key from the loopback DNS server');
  }
});
