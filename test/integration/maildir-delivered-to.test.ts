/**
 * maildir() and createLmtpServer(): the Delivered-To line and its loop check (Postfix
 * local(8)/virtual(8): `554 5.4.6 mail forwarding loop for <address>`), and the recipient
 * delimiter (`bob+tag@` stored in bob's maildir). Real files, real LMTP sockets.
 */
import assert from 'node:assert/strict';
import { mkdir, mkdtemp, readdir, readFile, rm, stat } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { Readable } from 'node:stream';
import { after, before, describe, it } from 'node:test';
import { maildir } from '../../lib/delivery/maildir.js';
import { createLmtpServer } from '../../lib/delivery/lmtp-server.js';
import { lmtp } from '../../lib/delivery/lmtp.js';
import type { DeliveryEnvelope, MessageSource } from '../../lib/delivery/types.js';
import { ehlo, message, send, split, startGateway } from '../helpers/smtp.js';

const MESSAGE = Buffer.from('From: Carol <carol@example.org>\r\nTo: alice@example.com\r\nSubject: hi\r\n\r\nHello there.\r\n');

const envelope = (sender: string, ...recipients: string[]): DeliveryEnvelope => ({
  queueId: 'Q1',
  sender: { address: sender, args: {} },
  recipients: recipients.map((address) => ({ address, args: {} })),
});
const source = (buf: Buffer): MessageSource => ({ size: buf.length, stream: () => Readable.from([buf]) });

async function files(root: string, box: string): Promise<{ data: Buffer; nlink: number }[]> {
  const dir = path.join(root, box, 'new');
  const names = (await readdir(dir).catch(() => [] as string[])).sort();
  return Promise.all(names.map(async (n) => ({ data: await readFile(path.join(dir, n)), nlink: (await stat(path.join(dir, n))).nlink })));
}

let base: string;
let n = 0;
async function freshRoot(): Promise<string> {
  const root = path.join(base, `root${++n}`);
  await mkdir(root);
  return root;
}
before(async () => {
  base = await mkdtemp(path.join(os.tmpdir(), 'dovetail-dt-'));
});
after(async () => {
  await rm(base, { recursive: true, force: true });
});

