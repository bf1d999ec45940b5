/**
 * The gateway as an MTA: routes() by recipient domain, local recipients delivered before
 * the 250, remote ones written to the durable queue and sent on by smtp() to a next hop
 * on loopback, nothing relayed ever stored locally, DSNs routed like any mail (a local
 * sender's bounce lands in its local mailbox), unroutable recipients refused at RCPT, the
 * hop-count loop limit, and the options that must go together (outbound routes need a
 * queue). Also routes() on its own: exact, `.parent` and `'*'` keys, envelope order.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { Readable } from 'node:stream';
import { createGateway, createQueue, isDovetailError, maildir, routes, smtp, smtpReply, type DeferredQueue, type DeliveryQueue, type RecipientResult, type Transport } from '../../lib/index.js';
import { relayControl } from '../../milters/index.js';
import { startPeer, type Peer } from '../helpers/smtp-peer.js';
import { ehlo, message, send, split, stored } from '../helpers/smtp.js';
import { waitFor } from '../helpers/wait.js';

/** A transport that records what it got and answers per recipient (a test transport, not a stand-in for ours). */
function recorder(name: string, outbound = false): Transport & { got: string[][] } {
  const got: string[][] = [];
  return {
    name,
    ...(outbound ? { outbound: true } : {}),
    got,
    async deliver(envelope) {
      got.push(envelope.recipients.map((r) => r.address));
      return envelope.recipients.map((r): RecipientResult => ({ recipient: r.address, status: 'delivered', reply: smtpReply(250, '2.0.0', `${name} ok`) }));
    },
  };
}

test('routes(): exact domain, .parent for subdomains, * for the rest; one delivery per transport; results in envelope order', async () => {
  const local = recorder('local');
  const sub = recorder('sub');
  const out = recorder('out', true);
  const table = routes({ 'Example.TEST.': local, '.example.test': sub, '*': out });
  assert.equal(table.route('a@example.test'), local);
  assert.equal(table.route('a@x.y.example.test'), sub);
  assert.equal(table.route('a@notexample.test'), out);
  assert.equal(table.route('a@[192.0.2.1]'), out);
  assert.equal(table.isOutbound('a@remote.test'), true);
  assert.equal(table.isOutbound('a@example.test'), false);
  assert.deepEqual(table.localDomains, ['example.test', '.example.test']);
  assert.equal(table.anyOutbound, true);
  const body = Buffer.from('Subject: x\r\n\r\nx\r\n');
  const r = await table.deliver(
    { queueId: 'Q', sender: { address: 's@example.test', args: {} }, recipients: ['a@remote.test', 'b@example.test', 'c@a.example.test', 'd@example.test'].map((address) => ({ address, args: {} })) },
    { size: body.length, stream: () => Readable.from([body]) },
  );
  assert.deepEqual(r.map((x) => `${x.recipient} ${x.reply.lines[0]}`), ['a@remote.test out ok', 'b@example.test local ok', 'c@a.example.test sub ok', 'd@example.test local ok']);
  assert.deepEqual(local.got, [['b@example.test', 'd@example.test']]);
  const noDefault = routes({ 'example.test': local });
  assert.equal(noDefault.route('x@remote.test'), undefined);
  assert.equal(noDefault.anyOutbound, false);
  const [none] = await noDefault.deliver({ queueId: 'Q', sender: { address: '', args: {} }, recipients: [{ address: 'x@remote.test', args: {} }] }, { size: body.length, stream: () => Readable.from([body]) });
  assert.equal(none!.status, 'failed');
  assert.equal(none!.reply.enhanced, '5.1.2');
  // A transport that throws defers its own recipients only.
  const broken: Transport = {
    name: 'broken',
    async deliver() {
      throw new Error('store on fire');
    },
  };
  const split2 = await routes({ 'example.test': broken, '*': out }).deliver(
    { queueId: 'Q', sender: { address: 's@example.test', args: {} }, recipients: [{ address: 'a@example.test', args: {} }, { address: 'b@remote.test', args: {} }] },
    { size: body.length, stream: () => Readable.from([body]) },
  );
  assert.deepEqual(split2.map((x) => [x.status, x.reply.code]), [['deferred', 451], ['delivered', 250]]);
  assert.throws(() => routes({ 'not a domain': local }), (e) => isDovetailError(e, 'DOVETAIL_ERR_INVALID_OPTIONS'));
  assert.throws(() => routes({ 'example.test': {} as Transport }), (e) => isDovetailError(e, 'DOVETAIL_ERR_INVALID_OPTIONS'));
});

