/**
 * gateway → lmtp() → createLmtpServer() end to end over real sockets on 127.0.0.1 (and a
 * unix socket): stored bytes, per-recipient replies, pipelining, the pool (reuse, limit,
 * RSET), STARTTLS with an openssl-made certificate, and recipient verification at RCPT.
 */
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import fs from 'node:fs/promises';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { Readable } from 'node:stream';
import { after, before, describe, it } from 'node:test';
import { promisify } from 'node:util';
import { lmtp } from '../../lib/delivery/lmtp.js';
import { DotStuffer, ReplyDecoder } from '../../lib/delivery/client.js';
import { createLmtpServer, type LmtpServer, type LmtpServerOptions } from '../../lib/delivery/lmtp-server.js';
import type { DeliveryEnvelope, MessageSource } from '../../lib/delivery/types.js';
import type { EnvelopeAddress } from '../../lib/milter/types.js';
import { ehlo, message, send, split, startGateway, stored } from '../helpers/smtp.js';

const run = promisify(execFile);

const a = (address: string, args: Record<string, string | true> = {}): EnvelopeAddress => ({ address, args });
const env = (sender: string, ...rcpts: string[]): DeliveryEnvelope => ({ queueId: 'Q' + Math.random().toString(36).slice(2, 8), sender: a(sender), recipients: rcpts.map((r) => a(r)) });
const src = (buf: Buffer | string): MessageSource => {
  const b = Buffer.isBuffer(buf) ? buf : Buffer.from(buf, 'utf8');
  return { size: b.length, stream: () => Readable.from([b]) };
};

let base: string;
before(async () => {
  base = await fs.mkdtemp(path.join(os.tmpdir(), 'dovetail-lmtp-'));
});
after(async () => {
  await fs.rm(base, { recursive: true, force: true });
});

/** A store in a fresh root. */
async function store(opts: Partial<LmtpServerOptions> = {}): Promise<LmtpServer & { root: string; port: number }> {
  const root = await fs.mkdtemp(path.join(base, 'store-'));
  const s = await createLmtpServer({ root, listen: { host: '127.0.0.1', port: 0 }, ...opts });
  return Object.assign(s, { root, port: 'port' in s.address ? s.address.port : 0 });
}

/** The stored message without the store's Return-Path and Delivered-To lines. */
const withoutReturnPath = (m: Buffer): Buffer => {
  let out = m;
  for (const name of ['Return-Path: ', 'Delivered-To: ']) {
    if (out.subarray(0, name.length).toString() === name) out = out.subarray(out.indexOf('\r\n') + 2);
  }
  return out;
};

describe('pure parts', () => {
  it('ReplyDecoder: multi-line replies, enhanced codes, split at every byte', () => {
    const wire = '250-mx\r\n250-PIPELINING\r\n250 SIZE 100\r\n550 5.1.1 <x@y> unknown\r\n452-4.2.2 full\r\n452 4.2.2 really\r\n';
    for (let cut = 0; cut <= wire.length; cut++) {
      const d = new ReplyDecoder();
      const out = [...d.push(wire.slice(0, cut)), ...d.push(wire.slice(cut))];
      assert.equal(out.length, 3);
      assert.deepEqual(out[0], { code: 250, enhanced: undefined, lines: ['mx', 'PIPELINING', 'SIZE 100'] });
      assert.deepEqual(out[1], { code: 550, enhanced: '5.1.1', lines: ['<x@y> unknown'] });
      assert.deepEqual(out[2], { code: 452, enhanced: '4.2.2', lines: ['full', 'really'] });
    }
    assert.throws(() => new ReplyDecoder().push('250-a\r\n251 b\r\n'), /continued/);
    assert.throws(() => new ReplyDecoder().push('hello\r\n'), /malformed/);
    assert.throws(() => new ReplyDecoder().push('2'.repeat(5000)), /longer/);
  });

  it('DotStuffer: dots at line starts doubled across chunk boundaries; CRLF added only when missing', () => {
    const msg = '.a\r\nb\r\n..c\r\n.\r\nd.\r\n';
    const want = '..a\r\nb\r\n...c\r\n..\r\nd.\r\n.\r\n';
    for (let cut = 0; cut <= msg.length; cut++) {
      const s = new DotStuffer();
      const out = Buffer.concat([s.push(Buffer.from(msg.slice(0, cut))), s.push(Buffer.from(msg.slice(cut))), s.end()]).toString();
      assert.equal(out, want, `cut at ${cut}`);
    }
    const s = new DotStuffer();
    assert.equal(Buffer.concat([s.push(Buffer.from('x\r\n.y')), s.end()]).toString(), 'x\r\n..y\r\n.\r\n');
  });
});

