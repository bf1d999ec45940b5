/**
 * aliases(), virtual() and relocated() through a running gateway over real SMTP, into the
 * embedded Maildir store (maildir() with recipientDelimiter '+', and createLmtpServer over
 * LMTP for recipient verification): what the client is told at RCPT and DATA, and which
 * mailboxes the message lands in, with which Delivered-To.
 */
import assert from 'node:assert/strict';
import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { after, before, describe, it } from 'node:test';
import { createLmtpServer, defineMilter, lmtp, maildir, type DeliveryEnvelope, type Milter, type Transport } from '../../lib/index.js';
import { aliases, relayControl, relocated, verifyWithMaps, virtual } from '../../milters/index.js';
import { ehlo, message, send, split, startGateway, stored, type TestGateway } from '../helpers/smtp.js';

let base: string;
let n = 0;
before(async () => {
  base = await fs.mkdtemp(path.join(os.tmpdir(), 'dovetail-aliases-'));
});
after(async () => {
  await fs.rm(base, { recursive: true, force: true });
});

/** A gateway with these milters delivering into a fresh maildir root (delimiter '+'). */
async function gateway(milters: readonly Milter[], extra: { verifyRecipients?: boolean; delivery?: Transport } = {}): Promise<TestGateway & { store: string }> {
  const store = path.join(base, `store${++n}`);
  await fs.mkdir(store);
  const gw = await startGateway({ milters, delivery: extra.delivery ?? maildir({ root: store, recipientDelimiter: '+' }), ...(extra.verifyRecipients ? { verifyRecipients: true } : {}) });
  return Object.assign(gw, { store });
}

/** Every folder name in a store that holds mail. */
async function boxes(root: string): Promise<string[]> {
  const out: string[] = [];
  for (const name of (await fs.readdir(root)).sort()) if ((await stored(root, name)).length) out.push(name);
  return out;
}

const deliveredTo = (m: Buffer | undefined): string | undefined => /\r?\nDelivered-To: ([^\r]*)\r\n/.exec('\n' + split(m ?? Buffer.alloc(0)).headers)?.[1];

/** A transport that stores nothing and keeps every envelope it is given. */
function recorder(): Transport & { envelopes: DeliveryEnvelope[] } {
  const envelopes: DeliveryEnvelope[] = [];
  return {
    name: 'recorder',
    envelopes,
    async deliver(envelope) {
      envelopes.push(envelope);
      return envelope.recipients.map((r) => ({ recipient: r.address, status: 'delivered' as const, reply: { code: 250, enhanced: '2.0.0', lines: ['Ok'] } }));
    },
  };
}

const TABLE = `# the team
team: alice, bob
all: team,
  # a comment line inside a continued entry
  carol
robert: bob
bob: \\bob, archive
ping: pong
pong: ping
ext: someone@elsewhere.test
`;

