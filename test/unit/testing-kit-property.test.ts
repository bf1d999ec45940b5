/**
 * dovetail/testing under arbitrary input (fast-check): whatever bytes a test hands it as
 * the message, and whatever a milter does with them at eom, runMilter() resolves — with the
 * message accepted (the gateway's Received header first, the body bytes kept) or refused
 * with one of the gateway's defined replies — and never throws or hangs.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import { defineMilter } from '../../lib/index.js';
import { runMilter } from '../../lib/testing/index.js';

const REFUSALS = new Set([
  '550 5.5.2 Error: bare <CR> or <LF> in message data (RFC 5321 2.3.8)',
  '552 5.3.4 Error: message header too big',
  '554 5.6.0 Error: message has a line longer than 200 bytes',
  '552 5.3.4 Error: message size exceeds the 1500-byte limit of localhost',
  '554 5.4.6 Error: too many hops (mail forwarding loop)',
]);

/** Bytes biased towards what matters to the parser: CR, LF, colons, spaces, dots, header names. */
const messageBytes = fc
  .array(
    fc.oneof(
      fc.constantFrom('\r\n', '\r', '\n', ':', ' ', '\t', '.', 'Subject: x', 'Received: y', '\r\n\r\n', 'é'),
      fc.string({ maxLength: 40 }),
    ),
    { maxLength: 60 },
  )
  .map((parts) => Buffer.from(parts.join(''), 'utf8'));

const editor = defineMilter({
  name: 'editor',
  async eom(ctx) {
    const n = ctx.headers.length;
    ctx.message.addHeader('X-Count', String(n));
    if (n > 1) ctx.message.changeHeader(ctx.headers[1]!.name, 1, 'changed');
  },
});

test('any message bytes: a defined reply, never a throw', async () => {
  await fc.assert(
    fc.asyncProperty(messageBytes, async (bytes) => {
      const r = await runMilter(editor, {
        from: 'a@example.net',
        to: 'b@example.com',
        message: bytes,
        maxMessageBytes: 1500,
        maxHeaderBytes: 400,
        maxLineBytes: 200,
        maxHops: 3,
      });
      const reply = r.verdict.reply ? `${r.verdict.reply.code} ${r.verdict.reply.enhanced} ${r.verdict.reply.lines.join(' ')}` : '';
      if (r.verdict.type === 'continue') {
        assert.equal(r.verdict.stage, 'eom');
        assert.match(reply, /^250 2\.6\.0 Ok: queued as [0-9A-Z]{12}$/);
        const out = r.message!;
        assert.ok(out.subarray(0, 10).equals(Buffer.from('Received: ')), out.toString('latin1'));
        assert.ok(/\r\nX-Count: \d+\r\n/.test(out.toString('latin1')));
        assert.ok(out.length >= bytes.length);
        // No bare line ending survives into the message handed on.
        assert.doesNotMatch(out.toString('latin1'), /\r(?!\n)|(?<!\r)\n/);
      } else {
        assert.ok(REFUSALS.has(reply), reply);
        assert.equal(r.message, undefined);
      }
    }),
    { numRuns: 300 },
  );
});
