/**
 * Outbound delivery against real Postfix 3.7 peers started by the test (never skipped: a
 * missing postfix or dovecot binary fails it). Our gateway routes example.test to a local
 * Maildir and everything else to smtp(), through the durable queue; the peers deliver what
 * they accept over LMTP into in-process sinks (test/helpers/postfix-mta.ts).
 *
 * a. Real Postfix as the remote MX, found by MX lookup at a loopback DNS server: one message
 *    for a local and a remote recipient. Proves that the local copy is stored before the
 *    250, the remote copy reaches Postfix (our Received header under Postfix's, the same
 *    body, the envelope holding only the remote recipient), the remote recipient never
 *    gets a local folder, and the queue entry is delivered in one attempt and removed.
 * b. Real Postfix as a smarthost (`[127.0.0.1]:port`) that offers AUTH only after STARTTLS
 *    (SASL by a real Dovecot auth service), with tls `verify` against its self-signed
 *    certificate and its name: the message arrives relayed `with ESMTPSA` over TLS, and the
 *    same certificate checked against another name fails at STARTTLS. With a wrong password the recipient is deferred (a 4xx of ours keeping Postfix's `535 5.7.8`
 *    words in the queue entry's lastReply), retried, and, once the message has outlived
 *    maxLifetime (the queue's injected clock is moved past it), failed: the local sender
 *    gets a DSN whose Diagnostic-Code carries the 535 reply, and nothing reached the sink.
 * c. Faults, counted, against a real Postfix remote MX: null MX (RFC 7505) bounces with no
 *    connection and no address lookup; a 5xx recipient (access map) bounces while its
 *    co-recipients are delivered; a greylisted recipient (a Postfix policy service answering
 *    450 the first time) is delivered on the retry; Postfix stopped → 250 and queued, retried
 *    while it is down, delivered once it is started again (same config, same port); a
 *    gateway child process (test/fixtures/outbound-gateway.ts) SIGKILLed with mail queued
 *    delivers it after its restart. A ledger at the end: every recipient of every message
 *    is delivered exactly once (Postfix's sink, or the local Maildir) or bounced exactly
 *    once (a DSN in the local sender's mailbox), none lost, none stored locally for a remote
 *    recipient, every queue empty.
 *
 * Waits are bounded polls; nothing sleeps to make an assertion true.
 */
