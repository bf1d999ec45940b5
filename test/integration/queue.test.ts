/**
 * The durable deferred queue (lib/delivery/queue.ts) with real files and real sockets: the
 * gateway hands it mixed results and answers 250; deferred recipients are retried into a
 * Maildir store; failures produce RFC 3464 DSNs that reach the sender through an SMTP sink
 * (smtp-server, sent to with nodemailer); expiry, the null sender, the inspection API, a
 * failing disk, concurrency and recovery after a crash. Backoffs are short through the
 * options; time-dependent cases use an injected clock; every wait is a bounded poll.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import diagnostics_channel from 'node:diagnostics_channel';
import fs from 'node:fs/promises';
import { createRequire } from 'node:module';
import os from 'node:os';
import path from 'node:path';
import { Readable, Writable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import libmime from 'libmime';
import Headers from 'mailsplit/lib/headers.js';
import nodemailer from 'nodemailer';
import { SMTPServer } from 'smtp-server';
import { maildir, smtpReply, type DeliveryEnvelope, type MessageSource, type RecipientResult, type SmtpReply, type Transport } from '../../lib/index.js';
import { createQueue, QueueChannels, type DeliveryQueue, type QueueOptions } from '../../lib/delivery/queue.js';
import { lmtp } from '../../lib/delivery/lmtp.js';
import { createLmtpServer } from '../../lib/delivery/lmtp-server.js';
import { ehlo, message, send, split, startGateway, stored } from '../helpers/smtp.js';
import { waitFor } from '../helpers/wait.js';

// ---- helpers ------------------------------------------------------------------------------

async function tempDir(): Promise<string> {
  return fs.mkdtemp(path.join(os.tmpdir(), 'dovetail-queue-'));
}

/** Polls `check` until it returns a truthy value (bounded). */
/**
 * A Maildir store behind a switch: recipients in `refuse` get that reply (4xx → deferred,
 * 5xx → failed); the others are delivered by maildir(). Counts calls and concurrency per
 * queue id.
 */
function switchedStore(root: string) {
  const store = maildir({ root });
  const refuse = new Map<string, SmtpReply>();
  const calls: DeliveryEnvelope[] = [];
  const inFlight = new Map<string, number>();
  let maxPerId = 0;
  let delay = 0;
  const transport: Transport = {
    name: 'switched',
    async deliver(envelope, msg) {
      calls.push(envelope);
      const n = (inFlight.get(envelope.queueId) ?? 0) + 1;
      inFlight.set(envelope.queueId, n);
      maxPerId = Math.max(maxPerId, n);
      try {
        if (delay) await new Promise((r) => setTimeout(r, delay));
        const ok = envelope.recipients.filter((r) => !refuse.has(r.address));
        const stored = ok.length ? await store.deliver({ ...envelope, recipients: ok }, msg) : [];
        return envelope.recipients.map((r) => {
          const reply = refuse.get(r.address);
          if (reply) return { recipient: r.address, status: reply.code >= 500 ? 'failed' : 'deferred', reply } as RecipientResult;
          return stored[ok.indexOf(r)]!;
        });
      } finally {
        inFlight.set(envelope.queueId, (inFlight.get(envelope.queueId) ?? 1) - 1);
      }
    },
  };
  return {
    transport,
    refuse,
    calls,
    get maxPerId() {
      return maxPerId;
    },
    set delay(ms: number) {
      delay = ms;
    },
  };
}

interface SunkMessage {
  readonly from: string;
  readonly to: string[];
  readonly raw: Buffer;
}

