/**
 * Per-client limits (Postfix anvil) and error limits, over real sockets: one client address
 * cannot hold every connection slot or open connections faster than its rate; a client
 * that keeps getting 4xx/5xx replies is slowed down past the soft limit and disconnected at
 * the hard one (regression tests for the hardening issue: 1,000 idle connections from one
 * address held all of maxClients; 5,000 relay-denied recipients never ended the session).
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import net from 'node:net';
import { isDovetailError, memoryAnvil } from '../../lib/index.js';
import { relayControl } from '../../milters/index.js';
import { ehlo, RawClient, startGateway } from '../helpers/smtp.js';

/** A raw client from a chosen loopback address; resolves with its first reply line. */
async function greetFrom(port: number, localAddress: string): Promise<{ line: string; socket: net.Socket }> {
  const socket = net.connect({ port, host: '127.0.0.1', localAddress });
  return new Promise((resolve, reject) => {
    let buf = '';
    socket.on('data', (d) => {
      buf += d.toString();
      const nl = buf.indexOf('\r\n');
      if (nl >= 0) resolve({ line: buf.slice(0, nl), socket });
    });
    socket.once('error', reject);
  });
}

test('one client address may hold maxConnections at once (421 4.7.0 for the next); other clients and freed slots go on', async () => {
  const gw = await startGateway({ clientLimits: { maxConnections: 3 } });
  const open: net.Socket[] = [];
  try {
    for (let i = 0; i < 3; i++) {
      const g = await greetFrom(gw.port, '127.0.0.1');
      assert.match(g.line, /^220 /);
      open.push(g.socket);
    }
    const refused = await greetFrom(gw.port, '127.0.0.1');
    open.push(refused.socket);
    assert.equal(refused.line, '421 4.7.0 mx.test Error: too many connections from 127.0.0.1');
    await new Promise((r) => refused.socket.once('close', r));
    // Another client is not affected.
    const other = await greetFrom(gw.port, '127.0.0.2');
    open.push(other.socket);
    assert.match(other.line, /^220 /);
    // A slot freed is a slot again.
    open[0]!.destroy();
    let again: { line: string; socket: net.Socket } | undefined;
    for (let i = 0; i < 100; i++) {
      again = await greetFrom(gw.port, '127.0.0.1');
      open.push(again.socket);
      if (again.line.startsWith('220')) break;
      await new Promise((r) => setTimeout(r, 20));
    }
    assert.match(again!.line, /^220 /);
  } finally {
    for (const s of open) s.destroy();
    await gw.close();
  }
});

test('exempt clients have no limit; the connection rate limit refuses the next connection in the same window', async () => {
  const exempted = await startGateway({ clientLimits: { maxConnections: 1, exempt: ['127.0.0.0/8'] } });
  const open: net.Socket[] = [];
  try {
    for (let i = 0; i < 3; i++) {
      const g = await greetFrom(exempted.port, '127.0.0.1');
      open.push(g.socket);
      assert.match(g.line, /^220 /);
    }
  } finally {
    for (const s of open.splice(0)) s.destroy();
    await exempted.close();
  }
  let now = 1_000_000;
  const gw = await startGateway({ anvil: memoryAnvil({ connectionRate: 2, window: 60_000, clock: () => now }) });
  try {
    for (let i = 0; i < 2; i++) {
      const g = await greetFrom(gw.port, '127.0.0.1');
      g.socket.destroy();
      assert.match(g.line, /^220 /);
    }
    const third = await greetFrom(gw.port, '127.0.0.1');
    third.socket.destroy();
    assert.equal(third.line, '421 4.7.0 mx.test Error: too many connection requests from 127.0.0.1');
    now += 60_000;
    const later = await greetFrom(gw.port, '127.0.0.1');
    later.socket.destroy();
    assert.match(later.line, /^220 /);
  } finally {
    await gw.close();
  }
  assert.throws(() => memoryAnvil({ exempt: ['not-an-ip'] }), (e) => isDovetailError(e, 'DOVETAIL_ERR_INVALID_OPTIONS'));
});