import { after, test, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import diagnostics_channel from 'node:diagnostics_channel';
import { spawnSync } from 'node:child_process';
import fs from 'node:fs/promises';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { Readable } from 'node:stream';
import { fileURLToPath } from 'node:url';
import { createGateway, maildir, routes, smtp, type SmtpTransport, type Transport } from '../../lib/index.js';
import { createQueue, QueueChannels, type DeliveryQueue, type QueueOptions } from '../../lib/delivery/queue.js';
import { relayControl } from '../../milters/index.js';
import { startDnsServer } from '../helpers/dns-server.js';
import type { SinkMessage } from '../helpers/lmtp-sink.js';
import { startRemoteMx, startSmarthost, type RemoteMx } from '../helpers/postfix-mta.js';
import { requireBinary } from '../helpers/postfix.js';
import { ehlo, send, split, stored } from '../helpers/smtp.js';
import { waitFor } from '../helpers/wait.js';
import { startChild, type Child } from '../helpers/child.js';

const FIXTURE = fileURLToPath(new URL('../fixtures/outbound-gateway.js', import.meta.url));
const HOSTNAME = 'mx.example.test';

// ---- what the queues report ---------------------------------------------------------------

interface AttemptEvent {
  readonly queueId: string;
  readonly kind: 'message' | 'dsn';
  readonly attempt: number;
  readonly results: readonly {
    readonly address: string;
    readonly status: 'delivered' | 'deferred' | 'failed';
    readonly reply?: { readonly code: number; readonly enhanced: string; readonly lines: readonly string[] };
    readonly expired: boolean;
  }[];
}

/** Every attempt of the in-process queues (queue ids are unique across tests). */
const attempts: AttemptEvent[] = [];
const onAttempt = (m: unknown): void => void attempts.push(m as AttemptEvent);
diagnostics_channel.subscribe(QueueChannels.attempt, onAttempt);
after(() => diagnostics_channel.unsubscribe(QueueChannels.attempt, onAttempt));

const attemptsOf = (queueId: string, from: readonly AttemptEvent[] = attempts): AttemptEvent[] => from.filter((a) => a.queueId === queueId && a.kind === 'message');
const replyText = (r: { code: number; enhanced: string; lines: readonly string[] } | undefined): string => (r ? `${r.code} ${r.enhanced} ${r.lines.join(' ')}` : '(none)');

// ---- small helpers ----------------------------------------------------------------------

/** Runs clean-ups in reverse order of registration; one failing does not stop the others. */
class Cleanup {
  private readonly steps: (() => Promise<unknown> | unknown)[] = [];
  add(step: () => Promise<unknown> | unknown): void {
    this.steps.push(step);
  }
  async run(): Promise<void> {
    let first: unknown;
    for (const step of this.steps.reverse()) {
      try {
        await step();
      } catch (err) {
        first ??= err;
      }
    }
    if (first !== undefined) throw first;
  }
}

/** Header block with folded lines joined (CRLF + WSP → one space). */
const unfold = (text: string): string => text.replace(/\r\n[ \t]+/g, ' ');
const receivedHeaders = (data: Buffer): string[] => unfold(split(data).headers).split('\r\n').filter((l) => /^received:/i.test(l));
const idOf = (tag: string): string => `<${tag}@client.example.test>`;
const carries = (data: Buffer, tag: string): boolean => data.toString('utf8').includes(idOf(tag));
const isDsn = (data: Buffer): boolean => /^Auto-Submitted: auto-replied\r?$/im.test(split(data).headers) && /report-type=delivery-status/.test(unfold(split(data).headers));

/** The DSNs in a mailbox that report on the message tagged `tag`. */
async function dsnsFor(root: string, mailbox: string, tag: string): Promise<string[]> {
  return (await stored(root, mailbox)).filter((m) => isDsn(m) && carries(m, tag)).map((m) => unfold(m.toString('utf8')));
}

/** One message from a trusted client; every RCPT and the DATA must get 250. Returns the queue id. */
async function sendTagged(port: number, from: string, to: readonly string[], tag: string): Promise<string> {
  const c = await ehlo(port, 'client.example.test');
  try {
    const content =
      `From: <${from}>\r\nTo: ${to.map((a) => `<${a}>`).join(', ')}\r\nSubject: ${tag}\r\n` +
      `Message-ID: ${idOf(tag)}\r\nDate: ${new Date().toUTCString()}\r\n\r\nThis is ${tag}.\r\n`;
    const r = await send(c, from, to, content);
    assert.equal(r.mail.code, 250, r.mail.text);
    r.rcpt.forEach((x, i) => assert.equal(x.code, 250, `RCPT ${to[i]}: ${x.text}`));
    assert.equal(r.data?.code, 250, r.data?.text);
    const queueId = /queued as (\w+)/.exec(r.data!.text)?.[1];
    assert.ok(queueId, r.data!.text);
    await c.cmd('QUIT').catch(() => undefined);
    return queueId;
  } finally {
    c.end();
  }
}

interface Outbound {
  readonly port: number;
  /** The local Maildir root (example.test). */
  readonly root: string;
  readonly quarantine: string;
  readonly queue: DeliveryQueue;
  close(): Promise<void>;
}

/**
 * Our gateway as mx.example.test: example.test into a Maildir (that domain only), `*`
 * through `outbound`, the queue (short backoff unless overridden) taking the same routes for
 * retries and DSNs, relayControl trusting loopback.
 *
 * The short backoff matters more than it should: queue.defer() misses the "never tried"
 * recipients handoff() leaves as holes in its results array (Array#some skips holes), so a
 * freshly queued outbound recipient is first tried after backoff.min, not at once.
 */
async function startOutbound(outbound: Transport, queueOptions: Partial<QueueOptions> = {}): Promise<Outbound> {
  const base = await fs.mkdtemp(path.join(os.tmpdir(), 'dovetail-outbound-'));
  const root = path.join(base, 'mail');
  const quarantine = path.join(base, 'quarantine');
  await fs.mkdir(root);
  await fs.mkdir(quarantine);
  const delivery = routes({ 'example.test': maildir({ root, domains: ['example.test'] }), '*': outbound });
  const queue = createQueue({
    dir: path.join(base, 'queue'),
    transport: delivery,
    hostname: HOSTNAME,
    backoff: { min: 200, max: 1000 },
    scanInterval: 100,
    ...queueOptions,
  });
  const gateway = createGateway({
    hostname: HOSTNAME,
    resolveClientNames: false,
    listen: { host: '127.0.0.1', port: 0 },
    milters: [relayControl({ localDomains: delivery.localDomains, mynetworks: ['127.0.0.0/8'] })],
    delivery,
    quarantine: maildir({ root: quarantine }),
    queue,
  });
  let port: number;
  try {
    port = (await gateway.listen())[0]!.port;
  } catch (err) {
    await delivery.close();
    await fs.rm(base, { recursive: true, force: true });
    throw err;
  }
  return {
    port,
    root,
    quarantine,
    queue,
    async close() {
      try {
        await gateway.close();
      } finally {
        await fs.rm(base, { recursive: true, force: true });
      }
    },
  };
}

// ---- Postfix stopped and started again on the same configuration ------------------------

function postfixCtl(mx: RemoteMx, action: 'start' | 'stop'): void {
  const bin = requireBinary('postfix', 'Debian package "postfix" (3.7)');
  const r = spawnSync(bin, ['-c', mx.postfix.configDir, action], { encoding: 'utf8', timeout: 30_000 });
  if (r.status !== 0) throw new Error(`postfix -c ${mx.postfix.configDir} ${action}: exit ${r.status}: ${r.stdout}${r.stderr}`);
}

/** What 127.0.0.1:port does now: refuses, greets with 220, or something else. */
function probe(port: number): Promise<'refused' | 'greeting' | 'other'> {
  return new Promise((resolve) => {
    const s = net.connect(port, '127.0.0.1');
    let buf = '';
    const done = (v: 'refused' | 'greeting' | 'other'): void => {
      s.destroy();
      resolve(v);
    };
    s.setTimeout(3000, () => done('other'));
    s.on('error', (err: NodeJS.ErrnoException) => done(err.code === 'ECONNREFUSED' ? 'refused' : 'other'));
    s.on('data', (d) => {
      buf += d.toString('latin1');
      if (buf.includes('\r\n')) {
        s.write('QUIT\r\n');
        done(buf.startsWith('220 ') ? 'greeting' : 'other');
      }
    });
  });
}

function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
}