/** An SMTP server on loopback standing for the sender's mailstore; recipients in `refuse` get 550. */
async function smtpSink() {
  const messages: SunkMessage[] = [];
  const refuse = new Set<string>();
  const server = new SMTPServer({
    authOptional: true,
    disabledCommands: ['STARTTLS', 'AUTH'],
    logger: false,
    onRcptTo(addr, _session, cb) {
      if (refuse.has(addr.address)) return cb(Object.assign(new Error('User unknown'), { responseCode: 550 }));
      cb();
    },
    onData(stream, session, cb) {
      const chunks: Buffer[] = [];
      stream.on('data', (c: Buffer) => chunks.push(c));
      stream.on('end', () => {
        const from = session.envelope.mailFrom;
        messages.push({ from: from ? from.address : '', to: session.envelope.rcptTo.map((r) => r.address), raw: Buffer.concat(chunks) });
        cb();
      });
    },
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const port = (server.server.address() as { port: number }).port;
  return {
    port,
    messages,
    refuse,
    close: () => new Promise<void>((resolve) => server.close(() => resolve())),
  };
}

/** A Transport that relays over SMTP with nodemailer: the user-facing extension point, written by a user. */
function smtpTransport(port: number): Transport {
  const relay = nodemailer.createTransport({ host: '127.0.0.1', port, secure: false, ignoreTLS: true });
  const toReply = (text: unknown, fallback: number): SmtpReply => {
    const m = /^(\d)(\d\d)[ -](?:(\d\.\d{1,3}\.\d{1,3}) )?(.*)$/.exec(String(text ?? ''));
    const code = m ? Number(m[1]! + m[2]!) : fallback;
    return smtpReply(code, m?.[3] && m[3][0] === String(code)[0] ? m[3] : `${String(code)[0]}.0.0`, m?.[4] || 'relay error');
  };
  return {
    name: 'smtp-relay',
    async deliver(envelope, msg) {
      const chunks: Buffer[] = [];
      for await (const c of msg.stream()) chunks.push(c as Buffer);
      try {
        const info = await relay.sendMail({
          envelope: { from: envelope.sender.address, to: envelope.recipients.map((r) => r.address) },
          raw: Buffer.concat(chunks),
        });
        const accepted = (info.accepted as unknown[]).map(String);
        return envelope.recipients.map((r) =>
          accepted.includes(r.address)
            ? { recipient: r.address, status: 'delivered' as const, reply: toReply(info.response, 250) }
            : { recipient: r.address, status: 'failed' as const, reply: smtpReply(550, '5.1.1', 'User unknown') },
        );
      } catch (err) {
        const code = Number((err as { responseCode?: unknown }).responseCode);
        const permanent = code >= 500 && code < 600;
        const reply = toReply((err as { response?: unknown }).response, permanent ? code : 451);
        return envelope.recipients.map((r) => ({ recipient: r.address, status: permanent ? ('failed' as const) : ('deferred' as const), reply }));
      }
    },
  };
}

/** One MIME node as mailsplit sees it: its content type, parameters, headers and body. */
interface MimePart {
  readonly type: string;
  readonly params: Record<string, string>;
  readonly headers: Headers;
  body: Buffer;
}

/** Parses a whole message with mailsplit's Splitter (the nodes in document order). */
async function parseMime(raw: Buffer): Promise<MimePart[]> {
  const { Splitter } = createRequire(import.meta.url)('mailsplit') as { Splitter: new () => NodeJS.ReadWriteStream };
  const parts: MimePart[] = [];
  await pipeline(
    Readable.from([raw]),
    new Splitter(),
    new Writable({
      objectMode: true,
      write(data: { type: string; headers?: Headers; value?: Buffer }, _enc, cb) {
        if (data.type === 'node' && data.headers) {
          const ct = libmime.parseHeaderValue(data.headers.getFirst('content-type') || 'text/plain');
          parts.push({ type: ct.value.toLowerCase(), params: ct.params, headers: data.headers, body: Buffer.alloc(0) });
        } else if (data.type === 'body' && data.value) {
          const last = parts[parts.length - 1];
          if (last) last.body = Buffer.concat([last.body, data.value]);
        }
        cb();
      },
    }),
  );
  return parts;
}

/** The groups of a message/delivery-status body (RFC 3464 2.1), each parsed as a header block. */
function statusGroups(body: Buffer): Headers[] {
  return body
    .toString('utf8')
    .split(/\r\n\r\n/)
    .map((g) => g.trim())
    .filter((g) => g !== '')
    .map((g) => new Headers(Buffer.from(g + '\r\n\r\n', 'utf8')));
}

/** Checks a DSN is RFC 3464 in shape and returns its parts. */
async function parseDsn(raw: Buffer) {
  const parts = await parseMime(raw);
  const top = parts[0]!;
  assert.equal(top.type, 'multipart/report');
  assert.equal(top.params['report-type'], 'delivery-status');
  assert.equal(top.headers.getFirst('auto-submitted'), 'auto-replied');
  const human = parts.find((p) => p.type === 'text/plain');
  const status = parts.find((p) => p.type === 'message/delivery-status');
  const returned = parts.find((p) => p.type === 'text/rfc822-headers' || p.type === 'message/rfc822');
  assert.ok(human && status && returned, `parts: ${parts.map((p) => p.type).join(', ')}`);
  // The three parts are the report's direct children, in RFC 6522's order.
  assert.deepEqual(parts.slice(1, 4).map((p) => p.type), ['text/plain', 'message/delivery-status', returned.type]);
  const [perMessage, ...perRecipient] = statusGroups(status.body);
  return { parts, human: human.body.toString('utf8'), perMessage: perMessage!, perRecipient, returned };
}

/** Collects a diagnostics channel's messages while `fn` runs. */
async function collect<T>(name: string, fn: (seen: Record<string, unknown>[]) => Promise<T>): Promise<T> {
  const seen: Record<string, unknown>[] = [];
  const onMessage = (m: unknown): void => void seen.push(m as Record<string, unknown>);
  diagnostics_channel.subscribe(name, onMessage);
  try {
    return await fn(seen);
  } finally {
    diagnostics_channel.unsubscribe(name, onMessage);
  }
}

const FAST: Pick<QueueOptions, 'backoff' | 'scanInterval' | 'hostname'> = { backoff: { min: 40, max: 200 }, scanInterval: 20, hostname: 'mx.test' };

function source(content: string | Buffer): MessageSource {
  const buf = Buffer.isBuffer(content) ? content : Buffer.from(content, 'utf8');
  return { size: buf.length, stream: () => Readable.from([buf]) };
}

const r250 = smtpReply(250, '2.0.0', 'Ok');
const r452 = smtpReply(452, '4.2.2', 'Mailbox full');
const r550 = smtpReply(550, '5.1.1', '<ghost@example.test>: User unknown in virtual mailbox table');

async function filesIn(dir: string): Promise<string[]> {
  try {
    return (await fs.readdir(dir)).sort();
  } catch {
    return [];
  }
}

// ---- tests --------------------------------------------------------------------------------

test('a mixed result is queued durably, answered 250, and the deferred recipient is delivered once the store accepts', async () => {
  const base = await tempDir();
  const mail = path.join(base, 'mail');
  await fs.mkdir(mail);
  const store = switchedStore(mail);
  store.refuse.set('later@example.test', r452);
  const sink = await smtpSink();
  const queue = createQueue({ dir: path.join(base, 'queue'), transport: store.transport, bounce: smtpTransport(sink.port), ...FAST });
  const gw = await startGateway({ delivery: store.transport, queue });
  // listen() started the retry loop; hold it until the on-disk state right after the 250 is
  // checked (regression: with a 40 ms backoff a retry could be rewriting the envelope in tmp/).
  queue.stop();
  try {
    const c = await ehlo(gw.port);
    const content = message('queued', 'Some body.\r\n');
    const r = await send(c, 'alice@sender.test', ['bob@example.test', 'later@example.test'], content);
    assert.match(r.data!.text, /^250 2\.\d\.0 Ok: queued as /);
    c.end();

    // On disk before the 250: the message and its envelope, committed in active/.
    const [entry] = await queue.list();
    assert.ok(entry);
    assert.deepEqual(await filesIn(path.join(queue.dir, 'active')), [entry.queueId, `${entry.queueId}.json`]);
    assert.deepEqual(await filesIn(path.join(queue.dir, 'tmp')), []);
    const onDisk = JSON.parse(await fs.readFile(path.join(queue.dir, 'active', `${entry.queueId}.json`), 'utf8'));
    assert.equal(onDisk.sender.address, 'alice@sender.test');
    assert.deepEqual(onDisk.recipients.map((x: { address: string; status: string }) => [x.address, x.status]), [
      ['bob@example.test', 'delivered'],
      ['later@example.test', 'deferred'],
    ]);
    assert.deepEqual(onDisk.lastReply, { code: 452, enhanced: '4.2.2', lines: ['Mailbox full'] });
    const bobCopy = (await stored(mail, 'bob@example.test'))[0]!;
    assert.deepEqual(split(await fs.readFile(path.join(queue.dir, 'active', entry.queueId))).body, split(bobCopy).body);
    assert.deepEqual(
      entry.recipients.map((x) => [x.address, x.status, x.attempts, x.lastReply?.code]),
      [
        ['bob@example.test', 'delivered', 1, 250],
        ['later@example.test', 'deferred', 1, 452],
      ],
    );
    assert.ok(entry.recipients[1]!.nextAttempt instanceof Date);

    // Retried while the store still refuses: still queued, more attempts, only `later` is retried.
    await queue.start();
    await waitFor('a retry', async () => (await queue.list())[0]!.attempts >= 3);
    assert.ok(store.calls.slice(1).every((e) => e.recipients.length === 1 && e.recipients[0]!.address === 'later@example.test'));
    assert.equal((await stored(mail, 'later@example.test')).length, 0);

    store.refuse.delete('later@example.test');
    const delivered = await waitFor('delivery of the deferred recipient', async () => {
      const got = await stored(mail, 'later@example.test');
      return got.length ? got : undefined;
    });
    assert.equal(delivered.length, 1);
    assert.deepEqual(split(delivered[0]!).body, Buffer.from('Some body.\r\n'));
    assert.equal((await stored(mail, 'bob@example.test')).length, 1, 'bob is not delivered twice');
    await waitFor('the entry to leave the queue', async () => (await queue.list()).length === 0);
    assert.deepEqual(await filesIn(path.join(queue.dir, 'active')), []);
    assert.equal(sink.messages.length, 0, 'no DSN for a recipient that was delivered');
  } finally {
    await gw.close();
    await queue.close();
    await sink.close();
    await fs.rm(base, { recursive: true, force: true });
  }
});

test('a permanent failure produces an RFC 3464 DSN delivered to the sender through bounce', async () => {
  const base = await tempDir();
  const mail = path.join(base, 'mail');
  await fs.mkdir(mail);
  const store = switchedStore(mail);
  store.refuse.set('ghost@example.test', r550);
  const sink = await smtpSink();
  const queue = createQueue({ dir: path.join(base, 'queue'), transport: store.transport, bounce: smtpTransport(sink.port), ...FAST });
  await queue.start();
  const gw = await startGateway({ delivery: store.transport, queue });
  try {
    const c = await ehlo(gw.port);
    const content = message('to a ghost', 'Body of the original.\r\n');
    const r = await send(c, 'alice@sender.test', ['bob@example.test', 'ghost@example.test'], content);
    assert.equal(r.data?.code, 250, 'mixed delivered/failed is a 250 once the DSN is queued');
    c.end();

    const dsn = await waitFor('the DSN at the sink', () => sink.messages[0]);
    assert.equal(dsn.from, '', 'a DSN has the null reverse-path');
    assert.deepEqual(dsn.to, ['alice@sender.test']);
    const report = await parseDsn(dsn.raw);
    assert.equal(report.parts[0]!.headers.getFirst('to'), '<alice@sender.test>');
    assert.equal(report.perMessage.getFirst('reporting-mta'), 'dns; mx.test');
    assert.match(report.perMessage.getFirst('arrival-date'), /^\w{3}, \d{1,2} \w{3} \d{4} \d\d:\d\d:\d\d \+0000$/);
    assert.equal(report.perRecipient.length, 1);
    const rcpt = report.perRecipient[0]!;
    assert.equal(rcpt.getFirst('final-recipient'), 'rfc822; ghost@example.test');
    assert.equal(rcpt.getFirst('action'), 'failed');
    assert.match(rcpt.getFirst('status'), /^5\.\d{1,3}\.\d{1,3}$/);
    assert.equal(rcpt.getFirst('status'), '5.1.1');
    assert.equal(rcpt.getFirst('diagnostic-code'), 'smtp; 550 5.1.1 <ghost@example.test>: User unknown in virtual mailbox table');
    assert.match(report.human, /ghost@example\.test/);
    // No RET: a failure returns the whole message (Postfix's choice), under the size limit.
    assert.equal(report.returned.type, 'message/rfc822');
    assert.match(dsn.raw.toString('utf8'), /Subject: to a ghost/);
    assert.match(dsn.raw.toString('utf8'), /Body of the original\./);
    await waitFor('an empty queue', async () => (await queue.list()).length === 0);
  } finally {
    await gw.close();
    await queue.close();
    await sink.close();
    await fs.rm(base, { recursive: true, force: true });
  }
});

test('the real LMTP path: lmtp() into the embedded store for delivery, and a DSN delivered by lmtp() into the sender’s mailstore', async () => {
  const base = await tempDir();
  const mail = path.join(base, 'mail');
  const senders = path.join(base, 'senders');
  await fs.mkdir(mail);
  await fs.mkdir(senders);
  const store = await createLmtpServer({ root: mail, listen: { host: '127.0.0.1', port: 0 }, users: (a) => !a.startsWith('ghost@') });
  const senderStore = await createLmtpServer({ root: senders, listen: { host: '127.0.0.1', port: 0 } });
  const port = (s: typeof store): number => (s.address as { port: number }).port;
  const delivery = lmtp({ host: '127.0.0.1', port: port(store) });
  const bounce = lmtp({ host: '127.0.0.1', port: port(senderStore) });
  const queue = createQueue({ dir: path.join(base, 'queue'), transport: delivery, bounce, ...FAST });
  await queue.start();
  const gw = await startGateway({ delivery, queue });
  try {
    const c = await ehlo(gw.port);
    const r = await send(c, 'alice@sender.test', ['bob@example.test', 'ghost@example.test'], message('via lmtp'));
    c.end();
    // With recipient verification off, the unknown user is refused by the store after DATA: mixed → 250 + DSN.
    assert.equal(r.data?.code, 250, r.data?.text);
    assert.equal((await stored(mail, 'bob@example.test')).length, 1);
    const [dsn] = await waitFor('the DSN in the sender’s mailbox', async () => {
      const got = await stored(senders, 'alice@sender.test');
      return got.length ? got : undefined;
    });
    assert.match(split(dsn!).headers, /^Return-Path: <>\r\n/, 'delivered with the null sender');
    const report = await parseDsn(dsn!);
    assert.equal(report.perRecipient[0]!.getFirst('final-recipient'), 'rfc822; ghost@example.test');
    assert.equal(report.perRecipient[0]!.getFirst('action'), 'failed');
    assert.match(report.perRecipient[0]!.getFirst('status'), /^5\./);
    assert.match(report.perRecipient[0]!.getFirst('diagnostic-code'), /^smtp; 550 5\.1\.1/);
    await waitFor('an empty queue', async () => (await queue.list()).length === 0);
  } finally {
    await gw.close();
    await queue.close();
    await bounce.close();
    await store.close();
    await senderStore.close();
    await fs.rm(base, { recursive: true, force: true });
  }
});

test('DSN parameters: ENVID, ORCPT, RET=HDRS, NOTIFY=NEVER and NOTIFY=SUCCESS', async () => {
  const base = await tempDir();
  const sink = await smtpSink();
  const mail = path.join(base, 'mail');
  await fs.mkdir(mail);
  const queue = createQueue({ dir: path.join(base, 'queue'), transport: maildir({ root: mail }), bounce: smtpTransport(sink.port), ...FAST });
  await queue.start();
  try {
    const content = message('with params', 'The body must not come back.\r\n');
    await queue.defer(
      {
        queueId: 'PARAMS1',
        sender: { address: 'alice@sender.test', args: { ENVID: 'QQ+2B314', RET: 'HDRS' } },
        recipients: [
          { address: 'ghost@example.test', args: { ORCPT: 'rfc822;Ghost+2BTag@Example.test', NOTIFY: 'FAILURE' } },
          { address: 'quiet@example.test', args: { NOTIFY: 'NEVER' } },
          { address: 'bob@example.test', args: { NOTIFY: 'SUCCESS,FAILURE' } },
        ],
      },
      source(content),
      [
        { recipient: 'ghost@example.test', status: 'failed', reply: r550 },
        { recipient: 'quiet@example.test', status: 'failed', reply: smtpReply(554, '5.7.1', 'Rejected') },
        { recipient: 'bob@example.test', status: 'delivered', reply: r250 },
      ],
    );
    const dsn = await waitFor('the DSN', () => sink.messages[0]);
    const report = await parseDsn(dsn.raw);
    assert.equal(report.perMessage.getFirst('original-envelope-id'), 'QQ+314');
    const byAddress = new Map(report.perRecipient.map((g) => [g.getFirst('final-recipient'), g]));
    assert.deepEqual([...byAddress.keys()].sort(), ['rfc822; bob@example.test', 'rfc822; ghost@example.test'], 'NOTIFY=NEVER is not reported');
    assert.equal(byAddress.get('rfc822; ghost@example.test')!.getFirst('original-recipient'), 'rfc822; Ghost+Tag@Example.test');
    assert.equal(byAddress.get('rfc822; ghost@example.test')!.getFirst('action'), 'failed');
    assert.equal(byAddress.get('rfc822; bob@example.test')!.getFirst('action'), 'delivered');
    assert.equal(byAddress.get('rfc822; bob@example.test')!.getFirst('status'), '2.0.0');
    assert.equal(report.returned.type, 'text/rfc822-headers');
    assert.match(report.returned.body.toString('utf8'), /Subject: with params/);
    assert.doesNotMatch(dsn.raw.toString('utf8'), /must not come back/);
    await waitFor('an empty queue', async () => (await queue.list()).length === 0);
    assert.equal(sink.messages.length, 1, 'one DSN for all reported recipients');
  } finally {
    await queue.close();
    await sink.close();
    await fs.rm(base, { recursive: true, force: true });
  }
});

test('expiry: a recipient still deferred after maxLifetime fails with Action: failed; delayWarning sends Action: delayed first', async () => {
  const base = await tempDir();
  const sink = await smtpSink();
  const mail = path.join(base, 'mail');
  await fs.mkdir(mail);
  const store = switchedStore(mail);
  store.refuse.set('later@example.test', r452);
  let now = Date.UTC(2026, 0, 1);
  const hour = 3600_000;
  // The loop is not started: attempts happen through retryNow() only, at times the test sets.
  const queue = createQueue({
    dir: path.join(base, 'queue'),
    transport: store.transport,
    bounce: smtpTransport(sink.port),
    hostname: 'mx.test',
    clock: () => now,
    maxLifetime: 5 * 24 * hour,
    delayWarning: 4 * hour,
  });
  try {
    await queue.defer(
      { queueId: 'EXPIRE1', sender: { address: 'alice@sender.test', args: {} }, recipients: [{ address: 'bob@example.test', args: {} }, { address: 'later@example.test', args: {} }] },
      source(message('slow')),
      [
        { recipient: 'bob@example.test', status: 'delivered', reply: r250 },
        { recipient: 'later@example.test', status: 'deferred', reply: r452 },
      ],
    );
    let [entry] = await queue.list();
    // Postfix backoff: 300 s after the first attempt, doubling, capped at 4000 s.
    assert.equal(entry!.nextAttempt!.getTime() - now, 300_000);
    now += hour;
    await queue.retryNow('EXPIRE1');
    [entry] = await queue.list();
    assert.equal(entry!.attempts, 2);
    assert.equal(entry!.nextAttempt!.getTime() - now, 600_000);
    assert.equal(sink.messages.length, 0);

    // Past delayWarning: one delayed DSN (queued; sent on the next run of the queue).
    now += 4 * hour;
    await queue.retryNow();
    await queue.retryNow();
    const delayed = await waitFor('the delay DSN', () => sink.messages[0]);
    let report = await parseDsn(delayed.raw);
    assert.equal(report.perRecipient[0]!.getFirst('action'), 'delayed');
    assert.equal(report.perRecipient[0]!.getFirst('status'), '4.2.2');
    assert.ok(report.perRecipient[0]!.getFirst('will-retry-until'));
    assert.equal(report.returned.type, 'text/rfc822-headers', 'a delay report returns the headers only');

    // Past maxLifetime: the next attempt that is deferred again fails the recipient.
    for (let i = 0; i < 10; i++) {
      now += hour;
      await queue.retryNow('EXPIRE1');
    }
    assert.equal((await queue.list()).find((e) => e.queueId === 'EXPIRE1')?.recipients[1]?.status, 'deferred');
    now += 5 * 24 * hour;
    await queue.retryNow('EXPIRE1');
    await queue.retryNow(); // sends the DSN queued just now
    const failed = await waitFor('the expiry DSN', () => sink.messages[1]);
    report = await parseDsn(failed.raw);
    assert.equal(report.perRecipient.length, 1);
    assert.equal(report.perRecipient[0]!.getFirst('final-recipient'), 'rfc822; later@example.test');
    assert.equal(report.perRecipient[0]!.getFirst('action'), 'failed');
    assert.equal(report.perRecipient[0]!.getFirst('diagnostic-code'), 'smtp; 452 4.2.2 Mailbox full');
    assert.match(report.human, /delivery time expired/);
    assert.equal(sink.messages.length, 2, 'one delay warning, one failure');
    assert.deepEqual(await queue.list(), []);
    // Attempts were made only when asked (the loop never ran): 1 + 2 + 10 + 1.
    assert.equal(store.calls.length, 14);
  } finally {
    await queue.close();
    await sink.close();
    await fs.rm(base, { recursive: true, force: true });
  }
});

test('never bounce a bounce: no DSN for the null sender, and a DSN that cannot be delivered is dropped', async () => {
  const base = await tempDir();
  const sink = await smtpSink();
  const mail = path.join(base, 'mail');
  await fs.mkdir(mail);
  const store = switchedStore(mail);
  store.refuse.set('ghost@example.test', r550);
  const queue = createQueue({ dir: path.join(base, 'queue'), transport: store.transport, bounce: smtpTransport(sink.port), ...FAST });
  const gw = await startGateway({ delivery: store.transport, queue });
  try {
    await collect(QueueChannels.dropped, async (dropped) => {
      const c = await ehlo(gw.port);
      const r = await send(c, '', ['bob@example.test', 'ghost@example.test'], message('a bounce'));
      assert.equal(r.data?.code, 250);
      c.end();
      assert.deepEqual(await queue.list(), [], 'nothing queued: no DSN for <>');
      assert.equal(dropped.length, 1);
      assert.equal(dropped[0]!['reason'], 'null-sender');
      await queue.retryNow();
      assert.equal(sink.messages.length, 0);

      // A DSN whose recipient (the original sender) is refused permanently is dropped, not bounced.
      sink.refuse.add('gone@sender.test');
      await queue.defer(
        { queueId: 'BOUNCE1', sender: { address: 'gone@sender.test', args: {} }, recipients: [{ address: 'bob@example.test', args: {} }, { address: 'ghost@example.test', args: {} }] },
        source(message('x')),
        [
          { recipient: 'bob@example.test', status: 'delivered', reply: r250 },
          { recipient: 'ghost@example.test', status: 'failed', reply: r550 },
        ],
      );
      const [dsnEntry] = await queue.list();
      assert.equal(dsnEntry?.kind, 'dsn');
      assert.equal(dsnEntry?.of, 'BOUNCE1');
      assert.equal(dsnEntry?.sender.address, '');
      await queue.retryNow();
      assert.deepEqual(await queue.list(), []);
      assert.equal(dropped.length, 2);
      assert.equal(dropped[1]!['reason'], 'dsn-undeliverable');
      assert.equal(sink.messages.length, 0);
    });
  } finally {
    await gw.close();
    await queue.close();
    await sink.close();
    await fs.rm(base, { recursive: true, force: true });
  }
});

test('list, retryNow and remove', async () => {
  const base = await tempDir();
  const mail = path.join(base, 'mail');
  await fs.mkdir(mail);
  const store = switchedStore(mail);
  store.refuse.set('a@example.test', r452);
  store.refuse.set('b@example.test', r452);
  // Long backoff: nothing happens unless retryNow() asks.
  const queue = createQueue({ dir: path.join(base, 'queue'), transport: store.transport, hostname: 'mx.test', scanInterval: 20 });
  await queue.start();
  try {
    const env = (id: string, to: string): DeliveryEnvelope => ({
      queueId: id,
      sender: { address: 's@sender.test', args: {} },
      recipients: [{ address: 'ok@example.test', args: {} }, { address: to, args: {} }],
    });
    const res = (to: string): RecipientResult[] => [
      { recipient: 'ok@example.test', status: 'delivered', reply: r250 },
      { recipient: to, status: 'deferred', reply: r452 },
    ];
    await queue.defer(env('LISTA', 'a@example.test'), source(message('a')), res('a@example.test'));
    await queue.defer(env('LISTB', 'b@example.test'), source(message('b')), res('b@example.test'));
    const list = await queue.list();
    assert.deepEqual(list.map((e) => [e.queueId, e.kind, e.sender.address, e.attempts]), [
      ['LISTA', 'message', 's@sender.test', 1],
      ['LISTB', 'message', 's@sender.test', 1],
    ]);
    assert.equal(list[0]!.lastReply?.code, 452);
    assert.equal(list[0]!.recipients[1]!.lastReply?.enhanced, '4.2.2');
    assert.equal(list[0]!.recipients[0]!.nextAttempt, undefined, 'a delivered recipient has no next attempt');

    // retryNow(id): only that entry, now, whatever its backoff.
    const before = store.calls.length;
    assert.equal(await queue.retryNow('LISTA'), 1);
    assert.equal(store.calls.length, before + 1);
    assert.equal(store.calls.at(-1)!.queueId, 'LISTA');
    assert.equal((await queue.list())[0]!.attempts, 2);
    assert.equal(await queue.retryNow('NOSUCH'), 0);

    // remove(): gone from the API and from disk, no DSN.
    assert.equal(await queue.remove('LISTB'), true);
    assert.equal(await queue.remove('LISTB'), false);
    assert.deepEqual((await queue.list()).map((e) => e.queueId), ['LISTA']);
    assert.deepEqual(await filesIn(path.join(queue.dir, 'active')), ['LISTA', 'LISTA.json']);

    // retryNow() with everything accepted: delivered and gone.
    store.refuse.clear();
    assert.equal(await queue.retryNow(), 1);
    assert.deepEqual(await queue.list(), []);
    assert.equal((await stored(mail, 'a@example.test')).length, 1);
    assert.equal((await stored(mail, 'b@example.test')).length, 0);
  } finally {
    await queue.close();
    await fs.rm(base, { recursive: true, force: true });
  }
});

test('a defer() that cannot write rejects, and the gateway then answers 4xx, not 250', async () => {
  const base = await tempDir();
  const mail = path.join(base, 'mail');
  await fs.mkdir(mail);
  const store = switchedStore(mail);
  store.refuse.set('later@example.test', smtpReply(451, '4.3.0', 'Try again'));
  const queue = createQueue({ dir: path.join(base, 'queue'), transport: store.transport, ...FAST });
  await queue.start();
  const gw = await startGateway({ delivery: store.transport, queue });
  try {
    // The queue directory disappears (an unmounted disk): defer() must not recreate it.
    await fs.rm(queue.dir, { recursive: true, force: true });
    const c = await ehlo(gw.port);
    const r = await send(c, 'alice@sender.test', ['bob@example.test', 'later@example.test'], message('no disk'));
    assert.equal(r.data?.text, '451 4.3.0 Error: internal error, try again later', 'not on disk: the client retries');
    c.end();
    assert.deepEqual(await queue.list(), []);

    // Direct: the promise rejects and nothing is left behind, even with a message stream that lies about its size.
    await fs.mkdir(path.join(queue.dir, 'tmp'), { recursive: true });
    await fs.mkdir(path.join(queue.dir, 'active'), { recursive: true });
    const lying: MessageSource = { size: 999, stream: () => Readable.from([Buffer.from('short\r\n')]) };
    await assert.rejects(
      queue.defer({ queueId: 'LIE1', sender: { address: 'a@sender.test', args: {} }, recipients: [{ address: 'x@example.test', args: {} }] }, lying, [
        { recipient: 'x@example.test', status: 'deferred', reply: r452 },
      ]),
    );
    assert.deepEqual(await filesIn(path.join(queue.dir, 'active')), []);
    assert.deepEqual(await filesIn(path.join(queue.dir, 'tmp')), []);
  } finally {
    await gw.close();
    await queue.close();
    await fs.rm(base, { recursive: true, force: true });
  }
});

test('one delivery attempt per entry at a time, whatever asks for it', async () => {
  const base = await tempDir();
  const mail = path.join(base, 'mail');
  await fs.mkdir(mail);
  const store = switchedStore(mail);
  store.refuse.set('later@example.test', r452);
  store.delay = 60;
  const queue = createQueue({ dir: path.join(base, 'queue'), transport: store.transport, ...FAST, backoff: { min: 1, max: 1 }, scanInterval: 1 });
  try {
    await queue.defer(
      { queueId: 'ONE1', sender: { address: 'a@sender.test', args: {} }, recipients: [{ address: 'later@example.test', args: {} }, { address: 'bob@example.test', args: {} }] },
      source(message('once')),
      [
        { recipient: 'later@example.test', status: 'deferred', reply: r452 },
        { recipient: 'bob@example.test', status: 'delivered', reply: r250 },
      ],
    );
    await queue.start();
    await Promise.all([queue.retryNow('ONE1'), queue.retryNow(), queue.retryNow('ONE1'), queue.retryNow()]);
    await waitFor('more attempts by the loop', () => store.calls.length >= 6);
    assert.equal(store.maxPerId, 1);
    // close() waits for the attempt in flight.
    const calls = store.calls.length;
    await queue.close();
    const [entry] = await createQueue({ dir: path.join(base, 'queue'), transport: store.transport }).list();
    assert.equal(entry!.attempts, calls + 1, 'every attempt was recorded before close() resolved');
  } finally {
    await queue.close();
    await fs.rm(base, { recursive: true, force: true });
  }
});

test('start() recovers from a crash: half-written and unacknowledged files go, committed entries stay', async () => {
  const base = await tempDir();
  const mail = path.join(base, 'mail');
  await fs.mkdir(mail);
  const store = switchedStore(mail);
  store.refuse.set('later@example.test', r452);
  const dir = path.join(base, 'queue');
  const first = createQueue({ dir, transport: store.transport, ...FAST });
  await first.defer(
    { queueId: 'KEEP1', sender: { address: 'a@sender.test', args: {} }, recipients: [{ address: 'later@example.test', args: {} }, { address: 'bob@example.test', args: {} }] },
    source(message('kept', 'Kept body.\r\n')),
    [
      { recipient: 'later@example.test', status: 'deferred', reply: r452 },
      { recipient: 'bob@example.test', status: 'delivered', reply: r250 },
    ],
  );
  // What a crash leaves: a half-written message in tmp/, a message whose envelope was never
  // committed, an envelope being replaced; and a damaged entry.
  await fs.writeFile(path.join(dir, 'tmp', 'HALF1'), 'From: x\r\n');
  await fs.writeFile(path.join(dir, 'tmp', 'KEEP1.json.1.1'), '{"version":1,');
  await fs.writeFile(path.join(dir, 'active', 'NOACK1'), 'From: x\r\n\r\nnever acknowledged\r\n');
  await fs.writeFile(path.join(dir, 'active', 'BROKEN1'), 'From: x\r\n\r\n');
  await fs.writeFile(path.join(dir, 'active', 'BROKEN1.json'), '{"version":');
  // (first is abandoned without close(), as a killed process would leave it.)
  store.refuse.clear();
  const second = createQueue({ dir, transport: store.transport, hostname: 'mx.test', ...FAST });
  try {
    await collect(QueueChannels.loaded, async (loaded) => {
      await second.start();
      assert.deepEqual(loaded, [{ entries: 1, tmpRemoved: 2, orphansRemoved: 1, corrupt: 1 }]);
    });
    assert.deepEqual(await filesIn(path.join(dir, 'tmp')), []);
    assert.deepEqual(await filesIn(path.join(dir, 'corrupt')), ['BROKEN1', 'BROKEN1.json']);
    await waitFor('delivery after recovery', async () => (await stored(mail, 'later@example.test')).length === 1);
    assert.equal((await stored(mail, 'bob@example.test')).length, 0, 'bob was delivered before: not again');
    await waitFor('an empty queue', async () => (await second.list()).length === 0);
    assert.deepEqual(await filesIn(path.join(dir, 'active')), []);
  } finally {
    await second.close();
    await first.close();
    await fs.rm(base, { recursive: true, force: true });
  }
});

test('createQueue checks its options', () => {
  const transport: Transport = { name: 't', deliver: async () => [] };
  assert.throws(() => createQueue({ dir: '', transport }), { code: 'DOVETAIL_ERR_INVALID_OPTIONS' });
  assert.throws(() => createQueue({ dir: '/tmp/x', transport: {} as Transport }), { code: 'DOVETAIL_ERR_INVALID_OPTIONS' });
  assert.throws(() => createQueue({ dir: '/tmp/x', transport, backoff: { min: 10, max: 5 } }), { code: 'DOVETAIL_ERR_INVALID_OPTIONS' });
  assert.throws(() => createQueue({ dir: '/tmp/x', transport, concurrency: 0 }), { code: 'DOVETAIL_ERR_INVALID_OPTIONS' });
});

export type { DeliveryQueue };

test('delayWarning: once the delay notice is sent, a deferred entry waits for its next attempt (regression: the loop spun at 0 ms for every entry older than delayWarning)', async () => {
  const base = await tempDir();
  const mail = path.join(base, 'mail');
  await fs.mkdir(mail);
  const store = switchedStore(mail);
  store.refuse.set('later@example.test', r452);
  const sink = await smtpSink();
  let now = Date.UTC(2026, 0, 1);
  let clockCalls = 0;
  const queue = createQueue({
    dir: path.join(base, 'queue'),
    transport: store.transport,
    bounce: smtpTransport(sink.port),
    hostname: 'mx.test',
    clock: () => (clockCalls++, now),
    backoff: { min: 3_600_000, max: 3_600_000 },
    delayWarning: 1000,
    scanInterval: 60_000,
  });
  try {
    await queue.defer(
      { queueId: 'SPIN1', sender: { address: 'alice@sender.test', args: {} }, recipients: [{ address: 'later@example.test', args: {} }] },
      source(message('slow')),
      [{ recipient: 'later@example.test', status: 'deferred', reply: r452 }],
    );
    now += 5000; // past delayWarning; the next attempt is an hour away
    await queue.start();
    await waitFor('the delay notice', () => sink.messages.length === 1);
    // The notice is out: nothing is due for an hour. Count how often the loop looks at the clock now.
    await new Promise((r) => setTimeout(r, 300));
    const before = clockCalls;
    await new Promise((r) => setTimeout(r, 300));
    assert.ok(clockCalls - before < 20, `the retry loop looked at the clock ${clockCalls - before} times in 300 ms with nothing due`);
    assert.equal(store.calls.length, 0, 'no attempt before its time');
  } finally {
    await queue.close();
    await sink.close();
  }
});
