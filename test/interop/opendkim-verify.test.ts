/**
 * Interop: a message signed by OpenDKIM itself verifies through the mailAuth milter in a
 * running gateway. The key is made by `opendkim-genkey`, its TXT record (as opendkim-genkey
 * writes it) is published in a loopback DNS server, and the signature comes from the
 * `opendkim` filter run in test mode (`opendkim -t FILE`, which runs its milter callbacks
 * over the file and prints the header field the filter inserts).
 * Both canonicalizations are checked, and a tampered copy must fail.
 *
 * The binaries are Debian's opendkim and opendkim-tools (CI installs them). A missing binary
 * fails this test; it is never skipped.
 */
import { test, after, before } from 'node:test';
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import fs from 'node:fs/promises';
import { constants as fsConstants } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { mailAuth } from '../../milters/mail-auth.js';
import { startDnsServer, type TestDnsServer } from '../helpers/dns-server.js';
import { ehlo, send, split, startGateway, stored } from '../helpers/smtp.js';

let dns: TestDnsServer;
let dir: string;

before(async () => {
  dns = await startDnsServer();
  dns.txt('example.test', 'v=spf1 ip4:127.0.0.1 -all');
  dir = await fs.mkdtemp(path.join(os.tmpdir(), 'dovetail-opendkim-'));
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
  throw new Error(`${name} is not installed (Debian: apt-get install opendkim opendkim-tools); this interop test needs it`);
}

function run(file: string, args: readonly string[]): Promise<{ stdout: string; stderr: string }> {
  return new Promise((resolve, reject) => {
    execFile(file, [...args], { timeout: 20_000, cwd: dir }, (err, stdout, stderr) => {
      if (err) reject(new Error(`${file} ${args.join(' ')} failed: ${err.message}\n${stderr}`));
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

/** Runs opendkim in test mode as a signer and returns the DKIM-Signature field it inserted, CRLF-folded. */
async function opendkimSign(opendkim: string, message: string, canonicalization: string, selector: string, keyFile: string): Promise<string> {
  const msgFile = path.join(dir, `msg-${canonicalization.replace('/', '-')}.eml`);
  const conf = path.join(dir, `opendkim-${canonicalization.replace('/', '-')}.conf`);
  await fs.writeFile(msgFile, message);
  await fs.writeFile(
    conf,
    [
      'Mode s',
      'Domain example.test',
      `Selector ${selector}`,
      `KeyFile ${keyFile}`,
      `Canonicalization ${canonicalization}`,
      'RequireSafeKeys false',
      'Syslog no',
      '',
    ].join('\n'),
    { mode: 0o600 },
  );
  const { stdout, stderr } = await run(opendkim, ['-x', conf, '-t', msgFile]);
  // Without -v, test mode prints each header field the filter added ("opendkim: FILE:" and
  // the field, folded with LF + tab); with -vvv it prints "### INSHEADER: ... hvalue='...'".
  const out = stdout + stderr;
  const m = /^DKIM-Signature: (.*(?:\r?\n[ \t].*)*)/m.exec(out) ?? /hname='DKIM-Signature' hvalue='([^']*)'/.exec(out);
  assert.ok(m, `opendkim did not insert a DKIM-Signature:\n${out}`);
  const value = m[1]!.replace(/\r?\n/g, '\r\n');
  assert.match(value, new RegExp(`c=${canonicalization.replace('/', '\\/')}`));
  return `DKIM-Signature: ${value}\r\n`;
}

test('a message signed by opendkim (simple/simple and relaxed/relaxed) verifies through mailAuth; a tampered copy fails', async () => {
  const opendkim = await which('opendkim');
  const genkey = await which('opendkim-genkey');
  await run(genkey, ['-b', '2048', '-d', 'example.test', '-s', 'odk', '-D', dir]);
  const record = recordOf(await fs.readFile(path.join(dir, 'odk.txt'), 'utf8'));
  assert.match(record, /^v=DKIM1; .*k=rsa; .*p=[A-Za-z0-9+/=]+$/);
  dns.txt('odk._domainkey.example.test', record);
  const keyFile = path.join(dir, 'odk.private');

  const gw = await startGateway({ milters: [mailAuth({ resolver: dns.resolver() })] });
  try {
    const c = await ehlo(gw.port, 'client.example.test');
    for (const canonicalization of ['simple/simple', 'relaxed/relaxed']) {
      const message =
        'From: Alice <alice@example.test>\r\nTo: Bob <bob@dest.test>\r\n' +
        `Subject: signed by opendkim, ${canonicalization}\r\nDate: Mon, 01 Jan 2024 10:00:00 +0000\r\n` +
        `Message-ID: <odk-${canonicalization.replace('/', '-')}@example.test>\r\n\r\n` +
        'Hello Bob,\r\n\r\nthis was signed by the opendkim filter.\r\n';
      const signature = await opendkimSign(opendkim, message, canonicalization, 'odk', keyFile);
      for (const [content, verdict] of [
        [signature + message, 'pass'],
        [signature + message.replace('signed by the opendkim filter', 'signed by somebody else'), 'fail'],
      ] as const) {
        const r = await send(c, 'alice@example.test', ['bob@dest.test'], content);
        assert.equal(r.data?.code, 250, `${canonicalization} ${verdict}`);
        // Find this one among those stored so far (Maildir names do not sort by arrival within a second).
        const m = (await stored(gw.root, 'bob@dest.test')).find((x) => x.toString('utf8').endsWith(content));
        assert.ok(m, 'stored');
        const ar = split(m).headers.replace(/\r\n[ \t]+/g, ' ').split('\r\n').find((l) => l.startsWith('Authentication-Results:'));
        assert.ok(ar, 'Authentication-Results added');
        assert.match(ar, new RegExp(`dkim=${verdict} .*header\\.i=@example\\.test header\\.s=odk header\\.a=rsa-sha256`), `${canonicalization}: ${ar}`);
        if (verdict === 'fail') assert.match(ar, /dkim=fail \(body hash did not verify\)/);
        assert.match(ar, /dmarc=none|spf=pass/);
      }
    }
    c.end();
    assert.ok(dns.count('odk._domainkey.example.test', 'TXT') >= 1, 'the key was fetched from the loopback DNS server');
  } finally {
    await gw.close();
  }
});
