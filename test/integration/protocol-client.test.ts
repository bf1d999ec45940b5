/**
 * connectMilter's edge cases against a tiny raw-socket fake filter built on our codec
 * (a protocol peer stub, not a filter: garbage frames, bad lengths, hangs, closing
 * mid-message, PROGRESS, NR_*, SKIP, HDR_LEADSPC, SETSYMLIST), driving a real gateway over
 * SMTP. Each case checks the configured default action and that no connection hangs.
 * The real libmilter and opendkim are in test/interop.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import net from 'node:net';
import {
  decodeCommand,
  encodeFrame,
  encodeReply,
  FrameDecoder,
  SMFIF_ALL,
  SMFIM,
  SMFIP,
  type MilterCommand,
  type MilterReply,
} from '../../lib/milter/protocol/index.js';
import { connectMilter, OFFERED_PROTOCOL, parseReplyCode, type ConnectMilterOptions } from '../../lib/milter/protocol/client.js';
import { ehlo, message, RawClient, send, split, startGateway, stored, type TestGateway } from '../helpers/smtp.js';

interface Seen {
  readonly conn: number;
  readonly cmd: MilterCommand;
}

interface FakeConn {
  readonly index: number;
  reply(r: MilterReply): void;
  raw(b: Buffer): void;
  end(): void;
}

interface FakeOptions {
  version?: number;
  actions?: number;
  protocol?: number;
  macros?: { stage: number; names: string[] }[];
  /** Return true when it answered (or chose not to); otherwise the fake answers continue where a reply is due. */
  on?: (cmd: MilterCommand, c: FakeConn) => boolean | void;
}

const NO_REPLY = new Set(['macro', 'abort', 'quit', 'quitNc']);
const NR_FLAG: Record<string, number> = {
  connect: SMFIP.NR_CONN,
  helo: SMFIP.NR_HELO,
  mail: SMFIP.NR_MAIL,
  rcpt: SMFIP.NR_RCPT,
  data: SMFIP.NR_DATA,
  header: SMFIP.NR_HDR,
  eoh: SMFIP.NR_EOH,
  body: SMFIP.NR_BODY,
};

