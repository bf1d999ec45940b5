/**
 * sizeLimit through a running gateway over real SMTP: SIZE advertised with the limit, a
 * declared SIZE= over it refused at MAIL FROM, an oversized message refused at the end of
 * DATA with nothing stored, memory flat while a message far over the limit streams, and
 * the milter's own MAIL FROM check (what it does when served to Postfix) without the
 * gateway hook.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { once } from 'node:events';
import v8 from 'node:v8';
import vm from 'node:vm';
import { sizeLimit } from '../../milters/size-limit.js';
import type { Milter } from '../../lib/index.js';
import { ehlo, message, RawClient, send, startGateway, stored } from '../helpers/smtp.js';

const LIMIT = 1024 * 1024;

/** A 1 MiB block of 998-byte lines (no line starts with a dot). */
const BLOCK = Buffer.from(('x'.repeat(998) + '\r\n').repeat(Math.ceil(LIMIT / 1000))).subarray(0, 1000 * Math.floor(LIMIT / 1000));

/**
 * DATA with a message of a header block and `mib` MiB of body, written in 1 MiB blocks with
 * backpressure (the test itself never holds more than a block). Returns the final reply;
 * `onBlock` runs after each block is handed to the socket.
 */
async function streamData(c: RawClient, mib: number, onBlock?: () => void): Promise<string> {
  const r = await c.cmd('DATA');
  assert.equal(r.code, 354, r.text);
  c.write('From: a@sender.test\r\nTo: bob@example.test\r\nSubject: big\r\n\r\n');
  for (let i = 0; i < mib; i++) {
    if (!c.socket.write(BLOCK)) await once(c.socket, 'drain');
    onBlock?.();
  }
  c.write('.\r\n');
  return (await c.reply(60_000)).text;
}

test('EHLO advertises SIZE with the limit; MAIL FROM with SIZE= over it gets 552 5.3.4 at once, at it 250', async () => {
  const gw = await startGateway({ milters: [sizeLimit({ maxBytes: LIMIT })] });
  try {
    const c = await RawClient.connect(gw.port);
    await c.reply();
    const e = await c.cmd('EHLO client.example.test');
    assert.ok(e.lines.includes(`250-SIZE ${LIMIT}`) || e.lines.includes(`250 SIZE ${LIMIT}`), e.text);
    const m = await c.cmd(`MAIL FROM:<a@sender.test> SIZE=${LIMIT + 1}`);
    assert.equal(m.code, 552, m.text);
    assert.match(m.text, /^552 5\.3\.4 /);
    const ok = await c.cmd(`MAIL FROM:<a@sender.test> SIZE=${LIMIT}`);
    assert.equal(ok.text, '250 2.1.0 Accepted');
    c.end();
  } finally {
    await gw.close();
  }
});

test('the mail handler alone (as served to Postfix, no gateway hook) refuses SIZE= over the limit with Postfix’s reply', async () => {
  const full = sizeLimit({ maxBytes: 5000 });
  const { limits: _hook, ...served } = full;
  assert.deepEqual(_hook, { maxMessageBytes: 5000 });
  const gw = await startGateway({ milters: [served as Milter] });
  try {
    const c = await ehlo(gw.port);
    assert.equal((await c.cmd('MAIL FROM:<a@sender.test> SIZE=5001')).text, '552 5.3.4 Message size exceeds fixed limit');
    assert.equal((await c.cmd('MAIL FROM:<a@sender.test> SIZE=5000')).code, 250);
    await c.cmd('RSET');
    assert.equal((await c.cmd('MAIL FROM:<a@sender.test>')).code, 250, 'no SIZE= declared: nothing to check at MAIL');
    c.end();
  } finally {
    await gw.close();
  }
  assert.throws(() => sizeLimit({ maxBytes: 0 }), { code: 'DOVETAIL_ERR_INVALID_OPTIONS' });
  assert.throws(() => sizeLimit({ maxBytes: 1.5 }), { code: 'DOVETAIL_ERR_INVALID_OPTIONS' });
});

test('a 20 MiB message against a 1 MiB limit: 552 5.3.4 naming our host at the end of DATA, nothing stored, the session goes on', async () => {
  const gw = await startGateway({ milters: [sizeLimit({ maxBytes: LIMIT })] });
  try {
    const c = await ehlo(gw.port);
    assert.equal((await c.cmd('MAIL FROM:<a@sender.test>')).code, 250);
    assert.equal((await c.cmd('RCPT TO:<bob@example.test>')).code, 250);
    const reply = await streamData(c, 20);
    assert.equal(reply, `552 5.3.4 Error: message size exceeds the ${LIMIT}-byte limit of mx.test`);
    assert.equal((await stored(gw.root, 'bob@example.test')).length, 0);
    // The session is still in step: a small message goes through.
    const r = await send(c, 'a@sender.test', ['bob@example.test'], message());
    assert.match(r.data!.text, /^250 /);
    assert.equal((await stored(gw.root, 'bob@example.test')).length, 1);
    c.end();
  } finally {
    await gw.close();
  }
});

/**
 * A full garbage collection. Without one, freed chunk buffers wait for V8 to collect them
 * and the numbers measure the collector's laziness, not what the gateway keeps.
 */
function collector(): () => void {
  const g = (globalThis as { gc?: () => void }).gc;
  if (g) return g;
  v8.setFlagsFromString('--expose-gc');
  return vm.runInNewContext('gc') as () => void;
}

test('memory stays flat: 50 MiB streamed against a 64 KiB limit grows RSS and live memory far less than the message', async () => {
  const gc = collector();
  const MiB = 1024 * 1024;
  const live = (m: NodeJS.MemoryUsage): number => m.heapUsed + m.external;
  const gw = await startGateway({ milters: [sizeLimit({ maxBytes: 64 * 1024 })] });
  try {
    const c = await ehlo(gw.port);
    const transaction = async (mib: number, onBlock?: () => void): Promise<string> => {
      assert.equal((await c.cmd('MAIL FROM:<a@sender.test>')).code, 250);
      assert.equal((await c.cmd('RCPT TO:<bob@example.test>')).code, 250);
      return streamData(c, mib, onBlock);
    };
    // Warm up (code paths, socket buffers, lazily loaded modules), then take the baseline.
    assert.match(await transaction(2), /^552 5\.3\.4 /);
    gc();
    const base = process.memoryUsage();
    let peakRss = base.rss;
    let peakLive = live(base);
    // After each MiB the client hands over: collect, then see what is still held.
    const reply = await transaction(50, () => {
      gc();
      const m = process.memoryUsage();
      peakRss = Math.max(peakRss, m.rss);
      peakLive = Math.max(peakLive, live(m));
    });
    assert.match(reply, /^552 5\.3\.4 Error: message size exceeds the 65536-byte limit of mx\.test$/);
    const rssGrowth = (peakRss - base.rss) / MiB;
    const liveGrowth = (peakLive - live(base)) / MiB;
    assert.ok(liveGrowth < 20, `live heap + buffers grew ${liveGrowth.toFixed(1)} MiB while 50 MiB streamed`);
    assert.ok(rssGrowth < 20, `RSS grew ${rssGrowth.toFixed(1)} MiB while 50 MiB streamed`);
    assert.equal((await stored(gw.root, 'bob@example.test')).length, 0);
    c.end();
  } finally {
    await gw.close();
  }
});
