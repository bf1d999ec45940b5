/**
 * The serve-milter example runs: the tagger served by serveMilter() and driven over the
 * milter protocol by a gateway's connectMilter() (Postfix drives the same server in
 * test/interop/postfix.test.ts).
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { connectMilter } from '../../lib/index.js';
import { serveTagger } from '../../examples/serve-milter.js';
import { ehlo, message, send, split, startGateway, stored } from '../helpers/smtp.js';

test('serve-milter example: refuses nobody@, tags outside mail, names the queue id', async () => {
  const server = await serveTagger('inet:127.0.0.1:0');
  const gw = await startGateway({ milters: [connectMilter(server.address, { name: 'tagger-remote' })] });
  try {
    const c = await ehlo(gw.port);
    const r = await send(c, 'alice@outside.test', ['nobody@example.test', 'bob@example.test'], message('hello'));
    assert.equal(r.rcpt[0]?.text, '550 5.1.1 <nobody@example.test>: no such user here');
    assert.equal(r.data?.code, 250);
    c.end();
    const [m] = await stored(gw.root, 'bob@example.test');
    const headers = split(m!).headers;
    assert.match(headers, /\r\nSubject: \[ext\] hello\r\n/);
    const queueId = /queued as (\S+)/.exec(r.data!.text)![1];
    assert.match(headers, new RegExp(`\\r\\nX-Tagged-By: tagger \\(queue id ${queueId}\\)\\r\\n`));
  } finally {
    await gw.close();
    await server.close();
  }
});