async function fakeFilter(opts: FakeOptions = {}): Promise<{ port: number; seen: Seen[]; connections: () => number; close(): Promise<void> }> {
  const seen: Seen[] = [];
  let n = 0;
  const sockets = new Set<net.Socket>();
  const server = net.createServer((socket) => {
    sockets.add(socket);
    socket.on('close', () => sockets.delete(socket));
    socket.on('error', () => undefined);
    const index = n++;
    const decoder = new FrameDecoder();
    let protocol = 0;
    const c: FakeConn = {
      index,
      reply: (r) => socket.write(encodeReply(r)),
      raw: (b) => socket.write(b),
      end: () => socket.destroy(),
    };
    socket.on('data', (chunk) => {
      for (const f of decoder.push(chunk)) {
        const cmd = decodeCommand(f);
        seen.push({ conn: index, cmd });
        if (cmd.type === 'optneg') {
          protocol = opts.protocol ?? 0;
          c.reply({ type: 'optneg', version: opts.version ?? 6, actions: opts.actions ?? SMFIF_ALL, protocol, macros: opts.macros ?? [] });
          continue;
        }
        if (opts.on?.(cmd, c)) continue;
        if (NO_REPLY.has(cmd.type)) continue;
        if ((protocol & (NR_FLAG[cmd.type] ?? 0)) !== 0) continue;
        c.reply({ type: 'continue' });
      }
    });
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', () => resolve()));
  return {
    port: (server.address() as net.AddressInfo).port,
    seen,
    connections: () => n,
    close: () =>
      new Promise<void>((resolve) => {
        for (const s of sockets) s.destroy();
        server.close(() => resolve());
      }),
  };
}

async function withGateway(fake: { port: number }, options: ConnectMilterOptions, fn: (gw: TestGateway) => Promise<void>): Promise<void> {
  const gw = await startGateway({ milters: [connectMilter(`inet:127.0.0.1:${fake.port}`, { name: 'fake', ...options })] });
  try {
    await fn(gw);
  } finally {
    await gw.close();
  }
}

const types = (seen: Seen[]): string[] => seen.map((s) => (s.cmd.type === 'macro' ? `D${s.cmd.stage}` : s.cmd.type));

test('OPTNEG offers v6, every action and every flag we honour; default macros per stage; CONNECT facts', async () => {
  const fake = await fakeFilter();
  try {
    await withGateway(fake, {}, async (gw) => {
      const c = await ehlo(gw.port, 'helo.example.test');
      const r = await send(c, 'a@sender.test', ['bob@example.test'], message());
      assert.equal(r.data?.code, 250);
      assert.equal((await c.cmd('QUIT')).code, 221);
      await new Promise((res) => setTimeout(res, 100));
    });
    const opt = fake.seen[0]?.cmd;
    assert.deepEqual(opt, { type: 'optneg', version: 6, actions: SMFIF_ALL, protocol: OFFERED_PROTOCOL, macros: [] });
    assert.equal(OFFERED_PROTOCOL & SMFIP.RCPT_REJ, 0);
    const t = types(fake.seen);
    assert.deepEqual(t.slice(0, 9), ['optneg', 'DC', 'connect', 'DH', 'helo', 'DM', 'mail', 'DR', 'rcpt']);
    assert.deepEqual(t.slice(-4), ['DE', 'bodyEob', 'abort', 'quit'], 'ABORT after the message, QUIT at the end');
    const dc = fake.seen[1]?.cmd as Extract<MilterCommand, { type: 'macro' }>;
    assert.deepEqual(dc.macros.map((m) => m.name), ['j', '{daemon_name}', '{daemon_addr}', 'v', '_']);
    const conn = fake.seen[2]?.cmd as Extract<MilterCommand, { type: 'connect' }>;
    assert.equal(conn.family, 'ipv4');
    assert.equal(conn.hostname, '[127.0.0.1]');
    assert.ok(conn.family === 'ipv4' && conn.address === '127.0.0.1' && conn.port > 0);
    const mail = fake.seen.find((s) => s.cmd.type === 'mail')?.cmd as Extract<MilterCommand, { type: 'mail' }>;
    assert.equal(mail.address, '<a@sender.test>');
    const headers = fake.seen.filter((s) => s.cmd.type === 'header').map((s) => (s.cmd as { name: string }).name);
    assert.deepEqual(headers, ['From', 'To', 'Subject', 'Message-ID'], 'our Received header is not shown');
  } finally {
    await fake.close();
  }
});

test('a frame length of 0 at RCPT: defaultAction=reject for it, and for the rest of the session', async () => {
  const fake = await fakeFilter({ on: (cmd, c) => (cmd.type === 'rcpt' ? (c.raw(Buffer.from([0, 0, 0, 0])), true) : false) });
  try {
    await withGateway(fake, { defaultAction: 'reject' }, async (gw) => {
      const c = await ehlo(gw.port);
      assert.equal((await c.cmd('MAIL FROM:<a@sender.test>')).code, 250);
      assert.equal((await c.cmd('RCPT TO:<bob@example.test>')).text, '550 5.7.1 Command rejected');
      assert.equal((await c.cmd('RSET')).code, 250);
      assert.equal((await c.cmd('MAIL FROM:<a@sender.test>')).code, 550, 'failed for the session');
      assert.equal((await c.cmd('NOOP')).code, 250);
      c.end();
    });
    assert.equal(fake.connections(), 1, 'no reconnect after a failure');
  } finally {
    await fake.close();
  }
});

test('a frame longer than 65535 data bytes at MAIL, and pure garbage: tempfail', async () => {
  const big = Buffer.alloc(8);
  big.writeUInt32BE(70_000, 0);
  big.write('h', 4);
  const fake = await fakeFilter({ on: (cmd, c) => (cmd.type === 'mail' ? (c.raw(big), true) : false) });
  try {
    await withGateway(fake, {}, async (gw) => {
      const c = await ehlo(gw.port);
      const r = await c.cmd('MAIL FROM:<a@sender.test>');
      assert.equal(r.text, '451 4.7.1 Service unavailable - try again later');
      c.end();
    });
  } finally {
    await fake.close();
  }
  const junk = await fakeFilter({ on: (cmd, c) => (cmd.type === 'connect' ? (c.raw(encodeFrame('Z', Buffer.from('junk'))), true) : false) });
  try {
    await withGateway(junk, { defaultAction: 'tempfail' }, async (gw) => {
      const c = await RawClient.connect(gw.port);
      assert.equal((await c.reply()).code, 421, 'an unknown reply at connect: tempfail refuses the session');
      await c.waitClosed();
    });
  } finally {
    await junk.close();
  }
});

test('a filter that hangs at RCPT: our command timeout, defaultAction=accept; no hung connection', async () => {
  const fake = await fakeFilter({ on: (cmd) => cmd.type === 'rcpt' });
  try {
    await withGateway(fake, { defaultAction: 'accept', commandTimeout: 300 }, async (gw) => {
      const c = await ehlo(gw.port);
      const t0 = Date.now();
      const r = await send(c, 'a@sender.test', ['bob@example.test'], message());
      assert.ok(Date.now() - t0 < 3000);
      assert.equal(r.rcpt[0]?.code, 250);
      assert.equal(r.data?.code, 250);
      assert.equal((await stored(gw.root, 'bob@example.test')).length, 1);
      c.end();
    });
  } finally {
    await fake.close();
  }
});

test('the filter closes the connection mid-message (after DATA): default action, session goes on', async () => {
  const fake = await fakeFilter({ on: (cmd, c) => (cmd.type === 'data' ? (c.end(), true) : false) });
  try {
    await withGateway(fake, {}, async (gw) => {
      const c = await ehlo(gw.port);
      const r = await send(c, 'a@sender.test', ['bob@example.test'], message());
      assert.equal(r.data?.text, '451 4.7.1 Service unavailable - try again later');
      assert.equal((await c.cmd('NOOP')).code, 250);
      c.end();
    });
  } finally {
    await fake.close();
  }
});

test('the filter closes between messages: a new connection replays CONNECT and HELO', async () => {
  const fake = await fakeFilter({ on: (cmd, c) => (cmd.type === 'abort' ? (c.end(), true) : false) });
  try {
    await withGateway(fake, {}, async (gw) => {
      const c = await ehlo(gw.port, 'again.example.test');
      assert.equal((await send(c, 'a@sender.test', ['bob@example.test'], message())).data?.code, 250);
      await new Promise((res) => setTimeout(res, 50));
      assert.equal((await send(c, 'a@sender.test', ['bob@example.test'], message())).data?.code, 250);
      c.end();
    });
    assert.equal(fake.connections(), 2);
    const second = types(fake.seen.filter((s) => s.conn === 1));
    assert.deepEqual(second.slice(0, 7), ['optneg', 'DC', 'connect', 'DH', 'helo', 'DM', 'mail']);
  } finally {
    await fake.close();
  }
});

test('PROGRESS forever does not hold the message: after 4 content timeouts the filter fails (tempfail)', async () => {
  // Regression (hardening issue): progress every second kept a 5 s timeout alive for 51 s.
  const timers: NodeJS.Timeout[] = [];
  const fake = await fakeFilter({
    on: (cmd, c) => {
      if (cmd.type !== 'bodyEob') return false;
      timers.push(setInterval(() => c.reply({ type: 'progress' }), 50));
      return true;
    },
  });
  try {
    await withGateway(fake, { contentTimeout: 200 }, async (gw) => {
      const c = await ehlo(gw.port);
      const r = await send(c, 'a@sender.test', ['bob@example.test'], message());
      assert.equal(r.data?.code, 451, 'the default action, though the filter never stopped sending progress');
      assert.equal((await stored(gw.root, 'bob@example.test')).length, 0);
      c.end();
    });
  } finally {
    for (const t of timers) clearInterval(t);
    await fake.close();
  }
});

test('PROGRESS keeps a slow end of message alive past the content timeout; edits applied', async () => {
  const fake = await fakeFilter({
    on: (cmd, c) => {
      if (cmd.type !== 'bodyEob') return false;
      let k = 0;
      const t = setInterval(() => {
        if (++k < 10) return c.reply({ type: 'progress' });
        clearInterval(t);
        c.reply({ type: 'addHeader', name: 'X-Slow', value: 'done' });
        c.reply({ type: 'changeHeader', index: 0, name: 'Subject', value: 'changed' });
        c.reply({ type: 'insertHeader', index: 1, name: 'X-Second', value: 'two' });
        c.reply({ type: 'replaceBody', chunk: Buffer.from('new ') });
        c.reply({ type: 'replaceBody', chunk: Buffer.from('body\r\n') });
        c.reply({ type: 'continue' });
      }, 100);
      return true;
    },
  });
  try {
    await withGateway(fake, { contentTimeout: 400 }, async (gw) => {
      const c = await ehlo(gw.port);
      const r = await send(c, 'a@sender.test', ['bob@example.test'], message());
      assert.equal(r.data?.code, 250, r.data?.text);
      const [m] = await stored(gw.root, 'bob@example.test');
      const { headers, body } = split(m!);
      assert.match(headers, /\r\nX-Slow: done\r\n/);
      assert.match(headers, /\r\nSubject: changed\r\n/);
      assert.match(headers, /^Return-Path: [^\r]*\r\nDelivered-To: bob@example\.test\r\nReceived: (?:[^\r]*\r\n\t)*[^\r]*\r\nX-Second: two\r\n/, 'INSHEADER index 1 → position 2');
      assert.equal(body.toString(), 'new body\r\n');
      c.end();
    });
  } finally {
    await fake.close();
  }
});

test('NR_* flags: no reply is awaited for those events; HDR_LEADSPC keeps the leading space; LF folding', async () => {
  const nr = SMFIP.NR_CONN | SMFIP.NR_HELO | SMFIP.NR_MAIL | SMFIP.NR_RCPT | SMFIP.NR_DATA | SMFIP.NR_HDR | SMFIP.NR_EOH | SMFIP.NR_BODY;
  const fake = await fakeFilter({ protocol: nr | SMFIP.HDR_LEADSPC });
  try {
    await withGateway(fake, { commandTimeout: 2000, contentTimeout: 2000 }, async (gw) => {
      const c = await ehlo(gw.port);
      const t0 = Date.now();
      const r = await send(c, 'a@sender.test', ['bob@example.test'], message('hi', 'body\r\n', 'X-Fold: a\r\n\tb\r\n'));
      assert.equal(r.data?.code, 250);
      assert.ok(Date.now() - t0 < 1500, 'nothing waited for a reply that never comes');
      c.end();
    });
    const h = fake.seen.filter((s) => s.cmd.type === 'header').map((s) => s.cmd as { name: string; value: string });
    assert.equal(h.find((x) => x.name === 'Subject')?.value, ' hi');
    assert.equal(h.find((x) => x.name === 'X-Fold')?.value, ' a\n\tb');
  } finally {
    await fake.close();
  }
  const plain = await fakeFilter();
  try {
    await withGateway(plain, {}, async (gw) => {
      const c = await ehlo(gw.port);
      await send(c, 'a@sender.test', ['bob@example.test'], message('hi', 'body\r\n', 'X-Fold: a\r\n\tb\r\n'));
      c.end();
    });
    const h = plain.seen.filter((s) => s.cmd.type === 'header').map((s) => s.cmd as { name: string; value: string });
    assert.equal(h.find((x) => x.name === 'Subject')?.value, 'hi');
    assert.equal(h.find((x) => x.name === 'X-Fold')?.value, 'a\n\tb');
  } finally {
    await plain.close();
  }
});

test('SKIP at the first body chunk: no more chunks, end of message still sent; body in ≤ 65535-byte chunks', async () => {
  const fake = await fakeFilter({ protocol: SMFIP.SKIP, on: (cmd, c) => (cmd.type === 'body' ? (c.reply({ type: 'skip' }), true) : false) });
  const noSkip = await fakeFilter();
  try {
    const body = ('y'.repeat(998) + '\r\n').repeat(200);
    for (const f of [fake, noSkip]) {
      await withGateway(f, {}, async (gw) => {
        const c = await ehlo(gw.port);
        assert.equal((await send(c, 'a@sender.test', ['bob@example.test'], message('s', body))).data?.code, 250);
        c.end();
      });
    }
    assert.equal(fake.seen.filter((s) => s.cmd.type === 'body').length, 1);
    assert.ok(fake.seen.some((s) => s.cmd.type === 'bodyEob'));
    const chunks = noSkip.seen.filter((s) => s.cmd.type === 'body').map((s) => (s.cmd as { chunk: Buffer }).chunk.length);
    assert.ok(chunks.length >= 4 && chunks.every((n) => n <= 65535));
    assert.equal(chunks.reduce((a, b) => a + b, 0), body.length);
  } finally {
    await fake.close();
    await noSkip.close();
  }
});

test('SETSYMLIST in OPTNEG replaces the macro list of that stage only; NO* stages are not sent', async () => {
  const fake = await fakeFilter({
    protocol: SMFIP.NOHELO | SMFIP.NOHDRS | SMFIP.NOBODY,
    macros: [{ stage: SMFIM.ENVRCPT, names: ['{client_addr}', '{nonexistent}'] }],
  });
  try {
    await withGateway(fake, {}, async (gw) => {
      const c = await ehlo(gw.port);
      assert.equal((await send(c, 'a@sender.test', ['bob@example.test'], message())).data?.code, 250);
      c.end();
    });
    const t = types(fake.seen);
    assert.ok(!t.includes('helo') && !t.includes('header') && !t.includes('body'), t.join(' '));
    assert.ok(t.includes('DH'), 'the macro packet of a NO* envelope event is still sent (Postfix)');
    const dr = fake.seen.find((s) => s.cmd.type === 'macro' && s.cmd.stage === 'R')?.cmd as Extract<MilterCommand, { type: 'macro' }>;
    assert.deepEqual(dr.macros, [{ name: '{client_addr}', value: '127.0.0.1' }]);
    const dm = fake.seen.find((s) => s.cmd.type === 'macro' && s.cmd.stage === 'M')?.cmd as Extract<MilterCommand, { type: 'macro' }>;
    assert.deepEqual(dm.macros.map((m) => m.name), ['i', '{mail_addr}', '{mail_host}', '{mail_mailer}']);
  } finally {
    await fake.close();
  }
});

test('negotiation: a version above 6 or actions we did not offer is a protocol error (default action)', async () => {
  for (const bad of [{ version: 7 }, { actions: 0x400 }]) {
    const fake = await fakeFilter(bad);
    try {
      await withGateway(fake, { defaultAction: 'reject' }, async (gw) => {
        const c = await RawClient.connect(gw.port);
        assert.equal((await c.reply()).code, 554);
        await c.waitClosed();
      });
    } finally {
      await fake.close();
    }
  }
});

test('replies: REPLYCODE multi-line with %%, DISCARD ignored at connect, SHUTDOWN closes with 421', async () => {
  const fake = await fakeFilter({
    on: (cmd, c) => {
      if (cmd.type === 'connect') return c.reply({ type: 'discard' }), true;
      if (cmd.type === 'rcpt' && cmd.address === '<x@example.test>') return c.reply({ type: 'replyCode', reply: '554-5.7.1 first 50%%\r\n554 5.7.1 second' }), true;
      if (cmd.type === 'rcpt' && cmd.address === '<bad@example.test>') return c.reply({ type: 'replyCode', reply: '554 4.7.1 class mismatch' }), true;
      if (cmd.type === 'rcpt' && cmd.address === '<down@example.test>') return c.reply({ type: 'shutdown' }), true;
      return false;
    },
  });
  try {
    await withGateway(fake, { defaultAction: 'tempfail' }, async (gw) => {
      const c = await ehlo(gw.port);
      assert.equal((await c.cmd('MAIL FROM:<a@sender.test>')).code, 250);
      assert.deepEqual((await c.cmd('RCPT TO:<x@example.test>')).lines, ['554-5.7.1 first 50%', '554 5.7.1 second']);
      assert.equal((await c.cmd('RCPT TO:<bob@example.test>')).code, 250);
      assert.equal((await c.cmd('RCPT TO:<bad@example.test>')).code, 451, 'a malformed REPLYCODE is a failure: default action');
      c.end();
      const d = await ehlo(gw.port);
      assert.equal((await d.cmd('MAIL FROM:<a@sender.test>')).code, 250);
      assert.equal((await d.cmd('RCPT TO:<down@example.test>')).code, 421);
      await d.waitClosed();
    });
  } finally {
    await fake.close();
  }
  assert.equal(parseReplyCode('250 ok'), undefined);
  assert.equal(parseReplyCode('550 4.1.1 x'), undefined);
  assert.deepEqual(parseReplyCode('550 no enhanced code'), { code: 550, enhanced: '5.7.1', lines: ['no enhanced code'] });
});

test('a remote filter cannot grow a message past the limits that bind the client: header bytes, edit count, body size (451, nothing stored)', async () => {
  // Regression (hardening issue): 10,000 add-header edits of 60 KB were accepted and stored
  // as a 600 MB message. Each case is sent in full by the filter; the gateway stops at its limit.
  const cases: { name: string; send: (c: FakeConn) => void }[] = [
    { name: 'header bytes', send: (c) => { for (let i = 0; i < 40; i++) c.reply({ type: 'addHeader', name: 'X-Flood', value: 'h'.repeat(60_000) }); } },
    { name: 'edit count', send: (c) => { for (let i = 0; i < 1500; i++) c.reply({ type: 'addHeader', name: 'X-Many', value: String(i) }); } },
    { name: 'body size', send: (c) => { for (let i = 0; i < 5; i++) c.reply({ type: 'replaceBody', chunk: Buffer.alloc(60_000, 0x61) }); } },
  ];
  for (const k of cases) {
    const fake = await fakeFilter({
      on: (cmd, c) => {
        if (cmd.type !== 'bodyEob') return false;
        k.send(c);
        c.reply({ type: 'continue' });
        return true;
      },
    });
    const gw = await startGateway({
      maxHeaderBytes: 256 * 1024,
      maxMessageBytes: 200 * 1024,
      milters: [connectMilter(`inet:127.0.0.1:${fake.port}`, { name: 'fake' })],
    });
    try {
      const c = await ehlo(gw.port);
      const r = await send(c, 'a@sender.test', ['bob@example.test'], message(k.name));
      assert.equal(r.data?.code, 451, `${k.name}: the milter failed, its default action (tempfail) answers`);
      assert.equal((await stored(gw.root, 'bob@example.test')).length, 0, `${k.name}: nothing stored`);
      c.end();
    } finally {
      await gw.close();
      await fake.close();
    }
  }
});
