/**
 * dovetail/testing against a real libmilter filter: the python3-milter reference filter
 * (test/fixtures/libmilter/reference.py, on the C libmilter), started here on a free port
 * and given to runMilter() as a socket spec. The replies, verdicts and edits the kit
 * reports are the filter's own (what reference.py does is fixed and listed in its header),
 * and what the filter saw of the script (connect, HELO, macros, headers, body) it reports
 * itself in its X-Saw header.
 */
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { formatReply } from '../../lib/index.js';
import { runMilter, startSession } from '../../lib/testing/index.js';
import { connectMilter } from '../../lib/index.js';
import { kitAndGateway } from '../helpers/kit-compare.js';
import { startReferenceFilter, type RunningFilter } from '../helpers/libmilter.js';

let filter: RunningFilter;

before(async () => {
  filter = await startReferenceFilter('edit');
});
after(async () => {
  await filter?.stop();
});

const MESSAGE = (subject: string) => `From: a@sender.test\r\nTo: bob@example.test\r\nSubject: ${subject}\r\nX-Remove-Me: please\r\n\r\nOriginal body line.\r\n`;

test('libmilter reference filter through runMilter(): its replies, verdicts and every edit', async () => {
  const r = await runMilter(filter.spec, {
    hostname: 'mx.test',
    client: { address: '192.0.2.44', port: 4321, hostname: 'mail.sender.test' },
    helo: 'mail.sender.test',
    messages: [
      { from: { address: 'alice@sender.test', args: { BODY: '8BITMIME' } }, to: ['bob@example.test', 'reject@example.test', 'tempfail@example.test', 'drop@example.test'], message: MESSAGE('hello world') },
      { from: 'carol@sender.test', to: ['bob@example.test'], message: MESSAGE('QUARANTINE me') },
    ],
  });
  const [first, second] = r.transactions;
  assert.deepEqual(first?.rcpt.map((s) => s.reply && formatReply(s.reply)), [
    '250 2.1.5 Accepted',
    '550-5.1.1 No such user here\r\n550 5.1.1 second line 100%',
    '451 4.2.0 Mailbox busy, try later',
    '250 2.1.5 Accepted',
  ]);
  assert.equal(first?.verdict.stage, 'eom');
  assert.equal(first?.verdict.type, 'continue');
  // The filter's verdicts, as the chain got them: reject and tempfail at rcpt, accept at eom.
  assert.deepEqual(
    r.events.map((e) => ('verdict' in e ? `${e.milter} ${e.stage} ${e.verdict.type}` : `${e.milter} ${e.stage} failed`)),
    [`${filter.spec} rcpt reject`, `${filter.spec} rcpt tempfail`, `${filter.spec} eom accept`, `${filter.spec} eom accept`],
  );
  const e = first!.edits;
  assert.deepEqual(
    e.headersAdded.map((h) => h.name),
    ['X-Saw', 'X-Added'],
  );
  assert.deepEqual(e.headersAdded[1], { name: 'X-Added', value: 'yes' });
  // smfi_insheader index 0 = position 1: above our Received header.
  assert.deepEqual(e.headersInserted, [{ position: 1, name: 'X-Inserted', value: 'at the top' }]);
  assert.deepEqual(e.headersChanged, [{ name: 'Subject', index: 1, value: '[filtered] hello world' }]);
  assert.deepEqual(e.headersDeleted, [{ name: 'X-Remove-Me', index: 1 }]);
  assert.deepEqual(e.sender, { address: 'bounce@sender.test', args: { BODY: '8BITMIME' } });
  assert.deepEqual(e.recipientsAdded, [{ address: 'archive@example.test', args: {} }]);
  assert.deepEqual(e.recipientsRemoved, ['drop@example.test']);
  assert.equal(e.body?.toString(), 'Replaced by the reference filter.\r\nSecond chunk.\r\n');
  assert.equal(e.quarantine, undefined);
  assert.deepEqual(first?.envelope?.recipients.map((x) => x.address), ['bob@example.test', 'archive@example.test']);
  const text = first?.message?.toString() ?? '';
  assert.match(text, /^X-Inserted: at the top\r\nReceived: from mail\.sender\.test \(mail\.sender\.test \[192\.0\.2\.44\]\)/);
  assert.match(text, /\r\nSubject: \[filtered\] hello world\r\n/);
  assert.doesNotMatch(text, /\r\nX-Remove-Me:/);

  // What the filter saw of the script, in its own words.
  const saw = first?.edits.headersAdded[0]?.value.replace(/\r\n[ \t]/g, ' ') ?? '';
  assert.match(saw, /connect=mail\.sender\.test\|\d+\|192\.0\.2\.44/, saw);
  assert.match(saw, /helo=mail\.sender\.test/);
  assert.match(saw, /j=mx\.test/);
  assert.match(saw, /mail=<alice@sender\.test>/);
  assert.match(saw, /mailargs=BODY=8BITMIME/);
  assert.match(saw, /client_addr=192\.0\.2\.44/);
  assert.match(saw, new RegExp(`macro_i_mail=${first?.queueId}`));
  assert.match(saw, /headers=From,To,Subject,X-Remove-Me;/, 'our Received header is not shown to the filter, as Postfix');
  assert.match(saw, /body=21/);
  assert.match(saw, /rcpts=bob@example\.test drop@example\.test/);

  // The second message on the same session: the filter quarantines it (smfi_quarantine).
  assert.equal(second?.quarantine, 'subject asked for it');
  assert.equal(second?.edits.quarantine, 'subject asked for it');
  assert.match(second?.message?.toString() ?? '', /\r\nSubject: \[filtered\] QUARANTINE me\r\n/);
});

test('stepping against the filter: a RCPT at a time, then the session ends cleanly', async () => {
  const s = await startSession(filter.spec, { client: { address: '198.51.100.7' } });
  try {
    await s.helo('client.test');
    assert.equal((await s.mail('a@sender.test')).reply?.code, 250);
    const refused = await s.rcpt('reject@example.test');
    assert.equal(refused.outcome.type, 'reject');
    assert.equal(refused.events.length, 1);
    assert.equal((await s.rcpt('ok@example.test')).reply?.code, 250);
    await s.rset();
    assert.equal((await s.mail('b@sender.test')).reply?.code, 250, 'ABORT, then a new message on the same filter connection');
  } finally {
    await s.close();
  }
});

test('the reference filter behind connectMilter(): runMilter() and a real gateway over a socket agree', async () => {
  const { gateway, kit } = await kitAndGateway(() => [connectMilter(filter.spec, { name: 'reference' })], {
    helo: 'client.sender.test',
    transactions: [
      { from: 'alice@sender.test', to: ['bob@example.test', 'reject@example.test', 'tempfail@example.test', 'drop@example.test'], message: MESSAGE('hello world') },
      { from: 'carol@sender.test', to: ['bob@example.test'], message: MESSAGE('QUARANTINE me') },
    ],
  });
  // X-Saw names the client port and queue ids the filter saw: the same port on both sides, ids masked.
  assert.deepEqual(kit, gateway);
  assert.equal(gateway.handed.length, 2);
  assert.match(gateway.handed[0]!, /^bounce@sender\.test -> bob@example\.test,archive@example\.test\nX-Inserted: at the top\r\nReceived: /);
  assert.match(gateway.handed[1]!, /^QUARANTINE /);
});
