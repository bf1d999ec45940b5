import { test } from 'node:test';
import assert from 'node:assert/strict';
import { parseSocketSpec } from '../../../lib/milter/protocol/socket.js';
import { ErrorCodes } from '../../../lib/index.js';

test('socket specs: Postfix and Sendmail spellings', () => {
  assert.deepEqual(parseSocketSpec('inet:127.0.0.1:8891'), { kind: 'inet', host: '127.0.0.1', port: 8891 });
  assert.deepEqual(parseSocketSpec('inet:8891@127.0.0.1'), { kind: 'inet', host: '127.0.0.1', port: 8891 });
  assert.deepEqual(parseSocketSpec('inet6:8891@[::1]'), { kind: 'inet', host: '::1', port: 8891 });
  assert.deepEqual(parseSocketSpec('inet:[::1]:8891'), { kind: 'inet', host: '::1', port: 8891 });
  assert.deepEqual(parseSocketSpec('inet:localhost:11332'), { kind: 'inet', host: 'localhost', port: 11332 });
  assert.deepEqual(parseSocketSpec('inet:8891'), { kind: 'inet', host: undefined, port: 8891 });
  assert.deepEqual(parseSocketSpec('unix:/run/milter.sock'), { kind: 'unix', path: '/run/milter.sock' });
  assert.deepEqual(parseSocketSpec('local:/run/milter.sock'), { kind: 'unix', path: '/run/milter.sock' });
  for (const bad of ['', 'inet:', 'inet:host:99999', 'tcp:1.2.3.4:5', 'unix:', 'inet:::1:25', '8891', 'inet:@host']) {
    assert.throws(() => parseSocketSpec(bad), (e: { code?: string }) => e.code === ErrorCodes.INVALID_OPTIONS, bad);
  }
});