test('error limits: past the soft limit each command waits longer; at the hard limit 421 4.7.0 and the connection closes', async () => {
  const sleep = 60;
  const gw = await startGateway({ errorLimits: { soft: 2, hard: 5, sleep }, milters: [relayControl({ localDomains: ['example.test'] })] });
  try {
    const c = await ehlo(gw.port);
    assert.equal((await c.cmd('MAIL FROM:<a@client.test>')).code, 250);
    const times: number[] = [];
    for (let i = 1; i <= 4; i++) {
      const t0 = process.hrtime.bigint();
      const r = await c.cmd(`RCPT TO:<x${i}@remote.test>`);
      times.push(Number(process.hrtime.bigint() - t0) / 1e6);
      assert.match(r.text, /^554 5\.7\.1 /);
    }
    // soft 2: a command is delayed (errors - 2) x sleep; the 4th came after 3 errors.
    assert.ok(times[3]! >= sleep - 5, `delays ${times.map((t) => t.toFixed(0)).join(', ')} ms`);
    const t5 = process.hrtime.bigint();
    const fifth = await c.cmd('RCPT TO:<x5@remote.test>');
    assert.ok(Number(process.hrtime.bigint() - t5) / 1e6 >= 2 * sleep - 5, 'the 5th after 4 errors: 2 x sleep');
    assert.match(fifth.text, /^554 5\.7\.1 /);
    const bye = await c.reply();
    assert.equal(bye.text, '421 4.7.0 mx.test Error: too many errors');
    await c.waitClosed();
  } finally {
    await gw.close();
  }
});

test('with the defaults, thousands of refused recipients end in a disconnect after 20 errors', async () => {
  const gw = await startGateway({ errorLimits: { sleep: 0 }, milters: [relayControl({ localDomains: ['example.test'] })] });
  try {
    const c = await RawClient.connect(gw.port);
    await c.reply();
    // Pipelined, as a hostile client would send them.
    c.write('EHLO client.test\r\nMAIL FROM:<a@client.test>\r\n' + Array.from({ length: 5000 }, (_, i) => `RCPT TO:<x${i}@remote.test>\r\n`).join(''));
    let refused = 0;
    for (;;) {
      const r = await c.reply();
      if (r.code === 554) refused++;
      if (r.code === 421) {
        assert.equal(r.text, '421 4.7.0 mx.test Error: too many errors');
        break;
      }
    }
    assert.equal(refused, 20);
    await c.waitClosed();
  } finally {
    await gw.close();
  }
});

test('message rate per client address and per authenticated user (450 4.7.1 too much mail)', async () => {
  let now = 5_000_000;
  const gw = await startGateway({
    allowInsecureAuth: true,
    authFailureDelay: 0,
    authenticate: async (r) => r.password === 'pw',
    anvil: memoryAnvil({ messageRate: 2, userMessageRate: 3, window: 60_000, clock: () => now }),
  });
  try {
    const c = await ehlo(gw.port);
    for (let i = 0; i < 2; i++) {
      assert.equal((await c.cmd('MAIL FROM:<a@client.test>')).code, 250);
      assert.equal((await c.cmd('RSET')).code, 250);
    }
    assert.equal((await c.cmd('MAIL FROM:<a@client.test>')).text, '450 4.7.1 Error: too much mail from 127.0.0.1');
    // An authenticated user has its own count, wherever it comes from.
    assert.equal((await c.cmd(`AUTH PLAIN ${Buffer.from('\0alice\0pw').toString('base64')}`)).code, 235);
    for (let i = 0; i < 3; i++) {
      assert.equal((await c.cmd('MAIL FROM:<alice@example.test>')).code, 250);
      assert.equal((await c.cmd('RSET')).code, 250);
    }
    assert.equal((await c.cmd('MAIL FROM:<alice@example.test>')).text, '450 4.7.1 Error: too much mail from alice');
    now += 60_000;
    assert.equal((await c.cmd('MAIL FROM:<alice@example.test>')).code, 250, 'a new window');
    c.end();
  } finally {
    await gw.close();
  }
});
