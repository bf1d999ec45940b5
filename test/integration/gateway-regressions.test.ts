/**
 * Regression tests for bugs found in review of the core, one test each.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { subscribe, unsubscribe } from 'node:diagnostics_channel';
import { Channels, createGateway, defineMilter, ErrorCodes, maildir, type DeliveryEnvelope, type GatewayOptions } from '../../lib/index.js';
import { ehlo, message, send, split, startGateway, stored } from '../helpers/smtp.js';

test('an eom that throws after making edits: with defaultAction accept, none of its edits are applied', async () => {
  const gw = await startGateway({
    milters: [
      defineMilter({
        name: 'half-done',
        defaultAction: 'accept',
        async eom(ctx) {
          ctx.message.addHeader('X-Half', 'done');
          ctx.envelope.addRecipient('extra@example.test');
          throw new Error('then it broke');
        },
      }),
    ],
  });
  try {
    const c = await ehlo(gw.port);
    const r = await send(c, 'a@sender.test', ['bob@example.test'], message());
    assert.equal(r.data?.code, 250);
    const [m] = await stored(gw.root, 'bob@example.test');
    assert.ok(!split(m!).headers.includes('X-Half'));
    assert.deepEqual(await stored(gw.root, 'extra@example.test'), []);
    c.end();
  } finally {
    await gw.close();
  }
});

test('a repeated RCPT for the same address is one recipient for milters and the transport', async () => {
  const envelopes: DeliveryEnvelope[] = [];
  let seenAtEom: string[] = [];
  const gw = await startGateway({
    milters: [defineMilter({ name: 'see', eom: async (ctx) => void (seenAtEom = ctx.envelope.recipients.map((r) => r.address)) })],
    delivery: {
      name: 'capture',
      async deliver(envelope) {
        envelopes.push(envelope);
        return envelope.recipients.map((r) => ({ recipient: r.address, status: 'delivered' as const, reply: { code: 250, enhanced: '2.0.0', lines: ['ok'] } }));
      },
    },
  });
  try {
    const c = await ehlo(gw.port);
    const r = await send(c, 'a@sender.test', ['bob@example.test', 'BOB@example.test', 'carol@example.test'], message());
    assert.equal(r.data?.code, 250);
    assert.deepEqual(seenAtEom, ['bob@example.test', 'carol@example.test']);
    assert.deepEqual(envelopes[0]?.recipients.map((x) => x.address), ['bob@example.test', 'carol@example.test']);
    c.end();
  } finally {
    await gw.close();
  }
});

test('macros: `_` says unknown for an unresolved client; message macros do not leak into the next message', async () => {
  const seen: Record<string, string | undefined>[] = [];
  const gw = await startGateway({
    milters: [
      defineMilter({
        name: 'macros',
        async mail(ctx) {
          seen.push({ _: ctx.macros['_'], rcpt: ctx.macros['{rcpt_addr}'], i: ctx.macros['i'] });
        },
      }),
    ],
  });
  try {
    const c = await ehlo(gw.port);
    await send(c, 'a@sender.test', ['bob@example.test'], message());
    await send(c, 'a@sender.test', ['bob@example.test'], message());
    assert.equal(seen[0]?._, 'unknown [127.0.0.1]');
    assert.equal(seen[1]?.rcpt, undefined, '{rcpt_addr} of the first message is gone at the second MAIL');
    assert.notEqual(seen[0]?.i, seen[1]?.i);
    c.end();
  } finally {
    await gw.close();
  }
});

test('bad options fail in createGateway, not at the first DATA', () => {
  const delivery = maildir({ root: '/tmp' });
  const cases: Partial<GatewayOptions>[] = [
    { maxMessageBytes: -1 },
    { maxHeaderBytes: 1.5 },
    { bareLineEndings: 'strip' as never },
    { spool: { memoryThreshold: -5 } },
    { milterTimeouts: { command: 0 } },
    { listen: { port: 70000 } },
    { listen: [] },
  ];
  for (const c of cases) {
    assert.throws(
      () => createGateway({ delivery, ...c } as GatewayOptions),
      (e: { code?: string }) => e.code === ErrorCodes.INVALID_OPTIONS,
      JSON.stringify(c),
    );
  }
});

test('a gateway can listen again after close()', async () => {
  const gw = await startGateway();
  try {
    await gw.gateway.close();
    const [addr] = await gw.gateway.listen();
    const c = await ehlo(addr!.port);
    const r = await send(c, 'a@sender.test', ['bob@example.test'], message());
    assert.equal(r.data?.code, 250, 'MAIL is not refused as "shutting down"');
    c.end();
  } finally {
    await gw.close();
  }
});

test('a failing close handler is reported with action none', async () => {
  const events: { stage: string; action: string }[] = [];
  const on = (m: unknown) => events.push(m as { stage: string; action: string });
  subscribe(Channels.milterError, on);
  const gw = await startGateway({ milters: [defineMilter({ name: 'bad-close', close: async () => { throw new Error('x'); } })] });
  try {
    const c = await ehlo(gw.port);
    assert.equal((await c.cmd('QUIT')).code, 221);
    await c.waitClosed();
    for (let i = 0; i < 50 && events.length === 0; i++) await new Promise((r) => setTimeout(r, 20));
    assert.deepEqual(events.map((e) => [e.stage, e.action]), [['close', 'none']]);
  } finally {
    unsubscribe(Channels.milterError, on);
    await gw.close();
  }
});
