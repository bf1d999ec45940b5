/**
 * The bundled milters that declare `needs` (so serveMilter asks the MTA to leave out the
 * headers and/or the body: SMFIP_NOHDRS / SMFIP_NOBODY) give the same result served over
 * the milter protocol as in process: the same script through dovetail/testing, once with the
 * milter object and once through connectMilter to serveMilter on a loopback port, and the
 * resulting message and envelope compared byte for byte. A milter that declared it did not
 * need what its eom reads (spamTag deleting an incoming X-Spam-Status, masquerade rewriting
 * From:) would lose those edits on the wire and fail here.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { connectMilter, serveMilter, type Milter } from '../../lib/index.js';
import { runMilter, type TestRun, type TestScript } from '../../lib/testing/index.js';
import { aliases, masquerade, postmaster, spamTag, virtual } from '../../milters/index.js';

const script: TestScript = {
  client: { address: '192.0.2.7', hostname: 'mx.sender.test' },
  helo: 'mx.sender.test',
  from: 'alice@mail.example.test',
  to: ['team@example.test', 'postmaster@example.test', 'someone@alias.test'],
  message:
    'From: Alice <alice@mail.example.test>\r\nTo: team@example.test\r\nSubject: served\r\n' +
    'X-Spam-Status: Yes, score=99 (forged by the sender)\r\nMessage-ID: <1@mail.example.test>\r\n\r\nThe body.\r\n',
};

const cases: [string, () => Milter][] = [
  ['aliases', () => aliases({ map: { team: ['alice', 'bob'] }, domains: ['example.test'] })],
  ['virtual', () => virtual({ map: { '@alias.test': 'carol@example.test' }, localDomains: ['example.test'] })],
  ['postmaster', () => postmaster({ mailbox: 'admin@example.test', domains: ['example.test'] })],
  ['masquerade', () => masquerade({ domains: ['example.test'], headers: ['From'] })],
  ['spamTag', () => spamTag({ requiredScore: 5 })],
];

/** What must agree: the message as delivered (the Received header's date and id masked) and the envelope. */
function outcome(r: TestRun): { message: string; sender: string | undefined; recipients: string[] } {
  return {
    message: (r.message?.toString() ?? '').replace(/^Received: [^]*?\r\n(?![ \t])/, 'Received: (masked)\r\n'),
    sender: r.envelope?.sender.address,
    recipients: r.envelope?.recipients.map((x) => x.address) ?? [],
  };
}

for (const [name, make] of cases) {
  test(`${name} declares needs ${JSON.stringify(make().needs)} and gives the same result served as in process`, async () => {
    const local = await runMilter(make(), script);
    assert.equal(local.verdict.type, 'continue');
    const server = await serveMilter(make(), { listen: 'inet:127.0.0.1:0' });
    try {
      const remote = await runMilter(connectMilter(`inet:127.0.0.1:${server.port}`), script);
      assert.deepEqual(outcome(remote), outcome(local));
    } finally {
      await server.close();
    }
  });
}

test('the in-process results show each milter did its work (so the comparison is not of two no-ops)', async () => {
  const r = async (m: Milter): Promise<ReturnType<typeof outcome>> => outcome(await runMilter(m, script));
  assert.ok((await r(cases[0]![1]())).recipients.includes('alice@example.test'));
  assert.ok((await r(cases[1]![1]())).recipients.includes('carol@example.test'));
  assert.ok((await r(cases[2]![1]())).recipients.includes('admin@example.test'));
  assert.match((await r(cases[3]![1]())).message, /\r\nFrom: Alice <alice@example\.test>\r\n/);
  const tagged = (await r(cases[4]![1]())).message;
  assert.doesNotMatch(tagged, /forged by the sender/);
  assert.match(tagged, /\r\nX-Spam-Status: No, score=/);
});
