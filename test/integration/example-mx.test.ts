/**
 * The MX example (examples/mx-gateway.ts) runs: the five bundled milters in MX order, over
 * real SMTP, against a real DNS server on loopback (test/helpers/dns-server.ts) that serves
 * the test zones: SPF, a DKIM key generated here, DMARC policies, and DNS lists that list
 * the test client 127.0.0.1 (as 1.0.0.127.<zone>). Messages are signed with mailauth's
 * dkimSign.
 *
 * Gateway `mx` has a DNS list that lists 127.0.0.1 with weight 1 under the threshold of 3
 * (the hit only adds score); gateway `blocked` has one more that lists it with weight 3.
 * The test client is never in mynetworks, so it is treated as the internet.
 */
import { test, after, before } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import type { Resolver } from 'node:dns/promises';
import { dkimSign } from 'mailauth';
import type { Gateway } from '../../lib/index.js';
import { createMxGateway, mxMilters, type MxGatewayOptions } from '../../examples/mx-gateway.js';
import { startDnsServer, type TestDnsServer } from '../helpers/dns-server.js';
import { ehlo, send, split, stored, type RawClient } from '../helpers/smtp.js';

const LIMIT = 64 * 1024;
const HOST = 'mx.example.test';
const DKIM_KEY_NAME = 'sel._domainkey.sender.test';

let dns: TestDnsServer;
let dir: string;
let privateKey: string;
const resolvers: Resolver[] = [];
const gateways: Gateway[] = [];

interface Mx {
  readonly port: number;
  readonly root: string;
  readonly quarantineRoot: string;
}
let mx: Mx;
let blocked: Mx;

async function start(name: string, options: MxGatewayOptions): Promise<Mx> {
  const root = path.join(dir, name, 'mail');
  const quarantineRoot = path.join(dir, name, 'quarantine');
  await fs.mkdir(root, { recursive: true });
  await fs.mkdir(quarantineRoot, { recursive: true });
  const resolver = dns.resolver({ timeout: 2000, tries: 2 });
  resolvers.push(resolver);
  const gateway = createMxGateway({
    hostname: HOST,
    listen: { host: '127.0.0.1', port: 0 },
    root,
    quarantineRoot,
    localDomains: ['example.test'],
    maxMessageBytes: LIMIT,
    resolver,
    dnsTimeout: 3000,
    ...options,
  });
  gateways.push(gateway);
  const [addr] = await gateway.listen();
  return { port: addr!.port, root, quarantineRoot };
}

before(async () => {
  dir = await fs.mkdtemp(path.join(os.tmpdir(), 'dovetail-mx-'));
  dns = await startDnsServer();
  // sender.test: SPF passes for the test client, a DKIM key, DMARC p=reject.
  const keys = crypto.generateKeyPairSync('rsa', { modulusLength: 2048 });
  dns.txt(DKIM_KEY_NAME, `v=DKIM1; k=rsa; p=${keys.publicKey.export({ type: 'spki', format: 'der' }).toString('base64')}`);
  privateKey = keys.privateKey.export({ type: 'pkcs8', format: 'pem' }) as string;
  dns.txt('sender.test', 'v=spf1 ip4:127.0.0.1 -all');
  dns.txt('_dmarc.sender.test', 'v=DMARC1; p=reject');
  // strict.test: SPF for other hosts only, DMARC p=reject, no key: its mail from us is forged.
  dns.txt('strict.test', 'v=spf1 ip4:192.0.2.0/24 -all');
  dns.txt('_dmarc.strict.test', 'v=DMARC1; p=reject');
  // DNS lists: zen does not list the client; weak lists it (weight 1 < 3); block lists it (weight 3).
  dns.a('1.0.0.127.weak.dnsbl.test', '127.0.0.2');
  dns.a('1.0.0.127.block.dnsbl.test', '127.0.0.4');
  const zones = ['zen.dnsbl.test=127.0.0.[2..11]*3', 'weak.dnsbl.test*1'];
  mx = await start('mx', { dnsblZones: zones });
  blocked = await start('blocked', { dnsblZones: [...zones, 'block.dnsbl.test=127.0.0.[2..11]*3'] });
});

after(async () => {
  for (const g of gateways) await g.close();
  for (const r of resolvers) r.cancel();
  await dns?.close();
  if (dir) await fs.rm(dir, { recursive: true, force: true });
});

function rfc822(from: string, subject: string, body = 'Hello Bob,\r\n\r\nsee you at noon.\r\n'): string {
  return (
    `From: ${from}\r\nTo: Bob <bob@example.test>\r\nSubject: ${subject}\r\n` +
    `Date: Mon, 01 Jan 2024 10:00:00 +0000\r\nMessage-ID: <${crypto.randomUUID()}@sender.test>\r\n\r\n${body}`
  );
}