describe('aliases() through the gateway into Maildir', () => {
  let gw: TestGateway & { store: string };
  let seen: string[][];
  before(async () => {
    const file = path.join(base, 'aliases');
    await fs.writeFile(file, TABLE);
    seen = [];
    // What a milter after aliases() sees at end of message: the expanded envelope.
    const after = defineMilter({
      name: 'observer',
      async eom(ctx) {
        seen.push(ctx.envelope.recipients.map((r) => r.address));
      },
    });
    gw = await gateway([
      relayControl({ localDomains: ['example.test', 'other.test'] }),
      aliases({ file, domains: ['example.test', 'other.test'], recipientDelimiter: '+' }),
      after,
    ]);
  });
  after(async () => {
    await gw.close();
  });

  it('an alias with two targets: one RCPT accepted, a copy in each mailbox with its own Delivered-To', async () => {
    const c = await ehlo(gw.port);
    const r = await send(c, 'sender@sender.test', ['Team@Example.Test'], message('team'));
    c.end();
    assert.equal(r.rcpt[0]?.text, '250 2.1.5 Accepted');
    assert.equal(r.data?.code, 250, r.data?.text);
    for (const who of ['alice@example.test', 'bob@example.test']) {
      const [m] = await stored(gw.store, who);
      assert.ok(m, `stored for ${who}`);
      assert.equal(deliveredTo(m), who);
      assert.match(split(m).headers, /^Return-Path: <sender@sender\.test>\r\n/);
    }
    // bob is itself an alias (bob: \bob, archive).
    assert.deepEqual(seen.at(-1), ['alice@example.test', 'bob@example.test', 'archive@example.test']);
  });

  it('expands recursively, in the recipient’s own domain, and keeps the order of first appearance', async () => {
    const c = await ehlo(gw.port);
    const r = await send(c, 'sender@sender.test', ['all@other.test'], message('all'));
    c.end();
    assert.equal(r.data?.code, 250, r.data?.text);
    // all → team, carol → alice, bob (→ \bob, archive), carol
    assert.deepEqual(seen.at(-1), ['alice@other.test', 'bob@other.test', 'archive@other.test', 'carol@other.test']);
  });

  it('\\name and an alias that names itself keep that address as a final recipient', async () => {
    const c = await ehlo(gw.port);
    const r = await send(c, 'sender@sender.test', ['bob@example.test'], message('bob himself'));
    c.end();
    assert.equal(r.data?.code, 250, r.data?.text);
    assert.deepEqual(seen.at(-1), ['bob@example.test', 'archive@example.test']);
  });

  it('a loop (ping → pong → ping) ends at the first address met again, delivered once', async () => {
    const c = await ehlo(gw.port);
    const r = await send(c, 'sender@sender.test', ['ping@example.test'], message('loop'));
    c.end();
    assert.equal(r.data?.code, 250, r.data?.text);
    assert.deepEqual(seen.at(-1), ['ping@example.test']);
    assert.equal((await stored(gw.store, 'ping@example.test')).length, 1);
    assert.equal((await stored(gw.store, 'pong@example.test')).length, 0);
  });

  it('with a detail: robert+tag@ → bob+tag@ (extension carried), stored in bob’s mailbox with Delivered-To bob+tag@', async () => {
    const before = (await stored(gw.store, 'bob@example.test')).length;
    const c = await ehlo(gw.port);
    const r = await send(c, 'sender@sender.test', ['robert+tag@example.test'], message('robert tagged'));
    c.end();
    assert.equal(r.data?.code, 250, r.data?.text);
    // robert+tag → bob+tag, which is looked up again: bob → \bob (+tag), archive+tag.
    assert.deepEqual(seen.at(-1), ['bob+tag@example.test', 'archive+tag@example.test']);
    const all = await stored(gw.store, 'bob@example.test');
    assert.equal(all.length, before + 1);
    assert.equal(deliveredTo(all.at(-1)), 'bob+tag@example.test');
  });

  it('a non-local target is kept as written, without the extension; other domains are not aliased', async () => {
    const c = await ehlo(gw.port);
    const r1 = await send(c, 'sender@sender.test', ['ext+x@example.test'], message('ext'));
    assert.equal(r1.data?.code, 250, r1.data?.text);
    assert.deepEqual(seen.at(-1), ['someone@elsewhere.test']);
    c.end();
  });

  it('an unknown name passes unchanged', async () => {
    const c = await ehlo(gw.port);
    const r = await send(c, 'sender@sender.test', ['dave@example.test'], message('dave'));
    c.end();
    assert.equal(r.data?.code, 250, r.data?.text);
    assert.deepEqual(seen.at(-1), ['dave@example.test']);
  });
});

