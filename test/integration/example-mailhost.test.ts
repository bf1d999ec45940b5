/**
 * examples/mailhost.ts runs: our domain into the embedded store before the 250, everything
 * else queued and sent on by MX (a loopback DNS server points remote.test at a next hop on
 * loopback), relaying only for authenticated users (AUTH over STARTTLS with a real client),
 * and a stranger may send to our domain but not through us.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import nodemailer from 'nodemailer';
import { startMailhost } from '../../examples/mailhost.js';
import { startDnsServer } from '../helpers/dns-server.js';
import { startPeer } from '../helpers/smtp-peer.js';
import { selfSignedCert } from '../helpers/tls.js';
import { stored } from '../helpers/smtp.js';

test('mailhost example: local delivery, MX delivery through the queue for an authenticated user, no relay for strangers', async () => {
  const base = await fs.mkdtemp(path.join(os.tmpdir(), 'dovetail-mailhost-'));
  const dns = await startDnsServer();
  const peer = await startPeer({ name: 'mx.remote.test' });
  dns.add('remote.test', { type: 'MX', value: { exchange: 'mx.remote.test', priority: 10 } });
  dns.a('mx.remote.test', '127.0.0.1');
  const m = await startMailhost({
    base,
    port: 0,
    mynetworks: [], // loopback is a stranger here: only AUTH lets it relay
    users: { 'alice@example.test': 'correct horse' },
    tls: selfSignedCert('mail.example.test'),
    resolver: dns.resolver({ timeout: 3000, tries: 2 }),
    smtpPort: peer.port,
    backoff: { min: 200, max: 400 },
  });
  try {
    const stranger = nodemailer.createTransport({ host: m.host, port: m.port, secure: false, ignoreTLS: true, name: 'client.example' });
    const info = await stranger.sendMail({ from: 'someone@elsewhere.test', to: 'bob@example.test', subject: 'to us', text: 'hi bob' });
    assert.match(info.response, /^250 /);
    assert.equal((await stored(m.root, 'bob@example.test')).length, 1, 'stored before the 250');
    await assert.rejects(
      stranger.sendMail({ from: 'someone@elsewhere.test', to: 'x@remote.test', subject: 'relay?', text: 'x' }),
      (err: { response?: string }) => /^554 5\.7\.1 <x@remote\.test>: Relay access denied/.test(err.response ?? ''),
    );
    stranger.close();

    const alice = nodemailer.createTransport({ host: m.host, port: m.port, secure: false, requireTLS: true, tls: { rejectUnauthorized: false }, auth: { user: 'alice@example.test', pass: 'correct horse' }, name: 'laptop.example' });
    const sent = await alice.sendMail({ from: 'alice@example.test', to: ['x@remote.test', 'bob@example.test'], subject: 'out and in', text: 'hello both' });
    alice.close();
    assert.match(sent.response, /^250 /);
    assert.equal((await stored(m.root, 'bob@example.test')).length, 2);
    const [out] = await peer.waitFor(1);
    assert.deepEqual(out!.to, ['x@remote.test']);
    assert.match(out!.data.toString(), /by mail\.example\.test \(dovetail\) with ESMTPSA id /);
    assert.deepEqual((await fs.readdir(m.root)).sort(), ['bob@example.test'], 'nothing stored for the remote recipient');
  } finally {
    await m.close();
    await peer.close();
    await dns.close();
    await fs.rm(base, { recursive: true, force: true });
  }
});
