/**
 * smtp(), the outbound transport, against next hops on loopback (smtp-server peers, a raw
 * HELO-only server) found through a real DNS server on loopback: MX order and fallback,
 * random order among equal preferences, implicit MX, null MX without any connection, DNS
 * failures, mail loops, TLS policies, AUTH only over TLS, the extensions a message needs
 * (8BITMIME, SMTPUTF8, SIZE), DSN parameters carried on, per-recipient replies, the
 * connection cache, per-destination concurrency, and dead destinations. The same next hop
 * as real Postfix (remote MX, smarthost) is in test/interop/postfix-outbound.test.ts.
 */
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import net from 'node:net';
import { Readable } from 'node:stream';
import { smtp, isDovetailError, type DeliveryEnvelope, type MessageSource, type RecipientResult } from '../../lib/index.js';
import { startDnsServer, type TestDnsServer } from '../helpers/dns-server.js';
import { startPeer, type Peer } from '../helpers/smtp-peer.js';
import { selfSignedCert, type TestCert } from '../helpers/tls.js';

const ME = 'mx.example.test';

function env(recipients: readonly string[], senderArgs: Record<string, string | true> = {}, rcptArgs: Record<string, string | true> = {}): DeliveryEnvelope {
  return { queueId: 'Q1', sender: { address: 'alice@example.test', args: senderArgs }, recipients: recipients.map((address) => ({ address, args: rcptArgs })) };
}

function src(text: string | Buffer): MessageSource {
  const buf = Buffer.isBuffer(text) ? text : Buffer.from(text, 'utf8');
  return { size: buf.length, stream: () => Readable.from([buf]) };
}

const MESSAGE = 'From: alice@example.test\r\nTo: bob@remote.test\r\nSubject: out\r\n\r\n.a line that starts with a dot\r\n..two\r\nend\r\n';

const statuses = (r: readonly RecipientResult[]): string[] => r.map((x) => x.status);

describe('smtp(): next hop by relayhost', () => {
  let peer: Peer;
  before(async () => {
    peer = await startPeer({ rcpt: (a) => (a.startsWith('nouser@') ? [550, '5.1.1 No such user here'] : a.startsWith('later@') ? [450, '4.2.1 Mailbox busy'] : undefined) });
  });
  after(() => peer.close());

  it('delivers byte-identical (dot-stuffing undone by the peer), keeps each recipient its own reply, and reuses one connection', async () => {
    const t = smtp({ relayhost: `[127.0.0.1]:${peer.port}`, hostname: ME, tls: 'none' });
    try {
      const r = await t.deliver(env(['bob@remote.test', 'nouser@remote.test', 'later@remote.test']), src(MESSAGE));
      assert.deepEqual(statuses(r), ['delivered', 'failed', 'deferred']);
      assert.match(r[0]!.reply.lines[0]!, /Ok: queued as P1/);
      assert.equal(r[1]!.reply.code, 550);
      assert.equal(r[1]!.reply.enhanced, '5.1.1');
      assert.match(r[1]!.reply.lines[0]!, /^SMTP \[127\.0\.0\.1\]:\d+ said: 550 5\.1\.1 No such user here/);
      assert.equal(r[2]!.reply.code, 450);
      const [m] = await peer.waitFor(1);
      assert.deepEqual(m!.to, ['bob@remote.test']);
      assert.equal(m!.data.toString(), MESSAGE);
      for (let i = 0; i < 2; i++) assert.deepEqual(statuses(await t.deliver(env(['bob@remote.test']), src(MESSAGE))), ['delivered']);
      assert.equal(peer.connections(), 1, 'three messages over one cached connection');
      assert.equal(t.stats().reused, 2);
    } finally {
      await t.close();
    }
  });

  it('rejects malformed options at once', () => {
    const bad = (o: Parameters<typeof smtp>[0]): void => assert.throws(() => smtp(o), (e) => isDovetailError(e, 'DOVETAIL_ERR_INVALID_OPTIONS'));
    bad({ relayhost: 'not a host' });
    bad({ relayhost: '[127.0.0.1]:99999' });
    bad({ tls: 'none', auth: { user: 'u', pass: 'p' } });
    bad({ tls: 'sometimes' as 'may' });
    bad({ destinationConcurrency: 0 });
  });
});

