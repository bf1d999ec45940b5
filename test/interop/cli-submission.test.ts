/**
 * `dovetail start` with a submission listener, certificate files and AUTH against a real
 * Dovecot auth service, all from a JSON config; then SIGHUP after the certificate files
 * were replaced and `authenticate` pointed at another Dovecot listener: new connections get
 * the new certificate and authenticate through it, a connection opened before keeps its TLS
 * session and finishes its message.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import type tls from 'node:tls';
import { startCli, type RunningCli } from '../helpers/cli.js';
import { startDovecotAuth, type DovecotAuth } from '../helpers/dovecot-auth.js';
import { ehlo, message, send, split, stored } from '../helpers/smtp.js';
import { selfSignedCert } from '../helpers/tls.js';

const fingerprint = (c: { socket: unknown }): string => (c.socket as tls.TLSSocket).getPeerCertificate().fingerprint256;

test('dovetail start: submission with STARTTLS and Dovecot AUTH from a config file; SIGHUP re-reads the certificate and rebuilds authenticate', async () => {
  const dir = await mkdtemp(path.join(os.tmpdir(), 'dovetail-cli-sub-'));
  let dovecot: DovecotAuth | undefined;
  let gw: RunningCli | undefined;
  try {
    dovecot = await startDovecotAuth([{ user: 'alice@example.test', password: 'secret' }]);
    const first = selfSignedCert('one.test');
    await writeFile(path.join(dir, 'key.pem'), first.key);
    await writeFile(path.join(dir, 'cert.pem'), first.cert);
    const config = {
      hostname: 'mx.example.test',
      resolveClientNames: false,
      listen: [
        { port: 0, name: 'mx', auth: false },
        { port: 0, name: 'submission', submission: true },
      ],
      tls: { key: './key.pem', cert: './cert.pem' },
      authenticate: { dovecot: `unix:${dovecot.socketPath}` },
      limits: { authFailureDelay: 0 },
      delivery: { maildir: './mail' },
    };
    const file = path.join(dir, 'dovetail.config.json');
    await writeFile(file, JSON.stringify(config));
    gw = await startCli(['start', '-c', file], dir);
    const [mx, sub] = gw.ready['listen'] as { port: number }[];

    // Port 25 profile: no AUTH. Submission: nothing before AUTH, AUTH after STARTTLS.
    const plain = await ehlo(mx!.port);
    assert.doesNotMatch((await plain.cmd('EHLO c.test')).text, /AUTH/);
    plain.end();
    const before = await ehlo(sub!.port);
    assert.equal((await before.cmd('MAIL FROM:<alice@example.test>')).code, 530);
    await before.starttls();
    const oldPrint = fingerprint(before);
    assert.equal((await before.authPlain('alice@example.test', 'wrong')).code, 535);
    assert.equal((await before.authPlain('alice@example.test', 'secret')).code, 235);
    assert.equal((await before.cmd('MAIL FROM:<alice@example.test>')).code, 250);
    assert.equal((await before.cmd('RCPT TO:<bob@example.test>')).code, 250);

    // New certificate files; authenticate over Dovecot's inet listener instead.
    const second = selfSignedCert('two.test');
    await writeFile(path.join(dir, 'key.pem'), second.key);
    await writeFile(path.join(dir, 'cert.pem'), second.cert);
    await writeFile(file, JSON.stringify({ ...config, authenticate: { dovecot: `inet:127.0.0.1:${dovecot.port}` } }));
    const from = gw.lines.length;
    gw.process.kill('SIGHUP');
    await gw.waitForLine('reloaded', (l) => l.event === 'reloaded', from);
    assert.ok(!gw.lines.slice(from).some((l) => l.event === 'reload-needs-restart'), JSON.stringify(gw.lines.slice(from)));

    const after = await ehlo(sub!.port);
    await after.starttls();
    assert.notEqual(fingerprint(after), oldPrint);
    assert.equal((await after.authPlain('alice@example.test', 'secret')).code, 235);
    assert.equal((await send(after, 'alice@example.test', ['carol@example.test'], message('after reload'))).data?.code, 250);
    after.end();

    assert.equal((await before.data(message('before reload'))).code, 250);
    assert.equal(fingerprint(before), oldPrint);
    before.end();
    assert.match(split((await stored(path.join(dir, 'mail'), 'bob@example.test'))[0]!).headers, /\r\nSubject: before reload\r\n/);
    assert.match(split((await stored(path.join(dir, 'mail'), 'carol@example.test'))[0]!).headers, /\r\nSubject: after reload\r\n/);
    assert.equal(await gw.stop('SIGTERM'), 0);
  } finally {
    await gw?.stop('SIGKILL');
    await dovecot?.stop();
    await rm(dir, { recursive: true, force: true });
  }
});
