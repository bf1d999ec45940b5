/**
 * dovetail/testing against opendkim (signing mode, a key made here): runMilter() with
 * opendkim's socket spec reports opendkim's own edit — one DKIM-Signature header — and the
 * resulting message verifies with mailauth's dkimVerify against the key's TXT record. So
 * the message the kit hands back is byte-exact where a signature needs it to be.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { dkimVerify } from 'mailauth';
import { connectMilter } from '../../lib/index.js';
import { runMilter } from '../../lib/testing/index.js';
import { startOpenDkim } from '../helpers/opendkim.js';

test('opendkim through runMilter(): its DKIM-Signature is the only edit, and the message verifies', async () => {
  const dkim = await startOpenDkim({ canonicalization: 'simple/simple' });
  try {
    const message =
      'From: Alice <alice@sender.test>\r\nTo: Bob <bob@example.test>\r\nSubject: signed\r\n\tand folded\r\n' +
      `Date: ${new Date().toUTCString()}\r\nMessage-ID: <${Date.now()}@sender.test>\r\n\r\nHello Bob,\r\n\r\nthis body is signed.\r\n`;
    const r = await runMilter(connectMilter(`inet:${dkim.port}@127.0.0.1`, { name: 'opendkim', commandTimeout: 10_000 }), {
      client: { address: '127.0.0.1' },
      helo: 'client.sender.test',
      from: 'alice@sender.test',
      to: 'bob@example.test',
      message,
    });
    assert.equal(r.verdict.type, 'continue', dkim.log());
    const signatures = [...r.edits.headersAdded, ...r.edits.headersInserted].filter((h) => h.name === 'DKIM-Signature');
    assert.equal(signatures.length, 1, `edits: ${JSON.stringify(r.edits.all)} ${dkim.log()}`);
    assert.equal(r.edits.all.length, 1);
    assert.equal(r.edits.all[0]?.milter, 'opendkim');
    assert.match(signatures[0]!.value, new RegExp(`d=${dkim.domain};`));
    const resolver = async (name: string, type: string): Promise<string[][]> => {
      if (type === 'TXT' && name === `${dkim.selector}._domainkey.${dkim.domain}`) return [[dkim.txt]];
      throw Object.assign(new Error(`no such record ${name} ${type}`), { code: 'ENOTFOUND' });
    };
    const result = await dkimVerify(r.message!, { resolver } as never);
    assert.equal(result.results[0]?.status.result, 'pass', JSON.stringify(result.results, null, 1));
  } finally {
    await dkim.stop();
  }
});