/** `postfix stop`, then waits (bounded) for its master to be gone and the port to refuse. */
async function stopPostfix(mx: RemoteMx): Promise<void> {
  const pid = Number((await fs.readFile(path.join(mx.postfix.queueDir, 'pid', 'master.pid'), 'utf8')).trim());
  postfixCtl(mx, 'stop');
  await waitFor('the Postfix master to exit', () => !alive(pid), 15_000);
  await waitFor(`port ${mx.port} to refuse connections`, async () => (await probe(mx.port)) === 'refused', 15_000);
}

/** `postfix start` on the same config dir (same port, same sink), then waits for its greeting. */
async function startPostfixAgain(mx: RemoteMx): Promise<void> {
  postfixCtl(mx, 'start');
  await waitFor(`Postfix to greet on ${mx.port} again`, async () => (await probe(mx.port)) === 'greeting', 20_000, () => mx.postfix.log());
}

// ---- a Postfix policy service that greylists ----------------------------------------------

interface Greylist {
  readonly port: number;
  /** Every decision, in order: the recipient asked about and the action answered. */
  readonly decisions: { recipient: string; action: string }[];
  close(): Promise<void>;
}

/**
 * A Postfix SMTP access policy delegation server (policy protocol: `name=value` lines, an
 * empty line; answer `action=…` and an empty line) that answers `450 4.7.1` the first time
 * it is asked about `address`, and DUNNO otherwise: what a greylisting service does.
 */
async function startGreylist(address: string): Promise<Greylist> {
  const decisions: { recipient: string; action: string }[] = [];
  const seen = new Set<string>();
  const sockets = new Set<net.Socket>();
  const server = net.createServer((s) => {
    sockets.add(s);
    s.on('close', () => sockets.delete(s));
    s.on('error', () => undefined);
    s.setEncoding('utf8');
    let buf = '';
    s.on('data', (d: string) => {
      buf += d;
      let end: number;
      while ((end = buf.indexOf('\n\n')) >= 0) {
        const request = buf.slice(0, end);
        buf = buf.slice(end + 2);
        const attrs = new Map(request.split('\n').map((l) => [l.slice(0, l.indexOf('=')), l.slice(l.indexOf('=') + 1)] as const));
        const recipient = (attrs.get('recipient') ?? '').toLowerCase();
        let action = 'DUNNO';
        if (recipient === address && !seen.has(recipient)) {
          seen.add(recipient);
          action = '450 4.7.1 greylisted, try again later';
        }
        decisions.push({ recipient, action });
        s.write(`action=${action}\n\n`);
      }
    });
  });
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(0, '127.0.0.1', () => resolve());
  });
  return {
    port: (server.address() as net.AddressInfo).port,
    decisions,
    close: () =>
      new Promise<void>((resolve) => {
        server.close(() => resolve());
        for (const s of sockets) s.destroy();
      }),
  };
}

// ---- the gateway child process ------------------------------------------------------------

/** Starts test/fixtures/outbound-gateway.ts. */
const startGatewayChild = (base: string, dnsPort: number, smtpPort: number): Promise<Child> => startChild(FIXTURE, [base, String(dnsPort), String(smtpPort)]);

const childAttempts = (c: Child): AttemptEvent[] =>
  c.events.filter((e) => e['event'] === QueueChannels.attempt).map((e) => e as unknown as AttemptEvent);

// ---- a. real Postfix as the remote MX ------------------------------------------------------

