/**
 * The pure parts of the address-rewriting milters: the aliases(5) parser (comments,
 * continuation lines, quoting, the lines it refuses), the recursive expansion with its loop
 * detection and limits, recipient-delimiter splitting, and the header address scanner of
 * masquerade().
 */
import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { AliasSyntaxError, expandAddress, ExpansionError, parseAliases, splitExtension, type Lookup } from '../../milters/address-maps.js';
import { rewriteHeaderAddresses } from '../../milters/masquerade.js';

const entries = (text: string) => Object.fromEntries(parseAliases(text));

describe('parseAliases (the /etc/aliases format)', () => {
  it('name: targets, comments, blank lines, continuation lines, CRLF, a BOM', () => {
    const text = [
      '\uFEFF# /etc/aliases',
      '',
      'postmaster:    root',
      'Team: alice, Bob@Example.ORG,',
      '\tcarol,',
      '   # a comment inside a continued entry',
      '',
      '  dave',
      '   ',
      'root: \\root, admin   ',
      '"odd name: #1": alice',
      'quoted: "|not a pipe"@example.com, <angle@example.com>',
    ].join('\r\n');
    assert.deepEqual(entries(text), {
      postmaster: [{ kind: 'local', name: 'root', final: false }],
      team: [
        { kind: 'local', name: 'alice', final: false },
        { kind: 'address', address: 'Bob@Example.ORG' },
        { kind: 'local', name: 'carol', final: false },
        { kind: 'local', name: 'dave', final: false },
      ],
      root: [
        { kind: 'local', name: 'root', final: true },
        { kind: 'local', name: 'admin', final: false },
      ],
      'odd name: #1': [{ kind: 'local', name: 'alice', final: false }],
      quoted: [
        { kind: 'address', address: '"|not a pipe"@example.com' },
        { kind: 'address', address: 'angle@example.com' },
      ],
    });
  });

  it('an empty table, or one of comments only, is empty', () => {
    assert.equal(parseAliases('').size, 0);
    assert.equal(parseAliases('# nothing\n\n   # here\n').size, 0);
  });

  it('refuses bad lines with their line number', () => {
    const cases: [string, number, RegExp][] = [
      ['a: b\nno colon here\n', 2, /expected "name: address/],
      [' starts: indented\n', 1, /continuation line .* no entry before it/],
      ['a: b\nA: c\n', 2, /defined twice/],
      ['a:\n', 1, /no addresses/],
      ['a:   \n  \n', 1, /no addresses/],
      [': b\n', 1, /empty alias name/],
      ['a@example.com: b\n', 1, /has a domain/],
      ['a: b,,c\n', 1, /empty address/],
      ['a: b c\n', 1, /"b c" is not an address/],
      ['log: |/usr/bin/logger -t mail\n', 1, /command/],
      ['log: "|/usr/bin/logger"\n', 1, /command/],
      ['list: :include:/etc/mail/list\n', 1, /:include:/],
      ['file: /var/spool/mail/archive\n', 1, /file/],
      ['a: \\b@example.com\n', 1, /backslash applies to local names only/],
      ['a: b@not_a..domain\n', 1, /not a domain name/],
      ['a: @example.com\n', 1, /empty local part/],
      ['# ok\n\n\nx: y\ny: \u0001\n', 5, /is not an address/],
    ];
    for (const [text, line, why] of cases) {
      assert.throws(
        () => parseAliases(text, '/etc/aliases'),
        (err: unknown) => {
          assert.ok(err instanceof AliasSyntaxError, String(err));
          assert.equal(err.line, line, `${JSON.stringify(text)}: ${err.message}`);
          assert.match(err.message, why);
          assert.ok(err.message.startsWith(`/etc/aliases, line ${line}: `), err.message);
          return true;
        },
      );
    }
  });
});

describe('expandAddress', () => {
  /** A lookup over a plain table of lower-cased addresses. */
  const table = (t: Record<string, string[]>, finals: string[] = []): Lookup => (a) =>
    t[a.toLowerCase()]?.map((address) => ({ address, final: finals.includes(address) }));
  const limits = { recursion: 20, expansion: 1000 };

  it('an address without an entry is itself', () => {
    assert.deepEqual(expandAddress('a@x', table({}), limits), ['a@x']);
  });

  it('recursive, de-duplicated case-insensitively, in order of first appearance', () => {
    const t = table({ 'all@x': ['team@x', 'carol@x', 'ALICE@x'], 'team@x': ['alice@x', 'bob@x'] });
    assert.deepEqual(expandAddress('all@x', t, limits), ['alice@x', 'bob@x', 'carol@x']);
  });

  it('a target equal to its key, or to an address on the way, is kept and not expanded again', () => {
    assert.deepEqual(expandAddress('a@x', table({ 'a@x': ['A@x', 'b@x'] }), limits), ['A@x', 'b@x']);
    assert.deepEqual(expandAddress('a@x', table({ 'a@x': ['b@x'], 'b@x': ['c@x'], 'c@x': ['a@x', 'd@x'] }), limits), ['a@x', 'd@x']);
    // Not a loop: the same address reached by two paths is expanded on each (and kept once).
    assert.deepEqual(expandAddress('a@x', table({ 'a@x': ['b@x', 'c@x'], 'b@x': ['d@x'], 'c@x': ['d@x'], 'd@x': ['e@x'] }), limits), ['e@x']);
  });

  it('a final target is kept as is', () => {
    assert.deepEqual(expandAddress('a@x', table({ 'a@x': ['b@x'], 'b@x': ['c@x'] }, ['b@x']), limits), ['b@x']);
  });

  it('gives up past the recursion limit and the expansion limit', () => {
    const chain: Record<string, string[]> = {};
    for (let i = 0; i < 30; i++) chain[`a${i}@x`] = [`a${i + 1}@x`];
    assert.deepEqual(expandAddress('a10@x', table(chain), limits), ['a30@x']);
    assert.throws(() => expandAddress('a0@x', table(chain), limits), (e: unknown) => e instanceof ExpansionError && e.reason === 'recursion');
    assert.deepEqual(expandAddress('a0@x', table(chain), { recursion: 30, expansion: 10 }), ['a30@x']);
    const wide = table({ 'w@x': ['1@x', '2@x', '3@x'] });
    assert.deepEqual(expandAddress('w@x', wide, { recursion: 5, expansion: 3 }), ['1@x', '2@x', '3@x']);
    assert.throws(() => expandAddress('w@x', wide, { recursion: 5, expansion: 2 }), (e: unknown) => e instanceof ExpansionError && e.reason === 'expansion');
  });

  it('a tree that re-uses wide aliases at every level ends quickly (lookup budget)', () => {
    const t: Record<string, string[]> = {};
    for (let i = 0; i < 19; i++) t[`l${i}@x`] = Array.from({ length: 10 }, () => `l${i + 1}@x`).map((a, k) => (k === 0 ? a : a.replace('@', `+${k}@`)));
    for (let i = 0; i < 19; i++) for (let k = 1; k < 10; k++) t[`l${i + 1}+${k}@x`] = [`l${i + 1}@x`];
    const started = Date.now();
    assert.throws(() => expandAddress('l0@x', table(t), limits), ExpansionError);
    assert.ok(Date.now() - started < 2000);
  });
});

describe('splitExtension (recipient_delimiter)', () => {
  it('splits at the first delimiter that is not the first character', () => {
    assert.deepEqual(splitExtension('bob+tag', '+'), { base: 'bob', delimiter: '+', extension: 'tag' });
    assert.deepEqual(splitExtension('bob+a+b', '+'), { base: 'bob', delimiter: '+', extension: 'a+b' });
    assert.deepEqual(splitExtension('bob-list+x', '+-'), { base: 'bob', delimiter: '-', extension: 'list+x' });
    assert.deepEqual(splitExtension('bob+', '+'), { base: 'bob', delimiter: '+', extension: '' });
    assert.equal(splitExtension('+bob', '+'), undefined);
    assert.equal(splitExtension('bob', '+'), undefined);
    assert.equal(splitExtension('bob+tag', undefined), undefined);
  });
});

describe('rewriteHeaderAddresses (masquerade)', () => {
  const toExample = (_l: string, d: string): string | undefined => (d.toLowerCase().endsWith('.example.com') ? 'example.com' : undefined);
  it('rewrites addr-specs only', () => {
    const cases: [string, string][] = [
      ['alice@host.example.com', 'alice@example.com'],
      ['Alice <alice@host.example.com>', 'Alice <alice@example.com>'],
      ['"a@host.example.com" <b@host.example.com>', '"a@host.example.com" <b@example.com>'],
      ['b@host.example.com (c@host.example.com)', 'b@example.com (c@host.example.com)'],
      ['(nested (x@host.example.com) \\) y@host.example.com) z@host.example.com', '(nested (x@host.example.com) \\) y@host.example.com) z@example.com'],
      ['"quoted local"@host.example.com', '"quoted local"@example.com'],
      ['list: a@host.example.com, b@other.org;', 'list: a@example.com, b@other.org;'],
      ['<@route.example.com,@r2.example.com:u@host.example.com>', '<@route.example.com,@r2.example.com:u@example.com>'],
      ['=?utf-8?Q?J=C3=B6rg?= <j@Host.Example.COM>', '=?utf-8?Q?J=C3=B6rg?= <j@example.com>'],
      ['folded\r\n <f@host.example.com>', 'folded\r\n <f@example.com>'],
      ['no addresses here', 'no addresses here'],
      ['trailing@host.example.com.', 'trailing@example.com.'],
    ];
    for (const [input, want] of cases) assert.equal(rewriteHeaderAddresses(input, toExample), want, input);
  });
});
