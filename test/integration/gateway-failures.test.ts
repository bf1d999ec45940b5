/**
 * Milters that throw or hang take their default action; no connection gets stuck.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { subscribe, unsubscribe } from 'node:diagnostics_channel';
import { Channels, defineMilter, ErrorCodes, type DefaultAction } from '../../lib/index.js';
import { ehlo, message, send, startGateway, stored } from '../helpers/smtp.js';

test('a milter that throws: tempfail by default, with no internal text in the reply', async () => {
  const gw = await startGateway({
    milters: [
      defineMilter({
        name: 'buggy',
        async rcpt() {
          throw new Error('secret internal detail');
        },
      }),
    ],
  });
  const errors: unknown[] = [];
  const onError = (m: unknown) => errors.push(m);
  subscribe(Channels.milterError, onError);
  try {
    const c = await ehlo(gw.port);
    const r = await send(c, 'a@sender.test', ['bob@example.test'], message());
    assert.equal(r.rcpt[0]?.text, '451 4.7.1 Service unavailable - try again later');
    assert.ok(!r.rcpt[0]?.text.includes('secret'));
    assert.equal((await c.cmd('NOOP')).code, 250, 'the session goes on');
    const e = errors[0] as { milter: string; stage: string; action: string; error: { code: string } };
    assert.equal(e.milter, 'buggy');
    assert.equal(e.stage, 'rcpt');
    assert.equal(e.action, 'tempfail');
    assert.equal(e.error.code, ErrorCodes.MILTER_FAILED);
    c.end();
  } finally {
    unsubscribe(Channels.milterError, onError);
    await gw.close();
  }
});

for (const [action, expectRcpt] of [
  ['tempfail', 451],
  ['reject', 550],
  ['accept', 250],
] as [DefaultAction, number][]) {
  test(`a milter that hangs at RCPT times out and takes defaultAction=${action}`, async () => {
    const gw = await startGateway({
      milters: [
        defineMilter({
          name: 'hangs',
          defaultAction: action,
          timeouts: { command: 150 },
          rcpt: () => new Promise<void>(() => undefined),
        }),
      ],
    });
    try {
      const c = await ehlo(gw.port);
      const r = await send(c, 'a@sender.test', ['bob@example.test'], message());
      assert.equal(r.rcpt[0]?.code, expectRcpt);
      if (action === 'accept') {
        assert.equal(r.data?.code, 250);
        assert.equal((await stored(gw.root, 'bob@example.test')).length, 1);
      }
      assert.equal((await c.cmd('NOOP')).code, 250, 'no stuck connection');
      c.end();
    } finally {
      await gw.close();
    }
  });
}

test('a milter that hangs at end of message times out (content timeout); its signal is aborted', async () => {
  let aborted = false;
  const gw = await startGateway({
    milters: [
      defineMilter({
        name: 'slow-eom',
        timeouts: { content: 150 },
        eom: (ctx) =>
          new Promise<void>((resolve) => {
            ctx.signal.addEventListener('abort', () => {
              aborted = true;
              resolve();
            });
          }),
      }),
    ],
  });
  try {
    const c = await ehlo(gw.port);
    const r = await send(c, 'a@sender.test', ['bob@example.test'], message());
    assert.equal(r.data?.text, '451 4.7.1 Service unavailable - try again later');
    assert.ok(aborted, 'the handler was told through ctx.signal');
    assert.deepEqual(await stored(gw.root, 'bob@example.test'), []);
    c.end();
  } finally {
    await gw.close();
  }
});

test('defaultAction=quarantine: the message is held, not delivered', async () => {
  const gw = await startGateway({
    milters: [
      defineMilter({
        name: 'flaky',
        defaultAction: 'quarantine',
        async data() {
          throw new Error('boom');
        },
      }),
    ],
  });
  try {
    const c = await ehlo(gw.port);
    const r = await send(c, 'a@sender.test', ['bob@example.test'], message());
    assert.equal(r.data?.code, 250);
    assert.deepEqual(await stored(gw.root, 'bob@example.test'), []);
    const [held] = await stored(gw.quarantineRoot, 'bob@example.test');
    assert.match(held!.toString(), /X-Dovetail-Quarantine: milter flaky failed at data/);
    c.end();
  } finally {
    await gw.close();
  }
});

test('a verdict a stage does not allow is a failure (quarantine at RCPT from untyped code)', async () => {
  const gw = await startGateway({
    milters: [
      {
        name: 'untyped',
        rcpt: async () => ({ type: 'quarantine', reason: 'x' }) as never,
      },
    ],
  });
  try {
    const c = await ehlo(gw.port);
    const r = await send(c, 'a@sender.test', ['bob@example.test'], message());
    assert.equal(r.rcpt[0]?.code, 451);
    c.end();
  } finally {
    await gw.close();
  }
});

test('a transport that throws: every recipient deferred, the client gets 451 and retries', async () => {
  const gw = await startGateway({
    delivery: {
      name: 'broken',
      async deliver() {
        throw new Error('disk on fire');
      },
    },
  });
  try {
    const c = await ehlo(gw.port);
    const r = await send(c, 'a@sender.test', ['bob@example.test'], message());
    assert.equal(r.data?.text, '451 4.3.0 Error: internal error, try again later');
    c.end();
  } finally {
    await gw.close();
  }
});

test('mixed delivery results are never acknowledged with 250 (until the deferred queue lands)', async () => {
  const gw = await startGateway({
    delivery: {
      name: 'half',
      async deliver(envelope) {
        return envelope.recipients.map((r, i) => ({
          recipient: r.address,
          status: i === 0 ? ('delivered' as const) : ('deferred' as const),
          reply: i === 0 ? { code: 250, enhanced: '2.0.0', lines: ['ok'] } : { code: 452, enhanced: '4.2.2', lines: ['Mailbox full'] },
        }));
      },
    },
  });
  try {
    const c = await ehlo(gw.port);
    const r = await send(c, 'a@sender.test', ['a@example.test', 'b@example.test'], message());
    assert.equal(r.data?.text, '452 4.2.2 Mailbox full');
    c.end();
  } finally {
    await gw.close();
  }
});