test('a. real Postfix as the remote MX: the local copy is stored before the 250, the remote one relayed by MX lookup, never stored locally', { timeout: 90_000 }, async () => {
  const cleanup = new Cleanup();
  try {
    const dns = await startDnsServer();
    cleanup.add(() => dns.close());
    dns.add('remote.test', { type: 'MX', value: { exchange: 'mx.remote.test', priority: 10 } });
    dns.a('mx.remote.test', '127.0.0.1');
    const mx = await startRemoteMx({ domains: ['remote.test'] });
    cleanup.add(() => mx.stop());
    const gw = await startOutbound(smtp({ resolver: dns.resolver(), port: mx.port, hostname: HOSTNAME, ipv6: false }));
    cleanup.add(() => gw.close());

    const tag = 'outbound-a-1';
    const queueId = await sendTagged(gw.port, 'carol@example.test', ['alice@example.test', 'bob@remote.test'], tag);
    // Local recipients are delivered before the client is answered.
    const alice = await stored(gw.root, 'alice@example.test');
    assert.equal(alice.length, 1, 'alice is stored when the 250 comes');
    assert.ok(carries(alice[0]!, tag));
    assert.equal(split(alice[0]!).body.toString(), `This is ${tag}.\r\n`);

    const got: SinkMessage = await mx.sink.waitFor((m) => carries(m.data, tag), 20_000);
    assert.equal(got.from, 'carol@example.test');
    assert.deepEqual(got.to, ['bob@remote.test'], 'only the remote recipient goes to the remote MX');
    assert.equal(split(got.data).body.toString(), `This is ${tag}.\r\n`);
    const received = receivedHeaders(got.data);
    assert.ok(received.length >= 2, received.join('\n'));
    // Postfix's own Received (newest, on top), naming our EHLO name, then ours.
    assert.match(received[0]!, /^Received: from mx\.example\.test \(localhost \[127\.0\.0\.1\]\) by mx\.remote\.test \(Postfix\) with ESMTP id \w+ for <bob@remote\.test>;/);
    assert.match(received[1]!, new RegExp(`^Received: from client\\.example\\.test \\(.*\\[127\\.0\\.0\\.1\\]\\) by mx\\.example\\.test \\(dovetail\\) with ESMTP id ${queueId}\\b`));

    // The queue entry: one attempt, delivered, then gone.
    await waitFor('the queue to be empty', async () => (await gw.queue.list()).length === 0);
    const tries = attemptsOf(queueId);
    assert.equal(tries.length, 1, JSON.stringify(tries));
    assert.deepEqual(tries[0]!.results.map((r) => [r.address, r.status]), [['bob@remote.test', 'delivered']]);
    assert.match(replyText(tries[0]!.results[0]!.reply), /^250 2\.0\.0 /);

    // Nothing for bob (or any remote.test address) was ever written locally.
    assert.deepEqual(await fs.readdir(gw.root), ['alice@example.test']);
    assert.deepEqual(await fs.readdir(gw.quarantine), []);
    assert.equal(mx.sink.messages.length, 1);
    assert.match(await mx.postfix.log(), /to=<bob@remote\.test>, relay=127\.0\.0\.1\[127\.0\.0\.1\]:\d+.*status=sent/);
  } finally {
    await cleanup.run();
  }
});

// ---- b. real Postfix as a smarthost with AUTH after STARTTLS --------------------------------