interface Mta {
  readonly port: number;
  readonly root: string;
  readonly queue: DeliveryQueue;
  readonly peer: Peer;
  close(): Promise<void>;
}

/** A small MTA: example.test into Maildir, everything else by smtp() to a loopback peer through the queue. */
async function startMta(peerOptions: Parameters<typeof startPeer>[0] = {}, backoff = { min: 100, max: 200 }): Promise<Mta> {
  const base = await fs.mkdtemp(path.join(os.tmpdir(), 'dovetail-mta-'));
  const root = path.join(base, 'mail');
  await fs.mkdir(root);
  const peer = await startPeer(peerOptions);
  const table = routes({
    'example.test': maildir({ root, domains: ['example.test'] }),
    '*': smtp({ relayhost: `[127.0.0.1]:${peer.port}`, hostname: 'mx.example.test', tls: 'none', deadDestinationTime: 0 }),
  });
  const queue = createQueue({ dir: path.join(base, 'queue'), transport: table, hostname: 'mx.example.test', backoff, scanInterval: 50 });
  const gateway = createGateway({
    hostname: 'mx.example.test',
    resolveClientNames: false,
    listen: { host: '127.0.0.1', port: 0 },
    milters: [relayControl({ localDomains: table.localDomains, mynetworks: ['127.0.0.0/8'] })],
    delivery: table,
    queue,
    quarantine: maildir({ root: path.join(base, 'quarantine') }),
  });
  await fs.mkdir(path.join(base, 'quarantine'));
  const [addr] = await gateway.listen();
  return {
    port: addr!.port,
    root,
    queue,
    peer,
    async close() {
      await gateway.close();
      await peer.close();
      await fs.rm(base, { recursive: true, force: true });
    },
  };
}

test('local recipient stored before the 250, remote recipient queued and sent on by smtp() at once, never stored locally', async () => {
  // A one-hour backoff: the remote copy can only arrive in time if its first attempt is immediate
  // (regression: the handoff's sparse result array made the queue wait backoff.min first).
  const mta = await startMta({}, { min: 3_600_000, max: 3_600_000 });
  try {
    const c = await ehlo(mta.port);
    const r = await send(c, 'sender@client.test', ['alice@example.test', 'bob@remote.test'], message('mixed'));
    assert.equal(r.data?.code, 250);
    assert.match(r.data!.text, /queued as/);
    // The local copy is there when the client hears 250.
    const [local] = await stored(mta.root, 'alice@example.test');
    assert.ok(local, 'alice stored before the 250');
    const [remote] = await mta.peer.waitFor(1);
    assert.deepEqual(remote!.to, ['bob@remote.test']);
    assert.match(split(remote!.data).headers, /^Received: from client\.example\.test .*\r\n\tby mx\.example\.test \(dovetail\) with ESMTP id /s);
    assert.deepEqual(await fs.readdir(mta.root), ['alice@example.test'], 'no local folder for the remote recipient');
    await waitFor('an empty queue', async () => (await mta.queue.list()).length === 0);
    c.end();
  } finally {
    await mta.close();
  }
});

test('a remote recipient refused by the next hop: the DSN goes to the local sender mailbox, routed like any mail', async () => {
  const mta = await startMta({ rcpt: (a) => (a.startsWith('nouser@') ? [550, '5.1.1 No such user here'] : undefined) });
  try {
    const c = await ehlo(mta.port);
    const r = await send(c, 'alice@example.test', ['nouser@remote.test'], message('will bounce'));
    assert.equal(r.data?.code, 250, 'queued first');
    const [dsn] = await waitFor('the bounce in alice mailbox', async () => {
      const got = await stored(mta.root, 'alice@example.test');
      return got.length ? got : undefined;
    });
    const text = dsn!.toString().replace(/\r\n[ \t]+/g, ' '); // unfolded
    assert.match(text, /^Return-Path: <>\r\n/);
    assert.match(text, /Action: failed/);
    assert.match(text, /Diagnostic-Code: smtp; 550 5\.1\.1 SMTP \[127\.0\.0\.1\]:\d+ said: 550 5\.1\.1 No such user here/);
    assert.equal(mta.peer.messages.length, 0);
    c.end();
  } finally {
    await mta.close();
  }
});

