/**
 * The examples run: the quick start gateway accepts a message from a real client
 * (nodemailer) and stores it in its Maildir, stamped by the default chain.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import nodemailer from 'nodemailer';
import { startQuickstart } from '../../examples/quickstart.js';

test('quick start: a message sent with nodemailer goes over LMTP into the embedded store, stamped; nobody@ is refused', async () => {
  const dir = await fs.mkdtemp(path.join(os.tmpdir(), 'dovetail-qs-'));
  const root = path.join(dir, 'mail');
  await fs.mkdir(root);
  const qs = await startQuickstart({ port: 0, root });
  const { port } = qs;
  try {
    const transport = nodemailer.createTransport({ host: '127.0.0.1', port, secure: false, ignoreTLS: true, name: 'client.example' });
    const info = await transport.sendMail({
      from: 'alice@sender.example',
      to: ['bob@example.test', 'nobody@example.test'],
      subject: 'quick start',
      text: 'hello',
    });
    transport.close();
    assert.deepEqual(info.accepted, ['bob@example.test']);
    assert.deepEqual(info.rejected, ['nobody@example.test']);
    // Not our domain: the default chain is no open relay.
    const t2 = nodemailer.createTransport({ host: '127.0.0.1', port, secure: false, ignoreTLS: true, name: 'client.example' });
    await assert.rejects(
      t2.sendMail({ from: 'alice@sender.example', to: 'someone@elsewhere.example', subject: 'relay?', text: 'x' }),
      (err: { response?: string }) => /^554 5\.7\.1 <someone@elsewhere\.example>: Relay access denied/.test(err.response ?? ''),
    );
    t2.close();
    const newDir = path.join(root, 'bob@example.test', 'new');
    const [file] = await fs.readdir(newDir);
    const stored = await fs.readFile(path.join(newDir, file!), 'utf8');
    assert.match(stored, /\r\nX-Dovetail: checked by mx\.dovetail\.test \(queue id [0-9A-Z]{12}, 127\.0\.0\.1\)\r\n/);
    assert.match(stored, /\r\nSubject: quick start\r\n/);
    assert.match(stored, /^Return-Path: <alice@sender\.example>\r\n/);
    assert.match(stored, /\r\nX-Spam-Status: No, score=0\.1 required=5\.0 tests=DOVETAIL_QUICKSTART\r\n/);
    assert.match(stored, /\r\n\r\nhello\r?\n?$/);
  } finally {
    await qs.close();
    await fs.rm(dir, { recursive: true, force: true });
  }
});
