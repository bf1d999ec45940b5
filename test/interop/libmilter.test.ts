/**
 * connectMilter against the real C libmilter: the python3-milter reference filter
 * (test/fixtures/libmilter/reference.py), started here on a free port, behind a running
 * gateway. Every edit it makes shows in the stored Maildir message and the SMTP replies;
 * with the filter stopped, slow, or replaced by something writing junk, the gateway gives
 * the configured default action and no connection hangs.
 */
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import net from 'node:net';
import { connectMilter, type ConnectMilterOptions } from '../../lib/milter/protocol/client.js';
import type { DefaultAction } from '../../lib/index.js';
import { ehlo, message, send, split, startGateway, stored, type TestGateway } from '../helpers/smtp.js';
import { startReferenceFilter, type RunningFilter } from '../helpers/libmilter.js';
import { freePort } from '../helpers/ports.js';

let filter: RunningFilter;

before(async () => {
  filter = await startReferenceFilter('edit');
});
after(async () => {
  await filter?.stop();
});

async function gatewayWith(spec: string, options: ConnectMilterOptions = {}): Promise<TestGateway> {
  return startGateway({ milters: [connectMilter(spec, { name: 'reference', ...options })] });
}

test('libmilter reference filter: rcpt reject/tempfail replies, every eom edit lands in the stored message', async () => {
  const gw = await gatewayWith(`inet:${filter.port}@127.0.0.1`);
  try {
    const c = await ehlo(gw.port, 'client.example.test');
    const content = message('hello world', 'Original body line.\r\n', 'X-Remove-Me: please\r\nX-Folded: one\r\n\ttwo\r\n');
    const r = await send(c, 'alice@sender.test', ['bob@example.test', 'reject@example.test', 'tempfail@example.test', 'drop@example.test'], content);
    assert.equal(r.mail.code, 250);
    assert.equal(r.rcpt[0]?.code, 250);
    // setreply with two lines: a multi-line 550 with the enhanced code on every line, %% → %.
    assert.deepEqual(r.rcpt[1]?.lines, ['550-5.1.1 No such user here', '550 5.1.1 second line 100%']);
    assert.equal(r.rcpt[2]?.text, '451 4.2.0 Mailbox busy, try later');
    assert.equal(r.rcpt[3]?.code, 250);
    assert.equal(r.data?.code, 250, r.data?.text);

    assert.deepEqual(await stored(gw.root, 'drop@example.test'), [], 'DELRCPT removed drop@');
    const [bob] = await stored(gw.root, 'bob@example.test');
    const [archive] = await stored(gw.root, 'archive@example.test');
    assert.ok(bob, `bob got the message ${filter.stderr()}`);
    assert.ok(archive, 'ADDRCPT added archive@');
    const { headers, body } = split(bob);
    const lines = headers.split('\r\n');
    assert.equal(lines[0], 'Return-Path: <bounce@sender.test>', 'CHGFROM (maildir writes the envelope sender first)');
    assert.equal(lines[1], 'Delivered-To: bob@example.test', 'maildir names the recipient of this copy');
    assert.equal(lines[2], 'X-Inserted: at the top', 'INSHEADER index 0 puts it first, above our Received');
    assert.match(lines[3] ?? '', /^Received: from client\.example\.test/);
    assert.match(headers, /\r\nX-Added: yes\r\n/);
    assert.match(headers, /\r\nSubject: \[filtered\] hello world\r\n/);
    assert.doesNotMatch(headers, /\r\nX-Remove-Me:/);
    assert.equal(body.toString(), 'Replaced by the reference filter.\r\nSecond chunk.\r\n', 'REPLBODY chunks concatenated');

    // What the filter saw, reported by itself.
    const saw = /X-Saw: ([^\r]*(?:\r\n[ \t][^\r]*)*)/.exec(headers)?.[1]?.replace(/\r\n[ \t]/g, ' ') ?? '';
    assert.match(saw, /connect=\[127\.0\.0\.1\]\|\d+\|127\.0\.0\.1/, saw);
    assert.match(saw, /helo=client\.example\.test/);
    assert.match(saw, /j=mx\.test/);
    assert.match(saw, /daemon_name=dovetail/);
    assert.match(saw, /mail=<alice@sender\.test>/);
    assert.match(saw, /client_addr=127\.0\.0\.1/, 'the filter\'s SETSYMLIST for MAIL was honoured');
    assert.match(saw, /macro_i_mail=\w+/);
    assert.match(saw, /macro_i_eom=\w+/);
    assert.match(saw, /macro_rcpt=drop@example\.test/);
    assert.match(saw, /headers=From,To,Subject,Message-ID,X-Remove-Me,X-Folded;/, 'our own Received header is not shown');
    assert.match(saw, /body=21/);
    assert.match(saw, /rcpts=bob@example\.test drop@example\.test/);

    // A second message on the same SMTP session (ABORT in between, same filter connection).
    const r2 = await send(c, 'carol@sender.test', ['bob@example.test'], message('QUARANTINE me'));
    assert.equal(r2.data?.code, 250, r2.data?.text);
    assert.equal((await stored(gw.root, 'bob@example.test')).length, 1, 'quarantined, not delivered');
    const [held] = await stored(gw.quarantineRoot, 'bob@example.test');
    assert.match(held?.toString() ?? '', /X-Dovetail-Quarantine: subject asked for it/);
    assert.match(held?.toString() ?? '', /Subject: \[filtered\] QUARANTINE me/);
    assert.equal((await c.cmd('QUIT')).code, 221);
  } finally {
    await gw.close();
  }
});

