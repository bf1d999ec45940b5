/**
 * Our client against our server in one process: a gateway whose chain holds
 * connectMilter('inet:127.0.0.1:PORT'), forwarding over real loopback sockets to
 * serveMilter(inner). Every stage reaches the inner milter with the right data, every edit
 * lands in the stored message, every verdict is the client's SMTP reply.
 */
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { accept, defineMilter, discard, quarantine, reject, skip, tempfail } from '../../lib/index.js';
import { connectMilter } from '../../lib/milter/protocol/client.js';
import { serveMilter, type MilterServer } from '../../lib/milter/protocol/server.js';
import { ehlo, send, split, startGateway, stored, type TestGateway } from '../helpers/smtp.js';

const events: string[] = [];
const log = (e: string): void => void events.push(e);

const inner = defineMilter({
  name: 'inner',
  async connect(ctx) {
    log(`connect ${ctx.client.address} ${ctx.client.family} j=${ctx.server.hostname}`);
  },
  async helo(_ctx, name) {
    log(`helo ${name}`);
    if (name === 'bad.helo.test') return reject(550, '5.7.1', 'Bad HELO');
  },
  async mail(ctx, sender) {
    log(`mail ${sender.address} ${JSON.stringify(sender.args)} helo=${ctx.helo}`);
    if (sender.address === 'spammer@sender.test') return reject(553, '5.7.1', 'Sender refused');
    if (sender.address === 'trusted@sender.test') return accept();
  },
  async rcpt(ctx, rcpt) {
    log(`rcpt ${rcpt.address} i=${ctx.queueId ? 'set' : 'unset'}`);
    if (rcpt.address === 'nobody@example.test') return reject(550, '5.1.1', ['No such user', '100% sure']);
    if (rcpt.address === 'later@example.test') return tempfail();
  },
  async data(ctx) {
    log(`data ${ctx.envelope.recipients.map((r) => r.address).join(',')}`);
    if (ctx.envelope.sender.address === 'dropme@sender.test') return discard();
  },
  async header(_ctx, h) {
    if (h.name === 'Subject') log(`header Subject: ${h.value}`);
  },
  async eoh(ctx) {
    log(`eoh ${ctx.headers.length}`);
  },
  async body(_ctx, chunk) {
    log(`body ${chunk.length}`);
    return skip();
  },
  async eom(ctx) {
    const subject = ctx.headers.find((h) => h.name === 'Subject')?.value;
    log(`eom ${subject} ${ctx.message.size}`);
    if (subject === 'reject me') return reject(554, '5.7.1', ['Rejected: 50% spam', 'second line']);
    if (subject === 'tempfail me') return tempfail(452, '4.3.1', 'Out of room');
    if (subject === 'quarantine me') return quarantine('suspicious');
    if (subject === 'edit me') {
      ctx.message.addHeader('X-Checked', 'yes');
      ctx.message.insertHeader(1, 'X-First', 'first');
      ctx.message.changeHeader('Subject', 1, '[ext] edit me');
      ctx.message.deleteHeader('X-Internal', 1);
      ctx.envelope.changeSender('bounce@sender.test');
      ctx.envelope.addRecipient('archive@example.test');
      ctx.envelope.removeRecipient('old@example.test');
      ctx.message.replaceBody('Replaced body.\r\n');
    }
  },
  async abort() {
    log('abort');
  },
  async close() {
    log('close');
  },
});

let server: MilterServer;
let gw: TestGateway;

before(async () => {
  server = await serveMilter(inner, { listen: 'inet:127.0.0.1:0' });
  gw = await startGateway({ milters: [connectMilter(server.address, { name: 'remote', commandTimeout: 5000, contentTimeout: 5000 })] });
});

after(async () => {
  await gw?.close();
  await server?.close();
});

const MSG = (subject: string, body = 'Original body.\r\n'): string =>
  `From: Alice <alice@sender.test>\r\nTo: Bob <bob@example.test>\r\nSubject: ${subject}\r\nX-Internal: secret\r\nMessage-ID: <${Math.random().toString(36).slice(2)}@sender.test>\r\n\r\n${body}`;

async function until(pred: () => boolean, ms = 3000): Promise<void> {
  const deadline = Date.now() + ms;
  while (!pred()) {
    if (Date.now() > deadline) throw new Error(`timed out; events: ${events.join(' | ')}`);
    await new Promise((r) => setTimeout(r, 10));
  }
}

