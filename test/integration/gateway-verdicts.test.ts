/**
 * Every verdict at every stage, over a real SMTP connection to a running gateway that
 * delivers into a real Maildir.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { accept, defineMilter, discard, quarantine, reject, tempfail, type Milter } from '../../lib/index.js';
import { ehlo, message, RawClient, send, startGateway, stored } from '../helpers/smtp.js';

test('no milters: a message to two recipients is stored for both, with our Received header first', async () => {
  const gw = await startGateway();
  try {
    const c = await ehlo(gw.port);
    const msg = message('plain');
    const r = await send(c, 'alice@sender.test', ['bob@example.test', 'carol@example.test'], msg);
    assert.equal(r.mail.code, 250);
    assert.deepEqual(r.rcpt.map((x) => x.code), [250, 250]);
    assert.equal(r.data?.code, 250);
    assert.match(r.data!.text, /^250 2\.6\.0 Ok: queued as [0-9A-Z]{12}$/);
    const queueId = /queued as (\S+)/.exec(r.data!.text)![1]!;
    for (const rcpt of ['bob@example.test', 'carol@example.test']) {
      const [m, more] = await stored(gw.root, rcpt);
      assert.ok(m, `stored for ${rcpt}`);
      assert.equal(more, undefined);
      const text = m.toString('utf8');
      assert.match(text, /^Return-Path: <alice@sender\.test>\r\nDelivered-To: ([^\r]+)\r\nReceived: from client\.example\.test \(unknown \[127\.0\.0\.1\]\)\r\n\tby mx\.test \(dovetail\) with ESMTP id /);
      assert.equal(/^Return-Path: [^\r]*\r\nDelivered-To: ([^\r]+)\r\n/.exec(text)?.[1], rcpt, 'maildir names the recipient of this copy');
      assert.ok(text.includes(`id ${queueId}`));
      assert.ok(text.endsWith(msg), 'the message follows the trace headers byte for byte');
    }
    c.end();
  } finally {
    await gw.close();
  }
});

test('connect: reject refuses the greeting with the milter reply; tempfail gives 421', async () => {
  for (const [verdict, code, enhanced] of [
    [reject(550, '5.7.1', 'You are not welcome'), 554, '5.7.1'],
    [tempfail(450, '4.7.1', 'Come back later'), 421, '4.7.1'],
  ] as const) {
    const gw = await startGateway({ milters: [defineMilter({ name: 'door', connect: async () => verdict })] });
    try {
      const c = await RawClient.connect(gw.port);
      const greeting = await c.reply();
      assert.equal(greeting.code, code);
      assert.equal(greeting.lines[0], `${code} ${enhanced} ${verdict.reply.lines[0]}`);
      await c.waitClosed();
    } finally {
      await gw.close();
    }
  }
});

test('helo: a reject is the reply to MAIL FROM until the client says HELO with another name', async () => {
  const seen: string[] = [];
  const gw = await startGateway({
    milters: [
      defineMilter({
        name: 'helo-check',
        async helo(_ctx, name) {
          seen.push(name);
          if (name === 'bad.example') return reject(550, '5.7.1', 'Bad HELO');
        },
      }),
    ],
  });
  try {
    const c = await ehlo(gw.port, 'bad.example');
    assert.equal((await c.cmd('MAIL FROM:<a@sender.test>')).text, '550 5.7.1 Bad HELO');
    assert.equal((await c.cmd('MAIL FROM:<a@sender.test>')).text, '550 5.7.1 Bad HELO');
    assert.equal((await c.cmd('EHLO good.example')).code, 250);
    assert.equal((await c.cmd('MAIL FROM:<a@sender.test>')).code, 250);
    assert.deepEqual(seen, ['bad.example', 'good.example']);
    c.end();
  } finally {
    await gw.close();
  }
});

test('helo: the stage runs when the client says EHLO (before any MAIL); a slow verdict still answers a pipelined MAIL', async () => {
  const seen: string[] = [];
  const gw = await startGateway({
    milters: [
      defineMilter({
        name: 'slow-helo',
        async helo(_ctx, name) {
          seen.push(name);
          await new Promise((r) => setTimeout(r, 100));
          if (name === 'bad.example') return reject(550, '5.7.1', 'Bad HELO');
        },
      }),
    ],
  });
  try {
    const c = await ehlo(gw.port, 'first.example');
    for (let i = 0; i < 100 && seen.length === 0; i++) await new Promise((r) => setTimeout(r, 10));
    assert.deepEqual(seen, ['first.example'], 'called after EHLO, no MAIL sent');
    // EHLO and MAIL in one write: MAIL waits for the helo verdict of the new name.
    c.write('EHLO bad.example\r\nMAIL FROM:<a@sender.test>\r\n');
    assert.equal((await c.reply()).code, 250);
    assert.equal((await c.reply()).text, '550 5.7.1 Bad HELO');
    assert.deepEqual(seen, ['first.example', 'bad.example']);
    c.end();
  } finally {
    await gw.close();
  }
});

test('unknown: a command smtp-server does not know reaches the unknown stage; a reject is the reply, otherwise smtp-server answers', async () => {
  const seen: string[] = [];
  const gw = await startGateway({
    milters: [
      defineMilter({
        name: 'unknown-check',
        async unknown(_ctx, command) {
          seen.push(command);
          if (command.toUpperCase().startsWith('XEVIL')) return reject(554, '5.5.1', 'Not here');
        },
      }),
    ],
  });
  try {
    const c = await ehlo(gw.port);
    assert.equal((await c.cmd('XEVIL payload')).text, '554 5.5.1 Not here');
    assert.equal((await c.cmd('XNICE')).code, 500, 'no verdict: smtp-server answers as usual');
    assert.equal((await c.cmd('NOOP')).code, 250);
    assert.deepEqual(seen, ['XEVIL payload', 'XNICE'], 'known commands never reach the stage');
    const r = await send(c, 'a@sender.test', ['bob@example.test'], message());
    assert.equal(r.data?.code, 250, 'the session goes on');
    c.end();
  } finally {
    await gw.close();
  }
});

test('mail: reject, tempfail and discard', async () => {
  const gw = await startGateway({
    milters: [
      defineMilter({
        name: 'sender-check',
        async mail(_ctx, sender) {
          if (sender.address.startsWith('spammer@')) return reject(550, '5.7.1', 'Sender refused');
          if (sender.address.startsWith('slow@')) return tempfail(451, '4.7.1', 'Greylisted');
          if (sender.address.startsWith('drop@')) return discard();
        },
      }),
    ],
  });
  try {
    const c = await ehlo(gw.port);
    assert.equal((await c.cmd('MAIL FROM:<spammer@sender.test>')).text, '550 5.7.1 Sender refused');
    assert.equal((await c.cmd('MAIL FROM:<slow@sender.test>')).text, '451 4.7.1 Greylisted');
    const r = await send(c, 'drop@sender.test', ['bob@example.test'], message('dropped'));
    assert.equal(r.mail.code, 250);
    assert.equal(r.rcpt[0]?.code, 250);
    assert.equal(r.data?.code, 250, 'discard answers 250');
    assert.deepEqual(await stored(gw.root, 'bob@example.test'), [], 'and stores nothing');
    const ok = await send(c, 'fine@sender.test', ['bob@example.test'], message('kept'));
    assert.equal(ok.data?.code, 250);
    assert.equal((await stored(gw.root, 'bob@example.test')).length, 1);
    c.end();
  } finally {
    await gw.close();
  }
});

test('rcpt: a reject for one of two recipients delivers to the other; tempfail refuses that one only', async () => {
  const gw = await startGateway({
    milters: [
      defineMilter({
        name: 'rcpt-check',
        async rcpt(_ctx, rcpt) {
          if (rcpt.address.startsWith('nobody@')) return reject(550, '5.1.1', 'No such user');
          if (rcpt.address.startsWith('busy@')) return tempfail(452, '4.2.2', 'Mailbox full');
        },
      }),
    ],
  });
  try {
    const c = await ehlo(gw.port);
    const r = await send(c, 'alice@sender.test', ['nobody@example.test', 'busy@example.test', 'bob@example.test'], message());
    assert.deepEqual(r.rcpt.map((x) => x.text), ['550 5.1.1 No such user', '452 4.2.2 Mailbox full', '250 2.1.5 Accepted']);
    assert.equal(r.data?.code, 250);
    assert.equal((await stored(gw.root, 'bob@example.test')).length, 1);
    assert.equal((await stored(gw.root, 'nobody@example.test')).length, 0);
    assert.equal((await stored(gw.root, 'busy@example.test')).length, 0);
    c.end();
  } finally {
    await gw.close();
  }
});

test('data: tempfail answers 4xx at the end of DATA and stores nothing; reject answers 5xx', async () => {
  let mode: 'tempfail' | 'reject' = 'tempfail';
  const gw = await startGateway({
    milters: [
      defineMilter({
        name: 'data-check',
        async data() {
          return mode === 'tempfail' ? tempfail(451, '4.3.0', 'Not now') : reject(554, '5.7.1', 'Never');
        },
      }),
    ],
  });
  try {
    const c = await ehlo(gw.port);
    let r = await send(c, 'alice@sender.test', ['bob@example.test'], message());
    assert.equal(r.data?.text, '451 4.3.0 Not now');
    mode = 'reject';
    r = await send(c, 'alice@sender.test', ['bob@example.test'], message());
    assert.equal(r.data?.text, '554 5.7.1 Never');
    assert.deepEqual(await stored(gw.root, 'bob@example.test'), []);
    c.end();
  } finally {
    await gw.close();
  }
});

test('header, eoh, body: reject, tempfail and discard end the message at the end of DATA', async () => {
  const gw = await startGateway({
    milters: [
      defineMilter({
        name: 'content-check',
        async header(_ctx, h) {
          if (h.name.toLowerCase() === 'subject' && h.value.includes('viagra')) return reject(550, '5.7.1', 'Spam subject');
        },
        async eoh(ctx) {
          if (ctx.headers.some((h) => h.name === 'X-Drop')) return discard();
        },
        async body(_ctx, chunk) {
          if (chunk.includes('EICAR')) return reject(554, '5.7.1', ['Virus found', 'EICAR test file']);
          if (chunk.includes('LATER')) return tempfail();
        },
      }),
    ],
  });
  try {
    const c = await ehlo(gw.port);
    let r = await send(c, 'a@sender.test', ['bob@example.test'], message('cheap viagra'));
    assert.equal(r.data?.text, '550 5.7.1 Spam subject');
    r = await send(c, 'a@sender.test', ['bob@example.test'], message('x', 'hi\r\n', 'X-Drop: 1\r\n'));
    assert.equal(r.data?.code, 250);
    r = await send(c, 'a@sender.test', ['bob@example.test'], message('x', 'this has EICAR in it\r\n'));
    assert.deepEqual(r.data?.lines, ['554-5.7.1 Virus found', '554 5.7.1 EICAR test file']);
    r = await send(c, 'a@sender.test', ['bob@example.test'], message('x', 'LATER\r\n'));
    assert.equal(r.data?.text, '451 4.7.1 Service unavailable - try again later');
    assert.deepEqual(await stored(gw.root, 'bob@example.test'), []);
    c.end();
  } finally {
    await gw.close();
  }
});

test('eom: quarantine holds the message in the quarantine store, not the mailbox; reject there refuses it', async () => {
  const gw = await startGateway({
    milters: [
      defineMilter({
        name: 'eom-check',
        async eom(ctx) {
          const subject = ctx.headers.find((h) => h.name === 'Subject')?.value;
          if (subject === 'hold me') return quarantine('looks odd');
          if (subject === 'refuse me') return reject(550, '5.7.0', 'Refused at end of message');
          if (subject === 'drop me') return discard();
          return accept();
        },
      }),
    ],
  });
  try {
    const c = await ehlo(gw.port);
    let r = await send(c, 'a@sender.test', ['bob@example.test'], message('hold me'));
    assert.equal(r.data?.code, 250);
    assert.deepEqual(await stored(gw.root, 'bob@example.test'), []);
    const [held] = await stored(gw.quarantineRoot, 'bob@example.test');
    assert.ok(held, 'quarantined copy stored');
    assert.match(held.toString(), /\r\nX-Dovetail-Quarantine: looks odd\r\n/);
    r = await send(c, 'a@sender.test', ['bob@example.test'], message('refuse me'));
    assert.equal(r.data?.text, '550 5.7.0 Refused at end of message');
    r = await send(c, 'a@sender.test', ['bob@example.test'], message('drop me'));
    assert.equal(r.data?.code, 250);
    assert.deepEqual(await stored(gw.root, 'bob@example.test'), []);
    r = await send(c, 'a@sender.test', ['bob@example.test'], message('deliver me'));
    assert.equal(r.data?.code, 250);
    assert.equal((await stored(gw.root, 'bob@example.test')).length, 1);
    c.end();
  } finally {
    await gw.close();
  }
});

test('chain: the first non-continue verdict ends the stage; accept drops a milter for the message; unimplemented stages are never called', async () => {
  const calls: string[] = [];
  const first: Milter = defineMilter({
    name: 'first',
    async rcpt(_ctx, rcpt) {
      calls.push(`first.rcpt ${rcpt.address}`);
      if (rcpt.address.startsWith('vip@')) return accept();
    },
    async eom() {
      calls.push('first.eom');
    },
  });
  const second: Milter = defineMilter({
    name: 'second',
    async rcpt(_ctx, rcpt) {
      calls.push(`second.rcpt ${rcpt.address}`);
      if (rcpt.address.startsWith('x@')) return reject(550, '5.1.1', 'no x');
    },
    async eom() {
      calls.push('second.eom');
    },
  });
  const gw = await startGateway({ milters: [first, second] });
  try {
    const c = await ehlo(gw.port);
    const r = await send(c, 'a@sender.test', ['x@example.test', 'vip@example.test', 'y@example.test'], message());
    assert.deepEqual(r.rcpt.map((x) => x.code), [550, 250, 250]);
    assert.equal(r.data?.code, 250);
    assert.deepEqual(calls, [
      'first.rcpt x@example.test',
      'second.rcpt x@example.test',
      'first.rcpt vip@example.test',
      // first accepted: it is out of this message; second still runs
      'second.rcpt vip@example.test',
      'second.rcpt y@example.test',
      'second.eom',
    ]);
    c.end();
  } finally {
    await gw.close();
  }
});

test('accept at connect drops the milter for the whole session', async () => {
  const calls: string[] = [];
  const gw = await startGateway({
    milters: [
      defineMilter({
        name: 'trusting',
        async connect() {
          calls.push('connect');
          return accept();
        },
        async mail() {
          calls.push('mail');
          return reject();
        },
      }),
    ],
  });
  try {
    const c = await ehlo(gw.port);
    for (let i = 0; i < 2; i++) {
      const r = await send(c, 'a@sender.test', ['bob@example.test'], message());
      assert.equal(r.data?.code, 250);
    }
    assert.deepEqual(calls, ['connect']);
    c.end();
  } finally {
    await gw.close();
  }
});