for (const [action, rcptCode] of [
  ['tempfail', 421],
  ['reject', 554],
  ['accept', 250],
] as [DefaultAction, number][]) {
  test(`filter stopped (connection refused): defaultAction=${action}`, async () => {
    const port = await freePort(); // nothing listens there
    const gw = await gatewayWith(`inet:127.0.0.1:${port}`, { defaultAction: action, connectTimeout: 2000 });
    try {
      const c = await import('../helpers/smtp.js').then((m) => m.RawClient.connect(gw.port));
      const greeting = await c.reply();
      // A failure at connect: tempfail/reject refuse the session at the greeting (421/554).
      assert.equal(greeting.code, action === 'accept' ? 220 : rcptCode, greeting.text);
      if (action === 'accept') {
        await c.cmd('EHLO client.example.test');
        const r = await send(c, 'a@sender.test', ['bob@example.test'], message());
        assert.equal(r.data?.code, 250);
        assert.equal((await stored(gw.root, 'bob@example.test')).length, 1);
        c.end();
      } else {
        await c.waitClosed();
      }
    } finally {
      await gw.close();
    }
  });
}

test('filter stopped mid-session: the message gets the default action, the session goes on', async () => {
  const own = await startReferenceFilter('edit');
  const gw = await gatewayWith(`inet:127.0.0.1:${own.port}`, { defaultAction: 'reject' });
  try {
    const c = await ehlo(gw.port);
    assert.equal((await c.cmd('MAIL FROM:<a@sender.test>')).code, 250);
    await own.stop();
    const r = await c.cmd('RCPT TO:<bob@example.test>');
    assert.equal(r.text, '550 5.7.1 Command rejected');
    assert.equal((await c.cmd('RSET')).code, 250);
    const again = await c.cmd('MAIL FROM:<a@sender.test>');
    assert.equal(again.code, 550, 'failed for the rest of the session, as Postfix');
    assert.equal((await c.cmd('NOOP')).code, 250);
    c.end();
  } finally {
    await gw.close();
    await own.stop();
  }
});

test('slow filter (sleeps past the content timeout at eom): defaultAction=tempfail, nothing stored', async () => {
  const slow = await startReferenceFilter('slow', { SLOW_SECONDS: '3' });
  const gw = await gatewayWith(`inet:127.0.0.1:${slow.port}`, { contentTimeout: 500 });
  try {
    const c = await ehlo(gw.port);
    const t0 = Date.now();
    const r = await send(c, 'a@sender.test', ['bob@example.test'], message());
    assert.equal(r.data?.text, '451 4.7.1 Service unavailable - try again later');
    assert.ok(Date.now() - t0 < 2500, 'our own content timeout fired, not the filter');
    assert.deepEqual(await stored(gw.root, 'bob@example.test'), []);
    assert.equal((await c.cmd('NOOP')).code, 250, 'no hung connection');
    c.end();
  } finally {
    await gw.close();
    await slow.stop();
  }
});

test('a "filter" replying garbage: defaultAction=quarantine, message held; no hung connection', async () => {
  const junk = net.createServer((s) => {
    s.on('data', () => s.write(Buffer.from('HTTP/1.1 400 Bad Request\r\n\r\n')));
    s.on('error', () => undefined);
  });
  await new Promise<void>((resolve) => junk.listen(0, '127.0.0.1', () => resolve()));
  const port = (junk.address() as net.AddressInfo).port;
  const gw = await gatewayWith(`inet:127.0.0.1:${port}`, { defaultAction: 'quarantine', commandTimeout: 2000 });
  try {
    const c = await ehlo(gw.port);
    const r = await send(c, 'a@sender.test', ['bob@example.test'], message());
    assert.equal(r.data?.code, 250, r.data?.text);
    assert.deepEqual(await stored(gw.root, 'bob@example.test'), []);
    const [held] = await stored(gw.quarantineRoot, 'bob@example.test');
    assert.match(held?.toString() ?? '', /X-Dovetail-Quarantine: milter reference failed at connect/);
    c.end();
  } finally {
    await gw.close();
    await new Promise<void>((resolve) => junk.close(() => resolve()));
  }
});