describe('maildir(): Delivered-To', () => {
  it('gives each recipient its own copy, starting Return-Path then Delivered-To: <that recipient>', async () => {
    const root = await freshRoot();
    const results = await maildir({ root }).deliver(envelope('carol@example.org', 'alice@example.com', 'Bob@Example.com'), source(MESSAGE));
    assert.deepEqual(
      results.map((r) => [r.recipient, r.status, r.reply.code]),
      [
        ['alice@example.com', 'delivered', 250],
        ['Bob@Example.com', 'delivered', 250],
      ],
    );
    const [a] = await files(root, 'alice@example.com');
    const [b] = await files(root, 'bob@example.com');
    assert.deepEqual(a?.data, Buffer.concat([Buffer.from('Return-Path: <carol@example.org>\r\nDelivered-To: alice@example.com\r\n'), MESSAGE]));
    // The address as the envelope has it (case kept), as Postfix writes it.
    assert.deepEqual(b?.data, Buffer.concat([Buffer.from('Return-Path: <carol@example.org>\r\nDelivered-To: Bob@Example.com\r\n'), MESSAGE]));
    // Two different files, not links of one.
    assert.equal(a?.nlink, 1);
    assert.equal(b?.nlink, 1);
    for (const box of ['alice@example.com', 'bob@example.com']) assert.deepEqual(await readdir(path.join(root, box, 'tmp')), []);
  });

  it('without a Return-Path the Delivered-To line comes first; with deliveredTo: false it is not written', async () => {
    const root = await freshRoot();
    await maildir({ root, returnPath: false }).deliver(envelope('s@x', 'a@example.com'), source(MESSAGE));
    assert.deepEqual((await files(root, 'a@example.com'))[0]?.data, Buffer.concat([Buffer.from('Delivered-To: a@example.com\r\n'), MESSAGE]));
    await maildir({ root, deliveredTo: false }).deliver(envelope('s@x', 'b@example.com'), source(MESSAGE));
    assert.deepEqual((await files(root, 'b@example.com'))[0]?.data, Buffer.concat([Buffer.from('Return-Path: <s@x>\r\n'), MESSAGE]));
  });

  it('fails a recipient the message was already delivered to (554 5.4.6), case-insensitively, and delivers the others', async () => {
    const root = await freshRoot();
    const looped = Buffer.concat([
      Buffer.from('Received: from a by b; Thu, 1 Jan 2026 00:00:00 +0000\r\nDelivered-To: <ALICE@example.com>\r\nDelivered-To:\r\n  carol@example.com\r\n'),
      MESSAGE,
    ]);
    const results = await maildir({ root }).deliver(envelope('s@x', 'alice@example.com', 'bob@example.com', 'carol@example.com'), source(looped));
    assert.deepEqual(
      results.map((r) => [r.recipient, r.status, r.reply.code, r.reply.enhanced, r.reply.lines.join(' ')]),
      [
        ['alice@example.com', 'failed', 554, '5.4.6', 'mail forwarding loop for alice@example.com'],
        ['bob@example.com', 'delivered', 250, '2.0.0', results[1]?.reply.lines.join(' ')],
        ['carol@example.com', 'failed', 554, '5.4.6', 'mail forwarding loop for carol@example.com'],
      ],
    );
    assert.deepEqual(await files(root, 'alice@example.com'), []);
    assert.equal((await files(root, 'bob@example.com')).length, 1);
  });

  it('looks for Delivered-To in the header block only, not in the body', async () => {
    const root = await freshRoot();
    const msg = Buffer.from('Subject: quoting\r\n\r\nDelivered-To: alice@example.com\r\n');
    const [r] = await maildir({ root }).deliver(envelope('s@x', 'alice@example.com'), source(msg));
    assert.equal(r?.status, 'delivered');
    // A message with no header block at all, streamed one byte at a time.
    const bare = Buffer.from('\r\nDelivered-To: alice@example.com\r\n');
    const bytes: MessageSource = { size: bare.length, stream: () => Readable.from([...bare].map((b) => Buffer.from([b]))) };
    const [r2] = await maildir({ root }).deliver(envelope('s@x', 'alice@example.com'), bytes);
    assert.equal(r2?.status, 'delivered');
  });

  it('with deliveredTo: false, a message that carries the recipient’s Delivered-To is stored (no loop check)', async () => {
    const root = await freshRoot();
    const looped = Buffer.concat([Buffer.from('Delivered-To: alice@example.com\r\n'), MESSAGE]);
    const [r] = await maildir({ root, deliveredTo: false }).deliver(envelope('s@x', 'alice@example.com'), source(looped));
    assert.equal(r?.status, 'delivered');
  });

  it('rejects malformed options', () => {
    assert.throws(() => maildir({ root: base, deliveredTo: 'yes' as unknown as boolean }), { code: 'DOVETAIL_ERR_INVALID_OPTIONS' });
    for (const bad of ['', '@', 'a b', '"', 'x'.repeat(9)]) {
      assert.throws(() => maildir({ root: base, recipientDelimiter: bad }), { code: 'DOVETAIL_ERR_INVALID_OPTIONS' }, JSON.stringify(bad));
    }
  });
});