test('every stage reaches the served milter; every edit lands in the stored message', async () => {
  events.length = 0;
  const c = await ehlo(gw.port, 'client.sender.test');
  const r = await send(c, 'alice@sender.test', ['bob@example.test', 'old@example.test'], MSG('edit me'));
  c.end();
  assert.equal(r.data?.code, 250, r.data?.text);
  await until(() => events.includes('close'));
  assert.deepEqual(events.slice(0, 3), ['connect 127.0.0.1 ipv4 j=mx.test', 'helo client.sender.test', 'mail alice@sender.test {} helo=client.sender.test']);
  assert.ok(events.includes('rcpt bob@example.test i=set'), events.join('\n'));
  assert.ok(events.includes('data bob@example.test,old@example.test'), events.join('\n'));
  assert.ok(events.includes('header Subject: edit me'), events.join('\n'));
  assert.ok(events.includes('eoh 5'), `the gateway's Received header is not shown: ${events.join('\n')}`);
  assert.ok(events.some((e) => e.startsWith('body ')));
  assert.ok(events.some((e) => e.startsWith('eom edit me ')));
  assert.equal(events.at(-1), 'close');

  assert.deepEqual(await stored(gw.root, 'old@example.test'), []);
  const [bob] = await stored(gw.root, 'bob@example.test');
  const [archive] = await stored(gw.root, 'archive@example.test');
  assert.ok(bob && archive, 'delivered to bob and to the added recipient');
  const { headers, body } = split(bob);
  const lines = headers.split(/\r\n(?![ \t])/).filter(Boolean);
  assert.equal(lines[0], 'Return-Path: <bounce@sender.test>');
  assert.equal(lines[1], 'Delivered-To: bob@example.test');
  assert.equal(lines[2], 'X-First: first');
  assert.ok(lines.includes('Subject: [ext] edit me'), headers);
  assert.ok(!lines.some((l) => l.startsWith('X-Internal')), headers);
  assert.equal(lines.at(-1), 'X-Checked: yes');
  assert.equal(body.toString(), 'Replaced body.\r\n');
});

test('every verdict, as the SMTP client sees it', async () => {
  // helo reject (given at MAIL FROM by the gateway)
  let c = await ehlo(gw.port, 'bad.helo.test');
  assert.deepEqual((await c.cmd('MAIL FROM:<alice@sender.test>')).lines, ['550 5.7.1 Bad HELO']);
  c.end();

  c = await ehlo(gw.port, 'client.sender.test');
  try {
    // mail reject, custom code
    assert.deepEqual((await c.cmd('MAIL FROM:<spammer@sender.test>')).lines, ['553 5.7.1 Sender refused']);
    // rcpt reject (multi-line, %), rcpt tempfail (plain), then accepted
    let r = await send(c, 'alice@sender.test', ['nobody@example.test', 'later@example.test', 'bob@example.test'], MSG('reject me'));
    assert.deepEqual(r.rcpt[0]?.lines, ['550-5.1.1 No such user', '550 5.1.1 100% sure']);
    assert.deepEqual(r.rcpt[1]?.lines, ['451 4.7.1 Service unavailable - try again later']);
    assert.equal(r.rcpt[2]?.code, 250);
    // eom reject, multi-line
    assert.deepEqual(r.data?.lines, ['554-5.7.1 Rejected: 50% spam', '554 5.7.1 second line']);
    // eom tempfail, custom
    r = await send(c, 'alice@sender.test', ['bob@example.test'], MSG('tempfail me'));
    assert.deepEqual(r.data?.lines, ['452 4.3.1 Out of room']);
    // discard at data: 250, nothing stored
    const before = (await stored(gw.root, 'bob@example.test')).length;
    r = await send(c, 'dropme@sender.test', ['bob@example.test'], MSG('dropped'));
    assert.equal(r.data?.code, 250);
    // accept at mail: the milter is done with the message, it is delivered untouched
    events.length = 0;
    r = await send(c, 'trusted@sender.test', ['bob@example.test'], MSG('edit me'));
    assert.equal(r.data?.code, 250);
    assert.ok(!events.some((e) => e.startsWith('eom')), events.join('\n'));
    const after = await stored(gw.root, 'bob@example.test');
    assert.equal(after.length, before + 1);
    assert.ok(after.at(-1)?.toString().includes('Subject: edit me'));
    // quarantine: accepted, stored in the quarantine
    r = await send(c, 'alice@sender.test', ['bob@example.test'], MSG('quarantine me'));
    assert.equal(r.data?.code, 250);
    const q = await stored(gw.quarantineRoot, 'bob@example.test');
    assert.ok(q.some((m) => m.toString().includes('Subject: quarantine me')), 'quarantined');
    // an open message the client abandons: abort reaches the served milter
    events.length = 0;
    await c.cmd('MAIL FROM:<alice@sender.test>');
    await c.cmd('RCPT TO:<bob@example.test>');
    await c.cmd('RSET');
    await c.cmd('MAIL FROM:<alice@sender.test>');
    await until(() => events.includes('abort'));
  } finally {
    c.end();
  }
});

test('a refused connection: tempfail at connect is the greeting', async () => {
  const server2 = await serveMilter(defineMilter({ name: 'closed', async connect() { return tempfail(421, '4.3.2', 'Not now'); } }), { listen: 'inet:127.0.0.1:0' });
  const gw2 = await startGateway({ milters: [connectMilter(server2.address, { name: 'remote2' })] });
  try {
    const { RawClient } = await import('../helpers/smtp.js');
    const c = await RawClient.connect(gw2.port);
    const greeting = await c.reply();
    assert.equal(greeting.code, 421);
    assert.match(greeting.text, /4\.3\.2 Not now/);
    c.end();
  } finally {
    await gw2.close();
    await server2.close();
  }
});