test('b. real Postfix smarthost: AUTH after STARTTLS with a verified certificate; a wrong password defers with the 535 kept, then bounces to the local sender', { timeout: 90_000 }, async () => {
  const cleanup = new Cleanup();
  try {
    const user = 'relayuser';
    const password = 'correct-horse-battery';
    const sh = await startSmarthost({ user, password });
    cleanup.add(() => sh.stop());
    const relayhost = `[127.0.0.1]:${sh.port}`;
    // `verify`: the certificate must chain to the given CA (itself: self-signed) and be valid
    // for smarthost.test; the relayhost is an address literal, so the name is given.
    const tls = { level: 'verify' as const, ca: sh.cert, servername: sh.hostname };

    // -- the right password: relayed.
    const good = await startOutbound(smtp({ relayhost, hostname: HOSTNAME, auth: { user, pass: password }, tls, ipv6: false }));
    cleanup.add(() => good.close());
    const tag1 = 'outbound-b-1';
    const id1 = await sendTagged(good.port, 'alice@example.test', ['carol@elsewhere.test'], tag1);
    const got = await sh.sink.waitFor((m) => carries(m.data, tag1), 20_000);
    assert.deepEqual(got.to, ['carol@elsewhere.test']);
    assert.equal(got.from, 'alice@example.test');
    const top = receivedHeaders(got.data)[0] ?? '';
    assert.match(top, /^Received: from mx\.example\.test \(localhost \[127\.0\.0\.1\]\) \(using TLSv1\.[23] with cipher /, top);
    assert.match(top, /by smarthost\.test \(Postfix\) with ESMTPSA id /, 'authenticated (SA) over TLS');
    assert.equal(((await sh.postfix.log()).match(/client=localhost\[127\.0\.0\.1\], sasl_method=PLAIN, sasl_username=relayuser/g) ?? []).length, 1);
    await waitFor('the first queue to be empty', async () => (await good.queue.list()).length === 0);
    assert.deepEqual(attemptsOf(id1).map((a) => a.results.map((r) => r.status)), [['delivered']]);

    // `verify` is not a formality: the same certificate checked against another name fails
    // the TLS handshake, and nothing (credentials included) is sent.
    const misnamed = smtp({ relayhost, hostname: HOSTNAME, auth: { user, pass: password }, tls: { ...tls, servername: 'other.test' }, ipv6: false });
    cleanup.add(() => misnamed.close());
    const body = Buffer.from('Subject: never\r\n\r\nnever\r\n');
    const [refused] = await misnamed.deliver(
      { queueId: 'MISNAMED1', sender: { address: 'alice@example.test', args: {} }, recipients: [{ address: 'erin@elsewhere.test', args: {} }] },
      { size: body.length, stream: () => Readable.from([body]) },
    );
    assert.equal(refused!.status, 'deferred', replyText(refused!.reply));
    assert.match(replyText(refused!.reply), /^4\d\d 4\.\d\.\d .*TLS handshake failed: .*other\.test/);

    // -- a wrong password: deferred with the server's words kept, then expired → DSN.
    let skew = 0;
    const maxLifetime = 60_000;
    const bad = await startOutbound(smtp({ relayhost, hostname: HOSTNAME, auth: { user, pass: 'wrong-password' }, tls, ipv6: false, deadDestinationTime: 0 }), {
      maxLifetime,
      // The queue's clock, moved forward below to make the message outlive maxLifetime without waiting for it.
      clock: () => Date.now() + skew,
    });
    cleanup.add(() => bad.close());
    const tag2 = 'outbound-b-2';
    const id2 = await sendTagged(bad.port, 'alice@example.test', ['dave@elsewhere.test'], tag2);
    const entry = await waitFor(
      'the first attempt with the wrong password',
      async () => (await bad.queue.list()).find((e) => e.queueId === id2 && e.attempts >= 1 && !e.inFlight),
      20_000,
      async () => `queue: ${JSON.stringify(await bad.queue.list())}\nsmarthost log:\n${await sh.postfix.log()}`,
    );
    const rcpt = entry.recipients[0]!;
    assert.equal(rcpt.status, 'deferred', replyText(rcpt.lastReply));
    assert.equal(rcpt.expired, false);
    assert.ok(rcpt.lastReply && rcpt.lastReply.code >= 400 && rcpt.lastReply.code < 500, `a temporary failure: ${replyText(rcpt.lastReply)}`);
    assert.match(replyText(entry.lastReply), /535 5\.7\.8 Error: authentication failed/, 'the entry keeps the server reply');
    assert.match(replyText(rcpt.lastReply), /535 5\.7\.8 Error: authentication failed/);
    assert.deepEqual(await dsnsFor(bad.root, 'alice@example.test', tag2), [], 'no DSN while it is only deferred');

    // The queue keeps retrying (short backoff); stop its loop and let the attempt in flight
    // end, so that the one attempt after the lifetime is the forced one below.
    bad.queue.stop();
    await waitFor('no attempt in flight', async () => (await bad.queue.list()).every((e) => !e.inFlight));
    const before = attemptsOf(id2);
    assert.ok(before.length >= 1);
    for (const a of before) assert.deepEqual([a.results[0]!.status, a.results[0]!.expired], ['deferred', false], replyText(a.results[0]!.reply));
    skew = maxLifetime + 1000;
    assert.equal(await bad.queue.retryNow(id2), 1);
    // The DSN itself is queued: the loop, started again, delivers it (locally).
    await bad.queue.start();
    const [dsn] = await waitFor('the failure DSN in the local sender mailbox', async () => {
      const d = await dsnsFor(bad.root, 'alice@example.test', tag2);
      return d.length > 0 ? d : undefined;
    });
    assert.match(dsn!, /^Subject: Undelivered Mail Returned to Sender\r$/m);
    assert.match(dsn!, /^Final-Recipient: rfc822; dave@elsewhere\.test\r$/m);
    assert.match(dsn!, /^Action: failed\r$/m);
    assert.match(dsn!, /^Diagnostic-Code: smtp; 4\d\d 4\.7\.8 .*535 5\.7\.8 Error: authentication failed/m);
    assert.match(dsn!, /delivery time expired/);
    const tries = attemptsOf(id2);
    assert.equal(tries.length, before.length + 1, 'one more attempt: the forced one');
    assert.deepEqual([tries.at(-1)!.results[0]!.status, tries.at(-1)!.results[0]!.expired], ['failed', true]);
    await waitFor('the second queue to be empty', async () => (await bad.queue.list()).length === 0);
    // Every attempt really reached the smarthost and was refused there, once each.
    const failures = async (): Promise<number> => ((await sh.postfix.log()).match(/SASL PLAIN authentication failed/g) ?? []).length;
    await waitFor(`${tries.length} SASL failures in the smarthost log`, async () => (await failures()) >= tries.length, 10_000, () => sh.postfix.log());
    assert.equal(await failures(), tries.length);
    assert.equal(sh.sink.messages.filter((m) => carries(m.data, tag2)).length, 0, 'nothing relayed without authentication');
    assert.equal(sh.sink.messages.length, 1);
  } finally {
    await cleanup.run();
  }
});

// ---- c. faults, counted ------------------------------------------------------------------

type Expect = 'remote' | 'local' | 'bounce';
interface Sent {
  readonly tag: string;
  readonly from: string;
  readonly rcpt: string;
  readonly expect: Expect;
  /** The Maildir root of the gateway that took the message. */
  readonly root: string;
}

test('c. faults against a real Postfix MX, counted: null MX, 5xx, greylisting, Postfix down, gateway SIGKILL; nothing lost', { timeout: 110_000 }, async (t: TestContext) => {
  const cleanup = new Cleanup();
  const ledger: Sent[] = [];
  const children: Child[] = [];
  try {
    const dns = await startDnsServer();
    cleanup.add(() => dns.close());
    dns.add('remote.test', { type: 'MX', value: { exchange: 'mx.remote.test', priority: 10 } });
    dns.a('mx.remote.test', '127.0.0.1');
    // RFC 7505: one MX whose exchange is the root.
    dns.add('nullmx.test', { type: 'MX', value: { exchange: '.', priority: 0 } });
    const greylist = await startGreylist('greylist@remote.test');
    cleanup.add(() => greylist.close());
    const mx = await startRemoteMx({
      domains: ['remote.test'],
      recipientAccess: { 'nouser@remote.test': '550 5.1.1 no such user here' },
      // The policy service first; the helper's recipient access map still follows in smtpd_recipient_restrictions.
      main: { smtpd_relay_restrictions: `check_policy_service inet:127.0.0.1:${greylist.port}, permit_mynetworks, reject_unauth_destination` },
    });
    cleanup.add(() => mx.stop());
    const out: SmtpTransport = smtp({ resolver: dns.resolver(), port: mx.port, hostname: HOSTNAME, ipv6: false, deadDestinationTime: 0 });
    const gw = await startOutbound(out);
    cleanup.add(() => gw.close());
    const childBase = await fs.mkdtemp(path.join(os.tmpdir(), 'dovetail-outbound-child-'));
    cleanup.add(() => fs.rm(childBase, { recursive: true, force: true }));
    // (Clean-ups run in reverse: the children are gone before their directory is removed.)
    cleanup.add(async () => {
      for (const ch of children) if (ch.process.exitCode === null && ch.process.signalCode === null) ch.process.kill('SIGKILL');
      await Promise.all(children.map((ch) => ch.exited));
    });
    const childRoot = path.join(childBase, 'mail');
    await fs.mkdir(childRoot);
    await fs.mkdir(path.join(childBase, 'quarantine'));

    const sender = 'alice@example.test';
    const record = (tag: string, root: string, expect: Record<string, Expect>): void => {
      for (const [rcpt, e] of Object.entries(expect)) ledger.push({ tag, from: sender, rcpt, expect: e, root });
    };
    const connects = async (): Promise<number> => ((await mx.postfix.log()).match(/\]: connect from /g) ?? []).length;
    /**
     * The count once Postfix's log has settled: its lines reach the file through postlogd,
     * a moment after the event, so a connection from an earlier step (a readiness probe)
     * can be logged late. Found as a flake: a count taken at once saw one such line land
     * during the null-MX step.
     */
    const settledConnects = async (): Promise<number> => {
      let last = await connects();
      for (let i = 0; i < 20; i++) {
        await new Promise((r) => setTimeout(r, 300));
        const now = await connects();
        if (now === last) return now;
        last = now;
      }
      return last;
    };

    // -- 1. null MX: a DSN, and no connection or address lookup at all.
    const connectsBefore = await settledConnects();
    const nullId = await sendTagged(gw.port, sender, ['someone@nullmx.test'], 'outbound-c-null');
    record('outbound-c-null', gw.root, { 'someone@nullmx.test': 'bounce' });
    const [nullDsn] = await waitFor('the null-MX DSN', async () => {
      const d = await dsnsFor(gw.root, sender, 'outbound-c-null');
      return d.length ? d : undefined;
    });
    assert.match(nullDsn!, /^Final-Recipient: rfc822; someone@nullmx\.test\r$/m);
    assert.match(nullDsn!, /^Status: 5\.1\.10\r$/m);
    assert.match(nullDsn!, /^Diagnostic-Code: smtp; 556 5\.1\.10 .*does not accept mail \(nullMX\)/m);
    assert.deepEqual(attemptsOf(nullId).map((a) => a.results.map((r) => r.status)), [['failed']], 'failed at the first attempt');
    assert.ok(dns.count('nullmx.test', 'MX') >= 1, 'the MX was looked up');
    assert.deepEqual(dns.queries.filter((q) => q.type === 'A' || q.type === 'AAAA'), [], 'no address of any host was looked up');
    assert.equal(out.stats().opened, 0, 'our SMTP client opened no connection');
    assert.equal(await settledConnects(), connectsBefore, 'Postfix saw no connection');

    // -- 2. a 5xx recipient bounces; its co-recipients, remote and local, are delivered.
    const mixedId = await sendTagged(gw.port, sender, ['ok1@remote.test', 'nouser@remote.test', 'carol@example.test'], 'outbound-c-mixed');
    record('outbound-c-mixed', gw.root, { 'ok1@remote.test': 'remote', 'nouser@remote.test': 'bounce', 'carol@example.test': 'local' });
    assert.equal((await stored(gw.root, 'carol@example.test')).length, 1, 'carol is stored before the 250');
    const [mixedDsn] = await waitFor('the DSN for nouser', async () => {
      const d = await dsnsFor(gw.root, sender, 'outbound-c-mixed');
      return d.length ? d : undefined;
    });
    assert.match(mixedDsn!, /^Final-Recipient: rfc822; nouser@remote\.test\r$/m);
    assert.doesNotMatch(mixedDsn!, /Final-Recipient: rfc822; (ok1@remote|carol@example)\.test/, 'only the failed recipient is reported');
    assert.match(mixedDsn!, /^Status: 5\.1\.1\r$/m);
    assert.match(mixedDsn!, /^Diagnostic-Code: smtp; 550 5\.1\.1 .*550 5\.1\.1 .*no such user here/m);
    await mx.sink.waitFor((m) => carries(m.data, 'outbound-c-mixed'));
    assert.deepEqual(attemptsOf(mixedId).map((a) => a.results.map((r) => [r.address, r.status])), [[['ok1@remote.test', 'delivered'], ['nouser@remote.test', 'failed']]]);

    // -- 3. greylisted: 450 on the first attempt, delivered on the retry.
    const greyId = await sendTagged(gw.port, sender, ['greylist@remote.test'], 'outbound-c-grey');
    record('outbound-c-grey', gw.root, { 'greylist@remote.test': 'remote' });
    await mx.sink.waitFor((m) => carries(m.data, 'outbound-c-grey'));
    await waitFor('the greylisted entry to leave the queue', async () => !(await gw.queue.list()).some((e) => e.queueId === greyId));
    const greyTries = attemptsOf(greyId);
    assert.equal(greyTries.length, 2, JSON.stringify(greyTries));
    assert.equal(greyTries[0]!.results[0]!.status, 'deferred');
    assert.match(replyText(greyTries[0]!.results[0]!.reply), /^450 4\.7\.1 .*450 4\.7\.1 <greylist@remote\.test>: Recipient address rejected: greylisted, try again later/);
    assert.equal(greyTries[1]!.results[0]!.status, 'delivered');
    assert.deepEqual(
      greylist.decisions.filter((d) => d.recipient === 'greylist@remote.test').map((d) => d.action),
      ['450 4.7.1 greylisted, try again later', 'DUNNO'],
    );

    // -- 4. the next hop down: Postfix stopped; 250 and queued, retried while it is down.
    await stopPostfix(mx);
    const downId = await sendTagged(gw.port, sender, ['down1@remote.test'], 'outbound-c-down');
    record('outbound-c-down', gw.root, { 'down1@remote.test': 'remote' });
    await waitFor('two refused attempts while Postfix is down', () => attemptsOf(downId).length >= 2);

    // -- 5. a gateway process killed with mail queued (Postfix still down), then restarted.
    const first = await startGatewayChild(childBase, dns.port, mx.port);
    children.push(first);
    const k1 = await sendTagged(first.port, sender, ['crash1@remote.test', 'crash2@remote.test', 'dan@example.test'], 'outbound-c-kill1');
    record('outbound-c-kill1', childRoot, { 'crash1@remote.test': 'remote', 'crash2@remote.test': 'remote', 'dan@example.test': 'local' });
    const k2 = await sendTagged(first.port, sender, ['crash3@remote.test'], 'outbound-c-kill2');
    record('outbound-c-kill2', childRoot, { 'crash3@remote.test': 'remote' });
    assert.equal((await stored(childRoot, 'dan@example.test')).length, 1, 'dan is stored before the 250');
    await waitFor('refused attempts in the child for both messages', () => [k1, k2].every((id) => attemptsOf(id, childAttempts(first)).length >= 1));
    first.process.kill('SIGKILL');
    assert.equal(await first.exited, 'SIGKILL');
    const active = path.join(childBase, 'queue', 'active');
    assert.deepEqual((await fs.readdir(active)).sort(), [k1, `${k1}.json`, k2, `${k2}.json`].sort(), 'both messages are on disk');
    for (const a of [...attemptsOf(downId), ...attemptsOf(k1, childAttempts(first)), ...attemptsOf(k2, childAttempts(first))]) {
      for (const r of a.results) {
        assert.equal(r.status, 'deferred');
        assert.match(replyText(r.reply), /^4\d\d 4\.4\.1 .*ECONNREFUSED/, replyText(r.reply));
      }
    }
    assert.equal(mx.sink.messages.filter((m) => /outbound-c-(down|kill)/.test(m.data.toString())).length, 0, 'nothing got through while Postfix was down');

    await startPostfixAgain(mx);
    const second = await startGatewayChild(childBase, dns.port, mx.port);
    children.push(second);
    // (tmp/ may hold an envelope update the kill interrupted: that one is legitimately removed.)
    const loaded = second.events.find((e) => e['event'] === QueueChannels.loaded);
    assert.deepEqual([loaded?.['entries'], loaded?.['orphansRemoved'], loaded?.['corrupt']], [2, 0, 0], JSON.stringify(loaded));
    for (const tag of ['outbound-c-down', 'outbound-c-kill1', 'outbound-c-kill2']) await mx.sink.waitFor((m) => carries(m.data, tag), 30_000);
    await waitFor('the child queue to be empty', async () => (await fs.readdir(active)).length === 0);
    await waitFor('the in-process queue to be empty', async () => (await gw.queue.list()).length === 0);
    assert.ok(attemptsOf(downId).length >= 3, 'retried until Postfix was back');
    assert.equal(attemptsOf(downId).at(-1)!.results[0]!.status, 'delivered');
    second.process.kill('SIGTERM');
    assert.equal(await second.exited, 0, 'the restarted child closes cleanly');

    // -- the ledger: every recipient delivered or bounced exactly once, nothing else.
    const remoteCopies = (s: Sent): number => mx.sink.messages.filter((m) => m.to.includes(s.rcpt) && carries(m.data, s.tag)).length;
    const localCopies = async (s: Sent): Promise<number> => (await stored(s.root, s.rcpt)).filter((m) => carries(m, s.tag) && !isDsn(m)).length;
    const bounces = async (s: Sent): Promise<number> =>
      (await dsnsFor(s.root, s.from, s.tag)).filter((d) => new RegExp(`^Final-Recipient: rfc822; ${s.rcpt.replace(/\./g, '\\.')}\\r$`, 'm').test(d)).length;
    const counts = { delivered_remote: 0, delivered_local: 0, bounced: 0, lost: 0, duplicated: 0, misplaced: 0 };
    const problems: string[] = [];
    for (const s of ledger) {
      const got = { remote: remoteCopies(s), local: s.rcpt.endsWith('@example.test') ? await localCopies(s) : 0, bounce: await bounces(s) };
      const total = got.remote + got.local + got.bounce;
      if (total === 0) counts.lost++;
      else if (got[s.expect] !== 1 || total !== 1) (total > 1 ? counts.duplicated++ : counts.misplaced++);
      else counts[s.expect === 'remote' ? 'delivered_remote' : s.expect === 'local' ? 'delivered_local' : 'bounced']++;
      if (got[s.expect] !== 1 || total !== 1) problems.push(`${s.tag} → ${s.rcpt}: expected ${s.expect}, got ${JSON.stringify(got)}`);
    }
    const messages = new Set(ledger.map((s) => s.tag)).size;
    t.diagnostic(
      `ledger: ${messages} messages, ${ledger.length} recipients: ${counts.delivered_remote} delivered to Postfix, ` +
        `${counts.delivered_local} stored locally, ${counts.bounced} bounced (DSN), ${counts.lost} lost, ${counts.duplicated} duplicated, ${counts.misplaced} misplaced`,
    );
    assert.deepEqual(problems, []);
    // Nothing beyond the ledger reached Postfix, and no remote recipient has a local folder.
    const sinkRecipients = mx.sink.messages.flatMap((m) => m.to).sort();
    assert.deepEqual(sinkRecipients, ledger.filter((s) => s.expect === 'remote').map((s) => s.rcpt).sort());
    const folders = [...(await fs.readdir(gw.root)), ...(await fs.readdir(childRoot))];
    assert.deepEqual(folders.filter((f) => !f.endsWith('@example.test')), [], `local folders: ${folders.join(', ')}`);
    assert.deepEqual((await fs.readdir(gw.root)).sort(), ['alice@example.test', 'carol@example.test']);
    assert.deepEqual(await fs.readdir(childRoot), ['dan@example.test']);
    const dsnCount = (await stored(gw.root, sender)).filter(isDsn).length + (await stored(childRoot, sender)).filter(isDsn).length;
    assert.equal(dsnCount, counts.bounced, 'one DSN per bounced recipient, none more');
    assert.doesNotMatch(await mx.postfix.log(), /nullmx/i, 'Postfix never heard of nullmx.test');
    assert.equal(counts.lost + counts.duplicated + counts.misplaced, 0);
  } finally {
    await cleanup.run();
  }
});
