/**
 * connectMilter against opendkim in signing mode: the stored message carries a
 * DKIM-Signature that verifies (mailauth's dkimVerify, the key's TXT record given by a
 * resolver) with the key this test generated, for relaxed and simple header
 * canonicalization (simple needs every signed header byte-exact through the client).
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { dkimVerify } from 'mailauth';
import { connectMilter } from '../../lib/milter/protocol/client.js';
import { ehlo, send, startGateway, stored } from '../helpers/smtp.js';
import { startOpenDkim } from '../helpers/opendkim.js';

for (const canonicalization of ['relaxed/simple', 'simple/simple']) {
  test(`opendkim signs through connectMilter; the signature verifies (${canonicalization})`, async () => {
    const dkim = await startOpenDkim({ canonicalization });
    const gw = await startGateway({ milters: [connectMilter(`inet:${dkim.port}@127.0.0.1`, { name: 'opendkim', commandTimeout: 10_000 })] });
    try {
      const c = await ehlo(gw.port);
      const content =
        'From: Alice <alice@sender.test>\r\nTo: Bob <bob@example.test>\r\nSubject: signed   through\r\n\ta folded subject\r\n' +
        `Date: ${new Date().toUTCString()}\r\nMessage-ID: <${Date.now()}@sender.test>\r\n\r\n` +
        'Hello Bob,\r\n\r\nthis body is signed.\r\n' + 'x'.repeat(70_000) + '\r\n';
      const r = await send(c, 'alice@sender.test', ['bob@example.test'], content);
      assert.equal(r.data?.code, 250, `${r.data?.text} ${dkim.log()}`);
      const [msg] = await stored(gw.root, 'bob@example.test');
      assert.ok(msg);
      const text = msg.toString();
      assert.match(text, /\r\nDKIM-Signature: v=1;/, `no signature: ${dkim.log()}`);
      assert.match(text, new RegExp(`d=${dkim.domain};`));
      const resolver = async (name: string, type: string): Promise<string[][]> => {
        if (type === 'TXT' && name === `${dkim.selector}._domainkey.${dkim.domain}`) return [[dkim.txt]];
        throw Object.assign(new Error(`no such record ${name} ${type}`), { code: 'ENOTFOUND' });
      };
      const result = await dkimVerify(msg, { resolver } as never);
      const sig = result.results[0];
      assert.equal(sig?.status.result, 'pass', JSON.stringify(result.results, null, 1));
      assert.equal(sig?.signingDomain, dkim.domain);
      c.end();
    } finally {
      await gw.close();
      await dkim.stop();
    }
  });
}