describe('aliases(): limits, DSN arguments, options', () => {
  it('past the recursion or expansion limit: 451 4.6.0 Alias expansion error at RCPT, that recipient only', async () => {
    const map: Record<string, string> = {};
    for (let i = 0; i < 25; i++) map[`a${i}`] = `a${i + 1}`;
    map['wide'] = 'w1, w2, w3, w4';
    const gw = await gateway([aliases({ map, domains: ['example.test'], expansionLimit: 3 })]);
    try {
      const c = await ehlo(gw.port);
      const r = await send(c, 'sender@sender.test', ['a0@example.test', 'wide@example.test', 'a10@example.test'], message('deep'));
      c.end();
      assert.equal(r.rcpt[0]?.text, '451 4.6.0 Alias expansion error');
      assert.equal(r.rcpt[1]?.text, '451 4.6.0 Alias expansion error');
      // a10 → … → a25: 15 levels, within the default limit of 20.
      assert.equal(r.rcpt[2]?.code, 250);
      assert.equal(r.data?.code, 250, r.data?.text);
      assert.deepEqual(await boxes(gw.store), ['a25@example.test']);
    } finally {
      await gw.close();
    }
  });

  it('each new recipient keeps the original’s NOTIFY and gets ORCPT=rfc822;<alias> for DSNs', async () => {
    const rec = recorder();
    const gw = await gateway([aliases({ map: { team: 'alice, bob' }, domains: ['example.test'] })], { delivery: rec });
    try {
      const c = await ehlo(gw.port);
      assert.equal((await c.cmd('MAIL FROM:<s@sender.test>')).code, 250);
      assert.equal((await c.cmd('RCPT TO:<team@example.test> NOTIFY=SUCCESS,FAILURE')).code, 250);
      assert.equal((await c.cmd('RCPT TO:<carol@example.test> NOTIFY=NEVER ORCPT=rfc822;carol+x@example.test')).code, 250);
      assert.equal((await c.data(message('dsn'))).code, 250);
      c.end();
      const env = rec.envelopes.at(-1);
      assert.deepEqual(
        env?.recipients.map((r) => [r.address, r.args['NOTIFY'], r.args['ORCPT']]),
        [
          ['carol@example.test', 'NEVER', 'rfc822;carol+x@example.test'],
          ['alice@example.test', 'SUCCESS,FAILURE', 'rfc822;team@example.test'],
          ['bob@example.test', 'SUCCESS,FAILURE', 'rfc822;team@example.test'],
        ],
      );
    } finally {
      await gw.close();
    }
    // dsnArguments: false (for Postfix, which ignores SMFIR_ADDRCPT_PAR's arguments): none are added.
    const rec2 = recorder();
    const gw2 = await gateway([aliases({ map: { team: 'alice, bob' }, domains: ['example.test'], dsnArguments: false })], { delivery: rec2 });
    try {
      const c = await ehlo(gw2.port);
      assert.equal((await c.cmd('MAIL FROM:<s@sender.test>')).code, 250);
      assert.equal((await c.cmd('RCPT TO:<team@example.test> NOTIFY=SUCCESS')).code, 250);
      assert.equal((await c.data(message('no dsn args'))).code, 250);
      c.end();
      assert.deepEqual(rec2.envelopes.at(-1)?.recipients.map((r) => [r.address, r.args]), [
        ['alice@example.test', {}],
        ['bob@example.test', {}],
      ]);
    } finally {
      await gw2.close();
    }
  });

  it('refuses, when it is created, what it cannot do, naming the file and line', async () => {
    const file = path.join(base, 'bad-aliases');
    for (const [text, why] of [
      ['ok: a\nlog: |/usr/bin/logger\n', /line 2: .*command/],
      ['inc: :include:/etc/mail/list\n', /line 1: .*:include:/],
      ['f: /var/log/mail\n', /line 1: .*file/],
      ['ok: a,\n  \n  b\nnocolon\n', /line 4: expected "name: address/],
      ['two: a b\n', /line 1: "a b" is not an address/],
      ['  leading: a\n', /line 1: a continuation line/],
      ['x@example.test: a\n', /line 1: .*has a domain/],
      ['dup: a\nDUP: b\n', /line 2: .*defined twice/],
      ['empty:\n', /line 1: .*no addresses/],
    ] as const) {
      await fs.writeFile(file, text);
      assert.throws(() => aliases({ file, domains: ['example.test'] }), (err: Error & { code?: string }) => {
        assert.equal(err.code, 'DOVETAIL_ERR_INVALID_OPTIONS');
        assert.ok(err.message.includes(file), err.message);
        assert.match(err.message, why);
        return true;
      });
    }
    assert.throws(() => aliases({ file: path.join(base, 'missing'), domains: ['example.test'] }), /cannot read/);
    assert.throws(() => aliases({ map: { a: 'b' } } as never), /domains must list/);
    assert.throws(() => aliases({ map: { a: 'b' }, file, domains: ['example.test'] } as never), /either map or file/);
    assert.throws(() => aliases({ map: { a: '|cmd' }, domains: ['example.test'] }), /command/);
    assert.throws(() => aliases({ map: { a: 'b' }, domains: ['not a domain'] }), /domains/);
    assert.throws(() => aliases({ map: { a: 'b' }, domains: ['example.test'], recursionLimit: 0 }), /recursionLimit/);
    assert.throws(() => aliases({ map: { a: 'b' }, domains: ['example.test'], recipientDelimiter: '@' }), /recipientDelimiter/);
  });

  it('reload() reads the file again; a broken file keeps the old table', async () => {
    const file = path.join(base, 'reload-aliases');
    await fs.writeFile(file, 'sales: alice\n');
    const a = aliases({ file, domains: ['example.test'] });
    assert.deepEqual(a.expand('sales@example.test'), ['alice@example.test']);
    await fs.writeFile(file, 'sales: bob, carol\n');
    a.reload();
    assert.deepEqual(a.expand('sales@example.test'), ['bob@example.test', 'carol@example.test']);
    await fs.writeFile(file, 'sales: |/bin/sh\n');
    assert.throws(() => a.reload(), { code: 'DOVETAIL_ERR_INVALID_OPTIONS' });
    assert.deepEqual(a.expand('sales@example.test'), ['bob@example.test', 'carol@example.test']);
    assert.equal(a.has('SALES@example.test'), true);
    assert.equal(a.has('sales@other.test'), false);
  });
});

describe('verifyWithMaps(): recipient verification that knows the aliases', () => {
  it('the mailstore is asked about everything but alias names; without the wrapper it refuses the alias', async () => {
    const root = path.join(base, `lmtp${++n}`);
    await fs.mkdir(root);
    const store = await createLmtpServer({ root, listen: { host: '127.0.0.1', port: 0 }, users: ['alice@example.test', 'bob@example.test'], recipientDelimiter: '+' });
    const port = 'port' in store.address ? store.address.port : 0;
    const a = aliases({ map: { team: 'alice, bob' }, domains: ['example.test'] });
    const wrapped = await gateway([a], { delivery: verifyWithMaps(lmtp({ port }), [a]), verifyRecipients: true });
    const plain = await gateway([a], { delivery: lmtp({ port }), verifyRecipients: true });
    try {
      const c = await ehlo(wrapped.port);
      const r = await send(c, 'sender@sender.test', ['team@example.test', 'nobody@example.test', 'bob+x@example.test'], message('verified'));
      c.end();
      assert.equal(r.rcpt[0]?.code, 250, r.rcpt[0]?.text);
      assert.equal(r.rcpt[1]?.text, '550 5.1.1 <nobody@example.test>: User unknown in local recipient table');
      assert.equal(r.rcpt[2]?.code, 250, r.rcpt[2]?.text);
      assert.equal(r.data?.code, 250, r.data?.text);
      assert.equal((await stored(root, 'alice@example.test')).length, 1);
      // bob's copy (team → bob, and bob+x@): one folder, one copy, as for duplicates.
      assert.equal((await stored(root, 'bob@example.test')).length, 1);

      const c2 = await ehlo(plain.port);
      const r2 = await send(c2, 'sender@sender.test', ['team@example.test'], message('not verified'));
      c2.end();
      assert.equal(r2.rcpt[0]?.text, '550 5.1.1 <team@example.test>: User unknown in local recipient table');
    } finally {
      await wrapped.close();
      await plain.close();
      await store.close();
    }
  });
});

describe('virtual() through the gateway', () => {
  let gw: TestGateway & { store: string };
  before(async () => {
    gw = await gateway([
      virtual({
        map: {
          '@alias.test': 'catchall@example.test',
          'info@alias.test': ['alice@example.test', 'bob@example.net'],
          'sales@alias.test': 'sales@alias.test, archive@example.test',
          '@old.test': '@example.test',
          'dev@example.test': 'alice@example.test',
          'a@loop.test': 'b@loop.test',
          'b@loop.test': 'a@loop.test, carol@example.test',
        },
        domains: ['alias.test', 'strict.test'],
        recipientDelimiter: '+',
        localDomains: ['example.test'],
      }),
    ]);
  });
  after(async () => {
    await gw.close();
  });

  async function route(rcpt: string, subject: string): Promise<string[]> {
    const before = new Map<string, number>();
    for (const b of await boxes(gw.store)) before.set(b, (await stored(gw.store, b)).length);
    const c = await ehlo(gw.port);
    const r = await send(c, 'sender@sender.test', [rcpt], message(subject));
    c.end();
    assert.equal(r.rcpt[0]?.code, 250, r.rcpt[0]?.text);
    assert.equal(r.data?.code, 250, r.data?.text);
    const out: string[] = [];
    for (const b of await boxes(gw.store)) if ((await stored(gw.store, b)).length > (before.get(b) ?? 0)) out.push(b);
    return out;
  }

  it('the exact key wins over the catch-all; the catch-all takes any other user', async () => {
    assert.deepEqual(await route('info@alias.test', 'exact'), ['alice@example.test', 'bob@example.net']);
    assert.deepEqual(await route('Whoever@ALIAS.test', 'catch-all'), ['catchall@example.test']);
  });

  it('a target equal to its key stops there (kept, not looked up again), beside the other targets', async () => {
    assert.deepEqual(await route('sales@alias.test', 'self'), ['archive@example.test', 'sales@alias.test']);
  });

  it('@domain targets keep the local part; a detail is kept by the catch-all, and carried to local targets of an exact key', async () => {
    assert.deepEqual(await route('zed@old.test', 'domain move'), ['zed@example.test']);
    assert.deepEqual(await route('zed+news@old.test', 'domain move tagged'), ['zed@example.test']);
    const [m] = (await stored(gw.store, 'zed@example.test')).slice(-1);
    assert.equal(deliveredTo(m), 'zed+news@example.test');
    assert.deepEqual(await route('dev+ci@example.test', 'tagged key'), ['alice@example.test']);
    assert.equal(deliveredTo((await stored(gw.store, 'alice@example.test')).at(-1)), 'alice+ci@example.test');
  });

  it('a loop between two keys ends; the mail reaches the address met again and the other target', async () => {
    assert.deepEqual(await route('a@loop.test', 'loop'), ['a@loop.test', 'carol@example.test']);
  });

  it('an address of a virtual alias domain that no key matches: 550 5.1.1 User unknown in virtual alias table', async () => {
    const c = await ehlo(gw.port);
    const r = await send(c, 'sender@sender.test', ['nobody@strict.test', 'alice@example.test'], message('strict'));
    c.end();
    assert.equal(r.rcpt[0]?.text, '550 5.1.1 <nobody@strict.test>: Recipient address rejected: User unknown in virtual alias table');
    assert.equal(r.rcpt[1]?.code, 250);
  });

  it('refuses malformed maps when it is created', () => {
    assert.throws(() => virtual({ map: { bob: 'alice@example.test' } }), { code: 'DOVETAIL_ERR_INVALID_OPTIONS' });
    assert.throws(() => virtual({ map: { 'bob@example.test': 'alice' } }), /not user@domain or @domain/);
    assert.throws(() => virtual({ map: { 'bob@example.test': [] } }), /no targets/);
    assert.throws(() => virtual({ map: { 'bob@example.test': 'a@x.test', 'BOB@Example.Test': 'b@x.test' } }), /given twice/);
    assert.throws(() => virtual({ map: { 'bob@example.test': 'alice@exa mple.test' } }), /not an address/);
    assert.throws(() => virtual({ map: {}, domains: ['bad domain'] }), /domains/);
  });
});

describe('relocated() through the gateway', () => {
  it('551 5.1.6 User has moved; please try <new address>, at RCPT, for that recipient only', async () => {
    const gw = await gateway([
      relocated({
        map: {
          'alice@example.test': 'alice@new.example',
          '@gone.test': 'the new domain example.org',
          'bob@example.test': '<robert@new.example>',
        },
        recipientDelimiter: '+',
      }),
    ]);
    try {
      const c = await ehlo(gw.port);
      const r = await send(c, 'sender@sender.test', ['Alice@Example.Test', 'alice+x@example.test', 'anyone@gone.test', 'bob@example.test', 'carol@example.test'], message('moved'));
      c.end();
      assert.deepEqual(
        r.rcpt.map((x) => x.text),
        [
          '551 5.1.6 User has moved; please try <alice@new.example>',
          '551 5.1.6 User has moved; please try <alice@new.example>',
          '551 5.1.6 User has moved; please try the new domain example.org',
          '551 5.1.6 User has moved; please try <robert@new.example>',
          '250 2.1.5 Accepted',
        ],
      );
      assert.equal(r.data?.code, 250);
      assert.deepEqual(await boxes(gw.store), ['carol@example.test']);
    } finally {
      await gw.close();
    }
  });

  it('code: 550 gives Postfix’s code; bad options throw', async () => {
    const m = relocated({ map: { 'a@example.test': 'b@example.org' }, code: 550 });
    assert.equal(m.lookup('A@example.test'), '<b@example.org>');
    assert.equal(m.lookup('c@example.test'), undefined);
    const gw = await gateway([m]);
    try {
      const c = await ehlo(gw.port);
      assert.equal((await c.cmd('MAIL FROM:<s@sender.test>')).code, 250);
      assert.equal((await c.cmd('RCPT TO:<a@example.test>')).text, '550 5.1.6 User has moved; please try <b@example.org>');
      c.end();
    } finally {
      await gw.close();
    }
    assert.throws(() => relocated({ map: { 'a@example.test': 'x' }, code: 552 as 551 }), /code/);
    assert.throws(() => relocated({ map: { a: 'x' } }), /not user@domain/);
    assert.throws(() => relocated({ map: { 'a@example.test': 'line\r\nbreak' } }), /new location/);
    assert.throws(() => relocated({ map: { 'a@example.test': '' } }), /new location/);
  });
});

describe('the three together, in the documented order', () => {
  it('relocated refuses at RCPT; virtual then aliases rewrite at end of message', async () => {
    const gw = await gateway([
      relocated({ map: { 'old@example.test': 'new@example.org' } }),
      virtual({ map: { '@alias.test': 'staff@example.test' } }),
      aliases({ map: { staff: 'alice, bob' }, domains: ['example.test'] }),
    ]);
    try {
      const c = await ehlo(gw.port);
      const r = await send(c, 'sender@sender.test', ['old@example.test', 'x@alias.test'], message('together'));
      c.end();
      assert.equal(r.rcpt[0]?.code, 551);
      assert.equal(r.rcpt[1]?.code, 250);
      assert.equal(r.data?.code, 250, r.data?.text);
      assert.deepEqual(await boxes(gw.store), ['alice@example.test', 'bob@example.test']);
    } finally {
      await gw.close();
    }
  });
});
