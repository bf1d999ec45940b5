/**
 * masquerade() through a running gateway over real SMTP: the envelope sender the store sees
 * (Return-Path) and, when asked, the From:/Sender: headers, with Postfix's
 * masquerade_domains ordering, `!` exclusions and masquerade_exceptions.
 */
import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import type { DeliveryEnvelope, Transport } from '../../lib/index.js';
import { masquerade } from '../../milters/index.js';
import { ehlo, send, split, startGateway, stored } from '../helpers/smtp.js';

const MSG = (from: string, extra = ''): string =>
  `From: ${from}\r\nSender: ops@build.dev.example.com\r\nTo: Bob <bob@example.test>\r\nSubject: masq\r\n${extra}\r\nBody mentions alice@host.sub.example.com.\r\n`;

async function deliver(options: Parameters<typeof masquerade>[0], from: string, content: string): Promise<{ returnPath: string; headers: string; body: string }> {
  const gw = await startGateway({ milters: [masquerade(options)] });
  try {
    const c = await ehlo(gw.port);
    const r = await send(c, from, ['bob@example.test'], content);
    c.end();
    assert.equal(r.data?.code, 250, r.data?.text);
    const [m] = await stored(gw.root, 'bob@example.test');
    assert.ok(m);
    const { headers, body } = split(m);
    return { returnPath: /^Return-Path: ([^\r]*)/.exec(headers)?.[1] ?? '', headers, body: body.toString() };
  } finally {
    await gw.close();
  }
}

describe('masquerade() through the gateway', () => {
  it('strips the host part of the envelope sender down to the listed domain; headers only when asked', async () => {
    const got = await deliver({ domains: ['example.com'] }, 'alice@host.sub.example.com', MSG('Alice <alice@host.sub.example.com>'));
    assert.equal(got.returnPath, '<alice@example.com>');
    assert.match(got.headers, /\r\nFrom: Alice <alice@host\.sub\.example\.com>\r\n/);
    assert.equal(got.body, 'Body mentions alice@host.sub.example.com.\r\n');
  });

  it('rewrites the addresses of the chosen header fields, leaving display names, quoted strings and comments', async () => {
    const from = '"alice@host.sub.example.com" <alice@host.sub.example.com> (at host.sub.example.com), root@mx.example.com, carol@example.org';
    const got = await deliver({ domains: ['example.com'], exceptions: ['root'], headers: ['From', 'sender'] }, 'alice@host.sub.example.com', MSG(from));
    assert.match(
      got.headers,
      /\r\nFrom: "alice@host\.sub\.example\.com" <alice@example\.com> \(at host\.sub\.example\.com\), root@mx\.example\.com, carol@example\.org\r\n/,
    );
    assert.match(got.headers, /\r\nSender: ops@example\.com\r\n/);
    assert.match(got.headers, /\r\nTo: Bob <bob@example\.test>\r\n/);
  });

  it('the first matching entry decides: a !exclusion before the parent keeps its subdomains; an equal domain stops', async () => {
    const opts = { domains: ['!dev.example.com', 'example.com'] };
    assert.equal((await deliver(opts, 'ops@build.dev.example.com', MSG('x@y.test'))).returnPath, '<ops@build.dev.example.com>');
    assert.equal((await deliver(opts, 'ops@dev.example.com', MSG('x@y.test'))).returnPath, '<ops@dev.example.com>');
    assert.equal((await deliver(opts, 'ops@web.example.com', MSG('x@y.test'))).returnPath, '<ops@example.com>');
    // The other way round the exclusion comes too late (Postfix reads the list in order).
    assert.equal((await deliver({ domains: ['example.com', '!dev.example.com'] }, 'ops@build.dev.example.com', MSG('x@y.test'))).returnPath, '<ops@example.com>');
    // sub.example.com listed before example.com: masquerade to the nearer one.
    assert.equal((await deliver({ domains: ['sub.example.com', 'example.com'] }, 'a@host.sub.example.com', MSG('x@y.test'))).returnPath, '<a@sub.example.com>');
  });

  it('exceptions (local parts or addresses), other domains and the null sender are left alone', async () => {
    const opts = { domains: ['example.com'], exceptions: ['Root', 'mailer-daemon@mx.example.com'] };
    assert.equal((await deliver(opts, 'root@mx.example.com', MSG('x@y.test'))).returnPath, '<root@mx.example.com>');
    assert.equal((await deliver(opts, 'mailer-daemon@mx.example.com', MSG('x@y.test'))).returnPath, '<mailer-daemon@mx.example.com>');
    assert.equal((await deliver(opts, 'alice@example.org', MSG('x@y.test'))).returnPath, '<alice@example.org>');
    assert.equal((await deliver(opts, 'alice@notexample.com', MSG('x@y.test'))).returnPath, '<alice@notexample.com>');
    assert.equal((await deliver(opts, '', MSG('x@y.test'))).returnPath, '<>');
    assert.equal((await deliver({ ...opts, envelopeSender: false }, 'a@host.example.com', MSG('x@y.test'))).returnPath, '<a@host.example.com>');
  });

  it('keeps the sender’s ESMTP arguments when it rewrites it', async () => {
    const seen: DeliveryEnvelope[] = [];
    const rec: Transport = {
      name: 'recorder',
      async deliver(envelope) {
        seen.push(envelope);
        return envelope.recipients.map((r) => ({ recipient: r.address, status: 'delivered' as const, reply: { code: 250, enhanced: '2.0.0', lines: ['Ok'] } }));
      },
    };
    const gw = await startGateway({ milters: [masquerade({ domains: ['example.com'] })], delivery: rec });
    try {
      const c = await ehlo(gw.port);
      assert.equal((await c.cmd('MAIL FROM:<a@host.example.com> BODY=8BITMIME RET=HDRS ENVID=abc123')).code, 250);
      assert.equal((await c.cmd('RCPT TO:<bob@example.test>')).code, 250);
      assert.equal((await c.data(MSG('x@y.test'))).code, 250);
      c.end();
      assert.equal(seen[0]?.sender.address, 'a@example.com');
      assert.equal(seen[0]?.sender.args['BODY'], '8BITMIME');
      assert.equal(seen[0]?.sender.args['RET'], 'HDRS');
      assert.equal(seen[0]?.sender.args['ENVID'], 'abc123');
    } finally {
      await gw.close();
    }
  });

  it('refuses malformed options', () => {
    assert.throws(() => masquerade({ domains: [] }), { code: 'DOVETAIL_ERR_INVALID_OPTIONS' });
    assert.throws(() => masquerade({ domains: ['not a domain'] }), /domains/);
    assert.throws(() => masquerade({ domains: ['example.com'], headers: ['From:'] }), /headers/);
    assert.throws(() => masquerade({ domains: ['example.com'], exceptions: [''] }), /exceptions/);
  });
});