describe('smtp(): next hop by MX (RFC 5321 section 5, RFC 7505)', () => {
  let dns: TestDnsServer;
  let peer: Peer;
  let peer3: Peer;
  const transport = (extra: Parameters<typeof smtp>[0] = {}) => smtp({ resolver: dns.resolver({ timeout: 500, tries: 1 }), port: peer.port, hostname: ME, ipv6: false, tls: 'none', deadDestinationTime: 0, ...extra });
  before(async () => {
    dns = await startDnsServer();
    peer = await startPeer();
    // A second server on another loopback address, same port.
    peer3 = await startPeer({ host: '127.0.0.3', port: peer.port });
    dns.add('multi.test', { type: 'MX', value: { exchange: 'down.multi.test', priority: 10 } }, { type: 'MX', value: { exchange: 'up.multi.test', priority: 20 } });
    dns.a('down.multi.test', '127.0.0.2'); // nothing listens there
    dns.a('up.multi.test', '127.0.0.1');
    dns.add('pref.test', { type: 'MX', value: { exchange: 'second.pref.test', priority: 20 } }, { type: 'MX', value: { exchange: 'first.pref.test', priority: 5 } });
    dns.a('first.pref.test', '127.0.0.3');
    dns.a('second.pref.test', '127.0.0.1');
    dns.add('equal.test', { type: 'MX', value: { exchange: 'x.equal.test', priority: 10 } }, { type: 'MX', value: { exchange: 'y.equal.test', priority: 10 } });
    dns.a('x.equal.test', '127.0.0.1');
    dns.a('y.equal.test', '127.0.0.3');
    dns.a('implicit.test', '127.0.0.1');
    dns.add('nullmx.test', { type: 'MX', value: { exchange: '', priority: 0 } });
    dns.add('servfail.test', { type: 'MX', value: { exchange: 'mx.servfail.test', priority: 10 } });
    dns.behave('servfail.test', { fail: 'servfail' });
    dns.add('loop.test', { type: 'MX', value: { exchange: ME, priority: 10 } }, { type: 'MX', value: { exchange: 'backup.loop.test', priority: 20 } });
    dns.a('backup.loop.test', '127.0.0.1');
    dns.add('backup.test', { type: 'MX', value: { exchange: 'primary.backup.test', priority: 10 } }, { type: 'MX', value: { exchange: ME, priority: 20 } });
    dns.a('primary.backup.test', '127.0.0.1');
  });
  after(async () => {
    await peer.close();
    await peer3.close();
    await dns.close();
  });

  it('tries the MX hosts in preference order, every address, and moves on while none answers', async () => {
    const t = transport();
    try {
      assert.deepEqual(statuses(await t.deliver(env(['bob@multi.test']), src(MESSAGE))), ['delivered']);
      const before3 = peer3.messages.length;
      const before1 = peer.messages.length;
      assert.deepEqual(statuses(await t.deliver(env(['bob@pref.test']), src(MESSAGE))), ['delivered']);
      assert.equal(peer3.messages.length, before3 + 1, 'preference 5 (127.0.0.3) before preference 20');
      assert.equal(peer.messages.length, before1);
    } finally {
      await t.close();
    }
  });

  it('spreads mail over MX hosts of equal preference (random order among equals)', async () => {
    const t = transport();
    const before1 = peer.messages.length;
    const before3 = peer3.messages.length;
    try {
      for (let i = 0; i < 24; i++) assert.deepEqual(statuses(await t.deliver(env(['bob@equal.test']), src(MESSAGE))), ['delivered']);
    } finally {
      await t.close();
    }
    // Each of 24 picks is a coin toss: all on one host has probability 2^-23.
    assert.ok(peer.messages.length > before1, 'x.equal.test never chosen');
    assert.ok(peer3.messages.length > before3, 'y.equal.test never chosen');
  });

  it('uses the A record of a domain without MX (implicit MX)', async () => {
    const t = transport();
    try {
      assert.deepEqual(statuses(await t.deliver(env(['bob@implicit.test']), src(MESSAGE))), ['delivered']);
    } finally {
      await t.close();
    }
  });

  it('null MX fails permanently without looking up or connecting to anything', async () => {
    const t = transport();
    const connections = peer.connections() + peer3.connections();
    try {
      const [r] = await t.deliver(env(['bob@nullmx.test']), src(MESSAGE));
      assert.equal(r!.status, 'failed');
      assert.equal(r!.reply.enhanced, '5.1.10');
      assert.match(r!.reply.lines[0]!, /nullMX/);
    } finally {
      await t.close();
    }
    assert.equal(dns.count('nullmx.test', 'A'), 0);
    assert.equal(peer.connections() + peer3.connections(), connections);
  });

  it('a domain that does not exist fails (5.1.2); a DNS failure defers (4.4.3)', async () => {
    const t = transport();
    try {
      const [nx] = await t.deliver(env(['bob@nosuchdomain.test']), src(MESSAGE));
      assert.equal(nx!.status, 'failed');
      assert.equal(nx!.reply.enhanced, '5.1.2');
      const [sf] = await t.deliver(env(['bob@servfail.test']), src(MESSAGE));
      assert.equal(sf!.status, 'deferred');
      assert.equal(sf!.reply.enhanced, '4.4.3');
    } finally {
      await t.close();
    }
  });

  it('mail for a domain whose best MX is ourselves loops (5.4.6); a backup MX below a better host delivers to it', async () => {
    const t = transport();
    try {
      const [loop] = await t.deliver(env(['bob@loop.test']), src(MESSAGE));
      assert.equal(loop!.status, 'failed');
      assert.equal(loop!.reply.enhanced, '5.4.6');
      assert.match(loop!.reply.lines[0]!, /mail for loop\.test loops back to myself/);
      assert.deepEqual(statuses(await t.deliver(env(['bob@backup.test']), src(MESSAGE))), ['delivered']);
      // By address too: our own listening address counts as us.
      const byAddress = transport({ hostname: 'other.example.test', localAddresses: ['127.0.0.1'] });
      try {
        const [r] = await byAddress.deliver(env(['bob@implicit.test']), src(MESSAGE));
        assert.equal(r!.reply.enhanced, '5.4.6');
      } finally {
        await byAddress.close();
      }
    } finally {
      await t.close();
    }
  });

  it('splits one envelope by destination and keeps envelope order', async () => {
    const t = transport();
    try {
      const r = await t.deliver(env(['a@implicit.test', 'b@nullmx.test', 'c@multi.test', 'd@implicit.test']), src(MESSAGE));
      assert.deepEqual(r.map((x) => [x.recipient, x.status]), [
        ['a@implicit.test', 'delivered'],
        ['b@nullmx.test', 'failed'],
        ['c@multi.test', 'delivered'],
        ['d@implicit.test', 'delivered'],
      ]);
    } finally {
      await t.close();
    }
  });
});

