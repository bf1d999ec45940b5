import { test } from 'node:test';
import assert from 'node:assert/strict';
import { text } from 'node:stream/consumers';
import { EditRecorder, formatHeader, MessageState, parseEsmtpArgs, type StoredHeader } from '../../lib/milter/message.js';
import { ErrorCodes, DovetailError } from '../../lib/index.js';

function state(names: [string, string][], body = 'body\r\n'): MessageState {
  const buf = Buffer.from(body);
  return new MessageState({
    headers: names.map(([n, v]) => formatHeader(n, v)),
    body: { size: buf.length, stream: () => (async function* () { yield buf; })() as never },
    sender: { address: 's@x.test', args: {} },
    recipients: [{ address: 'a@x.test', args: {} }],
  });
}
const names = (s: MessageState) => s.headers.map((h: StoredHeader) => `${h.name}: ${h.value}`);

test('insert positions are 1-based and clamp to the end', async () => {
  const s = state([['A', '1'], ['B', '2']]);
  const r = new EditRecorder();
  r.insertHeader(1, 'Top', 't');
  r.insertHeader(3, 'Mid', 'm');
  r.insertHeader(100, 'End', 'e');
  await s.apply(r.edits, {});
  assert.deepEqual(names(s), ['Top: t', 'A: 1', 'Mid: m', 'B: 2', 'End: e']);
});

test('change/delete use the 1-based index among headers of that name, case-insensitively', async () => {
  const s = state([['X', '1'], ['Y', 'y'], ['x', '2'], ['X', '3']]);
  const r = new EditRecorder();
  r.changeHeader('x', 2, 'two');
  r.deleteHeader('X', 1);
  r.deleteHeader('X', 9);
  r.changeHeader('Z', 1, 'added');
  await s.apply(r.edits, {});
  assert.deepEqual(names(s), ['Y: y', 'x: two', 'X: 3', 'Z: added']);
});

test('edits apply in the order they were made (a delete then an index sees the shifted list)', async () => {
  const s = state([['X', '1'], ['X', '2'], ['X', '3']]);
  const r = new EditRecorder();
  r.deleteHeader('X', 1);
  r.deleteHeader('X', 1);
  await s.apply(r.edits, {});
  assert.deepEqual(names(s), ['X: 3']);
});

test('invalid edits throw INVALID_EDIT when made', () => {
  const r = new EditRecorder();
  const codeOf = (fn: () => void) => {
    try {
      fn();
    } catch (e) {
      return (e as DovetailError).code;
    }
    return undefined;
  };
  assert.equal(codeOf(() => r.addHeader('Bad:Name', 'x')), ErrorCodes.INVALID_EDIT);
  assert.equal(codeOf(() => r.addHeader('', 'x')), ErrorCodes.INVALID_EDIT);
  assert.equal(codeOf(() => r.insertHeader(0, 'A', 'x')), ErrorCodes.INVALID_EDIT);
  assert.equal(codeOf(() => r.changeHeader('A', 1.5, 'x')), ErrorCodes.INVALID_EDIT);
  assert.equal(codeOf(() => r.addRecipient('a b@x.test')), ErrorCodes.INVALID_EDIT);
  assert.equal(codeOf(() => r.addRecipient('')), ErrorCodes.INVALID_EDIT);
  assert.equal(codeOf(() => r.addRecipient('x@y.test\r\nRCPT TO:<z@y.test>')), ErrorCodes.INVALID_EDIT);
  assert.equal(codeOf(() => r.changeSender('<>')), undefined, 'the null sender is allowed');
  assert.equal(codeOf(() => r.quarantine('  ')), ErrorCodes.INVALID_EDIT);
  assert.equal(r.edits.length, 1);
});

test('ESMTP args parse into upper-case keys', () => {
  assert.deepEqual(parseEsmtpArgs('size=100 BODY=8BITMIME SMTPUTF8'), { SIZE: '100', BODY: '8BITMIME', SMTPUTF8: true });
});

test('formatHeader folds lines over 998 octets and keeps short ones as given', () => {
  assert.equal(formatHeader('Subject', 'hi').raw.toString(), 'Subject: hi\r\n');
  const long = formatHeader('X-Long', Array(300).fill('word').join(' ')).raw.toString();
  assert.ok(long.split('\r\n').every((l) => l.length <= 998));
  assert.ok(/\r\n[ \t]/.test(long));
  assert.equal(long.replace(/\r\n[ \t]/g, ' ').replace(/ +/g, ' '), `X-Long: ${Array(300).fill('word').join(' ')}\r\n`);
});

test('the envelope edits: change sender, add (deduplicated) and remove recipients', async () => {
  const s = state([]);
  const r = new EditRecorder();
  r.changeSender('<new@x.test>', 'BODY=8BITMIME');
  r.addRecipient('B@x.test');
  r.addRecipient('b@X.test');
  r.removeRecipient('A@X.TEST');
  await s.apply(r.edits, {});
  assert.deepEqual(s.sender, { address: 'new@x.test', args: { BODY: '8BITMIME' } });
  assert.deepEqual(s.recipients.map((x) => x.address), ['B@x.test']);
  assert.equal(await text(s.stream()), '\r\nbody\r\n');
});
