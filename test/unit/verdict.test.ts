import { test } from 'node:test';
import assert from 'node:assert/strict';
import { formatReply, reject, smtpReply, tempfail, ErrorCodes, DovetailError } from '../../lib/index.js';
import { toVerdict } from '../../lib/milter/verdict.js';

const code = (fn: () => unknown): string | undefined => {
  try {
    fn();
  } catch (err) {
    return err instanceof DovetailError ? err.code : 'other';
  }
  return undefined;
};

test('reject and tempfail defaults are Postfix’s replies', () => {
  assert.equal(formatReply(reject().reply), '550 5.7.1 Command rejected');
  assert.equal(formatReply(tempfail().reply), '451 4.7.1 Service unavailable - try again later');
});

test('multi-line replies: continuation marks on every line but the last, enhanced code on each', () => {
  const r = reject(550, '5.7.1', ['one', 'two', 'three']);
  assert.equal(formatReply(r.reply), '550-5.7.1 one\r\n550-5.7.1 two\r\n550 5.7.1 three');
  assert.deepEqual(reject(550, '5.7.1', 'a\nb').reply.lines, ['a', 'b']);
});

test('reply rules: class must match, enhanced code must match the class, at most 32 lines, no control characters', () => {
  assert.equal(code(() => reject(450, '4.7.1', 'x')), ErrorCodes.INVALID_REPLY);
  assert.equal(code(() => tempfail(550, '5.7.1', 'x')), ErrorCodes.INVALID_REPLY);
  assert.equal(code(() => reject(550, '4.7.1', 'x')), ErrorCodes.INVALID_REPLY);
  assert.equal(code(() => reject(550, '5.7', 'x')), ErrorCodes.INVALID_REPLY);
  assert.equal(code(() => reject(550, '5.7.1', Array(33).fill('x'))), ErrorCodes.INVALID_REPLY);
  assert.equal(code(() => reject(550, '5.7.1', Array(32).fill('x'))), undefined);
  assert.equal(code(() => reject(550, '5.7.1', 'tab\there')), ErrorCodes.INVALID_REPLY);
  assert.equal(code(() => reject(550, '5.7.1', 'x'.repeat(497))), ErrorCodes.INVALID_REPLY);
  assert.equal(code(() => smtpReply(99, '2.0.0', 'x')), ErrorCodes.INVALID_REPLY);
});

test('toVerdict: nothing is continue; a non-verdict or a reject without a valid reply is refused', () => {
  assert.equal(toVerdict(undefined).type, 'continue');
  assert.equal(code(() => toVerdict('reject')), ErrorCodes.INVALID_VERDICT);
  assert.equal(code(() => toVerdict({ type: 'reject' })), ErrorCodes.INVALID_VERDICT);
  assert.equal(code(() => toVerdict({ type: 'reject', reply: { code: 450, enhanced: '4.0.0', lines: ['x'] } })), ErrorCodes.INVALID_VERDICT);
  assert.equal(toVerdict({ type: 'tempfail', reply: { code: 450, enhanced: '4.0.0', lines: ['x'] } }).type, 'tempfail');
});