describe('smtp(): TLS policy and AUTH', () => {
  let cert: TestCert;
  let tlsPeer: Peer;
  let plainPeer: Peer;
  let authPeer: Peer;
  before(async () => {
    cert = selfSignedCert('relay.test');
    tlsPeer = await startPeer({ tls: cert });
    plainPeer = await startPeer();
    authPeer = await startPeer({ tls: cert, auth: { user: 'gw', pass: 's3cret' } });
  });
  after(async () => {
    await tlsPeer.close();
    await plainPeer.close();
    await authPeer.close();
  });
  const to = (p: Peer): string => `[127.0.0.1]:${p.port}`;

  it('may: STARTTLS when offered (no certificate check), plain text when not', async () => {
    const a = smtp({ relayhost: to(tlsPeer), hostname: ME });
    const b = smtp({ relayhost: to(plainPeer), hostname: ME });
    try {
      assert.deepEqual(statuses(await a.deliver(env(['x@remote.test']), src(MESSAGE))), ['delivered']);
      assert.equal(tlsPeer.messages.at(-1)!.secure, true);
      assert.deepEqual(statuses(await b.deliver(env(['x@remote.test']), src(MESSAGE))), ['delivered']);
      assert.equal(plainPeer.messages.at(-1)!.secure, false);
    } finally {
      await a.close();
      await b.close();
    }
  });

  it('encrypt: a server without STARTTLS defers the mail; verify: only a certificate valid for the name passes', async () => {
    const n = plainPeer.messages.length;
    const enc = smtp({ relayhost: to(plainPeer), hostname: ME, tls: 'encrypt', deadDestinationTime: 0 });
    const verifyBad = smtp({ relayhost: to(tlsPeer), hostname: ME, tls: 'verify', deadDestinationTime: 0 });
    const verifyWrongName = smtp({ relayhost: to(tlsPeer), hostname: ME, tls: { level: 'verify', ca: cert.cert, servername: 'other.test' }, deadDestinationTime: 0 });
    const verifyOk = smtp({ relayhost: to(tlsPeer), hostname: ME, tls: { level: 'verify', ca: cert.cert, servername: 'relay.test' } });
    try {
      const [e] = await enc.deliver(env(['x@remote.test']), src(MESSAGE));
      assert.equal(e!.status, 'deferred');
      assert.match(e!.reply.lines[0]!, /STARTTLS required but not offered/);
      assert.equal(plainPeer.messages.length, n, 'nothing sent in plain text');
      const [v] = await verifyBad.deliver(env(['x@remote.test']), src(MESSAGE));
      assert.equal(v!.status, 'deferred');
      const [w] = await verifyWrongName.deliver(env(['x@remote.test']), src(MESSAGE));
      assert.equal(w!.status, 'deferred');
      // The reason is named (regression: it read only "protocol error during STARTTLS").
      assert.match(w!.reply.lines[0]!, /TLS handshake failed: .*(certificate|altnames|other\.test)/i);
      const before = tlsPeer.messages.length;
      assert.deepEqual(statuses(await verifyOk.deliver(env(['x@remote.test']), src(MESSAGE))), ['delivered']);
      assert.equal(tlsPeer.messages.length, before + 1);
    } finally {
      await Promise.all([enc.close(), verifyBad.close(), verifyWrongName.close(), verifyOk.close()]);
    }
  });

  it('AUTH after STARTTLS delivers; a wrong password defers with the server reply kept; no TLS means no credentials', async () => {
    const good = smtp({ relayhost: to(authPeer), hostname: ME, auth: { user: 'gw', pass: 's3cret' }, tls: 'encrypt' });
    const wrong = smtp({ relayhost: to(authPeer), hostname: ME, auth: { user: 'gw', pass: 'nope' }, tls: 'encrypt', deadDestinationTime: 0 });
    const noTls = smtp({ relayhost: to(plainPeer), hostname: ME, auth: { user: 'gw', pass: 's3cret' }, tls: 'may', deadDestinationTime: 0 });
    try {
      assert.deepEqual(statuses(await good.deliver(env(['x@remote.test']), src(MESSAGE))), ['delivered']);
      assert.equal(authPeer.messages.at(-1)!.user, 'gw');
      const [w] = await wrong.deliver(env(['x@remote.test']), src(MESSAGE));
      assert.equal(w!.status, 'deferred');
      assert.ok(w!.reply.code >= 400 && w!.reply.code < 500);
      assert.match(w!.reply.lines[0]!, /said: 535 5\.7\.8 Error: authentication failed: bad password/);
      const n = plainPeer.messages.length;
      const [p] = await noTls.deliver(env(['x@remote.test']), src(MESSAGE));
      assert.equal(p!.status, 'deferred');
      assert.match(p!.reply.lines[0]!, /without TLS/);
      assert.equal(plainPeer.messages.length, n);
    } finally {
      await Promise.all([good.close(), wrong.close(), noTls.close()]);
    }
  });
});

