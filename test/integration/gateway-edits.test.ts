/**
 * Each end-of-message edit, as seen in the stored message; and the chain's rule that each
 * milter sees the edits of the milters before it.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { Readable } from 'node:stream';
import { defineMilter, type HeaderField } from '../../lib/index.js';
import { ehlo, send, split, startGateway, stored } from '../helpers/smtp.js';

const MSG =
  'Received: from relay.sender.test by mx.sender.test; Sun, 22 Nov 2026 08:00:00 +0000\r\n' +
  'From: Alice <alice@sender.test>\r\n' +
  'To: Bob <bob@example.test>\r\n' +
  'Subject: first\r\n' +
  'X-Internal: one\r\n' +
  'Subject: second\r\n' +
  'X-Internal: two\r\n' +
  '\r\n' +
  'Original body.\r\n';

async function deliverWith(eom: Parameters<typeof defineMilter>[0]['eom'], rcpts = ['bob@example.test']) {
  const gw = await startGateway({ milters: [defineMilter({ name: 'editor', ...(eom ? { eom } : {}) })] });
  const c = await ehlo(gw.port);
  const r = await send(c, 'alice@sender.test', rcpts, MSG);
  c.end();
  return { gw, r };
}

function headerLines(msg: Buffer): string[] {
  // The whole header block (maildir's Return-Path and Delivered-To first), unfold nothing.
  return split(msg).headers.split(/\r\n(?![ \t])/).filter(Boolean);
}

test('addHeader appends at the end of the header block', async () => {
  const { gw, r } = await deliverWith(async (ctx) => ctx.message.addHeader('X-Checked', 'yes'));
  try {
    assert.equal(r.data?.code, 250);
    const [m] = await stored(gw.root, 'bob@example.test');
    const lines = headerLines(m!);
    assert.equal(lines.at(-1), 'X-Checked: yes');
    assert.equal(lines.at(-2), 'X-Internal: two');
    assert.equal(split(m!).body.toString(), 'Original body.\r\n');
  } finally {
    await gw.close();
  }
});

test('insertHeader(1) puts a header first (before our Received); a position past the end appends', async () => {
  const { gw } = await deliverWith(async (ctx) => {
    ctx.message.insertHeader(1, 'X-First', 'yes');
    ctx.message.insertHeader(3, 'X-Third', 'yes');
    ctx.message.insertHeader(999, 'X-Last', 'yes');
  });
  try {
    const [m] = await stored(gw.root, 'bob@example.test');
    const lines = headerLines(m!);
    assert.equal(lines[0], 'Return-Path: <alice@sender.test>');
    assert.equal(lines[1], 'Delivered-To: bob@example.test');
    assert.equal(lines[2], 'X-First: yes');
    assert.match(lines[3]!, /^Received: from client\.example\.test/);
    assert.equal(lines[4], 'X-Third: yes');
    assert.match(lines[5]!, /^Received: from relay\.sender\.test/);
    assert.equal(lines.at(-1), 'X-Last: yes');
  } finally {
    await gw.close();
  }
});

test('changeHeader changes the n-th header of that name (case-insensitive); past the last it adds one', async () => {
  const { gw } = await deliverWith(async (ctx) => {
    ctx.message.changeHeader('subject', 2, '[ext] second');
    ctx.message.changeHeader('X-New', 1, 'added');
  });
  try {
    const [m] = await stored(gw.root, 'bob@example.test');
    const lines = headerLines(m!);
    assert.ok(lines.includes('Subject: first'));
    assert.ok(lines.includes('Subject: [ext] second'));
    assert.ok(!lines.includes('Subject: second'));
    assert.equal(lines.at(-1), 'X-New: added');
  } finally {
    await gw.close();
  }
});

test('deleteHeader removes the n-th header of that name only; a missing index does nothing', async () => {
  const { gw } = await deliverWith(async (ctx) => {
    ctx.message.deleteHeader('X-Internal', 1);
    ctx.message.deleteHeader('X-Nothing', 1);
  });
  try {
    const [m] = await stored(gw.root, 'bob@example.test');
    const lines = headerLines(m!);
    assert.ok(!lines.includes('X-Internal: one'));
    assert.ok(lines.includes('X-Internal: two'));
  } finally {
    await gw.close();
  }
});

test('a multi-line value is folded with white space, never injecting a header or ending the block', async () => {
  const { gw } = await deliverWith(async (ctx) => {
    ctx.message.addHeader('X-Multi', 'line one\nInjected: yes\n\nline three');
  });
  try {
    const [m] = await stored(gw.root, 'bob@example.test');
    const { headers, body } = split(m!);
    assert.ok(headers.includes('X-Multi: line one\r\n\tInjected: yes\r\n\tline three\r\n'));
    assert.ok(!/\r\nInjected:/.test(headers));
    assert.equal(body.toString(), 'Original body.\r\n');
  } finally {
    await gw.close();
  }
});

test('replaceBody: a string (LF ends become CRLF), and several calls concatenate', async () => {
  const { gw } = await deliverWith(async (ctx) => {
    ctx.message.replaceBody('New body\nline two\n');
    ctx.message.replaceBody(Buffer.from('more\r\n'));
    ctx.message.replaceBody(Readable.from([Buffer.from('from a '), Buffer.from('stream\r')]));
  });
  try {
    const [m] = await stored(gw.root, 'bob@example.test');
    assert.equal(split(m!).body.toString(), 'New body\r\nline two\r\nmore\r\nfrom a stream\r\n');
  } finally {
    await gw.close();
  }
});

test('changeSender sets the envelope sender the store sees (Return-Path)', async () => {
  const { gw } = await deliverWith(async (ctx) => ctx.envelope.changeSender('<bounce@example.test>', 'BODY=8BITMIME'));
  try {
    const [m] = await stored(gw.root, 'bob@example.test');
    assert.match(m!.toString(), /^Return-Path: <bounce@example\.test>\r\n/);
  } finally {
    await gw.close();
  }
});

test('addRecipient and removeRecipient change who gets the message', async () => {
  const { gw, r } = await deliverWith(
    async (ctx) => {
      ctx.envelope.addRecipient('archive@example.test');
      ctx.envelope.removeRecipient('OLD@example.test');
    },
    ['bob@example.test', 'old@example.test'],
  );
  try {
    assert.equal(r.data?.code, 250);
    assert.equal((await stored(gw.root, 'bob@example.test')).length, 1);
    assert.equal((await stored(gw.root, 'archive@example.test')).length, 1);
    assert.equal((await stored(gw.root, 'old@example.test')).length, 0);
  } finally {
    await gw.close();
  }
});

test('removing every recipient refuses the message instead of acknowledging it into nowhere', async () => {
  const { gw, r } = await deliverWith(async (ctx) => ctx.envelope.removeRecipient('bob@example.test'));
  try {
    assert.equal(r.data?.text, '554 5.5.1 Error: no valid recipients');
  } finally {
    await gw.close();
  }
});

test('a malformed edit makes the milter fail: its default action applies and nothing is half-applied', async () => {
  const { gw, r } = await deliverWith(async (ctx) => {
    ctx.message.addHeader('X-Fine', 'yes');
    ctx.message.addHeader('Bad Name', 'x');
  });
  try {
    assert.equal(r.data?.text, '451 4.7.1 Service unavailable - try again later');
    assert.deepEqual(await stored(gw.root, 'bob@example.test'), []);
  } finally {
    await gw.close();
  }
});

test('each milter sees the edits of those before it: headers, body, envelope, and the score', async () => {
  const seenBySecond: { headers: HeaderField[]; body: string; recipients: string[]; score: number } = {
    headers: [],
    body: '',
    recipients: [],
    score: 0,
  };
  const first = defineMilter({
    name: 'first',
    async eom(ctx) {
      ctx.message.changeHeader('Subject', 1, 'edited by first');
      ctx.message.replaceBody('first body\r\n');
      ctx.envelope.addRecipient('extra@example.test');
      ctx.score.add(2.5, 'FIRST_RULE');
    },
  });
  const second = defineMilter({
    name: 'second',
    async header(ctx, h) {
      seenBySecond.headers.push(h);
    },
    async body(_ctx, chunk) {
      seenBySecond.body += chunk.toString();
    },
    async eom(ctx) {
      seenBySecond.recipients = ctx.envelope.recipients.map((r) => r.address);
      seenBySecond.score = ctx.score.total;
      ctx.message.addHeader('X-Score', String(ctx.score.total));
    },
  });
  const gw = await startGateway({ milters: [first, second] });
  try {
    const c = await ehlo(gw.port);
    const r = await send(c, 'alice@sender.test', ['bob@example.test'], MSG);
    c.end();
    assert.equal(r.data?.code, 250);
    assert.equal(seenBySecond.headers.find((h) => h.name === 'Subject')?.value, 'edited by first');
    assert.equal(seenBySecond.body, 'first body\r\n');
    assert.deepEqual(seenBySecond.recipients, ['bob@example.test', 'extra@example.test']);
    assert.equal(seenBySecond.score, 2.5);
    const [m] = await stored(gw.root, 'extra@example.test');
    assert.match(m!.toString(), /\r\nX-Score: 2\.5\r\n\r\nfirst body\r\n$/);
  } finally {
    await gw.close();
  }
});
