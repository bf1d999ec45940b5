/**
 * The config file's pure parts: the schema's error wording (path, expectation, what was
 * given) and the Postfix table parser used for map files.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { checkConfig, formatPath } from '../../lib/cli/schema.js';
import { parseTable } from '../../lib/cli/tables.js';

const problems = (c: unknown): string[] => checkConfig(c).problems.map((p) => `${p.path}: ${p.message}`);

test('formatPath: dots for identifiers, brackets for indexes and other keys', () => {
  assert.equal(formatPath(['listen', 1, 'port']), 'listen[1].port');
  assert.equal(formatPath(['delivery', 'routes', 'example.com', 'lmtp']), 'delivery.routes["example.com"].lmtp');
  assert.equal(formatPath([]), '(config)');
});

test('checkConfig: a minimal config is valid; what is wrong is named with what was given', () => {
  assert.deepEqual(problems({ delivery: { maildir: '/srv/mail' } }), []);
  assert.deepEqual(problems(null), ['(config): expected the config object, got null']);
  assert.deepEqual(problems([]), ['(config): expected the config object, got []']);
  assert.deepEqual(problems({ delivery: { maildir: '/m' }, listen: [{ port: 1.5 }] }), ['listen[0].port: expected an integer 0..65535, got 1.5']);
  assert.deepEqual(problems({ delivery: { maildir: '/m' }, listen: [] }), ['listen: expected at least one listener, got []']);
  assert.deepEqual(problems({ delivery: { maildir: '/m' }, tls: { key: 'k' } }), ['tls.cert: expected a string (missing)']);
  assert.deepEqual(problems({ delivery: { lmtp: 'nohost' } }), ['delivery.lmtp: expected a socket address ("host:port", "inet:host:port" or "unix:/path"), got "nohost"']);
  assert.deepEqual(problems({ delivery: { routes: { a: { lmtp: 'x:1', maildir: '/m' } } } }), ['delivery.routes.a: expected exactly one of lmtp, maildir, smtp, store, got lmtp, maildir']);
  assert.deepEqual(problems({ delivery: { smtp: { relayhost: 'x', tls: 'maybe' } } }), ['delivery.smtp.tls: expected "none", "may", "encrypt", "verify" or { level, ca?, servername? }, got "maybe"']);
  assert.deepEqual(problems({ delivery: { maildir: '/m' }, milters: [{ use: 'dkimSign', keys: [] }] }), ['milters[0].keys: expected at least one key, got []']);
  assert.deepEqual(problems({ delivery: { maildir: '/m' }, milters: [{ connect: 'inet:127.0.0.1:1', defaultAction: 'shrug' }] }), [
    'milters[0].defaultAction: expected "tempfail", "accept", "reject" or "quarantine", got "shrug"',
  ]);
  assert.deepEqual(problems({ delivery: { maildir: '/m' }, milters: [{ use: 'relocated', map: { a: 1 } }] }), ['milters[0].map.a: expected a string or a list of strings, got 1']);
});

test('parseTable: postmap input format, continuation lines, comments; errors name the line', () => {
  const text = '# virtual\ninfo@example.com  alice@example.com,\n    bob@example.com\n\n@example.org carol@example.com\n';
  assert.deepEqual(parseTable(text, 'virtual', true), { 'info@example.com': ['alice@example.com', 'bob@example.com'], '@example.org': ['carol@example.com'] });
  assert.deepEqual(parseTable('old@example.com new@example.net please\n', 'relocated', false), { 'old@example.com': 'new@example.net please' });
  assert.throws(() => parseTable('a b\nlonely\n', 't', true), /t, line 2: expected "key value"/);
  assert.throws(() => parseTable('a b\na c\n', 't', true), /t, line 2: a is given twice/);
  // A key named like an Object.prototype member is an ordinary key.
  assert.deepEqual(parseTable('__proto__ x\nconstructor y\n', 't', false), { ['__proto__']: 'x', constructor: 'y' });
});