describe('smtp(): what the message needs of the next hop', () => {
  it('8BITMIME, SMTPUTF8 and SIZE missing or too small fail the message (RFC 6152, RFC 6531 3.2, RFC 1870); DSN parameters go on only when DSN is offered', async () => {
    const bare = await startPeer({ hide: ['8BITMIME', 'SMTPUTF8', 'DSN'], size: 1000 });
    const full = await startPeer();
    const a = smtp({ relayhost: `[127.0.0.1]:${bare.port}`, hostname: ME, tls: 'none' });
    const b = smtp({ relayhost: `[127.0.0.1]:${full.port}`, hostname: ME, tls: 'none' });
    try {
      const [eight] = await a.deliver(env(['x@remote.test'], { BODY: '8BITMIME' }), src('Subject: é\r\n\r\nbody é\r\n'));
      assert.equal(eight!.status, 'failed');
      assert.equal(eight!.reply.enhanced, '5.6.3');
      const [utf] = await a.deliver(env(['ñ@remote.test'], { SMTPUTF8: true }), src(MESSAGE));
      assert.equal(utf!.status, 'failed');
      assert.equal(utf!.reply.enhanced, '5.6.7');
      const [big] = await a.deliver(env(['x@remote.test']), src('Subject: big\r\n\r\n' + 'x'.repeat(2000) + '\r\n'));
      assert.equal(big!.status, 'failed');
      assert.equal(big!.reply.enhanced, '5.3.4');
      assert.equal(bare.messages.length, 0);
      // ASCII-only envelope with SMTPUTF8 asked: goes without the parameter (as Postfix).
      assert.deepEqual(statuses(await a.deliver(env(['x@remote.test'], { SMTPUTF8: true, RET: 'HDRS' }, { NOTIFY: 'SUCCESS,FAILURE' }), src(MESSAGE))), ['delivered']);
      assert.deepEqual(bare.messages[0]!.fromArgs, { SIZE: String(Buffer.byteLength(MESSAGE)) }, 'SIZE only: no SMTPUTF8, no RET');
      assert.deepEqual(bare.messages[0]!.toArgs[0], {});
      // A next hop with DSN gets the DSN parameters, and 8BITMIME / SMTPUTF8 as declared.
      const r = await b.deliver(env(['ñ@remote.test'], { BODY: '8BITMIME', SMTPUTF8: true, RET: 'HDRS', ENVID: 'QQ314' }, { NOTIFY: 'SUCCESS,DELAY', ORCPT: 'rfc822;bob@remote.test' }), src('Subject: é\r\n\r\nbody é\r\n'));
      assert.deepEqual(statuses(r), ['delivered']);
      const m = full.messages[0]!;
      assert.equal(m.fromArgs['BODY'], '8BITMIME');
      assert.equal(m.fromArgs['SMTPUTF8'], true);
      assert.equal(m.fromArgs['RET'], 'HDRS');
      assert.equal(m.fromArgs['ENVID'], 'QQ314');
      assert.equal(m.toArgs[0]!['NOTIFY'], 'SUCCESS,DELAY');
      assert.equal(m.toArgs[0]!['ORCPT'], 'rfc822;bob@remote.test');
    } finally {
      await Promise.all([a.close(), b.close(), bare.close(), full.close()]);
    }
  });
});

