/**
 * connectMilter against a real rspamd (Debian's 3.4): its rspamd_proxy worker in milter
 * mode, scanning by itself (self_scan), started by test/helpers/rspamd.ts with the
 * overrides in test/fixtures/rspamd. rspamd asks for every NR_* flag in OPTNEG, so all of
 * CONNECT … BODY goes unanswered and only end of message is waited for; there it answers
 * with header edits (X-Spamd-Result and friends added, the client's copies deleted through
 * CHGHEADER) or a REPLYCODE (reject, soft reject). The gateway runs spamTag after it,
 * reading rspamd's score from the X-Spamd-Result it wrote.
 *
 * One rspamd for the file (its start-up compiles hyperscan databases: several seconds);
 * the last test stops it.
 */
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { connectMilter } from '../../lib/milter/protocol/client.js';
import { SMFIP, SMFIP_NOREPLY_MASK } from '../../lib/milter/protocol/constants.js';
import { spamTag, formatScore } from '../../milters/spam-tag.js';
import { ehlo, RawClient, send, split, startGateway, stored, type TestGateway } from '../helpers/smtp.js';
import { startRspamd, type RunningRspamd } from '../helpers/rspamd.js';

const GTUBE = 'XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X';

let rspamd: RunningRspamd;

before(async () => {
  rspamd = await startRspamd();
});

after(async () => {
  await rspamd?.stop();
});

async function gateway(): Promise<TestGateway> {
  return startGateway({
    milters: [
      connectMilter(rspamd.spec, { name: 'rspamd', defaultAction: 'tempfail', connectTimeout: 5000, commandTimeout: 15_000, contentTimeout: 30_000 }),
      spamTag({ requiredScore: 5, remoteHeaders: ['rspamd'] }),
    ],
  });
}

function content(subject: string, extra = '', body = 'Hello Bob,\r\n\r\nsee you at lunch.\r\n'): string {
  return (
    `From: Alice <alice@sender.test>\r\nTo: Bob <bob@example.test>\r\nSubject: ${subject}\r\n` +
    `Date: ${new Date().toUTCString()}\r\nMessage-ID: <${Math.random().toString(36).slice(2)}@sender.test>\r\n` +
    `MIME-Version: 1.0\r\nContent-Type: text/plain; charset=us-ascii\r\n${extra}\r\n${body}`
  );
}

/** Every header field called `name` (case-insensitive), unfolded. */
function fields(headers: string, name: string): string[] {
  const out: string[] = [];
  for (const f of headers.split(/\r\n(?![ \t])/)) {
    const colon = f.indexOf(':');
    if (colon > 0 && f.slice(0, colon).toLowerCase() === name.toLowerCase()) out.push(f.slice(colon + 1).replace(/\r\n[ \t]/g, ' ').trim());
  }
  return out;
}

