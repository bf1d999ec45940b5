/**
 * Real Postfix 3.7 honours what serveMilter() negotiates from the milter's handlers and its
 * `needs` declaration. Two milters that each add one header at end of message are given to
 * one Postfix (`smtpd_milters` lists both); one declares `needs: { headers: false, body:
 * false }`, the other does not. Each is reached through a counting TCP relay that splits
 * what Postfix sends into milter frames (uint32 length, command byte), so the test sees,
 * per message, how many bytes and which commands each one got.
 */
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import net from 'node:net';
import { defineMilter } from '../../lib/index.js';
import { serveMilter, type MilterServer } from '../../lib/milter/protocol/server.js';
import { startLmtpSink, type LmtpSink } from '../helpers/lmtp-sink.js';
import { startPostfix, type Postfix } from '../helpers/postfix.js';
import { ehlo, send, split } from '../helpers/smtp.js';

/** What Postfix sent through one relay: bytes and frames per command letter. */
interface Tally {
  bytes: number;
  commands: Map<string, number>;
}

/** A TCP relay to `port` that counts what flows towards it, frame by frame. */
async function countingRelay(port: number): Promise<{ address: string; tally: Tally; reset(): void; close(): Promise<void> }> {
  const tally: Tally = { bytes: 0, commands: new Map() };
  const sockets = new Set<net.Socket>();
  const server = net.createServer((mta) => {
    const milter = net.connect(port, '127.0.0.1');
    sockets.add(mta).add(milter);
    let pending = Buffer.alloc(0);
    mta.on('data', (d: Buffer) => {
      tally.bytes += d.length;
      pending = Buffer.concat([pending, d]);
      while (pending.length >= 5) {
        const len = pending.readUInt32BE(0);
        if (pending.length < 4 + len) break;
        const cmd = String.fromCharCode(pending[4]!);
        tally.commands.set(cmd, (tally.commands.get(cmd) ?? 0) + 1);
        pending = pending.subarray(4 + len);
      }
      milter.write(d);
    });
    milter.on('data', (d: Buffer) => mta.write(d));
    const end = (): void => {
      mta.destroy();
      milter.destroy();
    };
    mta.on('close', end).on('error', end);
    milter.on('close', end).on('error', end);
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const addr = server.address() as net.AddressInfo;
  return {
    address: `inet:127.0.0.1:${addr.port}`,
    tally,
    reset() {
      tally.bytes = 0;
      tally.commands.clear();
    },
    close: async () => {
      for (const s of sockets) s.destroy();
      await new Promise<void>((resolve) => server.close(() => resolve()));
    },
  };
}

const eomSeen: { lean: { headers: number; size: number }[]; full: { headers: number; size: number }[] } = { lean: [], full: [] };
const lean = defineMilter({
  name: 'lean',
  needs: { headers: false, body: false },
  async eom(ctx) {
    eomSeen.lean.push({ headers: ctx.headers.length, size: ctx.message.size });
    ctx.message.addHeader('X-Lean', 'yes');
  },
});
const full = defineMilter({
  name: 'full',
  async eom(ctx) {
    eomSeen.full.push({ headers: ctx.headers.length, size: ctx.message.size });
    ctx.message.addHeader('X-Full', 'yes');
  },
});

let leanServer: MilterServer;
let fullServer: MilterServer;
let leanRelay: Awaited<ReturnType<typeof countingRelay>>;
let fullRelay: Awaited<ReturnType<typeof countingRelay>>;
let sink: LmtpSink;
let postfix: Postfix;

before(async () => {
  leanServer = await serveMilter(lean, { listen: 'inet:127.0.0.1:0' });
  fullServer = await serveMilter(full, { listen: 'inet:127.0.0.1:0' });
  leanRelay = await countingRelay(leanServer.port);
  fullRelay = await countingRelay(fullServer.port);
  sink = await startLmtpSink();
  postfix = await startPostfix({ milter: `${leanRelay.address} ${fullRelay.address}`, lmtpPort: sink.port });
});

after(async () => {
  await postfix?.stop();
  await sink?.close();
  await leanRelay?.close();
  await fullRelay?.close();
  await leanServer?.close();
  await fullServer?.close();
});

test('a milter whose eom reads neither headers nor body is sent neither: Postfix honours SMFIP_NOHDRS, NOEOH, NOBODY and the NO* of absent stages', async () => {
  const body = 'x'.repeat(998) + '\r\n';
  const message = (i: number): string =>
    `From: Alice <alice@sender.test>\r\nTo: Bob <bob@example.test>\r\nSubject: negotiation ${i}\r\nMessage-ID: <n${i}.${Date.now()}@sender.test>\r\n` +
    Array.from({ length: 20 }, (_, k) => `X-Filler-${k}: ${'y'.repeat(60)}\r\n`).join('') +
    `\r\n${body.repeat(8)}`;
  const c = await ehlo(postfix.smtpPort, 'client.sender.test');
  try {
    // The first message also carries the connection's OPTNEG, connect and helo: count from the second on.
    assert.equal((await send(c, 'alice@sender.test', ['bob@example.test'], message(0))).data?.code, 250);
    leanRelay.reset();
    fullRelay.reset();
    const n = 3;
    for (let i = 1; i <= n; i++) {
      const r = await send(c, 'alice@sender.test', ['bob@example.test'], message(i));
      assert.equal(r.data?.code, 250, r.data?.text);
    }
    for (let i = 0; i <= n; i++) {
      const got = await sink.waitFor((m) => m.data.includes(`Subject: negotiation ${i}\r\n`));
      const { headers } = split(got.data);
      assert.match(headers, /^X-Lean: yes$/m, 'the lean milter still edits the message');
      assert.match(headers, /^X-Full: yes$/m);
    }
  } finally {
    c.end();
  }
  const lean = leanRelay.tally;
  const full = fullRelay.tally;
  // The full milter (eom reads the message) gets every header, EOH is not asked for, the body.
  assert.ok((full.commands.get('L') ?? 0) >= 3 * 24, `SMFIC_HEADER frames (24 per message and Postfix's own): ${[...full.commands]}`);
  assert.ok((full.commands.get('B') ?? 0) >= 3, 'SMFIC_BODY');
  assert.equal(full.commands.get('E'), 3, 'SMFIC_BODYEOB');
  // The lean one: no header, no body, no EOH, no MAIL/RCPT/DATA/HELO — end of message and the
  // macros Postfix sends with it (and abort/quit bookkeeping) only.
  for (const cmd of ['L', 'B', 'N', 'M', 'R', 'T', 'H', 'C']) assert.equal(lean.commands.get(cmd), undefined, `lean got command ${cmd}: ${[...lean.commands]}`);
  assert.equal(lean.commands.get('E'), 3, 'SMFIC_BODYEOB');
  const perMessage = { lean: lean.bytes / 3, full: full.bytes / 3 };
  assert.ok(perMessage.full > 8 * 1000, `the full milter gets the body: ${perMessage.full} bytes/msg`);
  assert.ok(perMessage.lean < 600, `the lean milter gets a few hundred bytes per message, not the message: ${perMessage.lean} bytes/msg`);
  // The eom handlers saw what was negotiated.
  assert.ok(eomSeen.full.every((s) => s.headers >= 24 && s.size > 8000), JSON.stringify(eomSeen.full));
  assert.ok(eomSeen.lean.every((s) => s.headers === 0 && s.size === 2), `no headers, an empty body (size: the blank line): ${JSON.stringify(eomSeen.lean)}`);
  console.log(`# bytes Postfix sent per message: lean ${perMessage.lean.toFixed(0)}, full ${perMessage.full.toFixed(0)}`);
});
