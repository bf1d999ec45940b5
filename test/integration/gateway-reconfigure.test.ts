/**
 * Gateway.reconfigure() (what the CLI's SIGHUP calls), in-process over real sockets: a new
 * chain, certificate and authenticate reach new connections while a connection opened
 * before finishes with its old chain and its TLS session; the SIZE a new EHLO advertises
 * follows the new chain's limits; a malformed part throws and changes nothing.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import type tls from 'node:tls';
import { defineMilter, isDovetailError, type Milter } from '../../lib/index.js';
import { sizeLimit } from '../../milters/index.js';
import { ehlo, message, send, split, startGateway, stored } from '../helpers/smtp.js';
import { selfSignedCert } from '../helpers/tls.js';

const tagger = (tag: string): Milter =>
  defineMilter({
    name: `tag-${tag}`,
    async eom(ctx) {
      ctx.message.addHeader('X-Tag', tag);
    },
  });

const fingerprint = (c: { socket: unknown }): string => (c.socket as tls.TLSSocket).getPeerCertificate().fingerprint256;

test('reconfigure: new chain, certificate and authenticate for new connections; one open before keeps its chain and TLS session', async () => {
  const first = selfSignedCert('one.test');
  const second = selfSignedCert('two.test');
  const gw = await startGateway({
    milters: [tagger('v1')],
    tls: first,
    authenticate: async (r) => r.username === 'ann' && r.password === 'pw',
    authFailureDelay: 0,
  });
  try {
    const before = await ehlo(gw.port);
    await before.starttls();
    const oldPrint = fingerprint(before);
    assert.equal((await before.authPlain('ann', 'pw')).code, 235);
    assert.equal((await before.cmd('MAIL FROM:<ann@sender.test>')).code, 250);
    assert.equal((await before.cmd('RCPT TO:<old@example.test>')).code, 250);

    gw.gateway.reconfigure({ milters: [tagger('v2')], tls: second, authenticate: async (r) => r.username === 'bob' && r.password === 'pw' });

    const after = await ehlo(gw.port);
    await after.starttls();
    assert.notEqual(fingerprint(after), oldPrint, 'the new certificate');
    assert.equal((await after.authPlain('ann', 'pw')).code, 535);
    assert.equal((await after.authPlain('bob', 'pw')).code, 235);
    assert.equal((await send(after, 'bob@sender.test', ['new@example.test'], message('after'))).data?.code, 250);
    after.end();

    // The connection from before: its transaction runs the old chain to the end.
    assert.equal((await before.data(message('before'))).code, 250);
    assert.equal(fingerprint(before), oldPrint);
    before.end();
    assert.match(split((await stored(gw.root, 'new@example.test'))[0]!).headers, /\r\nX-Tag: v2\r\n/);
    const old = split((await stored(gw.root, 'old@example.test'))[0]!).headers;
    assert.match(old, /\r\nX-Tag: v1\r\n/);
    assert.doesNotMatch(old, /X-Tag: v2/);
  } finally {
    await gw.close();
  }
});

test('reconfigure: the SIZE of a new EHLO follows the new chain; malformed changes throw and change nothing', async () => {
  const gw = await startGateway({ milters: [tagger('v1')] });
  try {
    const size = async (): Promise<string | undefined> => {
      const c = await ehlo(gw.port);
      const r = await c.cmd('EHLO again.test');
      c.end();
      return r.lines.find((l) => /SIZE/.test(l));
    };
    assert.match((await size())!, /SIZE 52428800$/);
    gw.gateway.reconfigure({ milters: [sizeLimit({ maxBytes: 1000 }), tagger('v2')] });
    assert.match((await size())!, /SIZE 1000$/);
    const c = await ehlo(gw.port);
    const r = await send(c, 'a@sender.test', ['big@example.test'], message('big', 'x'.repeat(2000) + '\r\n'));
    assert.equal(r.data?.code, 552);
    c.end();

    const invalid = (fn: () => void, why: RegExp): void =>
      assert.throws(fn, (err: unknown) => isDovetailError(err, 'DOVETAIL_ERR_INVALID_OPTIONS') && why.test((err as Error).message));
    invalid(() => gw.gateway.reconfigure({ listeners: [{ milters: undefined }, { milters: undefined }] }), /listeners has 2 entries, the gateway has 1/);
    invalid(() => gw.gateway.reconfigure({ tls: selfSignedCert() }), /turning TLS on or off needs a restart/);
    invalid(() => gw.gateway.reconfigure({ authenticate: async () => true }), /turning AUTH on or off needs a restart/);
    assert.throws(() => gw.gateway.reconfigure({ milters: [{ name: 'bad', eom: 'not a function' } as unknown as Milter] }));
    // Nothing changed: still the 1000-byte chain that tags v2.
    assert.match((await size())!, /SIZE 1000$/);
    const c2 = await ehlo(gw.port);
    assert.equal((await send(c2, 'a@sender.test', ['small@example.test'], message('small'))).data?.code, 250);
    c2.end();
    assert.match(split((await stored(gw.root, 'small@example.test'))[0]!).headers, /\r\nX-Tag: v2\r\n/);
  } finally {
    await gw.close();
  }
});