describe('gateway → lmtp() → createLmtpServer', () => {
  it('stores the message byte-identical (dot lines, 8-bit, no final CRLF lost) with the Received header', async () => {
    const s = await store();
    const t = lmtp({ port: s.port });
    const gw = await startGateway({ delivery: t });
    try {
      const body = '.leading dot\r\n..two dots\r\n.\r\nnot the end\r\nGrüße, 8-bit ✓\r\n';
      const content = message('bytes', body, 'Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n');
      const c = await ehlo(gw.port);
      const r = await send(c, 'alice@sender.test', ['bob@example.test'], content);
      assert.equal(r.data?.code, 250, r.data?.text);
      c.end();
      const [m] = await stored(s.root, 'bob@example.test');
      assert.ok(m, 'stored');
      const msg = withoutReturnPath(m);
      assert.match(split(msg).headers, /^Received: from client\.example\.test .*by mx\.test/s);
      // Everything after our Received header is the client's message, byte for byte.
      assert.ok(msg.subarray(msg.length - Buffer.byteLength(content)).equals(Buffer.from(content, 'utf8')));
      assert.equal(m.toString().split('\r\n')[0], 'Return-Path: <alice@sender.test>');
    } finally {
      await gw.close();
      await s.close();
    }
  });

  it('maps every recipient to its own reply: delivered, unknown at RCPT, over quota after DATA', async () => {
    const s = await store({ users: ['bob@example.test', 'carol@example.test'], quota: (u) => (u === 'carol@example.test' ? 100 : Infinity) });
    const t = lmtp({ port: s.port });
    try {
      const res = await t.deliver(env('a@sender.test', 'bob@example.test', 'nobody@example.test', 'carol@example.test'), src(message()));
      assert.equal(res.length, 3);
      assert.equal(res[0]?.status, 'delivered');
      assert.equal(res[0]?.reply.code, 250);
      assert.match(res[0]!.reply.lines[0]!, /^<bob@example\.test> Ok: stored as \d+\./);
      assert.deepEqual(res[1], {
        recipient: 'nobody@example.test',
        status: 'failed',
        reply: { code: 550, enhanced: '5.1.1', lines: ['<nobody@example.test>: User unknown in local recipient table'] },
        relay: `127.0.0.1:${s.port}`,
      });
      assert.deepEqual(res[2], {
        recipient: 'carol@example.test',
        status: 'failed',
        reply: { code: 552, enhanced: '5.2.2', lines: ['<carol@example.test>: Mailbox full'] },
        relay: `127.0.0.1:${s.port}`,
      });
      assert.equal((await stored(s.root, 'bob@example.test')).length, 1);
      assert.equal((await stored(s.root, 'carol@example.test')).length, 0);
    } finally {
      await t.close();
      await s.close();
    }
  });

  it('the gateway answers mixed per-recipient results (no queue) with the worst reply; 2xx recipients are stored', async () => {
    const s = await store({ users: ['bob@example.test', 'carol@example.test'], quota: (u) => (u === 'carol@example.test' ? 100 : Infinity) });
    const gw = await startGateway({ delivery: lmtp({ port: s.port }) });
    try {
      const c = await ehlo(gw.port);
      const r = await send(c, 'a@sender.test', ['bob@example.test', 'carol@example.test'], message());
      assert.equal(r.data?.text, '552 5.2.2 <carol@example.test>: Mailbox full');
      assert.equal((await stored(s.root, 'bob@example.test')).length, 1);
      c.end();
    } finally {
      await gw.close();
      await s.close();
    }
  });

  it('pipelines MAIL, every RCPT and DATA in one group when PIPELINING is offered', async () => {
    // A scripted LMTP server that answers nothing until DATA arrives: a client that waited
    // for the MAIL reply would hang here.
    const seen: string[] = [];
    const srv = net.createServer((sock) => {
      let buf = '';
      let inData = false;
      let rcpts = 0;
      sock.write('220 fake LMTP\r\n');
      sock.on('data', (d: Buffer) => {
        buf += d.toString('latin1');
        for (;;) {
          if (inData) {
            const end = buf.indexOf('\r\n.\r\n');
            if (end < 0) return;
            buf = buf.slice(end + 5);
            inData = false;
            sock.write(Array.from({ length: rcpts }, (_, i) => `250 2.0.0 <r${i}> ok\r\n`).join(''));
            continue;
          }
          const nl = buf.indexOf('\r\n');
          if (nl < 0) return;
          const line = buf.slice(0, nl);
          buf = buf.slice(nl + 2);
          seen.push(line);
          if (line.startsWith('LHLO')) sock.write('250-fake\r\n250-PIPELINING\r\n250 ENHANCEDSTATUSCODES\r\n');
          else if (line === 'DATA') {
            rcpts = seen.filter((l) => l.startsWith('RCPT')).length;
            sock.write('250 2.1.0 ok\r\n' + 'x'.repeat(0) + Array.from({ length: rcpts }, () => '250 2.1.5 ok\r\n').join('') + '354 go\r\n');
            inData = true;
          } else if (line === 'QUIT') sock.end('221 bye\r\n');
          else if (!line.startsWith('MAIL') && !line.startsWith('RCPT')) sock.write('250 ok\r\n');
        }
      });
    });
    await new Promise<void>((r) => srv.listen(0, '127.0.0.1', r));
    const t = lmtp({ port: (srv.address() as net.AddressInfo).port, timeouts: { mail: 2000 } });
    try {
      const res = await t.deliver(env('a@s.test', 'x@example.test', 'y@example.test'), src('Subject: p\r\n\r\nbody\r\n'));
      assert.deepEqual(res.map((r) => r.status), ['delivered', 'delivered']);
      assert.deepEqual(res.map((r) => r.reply.lines[0]), ['<r0> ok', '<r1> ok']);
      assert.deepEqual(seen.slice(1), ['MAIL FROM:<a@s.test> ', 'RCPT TO:<x@example.test>', 'RCPT TO:<y@example.test>', 'DATA'].map((l) => l.trimEnd()));
    } finally {
      await t.close();
      await new Promise<void>((r) => srv.close(() => r()));
    }
  });

  it('reuses one pooled connection across messages of an SMTP session (RSET only after a refused transaction)', async () => {
    const s = await store({ users: ['bob@example.test'] });
    const t = lmtp({ port: s.port });
    const gw = await startGateway({ delivery: t });
    try {
      const c = await ehlo(gw.port);
      for (let i = 0; i < 5; i++) assert.equal((await send(c, 'a@sender.test', ['bob@example.test'], message(`m${i}`))).data?.code, 250);
      // A transaction where the store refuses every recipient (the gateway does not verify): RSET, then reuse.
      const refused = await send(c, 'a@sender.test', ['nobody@example.test'], message('refused'));
      assert.equal(refused.data?.text, '550 5.1.1 <nobody@example.test>: User unknown in local recipient table');
      assert.equal((await send(c, 'a@sender.test', ['bob@example.test'], message('after RSET'))).data?.code, 250);
      c.end();
      const st = t.stats();
      assert.equal(st.opened, 1, 'one LMTP connection for 7 messages');
      assert.equal(st.reused, 6);
      assert.equal(s.stats().sessions, 1);
      assert.equal(s.stats().transactions, 6, 'the refused one never reached DATA');
      assert.equal((await stored(s.root, 'bob@example.test')).length, 6);
    } finally {
      await gw.close();
      await s.close();
    }
  });

  it('never opens more than maxConnections; waiting deliveries get the freed connections', async () => {
    const s = await store();
    const t = lmtp({ port: s.port, maxConnections: 2 });
    try {
      const res = await Promise.all(Array.from({ length: 12 }, (_, i) => t.deliver(env('a@s.test', `u${i % 3}@example.test`), src(message(`p${i}`)))));
      assert.ok(res.every((r) => r[0]?.status === 'delivered'));
      const st = t.stats();
      assert.equal(st.peak, 2);
      assert.equal(st.opened, 2);
      assert.equal(s.stats().sessions, 2);
      let total = 0;
      for (let i = 0; i < 3; i++) total += (await stored(s.root, `u${i}@example.test`)).length;
      assert.equal(total, 12);
    } finally {
      await t.close();
      await s.close();
    }
  });

  it('drops a pooled connection the store closed while idle, and probes with NOOP after probeAfter', async () => {
    const s = await store();
    const t = lmtp({ port: s.port, probeAfter: 0 });
    try {
      assert.equal((await t.deliver(env('a@s.test', 'bob@example.test'), src(message())))[0]?.status, 'delivered');
      assert.equal((await t.deliver(env('a@s.test', 'bob@example.test'), src(message())))[0]?.status, 'delivered');
      assert.equal(t.stats().opened, 1);
      // The store restarts: the idle connection dies; the next delivery opens a new one.
      await s.close();
      const s2 = await createLmtpServer({ root: s.root, listen: { host: '127.0.0.1', port: s.port } });
      try {
        await new Promise((r) => setTimeout(r, 50));
        assert.equal((await t.deliver(env('a@s.test', 'bob@example.test'), src(message())))[0]?.status, 'delivered');
        assert.equal(t.stats().opened, 2);
      } finally {
        await s2.close();
      }
      assert.equal((await stored(s.root, 'bob@example.test')).length, 3);
    } finally {
      await t.close();
    }
  });

  it('delivers over a unix socket', async () => {
    const root = await fs.mkdtemp(path.join(base, 'unix-'));
    const sock = path.join(root, 'lmtp.sock');
    const s = await createLmtpServer({ root, listen: { path: sock } });
    const gw = await startGateway({ delivery: lmtp({ path: sock }) });
    try {
      assert.deepEqual(s.address, { path: sock });
      const c = await ehlo(gw.port);
      assert.equal((await send(c, 'a@sender.test', ['bob@example.test'], message())).data?.code, 250);
      c.end();
      assert.equal((await stored(root, 'bob@example.test')).length, 1);
    } finally {
      await gw.close();
      await s.close();
    }
  });

  it('STARTTLS with a self-signed certificate: delivered when trusted, deferred (never delivered) when not', async () => {
    const dir = await fs.mkdtemp(path.join(base, 'tls-'));
    const key = path.join(dir, 'key.pem');
    const cert = path.join(dir, 'cert.pem');
    await run('openssl', ['req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-subj', '/CN=lmtp.test', '-addext', 'subjectAltName=DNS:lmtp.test', '-days', '1', '-keyout', key, '-out', cert]);
    const pem = { key: await fs.readFile(key), cert: await fs.readFile(cert) };
    const s = await store({ tls: pem });
    const trusted = lmtp({ port: s.port, tls: { ca: pem.cert, servername: 'lmtp.test' } });
    const untrusted = lmtp({ port: s.port, tls: {} });
    const plainOnly = await store();
    const wantsTls = lmtp({ port: plainOnly.port, tls: { ca: pem.cert, servername: 'lmtp.test' } });
    try {
      assert.equal((await trusted.deliver(env('a@s.test', 'bob@example.test'), src(message())))[0]?.status, 'delivered');
      const bad = (await untrusted.deliver(env('a@s.test', 'bob@example.test'), src(message())))[0];
      assert.equal(bad?.status, 'deferred');
      assert.equal(bad?.reply.code, 451);
      const none = (await wantsTls.deliver(env('a@s.test', 'bob@example.test'), src(message())))[0];
      assert.equal(none?.status, 'deferred');
      assert.match(none!.reply.lines[0]!, /STARTTLS required but not offered/);
      assert.equal((await stored(s.root, 'bob@example.test')).length, 1);
      assert.equal((await stored(plainOnly.root, 'bob@example.test')).length, 0);
    } finally {
      await Promise.all([trusted.close(), untrusted.close(), wantsTls.close()]);
      await s.close();
      await plainOnly.close();
    }
  });

  it('recipient verification at RCPT: unknown user and full mailbox refused during SMTP, with the store\'s reply', async () => {
    const s = await store({ users: ['bob@example.test', 'full@example.test'], quota: (u) => (u === 'full@example.test' ? 200 : 5000) });
    // full@ already holds more than its quota.
    await fs.mkdir(path.join(s.root, 'full@example.test', 'cur'), { recursive: true });
    await fs.writeFile(path.join(s.root, 'full@example.test', 'cur', '1.M1P1.x,S=300'), 'x'.repeat(300));
    const t = lmtp({ port: s.port });
    const gw = await startGateway({ delivery: t, verifyRecipients: true });
    try {
      const c = await ehlo(gw.port);
      const r = await send(c, 'a@sender.test', ['bob@example.test', 'nobody@example.test', 'full@example.test'], message());
      assert.deepEqual(
        r.rcpt.map((x) => x.text),
        ['250 2.1.5 Accepted', '550 5.1.1 <nobody@example.test>: User unknown in local recipient table', '552 5.2.2 <full@example.test>: Mailbox full'],
      );
      assert.equal(r.data?.code, 250);
      c.end();
      assert.equal((await stored(s.root, 'bob@example.test')).length, 1);
      assert.equal(t.stats().opened, 1, 'verification and delivery share the pooled connection');
      // The client's SIZE= goes along: a message that would overflow the quota is refused at RCPT too.
      assert.equal(await t.verifyRecipient({ queueId: 'q', sender: a('a@s.test', { SIZE: '1000' }) }, a('bob@example.test')), undefined);
      assert.deepEqual(await t.verifyRecipient({ queueId: 'q', sender: a('a@s.test', { SIZE: '100000' }) }, a('bob@example.test')), {
        code: 552,
        enhanced: '5.2.2',
        lines: ['<bob@example.test>: Mailbox full'],
      });
    } finally {
      await gw.close();
      await s.close();
    }
  });

  it('messages around the one-write size (64 KiB), in small chunks with dots at chunk starts, are stored byte for byte', async () => {
    const s = await store();
    const t = lmtp({ port: s.port });
    try {
      const k = 64 * 1024;
      for (const size of [100, k - 1, k, k + 1, 3 * k + 7]) {
        // Lines of dots and text; chunks of 1 to 13 bytes so boundaries fall everywhere.
        let text = 'Subject: size ' + String(size) + '\r\n\r\n';
        for (let i = 0; text.length < size; i++) text += i % 3 === 0 ? '.\r\n' : i % 3 === 1 ? '..dot ' + String(i) + '\r\n' : 'line ' + String(i) + '\r\n';
        const bytes = Buffer.from(text.slice(0, size));
        const chunks: Buffer[] = [];
        for (let at = 0, n = 1; at < bytes.length; at += n, n = (n % 13) + 1) chunks.push(bytes.subarray(at, at + n));
        const res = await t.deliver(env('a@sender.test', 'bob@example.test'), { size: bytes.length, stream: () => Readable.from(chunks) });
        assert.equal(res[0]?.status, 'delivered', `${size}: ${JSON.stringify(res[0]?.reply)}`);
        const got = (await stored(s.root, 'bob@example.test')).map(withoutReturnPath).find((m) => m.subarray(0, 40).toString().startsWith(`Subject: size ${size}\r`));
        assert.ok(got, `${size} stored`);
        // The store ends a message that did not end with CRLF with one.
        const expected = bytes.subarray(bytes.length - 2).toString() === '\r\n' ? bytes : Buffer.concat([bytes, Buffer.from('\r\n')]);
        assert.ok(got.equals(expected), `${size}: ${got.length} bytes stored, ${expected.length} expected`);
      }
    } finally {
      await t.close();
      await s.close();
    }
  });

  it('a message source that gives more bytes than its size is never ended: the recipient is deferred, nothing stored (small and large)', async () => {
    const s = await store();
    const t = lmtp({ port: s.port });
    try {
      for (const size of [200, 200 * 1024]) {
        const bytes = Buffer.alloc(size + 10, 'a');
        bytes.write('Subject: liar\r\n\r\n');
        const res = await t.deliver(env('a@sender.test', 'bob@example.test'), { size, stream: () => Readable.from([bytes]) });
        assert.equal(res[0]?.status, 'deferred', JSON.stringify(res[0]));
      }
      // The pool is still usable afterwards.
      const ok = await t.deliver(env('a@sender.test', 'bob@example.test'), src('Subject: after\r\n\r\nok\r\n'));
      assert.equal(ok[0]?.status, 'delivered');
      const all = await stored(s.root, 'bob@example.test');
      assert.equal(all.length, 1);
      assert.ok(!all.some((m) => m.includes('Subject: liar')));
    } finally {
      await t.close();
      await s.close();
    }
  });
});