describe('maildir(): recipientDelimiter', () => {
  it('stores bob+tag@ in bob’s maildir, the detail kept in Delivered-To; one copy for bob+a@ and bob+b@ together', async () => {
    const root = await freshRoot();
    const t = maildir({ root, recipientDelimiter: '+-' });
    const r1 = await t.deliver(envelope('s@x', 'bob+tag@example.com'), source(MESSAGE));
    assert.equal(r1[0]?.status, 'delivered');
    const [m] = await files(root, 'bob@example.com');
    assert.match(m!.data.toString(), /^Return-Path: <s@x>\r\nDelivered-To: bob\+tag@example\.com\r\n/);
    // '-' is a delimiter too; a leading delimiter does not split; no delimiter: its own folder.
    const r2 = await t.deliver(envelope('s@x', 'bob-list@example.com', '+plus@example.com', 'carol@example.com'), source(MESSAGE));
    assert.deepEqual(r2.map((r) => r.status), ['delivered', 'delivered', 'delivered']);
    assert.equal((await files(root, 'bob@example.com')).length, 2);
    assert.equal((await files(root, '+plus@example.com')).length, 1);
    assert.equal((await files(root, 'carol@example.com')).length, 1);
    // Two extensions of one user in one envelope: one folder, one copy (as for duplicates).
    const r3 = await t.deliver(envelope('s@x', 'bob+a@example.com', 'bob+b@example.com'), source(MESSAGE));
    assert.deepEqual(r3.map((r) => r.status), ['delivered', 'delivered']);
    assert.deepEqual(r3[0]?.reply, r3[1]?.reply);
    assert.equal((await files(root, 'bob@example.com')).length, 3);
    assert.deepEqual((await readdir(root)).sort(), ['+plus@example.com', 'bob@example.com', 'carol@example.com']);
  });
});

describe('createLmtpServer(): Delivered-To and recipientDelimiter over LMTP', () => {
  it('gateway → lmtp() → store: bob+tag@ is known as bob, stored in bob’s maildir, counted in bob’s quota; a loop is 554 5.4.6', async () => {
    const root = await freshRoot();
    const quotaAsked: string[] = [];
    const store = await createLmtpServer({
      root,
      listen: { host: '127.0.0.1', port: 0 },
      users: ['bob@example.test'],
      recipientDelimiter: '+',
      quota: (user) => {
        quotaAsked.push(user);
        return 1_000_000;
      },
    });
    const port = 'port' in store.address ? store.address.port : 0;
    const gw = await startGateway({ delivery: lmtp({ port }), verifyRecipients: true });
    try {
      const c = await ehlo(gw.port);
      const ok = await send(c, 'alice@sender.test', ['bob+tag@example.test', 'nobody+tag@example.test'], message('tagged'));
      assert.equal(ok.rcpt[0]?.code, 250, ok.rcpt[0]?.text);
      assert.equal(ok.rcpt[1]?.text, '550 5.1.1 <nobody+tag@example.test>: User unknown in local recipient table');
      assert.equal(ok.data?.code, 250, ok.data?.text);
      const [m] = await files(root, 'bob@example.test');
      assert.ok(m, 'stored in bob’s maildir');
      assert.match(split(m.data).headers, /^Return-Path: <alice@sender\.test>\r\nDelivered-To: bob\+tag@example\.test\r\nReceived: /);
      assert.ok(quotaAsked.length > 0 && quotaAsked.every((u) => u === 'bob@example.test'), quotaAsked.join(', '));

      // The stored copy sent again to the same address is a mail forwarding loop.
      const loop = await send(c, 'alice@sender.test', ['bob+tag@example.test'], split(m.data).headers.replace(/^Return-Path: [^\r]*\r\n/, '') + '\r\n' + split(m.data).body.toString());
      assert.equal(loop.data?.code, 554, loop.data?.text);
      assert.match(loop.data!.text, /^554 5\.4\.6 .*mail forwarding loop for bob\+tag@example\.test/);
      // … but not for bob's other extension, nor for bob himself.
      const other = await send(c, 'alice@sender.test', ['bob@example.test'], split(m.data).headers.replace(/^Return-Path: [^\r]*\r\n/, '') + '\r\n' + 'again\r\n');
      assert.equal(other.data?.code, 250, other.data?.text);
      c.end();
      assert.equal((await files(root, 'bob@example.test')).length, 2);
    } finally {
      await gw.close();
      await store.close();
    }
  });
});