test('a recipient with no route is refused at RCPT; a message over the hop limit is refused (554 5.4.6)', async () => {
  const base = await fs.mkdtemp(path.join(os.tmpdir(), 'dovetail-noroute-'));
  const gateway = createGateway({
    hostname: 'mx.example.test',
    resolveClientNames: false,
    listen: { host: '127.0.0.1', port: 0 },
    delivery: routes({ 'example.test': maildir({ root: base }) }),
    quarantine: maildir({ root: base }),
    maxHops: 5,
  });
  const [addr] = await gateway.listen();
  try {
    const c = await ehlo(addr!.port);
    assert.equal((await c.cmd('MAIL FROM:<a@client.test>')).code, 250);
    const rcpt = await c.cmd('RCPT TO:<x@remote.test>');
    assert.match(rcpt.text, /^550 5\.1\.2 /);
    assert.equal((await c.cmd('RCPT TO:<bob@example.test>')).code, 250);
    const hops = (n: number): string => Array.from({ length: n }, (_, i) => `Received: from hop${i}.test by hop${i + 1}.test; Tue, 1 Dec 2026 00:00:0${i % 10} +0000\r\n`).join('');
    const loop = await c.data(hops(6) + message('looping'));
    assert.match(loop.text, /^554 5\.4\.6 /);
    const r = await send(c, 'a@client.test', ['bob@example.test'], hops(5) + message('five hops is fine'));
    assert.equal(r.data?.code, 250);
    assert.equal((await stored(base, 'bob@example.test')).length, 1);
    c.end();
  } finally {
    await gateway.close();
    await fs.rm(base, { recursive: true, force: true });
  }
});

test('outbound routes need a queue (refused at createGateway); a queue that cannot take the message gives 451, never 250', async () => {
  const base = await fs.mkdtemp(path.join(os.tmpdir(), 'dovetail-needqueue-'));
  const out = smtp({ relayhost: '[127.0.0.1]:9', tls: 'none' });
  try {
    assert.throws(
      () => createGateway({ listen: { port: 0 }, delivery: routes({ 'example.test': maildir({ root: base }), '*': out }), quarantine: maildir({ root: base }) }),
      (e) => isDovetailError(e, 'DOVETAIL_ERR_INVALID_OPTIONS') && /needs a queue/.test((e as Error).message),
    );
    const broken: DeferredQueue = {
      async defer() {
        throw new Error('disk full');
      },
    };
    const gateway = createGateway({
      hostname: 'mx.example.test',
      resolveClientNames: false,
      listen: { host: '127.0.0.1', port: 0 },
      delivery: routes({ 'example.test': maildir({ root: base }), '*': out }),
      queue: broken,
      quarantine: maildir({ root: base }),
    });
    const [addr] = await gateway.listen();
    try {
      const c = await ehlo(addr!.port);
      const r = await send(c, 'a@client.test', ['x@remote.test'], message('nowhere to keep it'));
      assert.equal(r.data?.code, 451);
      c.end();
    } finally {
      await gateway.close();
    }
  } finally {
    await out.close();
    await fs.rm(base, { recursive: true, force: true });
  }
});

test('maildir({ domains }) never stores a recipient of another domain (550 5.1.1)', async () => {
  const root = await fs.mkdtemp(path.join(os.tmpdir(), 'dovetail-domains-'));
  try {
    const store = maildir({ root, domains: ['example.test', '.sub.example.test'] });
    const body = Buffer.from('Subject: x\r\n\r\nx\r\n');
    const r = await store.deliver(
      { queueId: 'Q', sender: { address: 's@client.test', args: {} }, recipients: ['a@example.test', 'b@x.sub.example.test', 'c@remote.test'].map((address) => ({ address, args: {} })) },
      { size: body.length, stream: () => Readable.from([body]) },
    );
    assert.deepEqual(r.map((x) => x.status), ['delivered', 'delivered', 'failed']);
    assert.equal(r[2]!.reply.code, 550);
    assert.equal(r[2]!.reply.enhanced, '5.1.1');
    assert.deepEqual((await fs.readdir(root)).sort(), ['a@example.test', 'b@x.sub.example.test']);
    assert.throws(() => maildir({ root, domains: ['not a domain'] }), (e) => isDovetailError(e, 'DOVETAIL_ERR_INVALID_OPTIONS'));
  } finally {
    await fs.rm(root, { recursive: true, force: true });
  }
});