async function sign(message: string): Promise<string> {
  const key = { signingDomain: 'sender.test', selector: 'sel', privateKey };
  const r = await dkimSign(message, { ...key, signatureData: [key] });
  assert.deepEqual(r.errors, []);
  return r.signatures + message;
}

/** The stored message's header lines, unfolded, without the Return-Path and Delivered-To the Maildir adds. */
function headerLines(m: Buffer): string[] {
  return split(m)
    .headers.replace(/\r\n[ \t]+/g, ' ')
    .split('\r\n')
    .filter((l) => l && !l.startsWith('Return-Path:') && !l.startsWith('Delivered-To:'));
}

async function session<T>(port: number, run: (c: RawClient) => Promise<T>): Promise<T> {
  const c = await ehlo(port, 'client.sender.test');
  try {
    return await run(c);
  } finally {
    c.end();
  }
}

test('the chain is the five bundled milters in MX order', () => {
  assert.deepEqual(
    mxMilters({ resolver: dns.resolver() }).map((m) => m.name),
    ['size-limit', 'relay-control', 'dnsbl', 'mail-auth', 'spam-tag'],
  );
});

test('a signed message from an SPF-pass domain is delivered with Authentication-Results, Received-SPF and X-Spam-* (the DNSBL hit scored)', async () => {
  const signed = await sign(rfc822('Alice <alice@sender.test>', 'signed'));
  const r = await session(mx.port, (c) => send(c, 'alice@sender.test', ['bob@example.test'], signed));
  assert.equal(r.rcpt[0]?.code, 250, 'a hit of weight 1 under the threshold 3 does not refuse');
  assert.match(r.data?.text ?? '', /^250 2\.\d\.0 Ok: queued as [0-9A-Z]+$/);
  const [m, extra] = await stored(mx.root, 'bob@example.test');
  assert.ok(m && !extra, 'one message stored');
  const lines = headerLines(m);
  // mailAuth puts its two headers at the very top, above the gateway's Received.
  assert.match(
    lines[0]!,
    /^Authentication-Results: mx\.example\.test; spf=pass [^;]*smtp\.mailfrom=alice@sender\.test[^;]*; dkim=pass header\.i=@sender\.test header\.s=sel header\.a=rsa-sha256 [^;]*; dmarc=pass [^;]*header\.from=sender\.test[^;]*; arc=none$/,
  );
  assert.match(lines[1]!, /^Received-SPF: pass \(.*\) client-ip=127\.0\.0\.1; envelope-from="alice@sender\.test"; helo=client\.sender\.test;$/);
  assert.match(lines[2]!, /^Received: from client\.sender\.test .*by mx\.example\.test/);
  assert.ok(lines.includes('X-Dovetail-DNSBL: client [127.0.0.1] listed by weak.dnsbl.test (127.0.0.2), weight 1'), lines.join('\n'));
  // spamTag, last, saw every score: DNSBL_WEAK +1, SPF_PASS -0.2, DKIM_VALID -0.2, DKIM_VALID_AU -0.2, DMARC_PASS -0.5.
  const spam = lines.filter((l) => l.startsWith('X-Spam-')).map((l) => l.trimEnd());
  assert.deepEqual(spam, [
    'X-Spam-Score: -0.1',
    'X-Spam-Level:',
    'X-Spam-Status: No, score=-0.1 required=5.0 tests=DKIM_VALID,DKIM_VALID_AU,DMARC_PASS,DNSBL_WEAK,SPF_PASS',
  ]);
  assert.ok(!lines.some((l) => l.startsWith('X-Spam-Flag:')), 'not spam: no X-Spam-Flag');
});

test('a relay attempt from a client outside mynetworks gets 554 5.7.1; the local recipient of the same message is accepted', async () => {
  await session(mx.port, async (c) => {
    assert.equal((await c.cmd('MAIL FROM:<alice@sender.test>')).code, 250);
    assert.equal((await c.cmd('RCPT TO:<someone@elsewhere.example>')).text, '554 5.7.1 <someone@elsewhere.example>: Relay access denied');
    assert.equal((await c.cmd('RCPT TO:<user%elsewhere.example@example.test>')).text, '554 5.7.1 <user%elsewhere.example@example.test>: Relay access denied', 'percent hack');
    assert.equal((await c.cmd('RCPT TO:<carol@example.test>')).code, 250);
    assert.equal((await c.cmd('RSET')).code, 250);
  });
});

