/**
 * dovecotAuth() against a real Dovecot auth service (dovecot-core 2.3, started by the test in
 * a private directory, test/helpers/dovecot-auth.ts), over TCP and a unix socket: right and
 * wrong passwords, unknown users, Dovecot's temporary failure (a checkpassword passdb exiting
 * 111), 50 concurrent authentications on one connection, Dovecot stopped and restarted; then
 * fake auth servers (a net.Server in the test) for what a real Dovecot does not do: garbage,
 * over-long lines, silence, challenges, answers out of order. Ends with the gateway and
 * nodemailer: 235 → 250, wrong password → 535, temporary failure → 454. Fails (does not
 * skip) without Dovecot.
 *
 * Dovecot delays the requests that follow a failure from the same `rip` (its auth penalty,
 * up to 15 s), so each direct call here uses its own client address from 192.0.2.0/24.
 */
import assert from 'node:assert/strict';
import net from 'node:net';
import { after, before, describe, it } from 'node:test';
import nodemailer from 'nodemailer';
import { dovecotAuth, type DovecotAuthOptions } from '../../lib/auth/dovecot.js';
import { isDovetailError, ErrorCodes } from '../../lib/errors.js';
import type { AuthRequest } from '../../lib/smtp/options.js';
import { startDovecotAuth, type DovecotAuth } from '../helpers/dovecot-auth.js';
import { message, startGateway, stored } from '../helpers/smtp.js';
import { selfSignedCert } from '../helpers/tls.js';

const USERS = [
  { user: 'alice', password: 's3cret' },
  { user: 'bob@example.test', password: 'p@ss word with spaces ✓' },
];

let dovecot: DovecotAuth;

before(async () => {
  dovecot = await startDovecotAuth(USERS, { tempfailUsers: ['broken'] });
});

after(async () => {
  await dovecot?.stop();
});

let nextHost = 1;
/** A request from a fresh documentation address (Dovecot's penalty is per address). */
function req(username: string, password: string, over: Partial<AuthRequest> = {}): AuthRequest {
  const n = nextHost++;
  return { method: 'PLAIN', username, password, client: { address: `192.0.2.${n % 250 + 1}`, tls: true }, ...over };
}

/** Awaits a rejection and returns the error (fails if the promise resolves). */
async function rejection(p: Promise<unknown>): Promise<Error> {
  try {
    const v = await p;
    assert.fail(`expected a rejection, got ${JSON.stringify(v)}`);
  } catch (err) {
    if (err instanceof assert.AssertionError) throw err;
    assert.ok(err instanceof Error);
    return err;
  }
}

/** Checks the error is the auth-unavailable DovetailError, matching `re`, and does not leak `password`. */
function assertUnavailable(err: Error, re: RegExp, password?: string): void {
  assert.ok(isDovetailError(err), `a DovetailError: ${String(err)}`);
  assert.equal((err as { code: string }).code, 'DOVETAIL_ERR_AUTH_UNAVAILABLE');
  assert.match(err.message, re);
  if (password) {
    assert.ok(!err.message.includes(password), 'no password in the message');
    assert.ok(!err.message.includes(Buffer.from(password).toString('base64').slice(0, 8)), 'no encoded password either');
  }
}

// ---- a TCP proxy that counts connections, and a scriptable fake auth server ----

interface Proxy {
  readonly port: number;
  connections: number;
  close(): Promise<void>;
}

