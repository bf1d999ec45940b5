/**
 * Logs and metrics (lib/observe) over real sockets: a gateway whose local domain goes to
 * the embedded LMTP store over lmtp() and everything else through the durable queue to a
 * next hop (smtp-server on loopback) that defers every message, with in-process milters
 * that refuse a recipient, reject a message at end of data, and fail at MAIL. enableLogging
 * writes into a file the test reads back: the connection, transaction and delivery-attempt
 * lines and their fields. enableMetrics is scraped over HTTP from serveMetrics: the
 * counters moved by the right amounts, the queue gauges, the 404 path. close() stops both:
 * no line and no count after. The DNS histogram is fed by the bundled milters' caching
 * resolver asking a DNS server on loopback.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs/promises';
import diagnostics_channel from 'node:diagnostics_channel';
import http from 'node:http';
import os from 'node:os';
import path from 'node:path';
import { Writable } from 'node:stream';
import { Registry } from 'prom-client';
import {
  Channels,
  createGateway,
  createLmtpServer,
  createQueue,
  defineMilter,
  enableLogging,
  enableMetrics,
  lmtp,
  maildir,
  quarantine,
  reject,
  routes,
  serveMetrics,
  smtp,
  type Gateway,
} from '../../lib/index.js';
import { cachingResolver, defaultResolver } from '../../milters/dns.js';
import { startPeer } from '../helpers/smtp-peer.js';
import { startDnsServer } from '../helpers/dns-server.js';
import { ehlo, message, RawClient, send, startGateway } from '../helpers/smtp.js';
import { selfSignedCert } from '../helpers/tls.js';
import { waitFor } from '../helpers/wait.js';

type Line = Record<string, unknown> & { event?: string; msg?: string; level?: number };

async function readLines(file: string): Promise<Line[]> {
  const text = await fs.readFile(file, 'utf8').catch(() => '');
  return text
    .split('\n')
    .filter((l) => l.trim() !== '')
    .map((l) => JSON.parse(l) as Line);
}

function get(port: number, urlPath: string, method = 'GET'): Promise<{ status: number; type: string | undefined; body: string }> {
  return new Promise((resolve, reject) => {
    const req = http.request({ host: '127.0.0.1', port, path: urlPath, method }, (res) => {
      let body = '';
      res.setEncoding('utf8');
      res.on('data', (d: string) => (body += d));
      res.on('end', () => resolve({ status: res.statusCode ?? 0, type: res.headers['content-type'], body }));
    });
    req.on('error', reject);
    req.setTimeout(10_000, () => req.destroy(new Error('scrape timed out')));
    req.end();
  });
}

/** The value of one sample in Prometheus text (labels in any order), or undefined. */
function sample(text: string, name: string, labels: Record<string, string> = {}): number | undefined {
  for (const line of text.split('\n')) {
    if (line.startsWith('#')) continue;
    const m = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$/.exec(line);
    if (!m || m[1] !== name) continue;
    const got = new Map<string, string>();
    for (const part of (m[2] ?? '').matchAll(/([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"/g)) got.set(part[1]!, part[2]!);
    if (Object.entries(labels).every(([k, v]) => got.get(k) === v)) return Number(m[3]);
  }
  return undefined;
}

test('logs and metrics of a gateway with a mailstore, a deferring next hop and refusing milters; close() stops both', async (t) => {
  const base = await fs.mkdtemp(path.join(os.tmpdir(), 'dovetail-observe-'));
  t.after(() => fs.rm(base, { recursive: true, force: true }));
  const logFile = path.join(base, 'log', 'dovetail.log');

  // The embedded mailstore for example.test, reached over LMTP.
  await fs.mkdir(path.join(base, 'mail'));
  const store = await createLmtpServer({ root: path.join(base, 'mail'), listen: { host: '127.0.0.1', port: 0 } });
  t.after(() => store.close());
  const storePort = (store.address as { port: number }).port;
  // The next hop for every other domain: defers every message after DATA.
  const peer = await startPeer({ data: () => [451, 'Try again later'] });
  t.after(() => peer.close());

  const delivery = routes({
    'example.test': lmtp({ host: '127.0.0.1', port: storePort }),
    '*': smtp({ relayhost: `[127.0.0.1]:${peer.port}`, hostname: 'mx.test', tls: 'none', deadDestinationTime: 0 }),
  });
  const queueDir = path.join(base, 'queue');
  const queue = createQueue({ dir: queueDir, transport: delivery, hostname: 'mx.test', backoff: { min: 3_600_000, max: 3_600_000 } });

  const milters = [
    defineMilter({
      name: 'doorman',
      async rcpt(_ctx, rcpt) {
        if (rcpt.address.startsWith('nobody@')) return reject(550, '5.1.1', 'No such user here');
      },
      async eom(ctx) {
        if (ctx.headers.some((h) => h.name.toLowerCase() === 'subject' && h.value.includes('reject-me'))) return reject(550, '5.7.1', 'Message refused by policy');
      },
    }),
    defineMilter({
      name: 'flaky',
      async mail(_ctx, sender) {
        if (sender.address.startsWith('boom@')) throw new Error('flaky milter broke');
      },
    }),
  ];

  const logging = enableLogging({ destination: logFile });
  const metrics = enableMetrics({ queues: [queue] });
  const scrape = await serveMetrics({ registry: metrics.registry, port: 0 });
  let loggingClosed = false;
  let metricsClosed = false;
  t.after(async () => {
    if (!loggingClosed) logging.close();
    if (!metricsClosed) metrics.close();
    await scrape.close();
  });

  const cert = selfSignedCert('mx.test');
  const gateway: Gateway = createGateway({
    hostname: 'mx.test',
    resolveClientNames: false,
    listen: { host: '127.0.0.1', port: 0, name: 'mx-in' },
    tls: { key: cert.key, cert: cert.cert },
    milters,
    delivery,
    quarantine: maildir({ root: path.join(base, 'quarantine') }),
    queue,
  });
  const [addr] = await gateway.listen();
  t.after(() => gateway.close());
  const port = addr!.port;

  // Session 1, over STARTTLS: one message for a local and a remote recipient (and a refused
  // recipient), one rejected by a milter at end of data, one whose MAIL a failing milter tempfails.
  const c = await ehlo(port, 'client.test');
  await c.starttls('client.test');
  const first = await send(c, 'alice@sender.test', ['bob@example.test', 'nobody@example.test', 'carol@remote.test'], message('hello'));
  assert.equal(first.mail.code, 250);
  assert.deepEqual(first.rcpt.map((r) => r.code), [250, 550, 250]);
  assert.equal(first.data?.code, 250, first.data?.text);
  const queueId = /queued as ([0-9A-Z]+)/.exec(first.data?.text ?? '')?.[1];
  assert.ok(queueId, first.data?.text);
  const second = await send(c, 'alice@sender.test', ['bob@example.test'], message('please reject-me'));
  assert.equal(second.data?.code, 550);
  const third = await send(c, 'boom@sender.test', ['bob@example.test'], message('x'));
  assert.equal(third.mail.code, 451);
  assert.equal((await c.cmd('QUIT')).code, 221);
  await c.waitClosed();

  // The queue's attempt at the remote recipient is deferred by the next hop.
  await waitFor('the next hop to be tried', () => peer.connections() > 0);
  const lines = await waitFor('the connection line and the queue attempt', async () => {
    const all = await readLines(logFile);
    return all.some((l) => l.event === 'connection') && all.some((l) => l.event === 'delivery' && l.source === 'queue') ? all : undefined;
  });

  // --- the connection line
  const conns = lines.filter((l) => l.event === 'connection');
  assert.equal(conns.length, 1);
  const conn = conns[0]!;
  assert.equal(conn.level, 30);
  assert.equal(conn.client, '127.0.0.1');
  assert.equal(conn.clientName, '[127.0.0.1]');
  assert.equal(conn.listener, 'mx-in');
  assert.equal(conn.helo, 'client.test');
  assert.match(String(conn.tls), /^TLSv1\.[23] \S+ \d+$/);
  assert.equal(conn.user, undefined);
  assert.equal(conn.transactions, 3);
  assert.equal(conn.accepted, 1);
  assert.equal(conn.end, 'quit');
  assert.equal(typeof conn.duration, 'number');
  assert.equal(typeof conn.sessionId, 'string');
  assert.match(String(conn.msg), /^disconnect from unknown\[127\.0\.0\.1\]/);

  // --- the transaction lines
  const txs = lines.filter((l) => l.event === 'transaction');
  assert.equal(txs.length, 3, JSON.stringify(txs));
  const [queued, rejected, tempfailed] = txs as [Line, Line, Line];
  assert.equal(queued.queueId, queueId);
  assert.equal(queued.sessionId, conn.sessionId);
  assert.equal(queued.outcome, 'queued');
  assert.equal(queued.from, 'alice@sender.test');
  assert.deepEqual(queued.to, ['bob@example.test', 'carol@remote.test']);
  assert.deepEqual(queued.refused, [{ to: 'nobody@example.test', reply: '550 5.1.1 No such user here' }]);
  assert.equal(queued.helo, 'client.test');
  assert.equal(queued.client, '127.0.0.1');
  assert.equal(typeof queued.size, 'number');
  assert.ok((queued.size as number) > message('hello').length, 'the size counts the Received header too');
  assert.match(String(queued.reply), new RegExp(`^250 2\\.6\\.0 Ok: queued as ${queueId}`));
  assert.equal(queued.queued, true);
  const results = queued.results as { to: string; status: string; reply?: string }[];
  assert.equal(results.length, 2);
  assert.equal(results[0]!.to, 'bob@example.test');
  assert.equal(results[0]!.status, 'delivered');
  assert.match(results[0]!.reply ?? '', /^250 /);
  assert.deepEqual(results[1], { to: 'carol@remote.test', status: 'queued' });
  // The rcpt refusal is a milter decision too.
  assert.deepEqual(queued.milters, [{ milter: 'doorman', stage: 'rcpt', verdict: 'reject', reply: '550 5.1.1 No such user here' }]);
  assert.match(String(queued.delays), /^\d+(\.\d+)?\/\d+(\.\d+)?\/\d+(\.\d+)?$/);
  const [a, b, cc] = String(queued.delays).split('/').map(Number) as [number, number, number];
  assert.ok(Math.abs(a + b + cc - (queued.delay as number)) <= 0.003, `delays ${String(queued.delays)} add up to delay ${String(queued.delay)}`);
  assert.match(String(queued.msg), new RegExp(`^${queueId}: queued from=<alice@sender.test>`));

  assert.equal(rejected.outcome, 'rejected');
  assert.equal(rejected.reply, '550 5.7.1 Message refused by policy');
  assert.deepEqual(rejected.milters, [{ milter: 'doorman', stage: 'eom', verdict: 'reject', reply: '550 5.7.1 Message refused by policy' }]);
  assert.equal(rejected.results, undefined);
  assert.equal(rejected.queued, false);

  assert.equal(tempfailed.outcome, 'tempfailed');
  assert.match(String(tempfailed.reply), /^451 4\.7\.1 /);
  assert.deepEqual(tempfailed.milters, [{ milter: 'flaky', stage: 'mail', verdict: 'tempfail', error: 'DOVETAIL_ERR_MILTER_FAILED' }]);
  assert.deepEqual(tempfailed.to, []);

  // --- the milter error line
  const merr = lines.filter((l) => l.event === 'milter-error');
  assert.equal(merr.length, 1);
  assert.equal(merr[0]!.level, 40);
  assert.equal(merr[0]!.milter, 'flaky');
  assert.equal(merr[0]!.stage, 'mail');
  assert.equal(merr[0]!.action, 'tempfail');
  assert.equal(merr[0]!.code, 'DOVETAIL_ERR_MILTER_FAILED');

  // --- the delivery-attempt lines: the gateway's own into the mailstore, the queue's to the next hop
  const local = lines.filter((l) => l.event === 'delivery' && l.source === 'gateway');
  assert.equal(local.length, 1, JSON.stringify(local));
  assert.equal(local[0]!.queueId, queueId);
  assert.deepEqual(local[0]!.to, ['bob@example.test']);
  assert.equal(local[0]!.transport, 'lmtp');
  assert.equal(local[0]!.relay, `127.0.0.1:${storePort}`);
  assert.equal(local[0]!.status, 'sent');
  assert.match(String(local[0]!.reply), /^250 2\.\d\.\d /);
  assert.equal(local[0]!.dsn, String(local[0]!.reply).split(' ')[1]);
  assert.equal(local[0]!.attempt, 1);
  assert.equal(typeof local[0]!.delay, 'number');
  assert.equal(typeof local[0]!.duration, 'number');

  const remote = lines.filter((l) => l.event === 'delivery' && l.source === 'queue');
  assert.equal(remote.length, 1, JSON.stringify(remote));
  assert.equal(remote[0]!.queueId, queueId);
  assert.deepEqual(remote[0]!.to, ['carol@remote.test']);
  assert.equal(remote[0]!.transport, 'smtp');
  assert.equal(remote[0]!.relay, `127.0.0.1[127.0.0.1]:${peer.port}`);
  assert.equal(remote[0]!.status, 'deferred');
  assert.match(String(remote[0]!.reply), /^451 4\.\d\.\d /);
  assert.match(String(remote[0]!.dsn), /^4\.\d\.\d$/);
  assert.equal(typeof remote[0]!.nextAttempt, 'string');
  assert.match(String(remote[0]!.msg), new RegExp(`^${queueId}: to=<carol@remote\\.test>, relay=127\\.0\\.0\\.1\\[127\\.0\\.0\\.1\\]:${peer.port}, status=deferred \\(451 `));

  // --- metrics, scraped over HTTP
  const page = await get(scrape.port, '/metrics');
  assert.equal(page.status, 200);
  assert.equal(page.type, metrics.registry.contentType);
  const m = page.body;
  assert.equal(sample(m, 'dovetail_connections_total', { listener: 'mx-in' }), 1);
  assert.equal(sample(m, 'dovetail_connections_active', { listener: 'mx-in' }), 0);
  assert.equal(sample(m, 'dovetail_connections_closed_total', { listener: 'mx-in', end: 'quit' }), 1);
  assert.equal(sample(m, 'dovetail_transactions_total', { listener: 'mx-in', outcome: 'queued', reply_class: '2xx' }), 1);
  assert.equal(sample(m, 'dovetail_transactions_total', { listener: 'mx-in', outcome: 'rejected', reply_class: '5xx' }), 1);
  assert.equal(sample(m, 'dovetail_transactions_total', { listener: 'mx-in', outcome: 'tempfailed', reply_class: '4xx' }), 1);
  assert.equal(sample(m, 'dovetail_recipients_total', { listener: 'mx-in', result: 'accepted' }), 3);
  assert.equal(sample(m, 'dovetail_recipients_total', { listener: 'mx-in', result: 'refused' }), 1);
  assert.equal(sample(m, 'dovetail_milter_verdicts_total', { milter: 'doorman', stage: 'rcpt', verdict: 'reject' }), 1);
  assert.equal(sample(m, 'dovetail_milter_verdicts_total', { milter: 'doorman', stage: 'eom', verdict: 'reject' }), 1);
  assert.equal(sample(m, 'dovetail_milter_errors_total', { milter: 'flaky', stage: 'mail', code: 'DOVETAIL_ERR_MILTER_FAILED' }), 1);
  // doorman's rcpt ran 3 + 1 times (the third MAIL failed), its eom twice; flaky's mail three times.
  assert.equal(sample(m, 'dovetail_milter_duration_seconds_count', { milter: 'doorman', stage: 'rcpt' }), 4);
  assert.equal(sample(m, 'dovetail_milter_duration_seconds_count', { milter: 'doorman', stage: 'eom' }), 2);
  assert.equal(sample(m, 'dovetail_milter_duration_seconds_count', { milter: 'flaky', stage: 'mail' }), 3);
  assert.equal(sample(m, 'dovetail_deliveries_total', { transport: 'lmtp', status: 'delivered', source: 'gateway' }), 1);
  assert.equal(sample(m, 'dovetail_deliveries_total', { transport: 'smtp', status: 'deferred', source: 'queue' }), 1);
  assert.equal(sample(m, 'dovetail_delivery_duration_seconds_count', { transport: 'routes', source: 'gateway' }), 1);
  assert.equal(sample(m, 'dovetail_delivery_duration_seconds_count', { transport: 'routes', source: 'queue' }), 1);
  assert.equal(sample(m, 'dovetail_message_size_bytes_count', { listener: 'mx-in' }), 1);
  assert.equal(sample(m, 'dovetail_message_size_bytes_sum', { listener: 'mx-in' }), queued.size);
  assert.equal(sample(m, 'dovetail_queue_entries', { queue: queueDir, kind: 'message' }), 1);
  assert.equal(sample(m, 'dovetail_queue_entries', { queue: queueDir, kind: 'dsn' }), 0);
  assert.equal(sample(m, 'dovetail_queue_recipients_deferred', { queue: queueDir }), 1);
  const age = sample(m, 'dovetail_queue_oldest_age_seconds', { queue: queueDir });
  assert.ok(age !== undefined && age >= 0, `queue age ${String(age)}`);

  // Only /metrics, only GET/HEAD.
  assert.equal((await get(scrape.port, '/')).status, 404);
  assert.equal((await get(scrape.port, '/metrics/x')).status, 404);
  assert.equal((await get(scrape.port, '/metrics', 'POST')).status, 405);

  // --- close(): no more lines, no more counts
  logging.close();
  loggingClosed = true;
  metrics.close();
  metricsClosed = true;
  const before = (await fs.readFile(logFile, 'utf8')).length;
  const d = await ehlo(port, 'again.test');
  const fourth = await send(d, 'alice@sender.test', ['bob@example.test'], message('after close'));
  assert.equal(fourth.data?.code, 250);
  assert.equal((await d.cmd('QUIT')).code, 221);
  await d.waitClosed();
  await waitFor('the store to have both messages', () => store.stats().stored >= 2);
  // The close event comes after the session's milters closed: give it the same turn it had above.
  await new Promise((r) => setImmediate(r));
  const after = await get(scrape.port, '/metrics');
  assert.equal((await fs.readFile(logFile, 'utf8')).length, before, 'nothing logged after close()');
  assert.equal(sample(after.body, 'dovetail_connections_total', { listener: 'mx-in' }), 1);
  assert.equal(sample(after.body, 'dovetail_transactions_total', { listener: 'mx-in', outcome: 'queued', reply_class: '2xx' }), 1);
  assert.equal(sample(after.body, 'dovetail_transactions_total', { listener: 'mx-in', outcome: 'delivered', reply_class: '2xx' }), undefined);
  assert.equal(sample(after.body, 'dovetail_queue_entries', { queue: queueDir, kind: 'message' }), undefined, 'the queue gauges went with close()');
});

test('DNS latency: the bundled milters\' caching resolver asking a DNS server on loopback', async (t) => {
  const dns = await startDnsServer();
  t.after(() => dns.close());
  dns.txt('example.test', 'v=spf1 -all');
  const metrics = enableMetrics();
  t.after(() => metrics.close());
  const resolver = cachingResolver(defaultResolver({ servers: [...dns.servers], timeout: 2000, tries: 1 }), { ttl: 60_000, max: 100 });
  assert.deepEqual(await resolver.resolve('example.test', 'TXT'), [['v=spf1 -all']]);
  assert.deepEqual(await resolver.resolve('example.test', 'TXT'), [['v=spf1 -all']]); // a cache hit: not a query
  await assert.rejects(resolver.resolve('missing.example.test', 'TXT'));
  const text = await metrics.registry.metrics();
  assert.equal(sample(text, 'dovetail_dns_query_duration_seconds_count', { rrtype: 'TXT', outcome: 'ok' }), 1);
  assert.equal(sample(text, 'dovetail_dns_query_duration_seconds_count', { rrtype: 'TXT', outcome: 'notfound' }), 1);
  assert.equal(dns.count('example.test', 'TXT'), 1);
});

test('transaction and connection lines for the other endings: NOQUEUE refusal, abandoned, quarantined, disconnect, timeout, shutdown', async (t) => {
  const base = await fs.mkdtemp(path.join(os.tmpdir(), 'dovetail-observe-'));
  t.after(() => fs.rm(base, { recursive: true, force: true }));
  await fs.mkdir(path.join(base, 'mail'));
  await fs.mkdir(path.join(base, 'quarantine'));
  // Lines into a stream this time (any pino destination), parsed as they come.
  const lines: Line[] = [];
  const stream = new Writable({
    write(chunk: Buffer, _enc, cb) {
      for (const l of chunk.toString('utf8').split('\n')) if (l.trim()) lines.push(JSON.parse(l) as Line);
      cb();
    },
  });
  const logging = enableLogging({ stream, level: 'info' });
  t.after(() => logging.close());
  const metrics = enableMetrics();
  t.after(() => metrics.close());

  const gateway = createGateway({
    hostname: 'mx.test',
    resolveClientNames: false,
    listen: [
      { host: '127.0.0.1', port: 0, name: 'mx' },
      { host: '127.0.0.1', port: 0, name: 'other' },
    ],
    // Long enough that a loaded machine does not time out the commands in between.
    socketTimeout: 2000,
    milters: [
      defineMilter({
        name: 'jail',
        async helo(_ctx, name) {
          if (name === 'bad.test') return reject(550, '5.7.1', 'Bad HELO');
        },
        async eom(ctx) {
          if (ctx.headers.some((h) => h.name.toLowerCase() === 'subject' && h.value.includes('hold-me'))) return quarantine('held for review');
        },
      }),
    ],
    delivery: maildir({ root: path.join(base, 'mail') }),
    quarantine: maildir({ root: path.join(base, 'quarantine') }),
  });
  const [mx, other] = await gateway.listen();
  let gatewayClosed = false;
  t.after(() => (gatewayClosed ? undefined : gateway.close()));

  // A refused HELO is said at MAIL FROM, before a queue id (NOQUEUE); then the client goes
  // away without QUIT.
  const s = await ehlo(other!.port, 'bad.test');
  assert.equal((await s.cmd('MAIL FROM:<alice@example.test>')).code, 550);
  s.socket.destroy();
  const m = await ehlo(mx!.port, 'relay.test');
  assert.equal((await m.cmd('MAIL FROM:<alice@sender.test>')).code, 250);
  assert.equal((await m.cmd('RCPT TO:<bob@example.test>')).code, 250);
  assert.equal((await m.cmd('RSET')).code, 250);
  // A quarantined message, then silence until the idle timeout closes the session.
  const held = await send(m, 'alice@sender.test', ['bob@example.test'], message('please hold-me'));
  assert.equal(held.data?.code, 250);
  await m.waitClosed();
  // An idle session the gateway's close() ends.
  const idle = await ehlo(mx!.port, 'idle.test');
  const ends = await waitFor('the first two connection lines', () => {
    const c = lines.filter((l) => l.event === 'connection');
    return c.length >= 2 ? c : undefined;
  });
  await gateway.close();
  gatewayClosed = true;
  await idle.waitClosed();
  const all = await waitFor('the shutdown connection line', () => (lines.filter((l) => l.event === 'connection').length >= 3 ? lines : undefined));

  const txs = all.filter((l) => l.event === 'transaction');
  assert.equal(txs.length, 3, JSON.stringify(txs));
  const [noqueue, abandoned, quarantined] = txs as [Line, Line, Line];
  assert.equal(noqueue.queueId, undefined);
  assert.equal(noqueue.listener, 'other');
  assert.equal(noqueue.helo, 'bad.test');
  assert.equal(noqueue.outcome, 'rejected');
  assert.equal(noqueue.reply, '550 5.7.1 Bad HELO');
  assert.deepEqual(noqueue.milters, undefined, 'a session-stage verdict belongs to no transaction');
  assert.match(String(noqueue.msg), /^NOQUEUE: rejected from=<alice@example\.test>/);
  assert.equal(abandoned.outcome, 'abandoned');
  assert.equal(typeof abandoned.queueId, 'string');
  assert.deepEqual(abandoned.to, ['bob@example.test']);
  assert.equal(abandoned.reply, undefined);
  assert.equal(quarantined.outcome, 'quarantined');
  assert.deepEqual(quarantined.milters, [{ milter: 'jail', stage: 'eom', verdict: 'quarantine', reason: 'held for review' }]);
  const qd = all.filter((l) => l.event === 'delivery');
  assert.equal(qd.length, 1);
  assert.equal(qd[0]!.kind, 'quarantine');
  assert.equal(qd[0]!.queueId, quarantined.queueId);
  assert.equal(qd[0]!.transport, 'maildir');
  assert.equal(qd[0]!.relay, 'maildir');
  assert.equal(qd[0]!.status, 'sent');

  const byListener = new Map(ends.map((l) => [l.listener, l]));
  assert.equal(byListener.get('other')?.end, 'disconnect');
  assert.equal(byListener.get('other')?.transactions, 0);
  assert.equal(byListener.get('mx')?.end, 'timeout');
  assert.equal(byListener.get('mx')?.transactions, 2);
  assert.equal(byListener.get('mx')?.accepted, 1);
  const last = all.filter((l) => l.event === 'connection')[2]!;
  assert.equal(last.end, 'shutdown');
  assert.equal(last.helo, 'idle.test');

  const text = await metrics.registry.metrics();
  assert.equal(sample(text, 'dovetail_connections_closed_total', { listener: 'mx', end: 'timeout' }), 1);
  assert.equal(sample(text, 'dovetail_connections_closed_total', { listener: 'mx', end: 'shutdown' }), 1);
  assert.equal(sample(text, 'dovetail_connections_closed_total', { listener: 'other', end: 'disconnect' }), 1);
  assert.equal(sample(text, 'dovetail_transactions_total', { listener: 'mx', outcome: 'abandoned', reply_class: 'none' }), 1);
  assert.equal(sample(text, 'dovetail_transactions_total', { listener: 'mx', outcome: 'quarantined', reply_class: '2xx' }), 1);
  assert.equal(sample(text, 'dovetail_transactions_total', { listener: 'other', outcome: 'rejected', reply_class: '5xx' }), 1);
  assert.equal(sample(text, 'dovetail_milter_verdicts_total', { milter: 'jail', stage: 'helo', verdict: 'reject' }), 1);
  assert.equal(sample(text, 'dovetail_milter_verdicts_total', { milter: 'jail', stage: 'eom', verdict: 'quarantine' }), 1);
  assert.equal(sample(text, 'dovetail_deliveries_total', { transport: 'maildir', status: 'delivered', source: 'gateway' }), 1);
});

test('enableMetrics again on the same registry carries the counters on', async () => {
  const registry = new Registry();
  const one = enableMetrics({ registry });
  diagnostics_channel.channel(Channels.connect).publish({ sessionId: 'a', client: { address: '192.0.2.1', port: 1, hostname: '[192.0.2.1]', family: 'ipv4' }, listener: 'x' });
  one.close();
  diagnostics_channel.channel(Channels.connect).publish({ sessionId: 'b', client: { address: '192.0.2.1', port: 1, hostname: '[192.0.2.1]', family: 'ipv4' }, listener: 'x' });
  const two = enableMetrics({ registry });
  diagnostics_channel.channel(Channels.connect).publish({ sessionId: 'c', client: { address: '192.0.2.1', port: 1, hostname: '[192.0.2.1]', family: 'ipv4' }, listener: 'x' });
  two.close();
  assert.equal(sample(await registry.metrics(), 'dovetail_connections_total', { listener: 'x' }), 2);
  // A payload that is not what the channel promises costs a count, never a crash.
  const three = enableMetrics({ registry });
  diagnostics_channel.channel(Channels.transaction).publish({ nonsense: true });
  diagnostics_channel.channel(Channels.delivery).publish(null);
  three.close();
});

test('nobody listening to the log channels: no transaction record, no milter timing', async (t) => {
  const verdicts: { durationMs: number }[] = [];
  const onVerdict = (m: unknown): void => void verdicts.push(m as { durationMs: number });
  diagnostics_channel.subscribe(Channels.verdict, onVerdict);
  t.after(() => diagnostics_channel.unsubscribe(Channels.verdict, onVerdict));
  assert.equal(diagnostics_channel.channel(Channels.transaction).hasSubscribers, false);
  assert.equal(diagnostics_channel.channel(Channels.milterCall).hasSubscribers, false);
  const gw = await startGateway({
    milters: [defineMilter({ name: 'no', async rcpt() { return reject(550, '5.7.1', 'No'); } })],
  });
  t.after(() => gw.close());
  const c = await ehlo(gw.port);
  const r = await send(c, 'a@sender.test', ['b@example.test'], message());
  assert.deepEqual(r.rcpt.map((x) => x.code), [550]);
  await c.cmd('QUIT');
  assert.equal(verdicts.length, 1);
  assert.equal(verdicts[0]!.durationMs, 0, 'the clock is read only for the log channels');
});

test('a greeting refused by the connect stage ends as refused; the hard error limit as too-many-errors', async (t) => {
  const lines: Line[] = [];
  const stream = new Writable({
    write(chunk: Buffer, _enc, cb) {
      for (const l of chunk.toString('utf8').split('\n')) if (l.trim()) lines.push(JSON.parse(l) as Line);
      cb();
    },
  });
  const logging = enableLogging({ stream });
  t.after(() => logging.close());
  let refuse = true;
  const gw = await startGateway({
    errorLimits: { soft: 1, hard: 3, sleep: 0 },
    milters: [defineMilter({ name: 'gate', async connect() { if (refuse) return reject(550, '5.7.1', 'Go away'); } })],
  });
  t.after(() => gw.close());
  const c = await RawClient.connect(gw.port);
  assert.equal((await c.reply()).code, 554);
  await c.waitClosed();
  refuse = false;
  const d = await ehlo(gw.port);
  for (let i = 0; i < 3; i++) await d.cmd('RCPT TO:<x@example.test>');
  await d.waitClosed();
  const ends = await waitFor('two connection lines', () => {
    const got = lines.filter((l) => l.event === 'connection');
    return got.length >= 2 ? got : undefined;
  });
  assert.deepEqual(ends.map((l) => l.end), ['refused', 'too-many-errors']);
});
