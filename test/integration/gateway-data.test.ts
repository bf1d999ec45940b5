/**
 * The message path: spooling past the memory threshold, byte-identical delivery, bare
 * CR/LF (SMTP smuggling), the size limit, pipelining, macros, abort/close, STARTTLS,
 * a real SMTP client (nodemailer), and graceful close.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import crypto from 'node:crypto';
import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import nodemailer from 'nodemailer';
import { defineMilter } from '../../lib/index.js';
import { selfSignedCert } from '../helpers/tls.js';
import { ehlo, message, RawClient, send, split, startGateway, stored } from '../helpers/smtp.js';

test('a message larger than the memory threshold is spooled to disk and delivered byte-identical', async () => {
  const spoolDir = await fs.mkdtemp(path.join(os.tmpdir(), 'dovetail-spool-'));
  let sawFile = false;
  const gw = await startGateway({
    spool: { memoryThreshold: 64 * 1024, dir: spoolDir },
    milters: [
      defineMilter({
        name: 'peek',
        async eom() {
          // While the message is in the chain, its spool is a temp file in spoolDir.
          sawFile = (await fs.readdir(spoolDir, { recursive: true })).length > 0;
        },
      }),
    ],
  });
  try {
    // 3 MB of base64 lines: realistic, and dot-stuffing-free.
    const body = crypto.randomBytes(3 * 1024 * 1024 * 3 / 4).toString('base64').replace(/.{76}/g, '$&\r\n') + '\r\n';
    const msg = message('big', body, 'Content-Transfer-Encoding: base64\r\n');
    const c = await ehlo(gw.port);
    const r = await send(c, 'a@sender.test', ['bob@example.test'], msg);
    assert.equal(r.data?.code, 250);
    assert.ok(sawFile, 'the spool went to disk');
    const [m] = await stored(gw.root, 'bob@example.test');
    assert.ok(m!.subarray(m!.length - Buffer.byteLength(msg)).equals(Buffer.from(msg)), 'byte-identical after the trace headers');
    assert.deepEqual(await fs.readdir(spoolDir, { recursive: true }), [], 'the spool file is removed afterwards');
    c.end();
  } finally {
    await gw.close();
    await fs.rm(spoolDir, { recursive: true, force: true });
  }
});

test('dot-stuffed lines arrive unstuffed, lines of only dots included', async () => {
  const gw = await startGateway();
  try {
    const msg = message('dots', '.\r\n..\r\n.leading dot\r\nend\r\n');
    const c = await ehlo(gw.port);
    const r = await send(c, 'a@sender.test', ['bob@example.test'], msg);
    assert.equal(r.data?.code, 250);
    const [m] = await stored(gw.root, 'bob@example.test');
    assert.equal(split(m!).body.toString(), '.\r\n..\r\n.leading dot\r\nend\r\n');
    c.end();
  } finally {
    await gw.close();
  }
});

test('bare LF and bare CR in DATA are refused; LF.LF does not end DATA (no smuggling)', async () => {
  const gw = await startGateway();
  try {
    const c = await ehlo(gw.port);
    assert.equal((await c.cmd('MAIL FROM:<a@sender.test>')).code, 250);
    assert.equal((await c.cmd('RCPT TO:<bob@example.test>')).code, 250);
    assert.equal((await c.cmd('DATA')).code, 354);
    // A smuggling attempt: "\n.\n" then a second transaction inside the first's data.
    c.write('Subject: one\r\n\r\nbody\n.\nMAIL FROM:<evil@sender.test>\r\nRCPT TO:<victim@example.test>\r\nDATA\r\nSubject: smuggled\r\n\r\nx\r\n.\r\n');
    const r = await c.reply();
    assert.equal(r.text, '550 5.5.2 Error: bare <CR> or <LF> in message data (RFC 5321 2.3.8)');
    assert.deepEqual(await stored(gw.root, 'victim@example.test'), []);
    assert.deepEqual(await stored(gw.root, 'bob@example.test'), []);
    const cr = await send(c, 'a@sender.test', ['bob@example.test'], 'Subject: two\r\n\r\nbare\rCR\r\n');
    assert.equal(cr.data?.code, 550);
    assert.equal((await c.cmd('NOOP')).code, 250);
    c.end();
  } finally {
    await gw.close();
  }
});

test('bareLineEndings: normalize rewrites bare LF to CRLF', async () => {
  const gw = await startGateway({ bareLineEndings: 'normalize' });
  try {
    const c = await ehlo(gw.port);
    const r = await send(c, 'a@sender.test', ['bob@example.test'], 'Subject: lf\nFrom: a@sender.test\n\nline1\nline2\r\n');
    assert.equal(r.data?.code, 250);
    const [m] = await stored(gw.root, 'bob@example.test');
    assert.ok(m!.toString().endsWith('\r\nSubject: lf\r\nFrom: a@sender.test\r\n\r\nline1\r\nline2\r\n'));
    c.end();
  } finally {
    await gw.close();
  }
});

test('SIZE is advertised; a declared SIZE over it is refused at MAIL; a message over it gets 552 at the end', async () => {
  const gw = await startGateway({ maxMessageBytes: 10_000 });
  try {
    const c = await RawClient.connect(gw.port);
    await c.reply();
    const e = await c.cmd('EHLO client.example.test');
    for (const ext of ['PIPELINING', '8BITMIME', 'SMTPUTF8', 'ENHANCEDSTATUSCODES', 'SIZE 10000']) {
      assert.ok(e.lines.some((l) => l.slice(4) === ext), `EHLO advertises ${ext}: ${e.text}`);
    }
    assert.ok(!e.lines.some((l) => l.includes('STARTTLS')), 'no STARTTLS without a certificate');
    assert.equal((await c.cmd('MAIL FROM:<a@sender.test> SIZE=20000')).code, 552);
    const r = await send(c, 'a@sender.test', ['bob@example.test'], message('big', ('y'.repeat(998) + '\r\n').repeat(15)));
    assert.equal(r.data?.code, 552);
    assert.match(r.data!.text, /^552 5\.3\.4 /);
    assert.deepEqual(await stored(gw.root, 'bob@example.test'), []);
    c.end();
  } finally {
    await gw.close();
  }
});

test('SMTPUTF8 and 8BITMIME: UTF-8 addresses and 8-bit bodies pass through; milters see the UTF-8 address', async () => {
  let seen = '';
  const gw = await startGateway({ milters: [defineMilter({ name: 'u', mail: async (_ctx, s) => void (seen = s.address) })] });
  try {
    const c = await ehlo(gw.port);
    assert.equal((await c.cmd('MAIL FROM:<jörg@sender.test> SMTPUTF8 BODY=8BITMIME')).code, 250);
    assert.equal(seen, 'jörg@sender.test');
    assert.equal((await c.cmd('RCPT TO:<bob@example.test>')).code, 250);
    const msg = 'From: Jörg <jörg@sender.test>\r\nSubject: grüße\r\n\r\nSchöne Grüße, 日本語\r\n';
    const r = await c.data(msg);
    assert.equal(r.code, 250);
    const [m] = await stored(gw.root, 'bob@example.test');
    assert.ok(m!.toString('utf8').endsWith(msg));
    assert.match(m!.toString('utf8'), /^Return-Path: <jörg@sender\.test>\r\n/);
    assert.match(m!.toString('utf8'), / with UTF8SMTP id /);
    c.end();
  } finally {
    await gw.close();
  }
});

test('PIPELINING: MAIL, RCPT, RCPT, DATA in one write get their replies in order', async () => {
  const gw = await startGateway({
    milters: [defineMilter({ name: 'r', rcpt: async (_c, r) => (r.address.startsWith('no@') ? { type: 'reject', reply: { code: 550, enhanced: '5.1.1', lines: ['nope'] } } : undefined) })],
  });
  try {
    const c = await ehlo(gw.port);
    c.write('MAIL FROM:<a@sender.test>\r\nRCPT TO:<no@example.test>\r\nRCPT TO:<bob@example.test>\r\nDATA\r\n');
    assert.equal((await c.reply()).code, 250);
    assert.equal((await c.reply()).text, '550 5.1.1 nope');
    assert.equal((await c.reply()).code, 250);
    assert.equal((await c.reply()).code, 354);
    c.write(message('pipelined') + '.\r\nQUIT\r\n');
    assert.equal((await c.reply()).code, 250);
    assert.equal((await c.reply()).code, 221);
    assert.equal((await stored(gw.root, 'bob@example.test')).length, 1);
  } finally {
    await gw.close();
  }
});

test('context: typed fields and Postfix macros per stage; abort on RSET-then-MAIL; close at QUIT', async () => {
  const events: string[] = [];
  const macrosAt: Record<string, Record<string, string>> = {};
  const gw = await startGateway({
    milters: [
      defineMilter({
        name: 'observer',
        async connect(ctx) {
          events.push(`connect ${ctx.client.address} ${ctx.client.family}`);
          macrosAt['connect'] = { ...ctx.macros };
        },
        async helo(ctx, name) {
          events.push(`helo ${name} ${ctx.helo}`);
        },
        async mail(ctx, sender) {
          events.push(`mail ${sender.address} ${JSON.stringify(sender.args)} ${ctx.queueId.length}`);
          macrosAt['mail'] = { ...ctx.macros };
        },
        async rcpt(ctx, rcpt) {
          events.push(`rcpt ${rcpt.address} after ${ctx.envelope.recipients.length}`);
          macrosAt['rcpt'] = { ...ctx.macros };
        },
        async abort(ctx) {
          events.push(`abort ${ctx.envelope.sender.address}`);
        },
        async eom(ctx) {
          events.push(`eom ${ctx.envelope.recipients.map((r) => r.address).join(',')}`);
        },
        async close() {
          events.push('close');
        },
      }),
    ],
  });
  try {
    const c = await ehlo(gw.port, 'helo.example.test');
    assert.equal((await c.cmd('MAIL FROM:<first@sender.test> BODY=8BITMIME')).code, 250);
    assert.equal((await c.cmd('RCPT TO:<bob@example.test>')).code, 250);
    assert.equal((await c.cmd('RSET')).code, 250);
    const r = await send(c, 'second@sender.test', ['bob@example.test', 'carol@example.test'], message());
    assert.equal(r.data?.code, 250);
    assert.equal((await c.cmd('QUIT')).code, 221);
    await c.waitClosed();
    for (let i = 0; i < 50 && !events.includes('close'); i++) await new Promise((res) => setTimeout(res, 10));
    assert.deepEqual(events, [
      'connect 127.0.0.1 ipv4',
      'helo helo.example.test helo.example.test',
      'mail first@sender.test {"BODY":"8BITMIME"} 12',
      'rcpt bob@example.test after 0',
      'abort first@sender.test',
      'mail second@sender.test {} 12',
      'rcpt bob@example.test after 0',
      'rcpt carol@example.test after 1',
      'eom bob@example.test,carol@example.test',
      'close',
    ]);
    assert.equal(macrosAt['connect']?.['j'], 'mx.test');
    assert.equal(macrosAt['connect']?.['{client_addr}'], '127.0.0.1');
    assert.equal(macrosAt['connect']?.['{daemon_addr}'], '127.0.0.1');
    assert.equal(macrosAt['mail']?.['{mail_addr}'], 'second@sender.test');
    assert.match(macrosAt['mail']?.['i'] ?? '', /^[0-9A-Z]{12}$/);
    assert.equal(macrosAt['rcpt']?.['{rcpt_addr}'], 'carol@example.test');
  } finally {
    await gw.close();
  }
});

test('STARTTLS with a real client (nodemailer): TLS facts reach the milter, the Received header and macros', async () => {
  let tlsSeen: unknown;
  let cipherMacro: string | undefined;
  const gw = await startGateway({
    tls: selfSignedCert(),
    milters: [
      defineMilter({
        name: 'tls-check',
        async mail(ctx) {
          tlsSeen = ctx.tls;
          cipherMacro = ctx.macros['{cipher}'];
        },
      }),
    ],
  });
  try {
    const transport = nodemailer.createTransport({
      host: '127.0.0.1',
      port: gw.port,
      secure: false,
      requireTLS: true,
      tls: { rejectUnauthorized: false },
      name: 'client.example.test',
    });
    const info = await transport.sendMail({
      from: 'alice@sender.test',
      to: 'bob@example.test',
      subject: 'over TLS',
      text: 'Encrypted hello.',
    });
    transport.close();
    assert.match(info.response, /^250 2\.6\.0 Ok: queued as /);
    const t = tlsSeen as { version: string; cipher: string; bits: number };
    assert.match(t.version, /^TLSv1\.[23]$/);
    assert.ok(t.cipher && cipherMacro === t.cipher);
    const [m] = await stored(gw.root, 'bob@example.test');
    assert.match(m!.toString(), /\(using TLSv1\.[23] with cipher \S+ \(\d+\/\d+ bits\)\)\r\n\tby mx\.test \(dovetail\) with ESMTPS id /);
  } finally {
    await gw.close();
  }
});

test('SMTP AUTH (PLAIN/LOGIN over a real client): the milter sees ctx.auth and {auth_authen}; bad credentials get 535', async () => {
  let auth: unknown;
  let authen: string | undefined;
  const gw = await startGateway({
    allowInsecureAuth: true,
    authenticate: async ({ username, password }) => username === 'alice' && password === 's3cret',
    milters: [
      defineMilter({
        name: 'who',
        async mail(ctx) {
          auth = ctx.auth;
          authen = ctx.macros['{auth_authen}'];
        },
      }),
    ],
  });
  try {
    const send = (pass: string, method: 'PLAIN' | 'LOGIN') => {
      const t = nodemailer.createTransport({ host: '127.0.0.1', port: gw.port, secure: false, ignoreTLS: true, auth: { user: 'alice', pass, method } });
      return t.sendMail({ from: 'alice@sender.test', to: 'bob@example.test', subject: 'auth', text: 'x' }).finally(() => t.close());
    };
    await send('s3cret', 'LOGIN');
    assert.deepEqual(auth, { method: 'LOGIN', user: 'alice' });
    assert.equal(authen, 'alice');
    await assert.rejects(send('wrong', 'PLAIN'), (err: { responseCode?: number }) => err.responseCode === 535);
  } finally {
    await gw.close();
  }
});

test('a client that disconnects mid-DATA: the spool file is removed, milters get abort, close() is not held up', async () => {
  const spoolDir = await fs.mkdtemp(path.join(os.tmpdir(), 'dovetail-spool-'));
  const events: string[] = [];
  const gw = await startGateway({
    spool: { memoryThreshold: 0, dir: spoolDir },
    milters: [defineMilter({ name: 'obs', abort: async () => void events.push('abort'), close: async () => void events.push('close') })],
  });
  try {
    const c = await ehlo(gw.port);
    assert.equal((await c.cmd('MAIL FROM:<a@sender.test>')).code, 250);
    assert.equal((await c.cmd('RCPT TO:<bob@example.test>')).code, 250);
    assert.equal((await c.cmd('DATA')).code, 354);
    c.write('Subject: cut off\r\n\r\n' + 'x'.repeat(100_000));
    await new Promise((r) => setTimeout(r, 200));
    c.socket.destroy();
    for (let i = 0; i < 100 && !events.includes('close'); i++) await new Promise((r) => setTimeout(r, 20));
    assert.deepEqual(events, ['abort', 'close']);
    for (let i = 0; i < 50 && (await fs.readdir(spoolDir)).length; i++) await new Promise((r) => setTimeout(r, 20));
    assert.deepEqual(await fs.readdir(spoolDir), [], 'no spool file left behind');
    assert.deepEqual(await stored(gw.root, 'bob@example.test'), []);
    // close() resolves: nothing is left in flight (a hang here fails the test by its timeout).
    await gw.gateway.close();
  } finally {
    await gw.close();
    await fs.rm(spoolDir, { recursive: true, force: true });
  }
});

test('graceful close: a transaction in flight finishes with 250, then idle clients get 421', async () => {
  let release: (() => void) | undefined;
  const gw = await startGateway({
    milters: [
      defineMilter({
        name: 'slow',
        eom: () => new Promise<void>((resolve) => (release = resolve)),
      }),
    ],
  });
  try {
    const busy = await ehlo(gw.port);
    const idle = await ehlo(gw.port);
    assert.equal((await busy.cmd('MAIL FROM:<a@sender.test>')).code, 250);
    assert.equal((await busy.cmd('RCPT TO:<bob@example.test>')).code, 250);
    assert.equal((await busy.cmd('DATA')).code, 354);
    busy.write(message('in flight') + '.\r\n');
    while (!release) await new Promise((r) => setTimeout(r, 10));
    const closed = gw.gateway.close();
    await new Promise((r) => setTimeout(r, 100));
    release();
    assert.equal((await busy.reply()).code, 250, 'the transaction in flight completes');
    await closed;
    const bye = await idle.reply();
    assert.equal(bye.code, 421);
    await idle.waitClosed();
    assert.equal((await stored(gw.root, 'bob@example.test')).length, 1);
    // The listener is gone.
    await assert.rejects(RawClient.connect(gw.port));
  } finally {
    await gw.close().catch(() => undefined);
  }
});

test('long lines: a 1,000,008-byte header line gets 552 5.3.4, a 102,401-byte body line 554 5.6.0, a 102,400-byte one passes (defaults)', async () => {
  // Regression (hardening issue): both were stored as they came.
  const gw = await startGateway({});
  try {
    const c = await ehlo(gw.port);
    const header = await send(c, 'a@sender.test', ['bob@example.test'], `X-Long: ${'h'.repeat(1_000_000)}\r\n` + message('long header'));
    assert.match(header.data!.text, /^552 5\.3\.4 Error: message header too big/);
    const body = await send(c, 'a@sender.test', ['bob@example.test'], message('long body', 'b'.repeat(102_401) + '\r\n'));
    assert.equal(body.data!.text, '554 5.6.0 Error: message has a line longer than 102400 bytes');
    const ok = await send(c, 'a@sender.test', ['bob@example.test'], message('just fits', 'b'.repeat(102_400) + '\r\nshort\r\n'));
    assert.equal(ok.data?.code, 250);
    const [m] = await stored(gw.root, 'bob@example.test');
    assert.equal(split(m!).body.toString(), 'b'.repeat(102_400) + '\r\nshort\r\n');
    c.end();
  } finally {
    await gw.close();
  }
});