test('an oversized message gets 552 5.3.4: declared at MAIL FROM at once, or at the end of DATA; nothing stored, no DKIM lookup', async () => {
  await session(mx.port, async (c) => {
    const declared = await c.cmd(`MAIL FROM:<alice@sender.test> SIZE=${LIMIT + 1}`);
    assert.match(declared.text, /^552 5\.3\.4 /);
    const keyLookups = dns.count(DKIM_KEY_NAME);
    const big = await sign(rfc822('Alice <alice@sender.test>', 'big', ('x'.repeat(998) + '\r\n').repeat(100)));
    assert.ok(big.length > LIMIT);
    const r = await send(c, 'alice@sender.test', ['dave@example.test'], big);
    assert.equal(r.rcpt[0]?.code, 250);
    assert.equal(r.data?.text, `552 5.3.4 Error: message size exceeds the ${LIMIT}-byte limit of ${HOST}`);
    assert.equal(dns.count(DKIM_KEY_NAME), keyLookups, 'no milter looked at the message: its DKIM key was never fetched');
  });
  assert.deepEqual(await stored(mx.root, 'dave@example.test'), []);
});

test('unsigned mail in the name of a DMARC p=reject domain is refused at the end of DATA with 550 5.7.1', async () => {
  const r = await session(mx.port, (c) => send(c, 'mallory@strict.test', ['erin@example.test'], rfc822('Strict Bank <service@strict.test>', 'your account')));
  assert.equal(r.mail.code, 250, 'SPF fail alone is not refused at MAIL: DMARC decides');
  assert.equal(r.rcpt[0]?.code, 250);
  assert.equal(r.data?.text, '550 5.7.1 Rejected by DMARC policy for strict.test');
  assert.deepEqual(await stored(mx.root, 'erin@example.test'), []);
  assert.deepEqual(await stored(mx.quarantineRoot, 'erin@example.test'), []);
});

test('a blocking DNS list refuses at RCPT, naming the list; relayControl, before it, still answers a relay attempt', async () => {
  await session(blocked.port, async (c) => {
    assert.equal((await c.cmd('MAIL FROM:<alice@sender.test>')).code, 250, 'the reject is delayed to RCPT');
    assert.equal((await c.cmd('RCPT TO:<bob@example.test>')).text, '554 5.7.1 Service unavailable; client [127.0.0.1] blocked using block.dnsbl.test');
    assert.equal((await c.cmd('RCPT TO:<someone@elsewhere.example>')).text, '554 5.7.1 <someone@elsewhere.example>: Relay access denied');
    assert.equal((await c.cmd('DATA')).code, 503, 'no recipient was accepted');
  });
  assert.deepEqual(await stored(blocked.root, 'bob@example.test'), []);
});

test('run as a script it listens, says what it does, delivers, and stops on SIGINT', async () => {
  const script = fileURLToPath(new URL('../../examples/mx-gateway.js', import.meta.url));
  const root = path.join(dir, 'script', 'mail');
  const child = spawn(process.execPath, [script], {
    env: {
      ...process.env,
      PORT: '0',
      MAIL_ROOT: root,
      DNS_SERVERS: dns.servers.join(','),
      DNS_TIMEOUT: '2000',
      DNSBL_ZONES: 'zen.dnsbl.test=127.0.0.[2..11]*3',
    },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let out = '';
  child.stdout.setEncoding('utf8').on('data', (d: string) => (out += d));
  child.stderr.setEncoding('utf8').on('data', (d: string) => (out += d));
  const exited = new Promise<number | null>((resolve) => child.once('exit', (code) => resolve(code)));
  const waitFor = async (re: RegExp): Promise<RegExpExecArray> => {
    const end = Date.now() + 10_000;
    for (;;) {
      const m = re.exec(out);
      if (m) return m;
      if (Date.now() > end || child.exitCode !== null) throw new Error(`no ${re} in the script's output:\n${out}`);
      await new Promise((r) => setTimeout(r, 25));
    }
  };
  try {
    const port = Number((await waitFor(/listening on 127\.0\.0\.1:(\d+)/))[1]);
    assert.match(out, /milter chain: +size-limit -> relay-control -> dnsbl -> mail-auth -> spam-tag/);
    assert.match(out, new RegExp(`DNS servers: +${dns.servers[0]!.replace(/\./g, '\\.')}`));
    const r = await session(port, (c) => send(c, 'alice@sender.test', ['bob@example.test', 'x@elsewhere.example'], rfc822('Alice <alice@sender.test>', 'script')));
    assert.equal(r.rcpt[1]?.code, 554);
    assert.equal(r.data?.code, 250);
    await waitFor(/relay-control at rcpt: reject 554 5\.7\.1 <x@elsewhere\.example>: Relay access denied/);
    await waitFor(/message [0-9A-Z]+, \d+ bytes: 250 /);
    const [m] = await stored(root, 'bob@example.test');
    assert.ok(m, 'stored under MAIL_ROOT');
    assert.match(headerLines(m)[0]!, /^Authentication-Results: mx\.example\.test; spf=pass /);
    child.kill('SIGINT');
    assert.equal(await exited, 0);
    assert.match(out, /closed\n/);
  } finally {
    if (child.exitCode === null) child.kill('SIGKILL');
  }
});