describe('smtp(): connections', () => {
  it('at most destinationConcurrency connections to one destination', async () => {
    const slow = await startPeer({ data: () => undefined });
    const t = smtp({ relayhost: `[127.0.0.1]:${slow.port}`, hostname: ME, tls: 'none', destinationConcurrency: 2 });
    try {
      const all = await Promise.all(Array.from({ length: 12 }, (_, i) => t.deliver(env([`r${i}@remote.test`]), src(MESSAGE))));
      assert.ok(all.every((r) => r[0]!.status === 'delivered'));
      assert.ok(slow.peak() <= 2, `peak ${slow.peak()} connections`);
      assert.equal(slow.messages.length, 12);
    } finally {
      await t.close();
      await slow.close();
    }
  });

  it('a destination none of whose servers answers is skipped without connecting until deadDestinationTime passes', async () => {
    let accepted = 0;
    // Accepts TCP and hangs up at once: no session comes about.
    const dead = net.createServer((s) => {
      accepted++;
      s.destroy();
    });
    await new Promise<void>((r) => dead.listen(0, '127.0.0.1', r));
    const port = (dead.address() as net.AddressInfo).port;
    const t = smtp({ relayhost: `[127.0.0.1]:${port}`, hostname: ME, tls: 'none', deadDestinationTime: 60_000 });
    try {
      const [first] = await t.deliver(env(['x@remote.test']), src(MESSAGE));
      assert.equal(first!.status, 'deferred');
      assert.equal(accepted, 1);
      const [second] = await t.deliver(env(['y@remote.test']), src(MESSAGE));
      assert.equal(second!.status, 'deferred');
      assert.match(second!.reply.lines[0]!, /delivery temporarily suspended/);
      assert.equal(accepted, 1, 'no second connection to a dead destination');
      assert.equal(t.stats().dead, 1);
    } finally {
      await t.close();
      await new Promise((r) => dead.close(r));
    }
  });

  it('falls back to HELO when the server does not know EHLO (RFC 5321 3.2), and sends no extensions', async () => {
    const seen: string[] = [];
    const old = net.createServer((s) => {
      s.setEncoding('latin1');
      s.write('220 old.test SMTP\r\n');
      let buf = '';
      let data = false;
      s.on('data', (d: string) => {
        buf += d;
        let nl: number;
        while ((nl = buf.indexOf('\r\n')) >= 0) {
          const line = buf.slice(0, nl);
          buf = buf.slice(nl + 2);
          if (data) {
            if (line === '.') {
              data = false;
              s.write('250 accepted\r\n');
            }
            continue;
          }
          seen.push(line);
          const cmd = line.slice(0, 4).toUpperCase();
          if (cmd === 'EHLO') s.write('502 command not implemented\r\n');
          else if (cmd === 'DATA') {
            data = true;
            s.write('354 go ahead\r\n');
          } else if (cmd === 'QUIT') s.end('221 bye\r\n');
          else s.write('250 ok\r\n');
        }
      });
      s.on('error', () => undefined);
    });
    await new Promise<void>((r) => old.listen(0, '127.0.0.1', r));
    const port = (old.address() as net.AddressInfo).port;
    const t = smtp({ relayhost: `[127.0.0.1]:${port}`, hostname: ME });
    try {
      assert.deepEqual(statuses(await t.deliver(env(['x@remote.test'], { SMTPUTF8: true, BODY: '7BIT' }), src(MESSAGE))), ['delivered']);
      assert.deepEqual(seen.slice(0, 4), [`EHLO ${ME}`, `HELO ${ME}`, 'MAIL FROM:<alice@example.test>', 'RCPT TO:<x@remote.test>']);
    } finally {
      await t.close();
      await new Promise((r) => old.close(r));
    }
  });
});
