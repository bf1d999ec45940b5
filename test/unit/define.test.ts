import { test } from 'node:test';
import assert from 'node:assert/strict';
import { defineMilter, ErrorCodes, MilterChain, type Milter } from '../../lib/index.js';

const codeOf = (fn: () => unknown) => {
  try {
    fn();
  } catch (e) {
    return (e as { code?: string }).code;
  }
  return undefined;
};

test('milters are checked when registered', () => {
  assert.equal(codeOf(() => defineMilter({ name: '' })), ErrorCodes.INVALID_MILTER);
  assert.equal(codeOf(() => defineMilter({ name: 'x', rcpt: 'no' } as unknown as Milter)), ErrorCodes.INVALID_MILTER);
  assert.equal(codeOf(() => defineMilter({ name: 'x', recpt: async () => undefined } as unknown as Milter)), ErrorCodes.INVALID_MILTER, 'a misspelt stage');
  assert.equal(codeOf(() => defineMilter({ name: 'x', defaultAction: 'ignore' } as unknown as Milter)), ErrorCodes.INVALID_MILTER);
  assert.equal(codeOf(() => defineMilter({ name: 'x', timeouts: { command: -1 } })), ErrorCodes.INVALID_MILTER);
  assert.equal(codeOf(() => new MilterChain([{ name: 'a' }, { name: 'a' }])), ErrorCodes.INVALID_MILTER, 'names are unique');
  assert.equal(codeOf(() => defineMilter({ name: 'ok', extra: 1, timeouts: { content: 5 } } as Milter)), undefined);
  // needs: an object of booleans, headers and body only.
  assert.equal(codeOf(() => defineMilter({ name: 'n', needs: { headers: false, body: true }, async eom() {} })), undefined);
  assert.equal(codeOf(() => defineMilter({ name: 'n', needs: {} })), undefined);
  assert.equal(codeOf(() => defineMilter({ name: 'n', needs: 'headers' } as unknown as Milter)), ErrorCodes.INVALID_MILTER);
  assert.equal(codeOf(() => defineMilter({ name: 'n', needs: null } as unknown as Milter)), ErrorCodes.INVALID_MILTER);
  assert.equal(codeOf(() => defineMilter({ name: 'n', needs: { headers: 'no' } } as unknown as Milter)), ErrorCodes.INVALID_MILTER);
  assert.equal(codeOf(() => defineMilter({ name: 'n', needs: { header: false } } as unknown as Milter)), ErrorCodes.INVALID_MILTER, 'a misspelt need');
});