async function countingProxy(target: number): Promise<Proxy> {
  const sockets = new Set<net.Socket>();
  const proxy: Proxy = { port: 0, connections: 0, close: async () => undefined };
  const server = net.createServer((down) => {
    proxy.connections++;
    const up = net.connect(target, '127.0.0.1');
    for (const s of [down, up]) {
      sockets.add(s);
      s.on('error', () => undefined);
      s.on('close', () => {
        sockets.delete(s);
        down.destroy();
        up.destroy();
      });
    }
    down.pipe(up);
    up.pipe(down);
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  return Object.assign(proxy, {
    port: (server.address() as net.AddressInfo).port,
    close: async () => {
      for (const s of sockets) s.destroy();
      await new Promise<void>((resolve) => server.close(() => resolve()));
    },
  });
}

/** One client connection as the fake server sees it. */
interface FakeConn {
  readonly socket: net.Socket;
  /** Complete lines received so far. */
  readonly lines: string[];
  /** Bytes received so far. */
  bytes: number;
  closed: boolean;
  /** Resolves with the first received line matching `re` (waits for it). */
  line(re: RegExp, ms?: number): Promise<string>;
  send(text: string): void;
}

interface Fake {
  readonly port: number;
  readonly conns: FakeConn[];
  close(): Promise<void>;
}

const HANDSHAKE = 'VERSION\t1\t2\nMECH\tPLAIN\tplaintext\nMECH\tLOGIN\tplaintext\nSPID\t4242\nCUID\t7\nCOOKIE\t0123456789abcdef0123456789abcdef\nDONE\n';

async function fakeServer(onConnection: (c: FakeConn) => void): Promise<Fake> {
  const conns: FakeConn[] = [];
  const server = net.createServer((socket) => {
    let buf = '';
    const waiters: (() => void)[] = [];
    const wake = (): void => {
      for (const w of waiters.splice(0)) w();
    };
    const c: FakeConn = {
      socket,
      lines: [],
      bytes: 0,
      closed: false,
      async line(re, ms = 5000) {
        const deadline = Date.now() + ms;
        for (;;) {
          const hit = c.lines.find((l) => re.test(l));
          if (hit !== undefined) return hit;
          if (c.closed) throw new Error(`closed before a line matching ${re}; got ${JSON.stringify(c.lines)}`);
          if (Date.now() > deadline) throw new Error(`no line matching ${re} within ${ms} ms; got ${JSON.stringify(c.lines)}`);
          await new Promise<void>((resolve) => {
            const t = setTimeout(resolve, 50);
            waiters.push(() => {
              clearTimeout(t);
              resolve();
            });
          });
        }
      },
      send(text) {
        if (!socket.destroyed) socket.write(text);
      },
    };
    conns.push(c);
    socket.on('data', (d: Buffer) => {
      c.bytes += d.length;
      buf += d.toString('utf8');
      let nl: number;
      while ((nl = buf.indexOf('\n')) >= 0) {
        c.lines.push(buf.slice(0, nl));
        buf = buf.slice(nl + 1);
      }
      wake();
    });
    socket.on('error', () => undefined);
    socket.on('close', () => {
      c.closed = true;
      wake();
    });
    onConnection(c);
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  return {
    port: (server.address() as net.AddressInfo).port,
    conns,
    async close() {
      for (const c of conns) c.socket.destroy();
      await new Promise<void>((resolve) => server.close(() => resolve()));
    },
  };
}

/** Waits until `cond` holds (polling), or fails after `ms`. */
async function until(cond: () => boolean, what: string, ms = 5000): Promise<void> {
  const deadline = Date.now() + ms;
  while (!cond()) {
    if (Date.now() > deadline) assert.fail(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

const b64 = (user: string, pass: string): string => Buffer.from(`\0${user}\0${pass}`, 'utf8').toString('base64');

// ---- real Dovecot ----

describe('dovecotAuth() → a real Dovecot auth service', () => {
  it('TCP: the right password → true, a wrong one → false, an unknown user → false', async () => {
    const auth = dovecotAuth({ host: '127.0.0.1', port: dovecot.port });
    try {
      assert.equal(await auth(req('alice', 's3cret')), true);
      assert.equal(await auth(req('alice', 'wrong')), false);
      assert.equal(await auth(req('nobody', 's3cret')), false);
      assert.equal(await auth(req('alice', '')), false);
      // Non-ASCII, spaces and '@' survive the trip (PLAIN carries UTF-8 in base64).
      assert.equal(await auth(req('bob@example.test', 'p@ss word with spaces ✓')), true);
      // LOGIN was decoded by the gateway: it goes to Dovecot as PLAIN all the same.
      assert.equal(await auth(req('alice', 's3cret', { method: 'LOGIN' })), true);
      // Without TLS and from an IPv4-mapped address (no `secured`; rip=192.0.2.x).
      assert.equal(await auth(req('alice', 's3cret', { client: { address: '::ffff:192.0.2.200', tls: false } })), true);
    } finally {
      await auth.close();
    }
  });

  it('unix socket (path): the right password → true, a wrong one → false', async () => {
    const auth = dovecotAuth({ path: dovecot.socketPath });
    try {
      assert.equal(await auth(req('alice', 's3cret')), true);
      assert.equal(await auth(req('alice', 'S3CRET')), false);
    } finally {
      await auth.close();
    }
  });

  it("Dovecot's temporary failure (FAIL … code=temp_fail) rejects, without the password in the error", async () => {
    const auth = dovecotAuth({ host: '127.0.0.1', port: dovecot.port });
    try {
      const err = await rejection(auth(req('broken', 'hunter2-secret')));
      assertUnavailable(err, /temporary failure/, 'hunter2-secret');
      // The connection is still good afterwards.
      assert.equal(await auth(req('alice', 's3cret')), true);
    } finally {
      await auth.close();
    }
  });

  it('50 concurrent authentications share one connection, and each gets its own answer', async () => {
    const proxy = await countingProxy(dovecot.port);
    const auth = dovecotAuth({ host: '127.0.0.1', port: proxy.port });
    try {
      const cases = Array.from({ length: 50 }, (_, i) => {
        const kind = i % 5;
        if (kind === 0) return { r: req('alice', 's3cret'), want: true };
        if (kind === 1) return { r: req('alice', `wrong-${i}`), want: false };
        if (kind === 2) return { r: req('bob@example.test', 'p@ss word with spaces ✓'), want: true };
        if (kind === 3) return { r: req(`nobody${i}`, 'x'), want: false };
        return { r: req('bob@example.test', 's3cret'), want: false };
      });
      const got = await Promise.all(cases.map((c) => auth(c.r)));
      assert.deepEqual(got, cases.map((c) => c.want));
      assert.equal(proxy.connections, 1, 'one connection to Dovecot');
    } finally {
      await auth.close();
      await proxy.close();
    }
  });

  it('maxConnections spreads concurrent requests over several connections, never more than the limit', async () => {
    const proxy = await countingProxy(dovecot.port);
    const auth = dovecotAuth({ host: '127.0.0.1', port: proxy.port, maxConnections: 3 });
    try {
      const got = await Promise.all(Array.from({ length: 30 }, (_, i) => auth(req('alice', i % 2 ? 's3cret' : 'no'))));
      assert.deepEqual(got, Array.from({ length: 30 }, (_, i) => i % 2 === 1));
      assert.ok(proxy.connections >= 2 && proxy.connections <= 3, `connections: ${proxy.connections}`);
    } finally {
      await auth.close();
      await proxy.close();
    }
  });

  it('Dovecot stopped: requests reject at once (no hang); restarted: the next request reconnects and works', async () => {
    const own = await startDovecotAuth(USERS);
    const auth = dovecotAuth({ host: '127.0.0.1', port: own.port, timeout: 5000 });
    try {
      assert.equal(await auth(req('alice', 's3cret')), true);
      await own.halt();
      for (let i = 0; i < 3; i++) {
        const t0 = Date.now();
        const err = await rejection(auth(req('alice', 's3cret')));
        assertUnavailable(err, /Dovecot auth service|connection/, 's3cret');
        assert.ok(Date.now() - t0 < 2000, `rejected after ${Date.now() - t0} ms`);
      }
      await own.restart();
      assert.equal(await auth(req('alice', 's3cret')), true);
      assert.equal(await auth(req('alice', 'wrong')), false);
    } finally {
      await auth.close();
      await own.stop();
    }
  });

  it('a unix socket that is not there rejects at once', async () => {
    const auth = dovecotAuth({ path: `${dovecot.socketPath}-missing` });
    try {
      const err = await rejection(auth(req('alice', 's3cret')));
      assertUnavailable(err, /ENOENT/, 's3cret');
    } finally {
      await auth.close();
    }
  });
});

// ---- fake auth servers ----

describe('dovecotAuth() → fake auth servers', () => {
  it('sends the handshake, then one AUTH line per request with increasing ids, tab-separated as Dovecot expects', async () => {
    const fake = await fakeServer((c) => {
      c.send(HANDSHAKE);
      let answered = 0;
      c.socket.on('data', () => {
        for (; answered < c.lines.length; answered++) {
          const m = /^AUTH\t(\d+)\t/.exec(c.lines[answered]!);
          if (m) c.send(`OK\t${m[1]}\tuser=whoever\n`);
        }
      });
    });
    const auth = dovecotAuth({ host: '127.0.0.1', port: fake.port, service: 'submission' });
    try {
      assert.equal(await auth({ method: 'PLAIN', username: 'u1', password: 'p1', client: { address: '192.0.2.7', tls: true } }), true);
      assert.equal(await auth({ method: 'LOGIN', username: 'u2', password: 'p\t2\n', client: { address: '::ffff:10.1.2.3', tls: false } }), true);
      assert.equal(await auth({ method: 'PLAIN', username: 'u3', password: 'p3', client: { address: 'not-an-ip', tls: false } }), true);
      const seen = fake.conns[0]!.lines;
      assert.deepEqual(seen, [
        'VERSION\t1\t2',
        `CPID\t${process.pid}`,
        `AUTH\t1\tPLAIN\tservice=submission\tnologin\tsecured\trip=192.0.2.7\tresp=${b64('u1', 'p1')}`,
        `AUTH\t2\tPLAIN\tservice=submission\tnologin\trip=10.1.2.3\tresp=${b64('u2', 'p\t2\n')}`,
        `AUTH\t3\tPLAIN\tservice=submission\tnologin\tresp=${b64('u3', 'p3')}`,
      ]);
      assert.equal(fake.conns.length, 1);
    } finally {
      await auth.close();
      await fake.close();
    }
  });

  it('answers in any order reach the right request; FAIL → false, FAIL temp → reject, CONT → reject and CANCEL', async () => {
    const fake = await fakeServer(async (c) => {
      c.send(HANDSHAKE);
      await c.line(/^AUTH\t4\t/);
      // Four requests in flight: answer them backwards.
      c.send('CONT\t4\t\nFAIL\t3\tuser=x\ttemp\treason=db\x01tdown\nFAIL\t2\tuser=x\nOK\t1\tuser=x\n');
    });
    const auth = dovecotAuth({ host: '127.0.0.1', port: fake.port });
    try {
      const ps = [1, 2, 3, 4].map((i) => auth(req(`u${i}`, `secret-${i}`)).then((v) => v, (e: Error) => e));
      const [r1, r2, r3, r4] = await Promise.all(ps);
      assert.equal(r1, true);
      assert.equal(r2, false);
      assert.ok(r3 instanceof Error);
      assertUnavailable(r3, /temporary failure \(request 3\): db\?down$/, 'secret-3');
      assert.ok(r4 instanceof Error);
      assertUnavailable(r4, /challenge \(CONT\)/, 'secret-4');
      await fake.conns[0]!.line(/^CANCEL\t4$/);
      assert.equal(fake.conns[0]!.closed, false, 'the connection stays');
    } finally {
      await auth.close();
      await fake.close();
    }
  });

  it('garbage instead of a handshake: rejects with a protocol error and drops the connection', async () => {
    const fake = await fakeServer((c) => c.send('HTTP/1.1 400 Bad Request\r\n\r\n'));
    const auth = dovecotAuth({ host: '127.0.0.1', port: fake.port });
    try {
      const err = await rejection(auth(req('alice', 'garbage-secret')));
      assertUnavailable(err, /protocol error .*expected VERSION/, 'garbage-secret');
      await until(() => fake.conns[0]?.closed === true, 'the connection to close');
    } finally {
      await auth.close();
      await fake.close();
    }
  });

  it('garbage after the handshake: the requests in flight reject; the next request opens a new connection', async () => {
    let n = 0;
    const fake = await fakeServer(async (c) => {
      c.send(HANDSHAKE);
      if (n++ === 0) {
        await c.line(/^AUTH\t2\t/);
        c.send('\x00\x01\x02 what is this\n');
      } else {
        const l = await c.line(/^AUTH\t1\t/);
        c.send(`OK\t1\tuser=${l.length}\n`);
      }
    });
    const auth = dovecotAuth({ host: '127.0.0.1', port: fake.port });
    try {
      const [a, b] = await Promise.all([rejection(auth(req('u', 'p1'))), rejection(auth(req('u', 'p2')))]);
      assertUnavailable(a!, /protocol error .*unexpected line/);
      assertUnavailable(b!, /protocol error .*unexpected line/);
      assert.equal(await auth(req('u', 'p3')), true);
      assert.equal(fake.conns.length, 2);
    } finally {
      await auth.close();
      await fake.close();
    }
  });

  it('a server echoing our request back: a protocol error whose message hides the credentials', async () => {
    const fake = await fakeServer((c) => {
      c.send(HANDSHAKE);
      c.socket.on('data', (d: Buffer) => {
        if (d.includes('AUTH\t')) c.send(d.toString('utf8').slice(d.indexOf('AUTH\t')));
      });
    });
    const auth = dovecotAuth({ host: '127.0.0.1', port: fake.port });
    try {
      const password = 'echo-me-not';
      const err = await rejection(auth(req('a', password)));
      assertUnavailable(err, /unexpected line "AUTH\?1\?PLAIN\?.*\?resp=<hidden>"/, password);
      assert.ok(!err.message.includes(b64('a', password).slice(0, 6)), err.message);
    } finally {
      await auth.close();
      await fake.close();
    }
  });

  it('an over-long line is a protocol error as soon as 64 KiB arrive without LF: rejects and drops the connection', async () => {
    // 70 000 bytes of one unfinished line, then nothing: the client must not wait for an LF.
    const fake = await fakeServer((c) => c.send(`VERSION\t1\t2\nMECH\tPLAIN\n${'x'.repeat(70_000)}`));
    const auth = dovecotAuth({ host: '127.0.0.1', port: fake.port, timeout: 5000 });
    try {
      const t0 = Date.now();
      const err = await rejection(auth(req('alice', 'long-secret')));
      assertUnavailable(err, /line longer than 65536 bytes/, 'long-secret');
      assert.ok(Date.now() - t0 < 2000, `rejected after ${Date.now() - t0} ms, not at the timeout`);
      await until(() => fake.conns[0]?.closed === true, 'the connection to close');
    } finally {
      await auth.close();
      await fake.close();
    }
  });

  it('an over-long answer line after the handshake also fails the request', async () => {
    const fake = await fakeServer(async (c) => {
      c.send(HANDSHAKE);
      await c.line(/^AUTH\t1\t/);
      c.send(`OK\t1\tuser=${'y'.repeat(70_000)}\n`);
    });
    const auth = dovecotAuth({ host: '127.0.0.1', port: fake.port });
    try {
      assertUnavailable(await rejection(auth(req('alice', 'pw'))), /line longer than/);
    } finally {
      await auth.close();
      await fake.close();
    }
  });

  it('a server that never answers: rejects after the timeout and drops the connection', async () => {
    const fake = await fakeServer(() => undefined);
    const auth = dovecotAuth({ host: '127.0.0.1', port: fake.port, timeout: 300 });
    try {
      const t0 = Date.now();
      const err = await rejection(auth(req('alice', 'silent-secret')));
      const took = Date.now() - t0;
      assertUnavailable(err, /no answer from the Dovecot auth service within 300 ms/, 'silent-secret');
      assert.ok(took >= 250 && took < 3000, `took ${took} ms`);
      await until(() => fake.conns[0]?.closed === true, 'the connection to close');
    } finally {
      await auth.close();
      await fake.close();
    }
  });

  it('a server that answers others but not one request: that one times out and is cancelled; the connection stays', async () => {
    const fake = await fakeServer(async (c) => {
      c.send(HANDSHAKE);
      await c.line(/^AUTH\t1\t/);
      // Keep answering every later request, never the first.
      for (let id = 2; ; id++) {
        try {
          await c.line(new RegExp(`^AUTH\\t${id}\\t`), 10_000);
        } catch {
          return;
        }
        c.send(`OK\t${id}\tuser=u\n`);
      }
    });
    const auth = dovecotAuth({ host: '127.0.0.1', port: fake.port, timeout: 400 });
    try {
      const first = auth(req('u', 'slow')).then((v) => v, (e: Error) => e);
      // Another request answered meanwhile shows that the server is alive.
      assert.equal(await auth(req('u', 'fast')), true);
      const r = await first;
      assert.ok(r instanceof Error);
      assertUnavailable(r, /no answer .* within 400 ms/);
      await fake.conns[0]!.line(/^CANCEL\t1$/);
      // A late answer for the cancelled id is ignored, not a protocol error.
      fake.conns[0]!.send('FAIL\t1\tuser=u\n');
      assert.equal(await auth(req('u', 'after')), true);
      assert.equal(fake.conns.length, 1);
      assert.equal(fake.conns[0]!.closed, false);
    } finally {
      await auth.close();
      await fake.close();
    }
  });

  it('an answer for an id never sent, a MECH list without PLAIN, another major version: each a clear rejection', async () => {
    const unknownId = await fakeServer(async (c) => {
      c.send(HANDSHAKE);
      await c.line(/^AUTH\t1\t/);
      c.send('OK\t99\tuser=u\n');
    });
    const noPlain = await fakeServer((c) => c.send('VERSION\t1\t2\nMECH\tCRAM-MD5\nMECH\tSCRAM-SHA-256\nDONE\n'));
    const v2 = await fakeServer((c) => c.send('VERSION\t2\t0\nMECH\tPLAIN\nDONE\n'));
    const a1 = dovecotAuth({ host: '127.0.0.1', port: unknownId.port });
    const a2 = dovecotAuth({ host: '127.0.0.1', port: noPlain.port });
    const a3 = dovecotAuth({ host: '127.0.0.1', port: v2.port });
    try {
      assertUnavailable(await rejection(a1(req('u', 'p'))), /OK for id 99, which was never sent/);
      assertUnavailable(await rejection(a2(req('u', 'p'))), /does not offer PLAIN \(it offers: CRAM-MD5 SCRAM-SHA-256\)/);
      assertUnavailable(await rejection(a3(req('u', 'p'))), /protocol version 2\.x, not 1\.x/);
    } finally {
      await Promise.all([a1.close(), a2.close(), a3.close()]);
      await Promise.all([unknownId.close(), noPlain.close(), v2.close()]);
    }
  });

  it('the server closing the connection mid-request rejects the requests in flight', async () => {
    const fake = await fakeServer(async (c) => {
      c.send(HANDSHAKE);
      await c.line(/^AUTH\t3\t/);
      c.socket.end();
    });
    const auth = dovecotAuth({ host: '127.0.0.1', port: fake.port });
    try {
      const errs = await Promise.all([1, 2, 3].map(() => rejection(auth(req('u', 'p')))));
      for (const e of errs) assertUnavailable(e, /closed the connection/);
    } finally {
      await auth.close();
      await fake.close();
    }
  });

  it('credentials PLAIN cannot carry, or too long to send, are false without asking', async () => {
    const fake = await fakeServer((c) => c.send(HANDSHAKE));
    const auth = dovecotAuth({ host: '127.0.0.1', port: fake.port });
    try {
      assert.equal(await auth(req('alice', 'a\0b')), false);
      assert.equal(await auth(req('al\0ice', 'pw')), false);
      assert.equal(await auth(req('alice', 'x'.repeat(10_000))), false);
      await new Promise((r) => setTimeout(r, 100));
      assert.equal(fake.conns.length, 0, 'nothing connected');
    } finally {
      await auth.close();
      await fake.close();
    }
  });

  it('close(): requests in flight and later calls reject; nothing is left open', async () => {
    const fake = await fakeServer((c) => c.send(HANDSHAKE));
    const auth = dovecotAuth({ host: '127.0.0.1', port: fake.port });
    const pending = auth(req('u', 'p')).then((v) => v, (e: Error) => e);
    await until(() => (fake.conns[0]?.lines.some((l) => l.startsWith('AUTH\t1\t')) ?? false), 'the request to arrive');
    await auth.close();
    const r = await pending;
    assert.ok(r instanceof Error);
    assertUnavailable(r, /closed/);
    assertUnavailable(await rejection(auth(req('u', 'p'))), /closed/);
    await until(() => fake.conns[0]?.closed === true, 'the connection to close');
    await fake.close();
  });
});

// ---- options ----

describe('dovecotAuth() options', () => {
  const invalid: [string, unknown][] = [
    ['nothing', {}],
    ['not an object', null],
    ['path and host', { path: '/run/auth', host: '127.0.0.1', port: 1 }],
    ['path and port', { path: '/run/auth', port: 12345 }],
    ['empty path', { path: '' }],
    ['host without port', { host: '127.0.0.1' }],
    ['port without host', { port: 12345 }],
    ['port 0', { host: '127.0.0.1', port: 0 }],
    ['port 70000', { host: '127.0.0.1', port: 70000 }],
    ['port as string', { host: '127.0.0.1', port: '12345' }],
    ['timeout 0', { path: '/run/auth', timeout: 0 }],
    ['timeout NaN', { path: '/run/auth', timeout: Number.NaN }],
    ['timeout 1.5', { path: '/run/auth', timeout: 1.5 }],
    ['service with a tab', { path: '/run/auth', service: 'sm\ttp' }],
    ['empty service', { path: '/run/auth', service: '' }],
    ['maxConnections 0', { path: '/run/auth', maxConnections: 0 }],
    ['maxConnections 2.5', { path: '/run/auth', maxConnections: 2.5 }],
  ];
  for (const [name, options] of invalid) {
    it(`throws DOVETAIL_ERR_INVALID_OPTIONS for ${name}`, () => {
      assert.throws(
        () => dovecotAuth(options as DovecotAuthOptions),
        (err: unknown) => isDovetailError(err, ErrorCodes.INVALID_OPTIONS) && /^dovecotAuth\(\): /.test((err as Error).message),
      );
    });
  }

  it('accepts a path, or host and port, and connects to nothing until asked', async () => {
    for (const o of [{ path: '/nonexistent/auth' }, { host: 'localhost', port: 1, timeout: 50, service: 'imap', maxConnections: 4 }]) {
      const auth = dovecotAuth(o);
      assert.equal(typeof auth, 'function');
      await auth.close();
    }
  });
});

// ---- the gateway ----

describe('gateway with authenticate: dovecotAuth() and nodemailer', () => {
  let gw: Awaited<ReturnType<typeof startGateway>>;
  let auth: ReturnType<typeof dovecotAuth>;
  before(async () => {
    auth = dovecotAuth({ host: '127.0.0.1', port: dovecot.port });
    gw = await startGateway({ tls: selfSignedCert(), authenticate: auth, authFailureDelay: 10 });
  });
  after(async () => {
    await gw?.close();
    await auth?.close();
  });

  // Each test connects from its own loopback address (the gateway passes it as rip=, and
  // Dovecot's penalty after a failure is per address), so the order does not matter.
  let from = 2;
  const sendAs = async (user: string, pass: string, subject: string, authMethod = 'PLAIN'): Promise<{ response?: string; code?: number; error?: Error }> => {
    const localAddress = `127.0.0.${from++}`;
    const t = nodemailer.createTransport({ host: '127.0.0.1', port: gw.port, localAddress, secure: false, requireTLS: true, tls: { rejectUnauthorized: false }, authMethod, auth: { user, pass } });
    try {
      const info = await t.sendMail({ envelope: { from: 'alice@example.test', to: ['bob@example.test'] }, raw: message(subject) });
      return { response: info.response };
    } catch (err) {
      return { code: (err as { responseCode?: number }).responseCode ?? 0, error: err as Error };
    } finally {
      t.close();
    }
  };

  it('the right password: AUTH succeeds and the message is accepted (250)', async () => {
    const r = await sendAs('alice', 's3cret', 'via dovecot auth');
    assert.match(r.response ?? String(r.error), /^250 /);
    const msgs = await stored(gw.root, 'bob@example.test');
    assert.ok(msgs.some((m) => m.includes('Subject: via dovecot auth')));
  });

  it('AUTH LOGIN with the right password: also 250 (the gateway decodes LOGIN, Dovecot gets PLAIN)', async () => {
    const r = await sendAs('bob@example.test', 'p@ss word with spaces ✓', 'via login', 'LOGIN');
    assert.match(r.response ?? String(r.error), /^250 /);
  });

  it("Dovecot's temporary failure: 454", async () => {
    const r = await sendAs('broken', 'whatever', 'nope');
    assert.equal(r.code, 454, String(r.error));
  });

  it('a wrong password: 535', async () => {
    const r = await sendAs('alice', 'not-it', 'nope');
    assert.equal(r.code, 535, String(r.error));
  });
});