/** rspamd's `default: False [0.90 / 15.00]; SYMBOL(score)[…]; …`: the score, the reject threshold, the symbols. */
function spamdResult(value: string): { score: number; reject: number; symbols: string[] } {
  const m = /^default: (?:True|False) \[(-?\d+(?:\.\d+)?) \/ (\d+(?:\.\d+)?)\]/.exec(value);
  assert.ok(m, `not an X-Spamd-Result: ${value}`);
  const symbols = [...value.matchAll(/;\s*([A-Z0-9_]+)\(/g)].map((s) => s[1] ?? '');
  return { score: Number(m[1]), reject: Number(m[2]), symbols };
}

/** The one stored message for `rcpt`, as headers (unsplit) and body. */
async function theMessage(gw: TestGateway, rcpt: string): Promise<{ headers: string; body: string }> {
  const all = await stored(gw.root, rcpt);
  assert.equal(all.length, 1, `messages stored for ${rcpt}`);
  const { headers, body } = split(all[0]!);
  return { headers, body: body.toString() };
}

test('rspamd asks for every NR_* flag; messages come back with its X-Spamd-Result, and spamTag follows its score', async (t) => {
  t.diagnostic(`rspamd started in ${rspamd.startupMs} ms; OPTNEG reply: version ${rspamd.negotiation.version}, actions 0x${rspamd.negotiation.actions.toString(16)}, protocol 0x${rspamd.negotiation.protocol.toString(16)}`);
  const neg = rspamd.negotiation;
  assert.equal(neg.version, 6);
  // The premise of this test: every stage before end of message is sent without a reply.
  assert.equal(neg.protocol & SMFIP_NOREPLY_MASK, SMFIP_NOREPLY_MASK, `rspamd's protocol flags 0x${neg.protocol.toString(16)}`);
  assert.equal(neg.protocol & (SMFIP.NOHDRS | SMFIP.NOBODY | SMFIP.NOEOH), 0, 'rspamd wants headers and body');

  const gw = await gateway();
  try {
    const c = await ehlo(gw.port);

    // 1. A plain message: delivered with rspamd's headers; spamTag says No with rspamd's score.
    //    Its body (~190 KB) goes as several BODY chunks, none of them answered (NR_BODY).
    const long = 'Hello Bob,\r\n\r\n' + Array.from({ length: 4000 }, (_, i) => `see you at lunch; this is line ${i} of a long letter.\r\n`).join('');
    const plain = await send(c, 'alice@sender.test', ['bob@example.test'], content('lunch', '', long));
    assert.equal(plain.data?.code, 250, `${plain.data?.text}\n${await rspamd.log()}`);
    const queueId = /queued as (\S+)/.exec(plain.data?.text ?? '')?.[1];
    const m1 = await theMessage(gw, 'bob@example.test');
    const results1 = fields(m1.headers, 'X-Spamd-Result');
    assert.equal(results1.length, 1, m1.headers);
    const r1 = spamdResult(results1[0]!);
    assert.equal(r1.reject, 15, 'the packaged reject threshold');
    assert.ok(r1.score < 5, `a plain message scores under 5: ${results1[0]}`);
    // rspamd read the {i} macro we sent at end of message: its queue id is ours.
    assert.deepEqual(fields(m1.headers, 'X-Rspamd-Queue-Id'), [queueId]);
    assert.deepEqual(fields(m1.headers, 'X-Spam-Status'), [`No, score=${formatScore(r1.score)} required=5.0 tests=RSPAMD`]);
    assert.deepEqual(fields(m1.headers, 'X-Spam-Score'), [formatScore(r1.score)]);
    assert.deepEqual(fields(m1.headers, 'X-Spam-Flag'), []);
    assert.equal(m1.body, long);

    // 2. Same session (ABORT, then the next message on the same filter connection): a
    //    message with the test symbol (+7) and a forged X-Spamd-Result, which rspamd deletes
    //    (CHGHEADER with an empty value) before adding its own.
    const forged = 'X-Dovetail-Test: spammy\r\nX-Spamd-Result: default: False [-50.00 / 15.00]\r\n';
    const spammy = await send(c, 'alice@sender.test', ['carol@example.test'], content('lunch', forged));
    assert.equal(spammy.data?.code, 250, `${spammy.data?.text}\n${await rspamd.log()}`);
    const m2 = await theMessage(gw, 'carol@example.test');
    const results2 = fields(m2.headers, 'X-Spamd-Result');
    assert.equal(results2.length, 1, `the forged copy is gone:\n${m2.headers}`);
    const r2 = spamdResult(results2[0]!);
    assert.ok(r2.symbols.includes('DOVETAIL_TEST_SPAMMY'), results2[0]);
    // Over rspamd's add_header action (6) and spamTag's requiredScore, under rspamd's reject (15).
    assert.ok(r2.score >= 6 && r2.score < 15, results2[0]);
    assert.ok(r2.score > r1.score + 5, `${r2.score} vs ${r1.score}`);
    t.diagnostic(`rspamd scores: plain ${r1.score}, spammy ${r2.score}`);
    // rspamd's own verdict header for its add_header action (spam_header = "X-Spam").
    assert.deepEqual(fields(m2.headers, 'X-Spam'), ['Yes']);
    assert.deepEqual(fields(m2.headers, 'X-Spam-Status'), [`Yes, score=${formatScore(r2.score)} required=5.0 tests=RSPAMD`]);
    assert.deepEqual(fields(m2.headers, 'X-Spam-Flag'), ['YES']);
    assert.deepEqual(fields(m2.headers, 'X-Dovetail-Test'), ['spammy']);

    assert.equal((await c.cmd('QUIT')).code, 221);
  } finally {
    await gw.close();
  }
});

test("rspamd's reject (GTUBE) and soft reject reach the client as rspamd's replies; the session goes on", async () => {
  const gw = await gateway();
  try {
    const c = await ehlo(gw.port);
    const gtube = await send(c, 'alice@sender.test', ['bob@example.test'], content('gtube', '', `This is the GTUBE:\r\n\r\n${GTUBE}\r\n`));
    assert.equal(gtube.data?.text, '554 5.7.1 Gtube pattern', await rspamd.log());

    const soft = await send(c, 'alice@sender.test', ['bob@example.test'], content('later', 'X-Dovetail-Test: tempfail\r\n'));
    assert.equal(soft.data?.code, 451, `${soft.data?.text}\n${await rspamd.log()}`);
    assert.equal(soft.data?.text, '451 4.7.1 Try again later (dovetail test)');
    assert.deepEqual(await stored(gw.root, 'bob@example.test'), []);

    // Both refusals ended the message at rspamd, not the connection: the next one goes through.
    const ok = await send(c, 'alice@sender.test', ['bob@example.test'], content('after the refusals'));
    assert.equal(ok.data?.code, 250, `${ok.data?.text}\n${await rspamd.log()}`);
    const m = await theMessage(gw, 'bob@example.test');
    assert.equal(fields(m.headers, 'X-Spamd-Result').length, 1);
    assert.equal((await c.cmd('QUIT')).code, 221);
  } finally {
    await gw.close();
  }
});

test('rspamd stopped: the default action (tempfail), at once, for an open session and a new one', async (t) => {
  const gw = await gateway();
  try {
    // A session that talked to rspamd already (CONNECT, HELO sent), mid-message when it goes.
    const open = await ehlo(gw.port);
    assert.equal((await open.cmd('MAIL FROM:<alice@sender.test>')).code, 250);
    await rspamd.stop();
    const t0 = Date.now();
    const rcpt = await open.cmd('RCPT TO:<bob@example.test>');
    let final = rcpt;
    if (rcpt.code === 250) {
      // The RCPT went out unanswered (NR_RCPT) before the close was seen: end of message finds it.
      final = await open.data(content('lost'));
    }
    assert.equal(final.code, 451, final.text);
    assert.equal(final.text, '451 4.7.1 Service unavailable - try again later');
    assert.ok(Date.now() - t0 < 5000, `took ${Date.now() - t0} ms`);
    t.diagnostic(`the open session got 451 at ${rcpt.code === 250 ? 'end of DATA' : 'RCPT'}, ${Date.now() - t0} ms after rspamd stopped`);
    // Failed for the rest of that session (as Postfix): MAIL is refused too, quickly.
    assert.equal((await open.cmd('RSET')).code, 250);
    assert.equal((await open.cmd('MAIL FROM:<alice@sender.test>')).code, 451);
    open.end();

    // A new session: connection refused at CONNECT → the session is refused at the greeting.
    const t1 = Date.now();
    const c = await RawClient.connect(gw.port);
    const greeting = await c.reply();
    assert.equal(greeting.code, 421, greeting.text);
    await c.waitClosed();
    assert.ok(Date.now() - t1 < 5000, `took ${Date.now() - t1} ms`);
    assert.deepEqual(await stored(gw.root, 'bob@example.test'), []);
  } finally {
    await gw.close();
  }
});
