/**
 * spamTag through a running gateway over real SMTP. A small in-test milter ahead of it adds
 * the score entries a message asks for (its `X-Test-Score: 3.2 RULE_A, 3.1 RULE_B` header),
 * another plays a remote filter that appends its own score header; the stored messages'
 * headers are checked exactly: the SpamAssassin set, the Level stars Sieve rules match,
 * spoofed headers removed, the subject tagged once, and the reject and quarantine
 * thresholds.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { defineMilter, type Milter } from '../../lib/index.js';
import { spamTag, formatScore, spamLevel, type SpamTagOptions } from '../../milters/spam-tag.js';
import { ehlo, send, split, startGateway, stored, type TestGateway } from '../helpers/smtp.js';

/** Adds the score entries listed in the message's X-Test-Score header. */
const scorer = defineMilter({
  name: 'scorer',
  async eom(ctx) {
    const spec = ctx.headers.find((h) => h.name.toLowerCase() === 'x-test-score')?.value ?? '';
    for (const item of spec.split(',')) {
      const [points, reason] = item.trim().split(/\s+/);
      if (points && reason) ctx.score.add(Number(points), reason);
    }
  },
});

/** Plays a remote filter (rspamd / SpamAssassin behind connectMilter): appends the header the message asks for. */
const remoteFilter = defineMilter({
  name: 'remote-filter',
  async eom(ctx) {
    const spec = ctx.headers.find((h) => h.name.toLowerCase() === 'x-test-remote')?.value;
    if (!spec) return;
    const colon = spec.indexOf(':');
    ctx.message.addHeader(spec.slice(0, colon), spec.slice(colon + 1).trim());
  },
});

async function gateway(options: SpamTagOptions = {}, before: readonly Milter[] = [scorer]): Promise<TestGateway> {
  return startGateway({ milters: [...before, spamTag(options)] });
}

function msg(extra: string, subject: string | null = 'hello'): string {
  return (
    `From: Alice <alice@sender.test>\r\nTo: Bob <bob@example.test>\r\n` +
    (subject === null ? '' : `Subject: ${subject}\r\n`) +
    `Message-ID: <${Math.random().toString(36).slice(2)}@sender.test>\r\n${extra}\r\nHello.\r\n`
  );
}

let seq = 0;
/** The recipient of the last message sent: each message goes to its own mailbox, so "the last one" is never ambiguous. */
let rcpt = 'bob@example.test';

/** Sends one message to a fresh recipient (bob+N@example.test); returns the DATA reply. */
async function deliver(gw: TestGateway, content: string): Promise<string> {
  rcpt = `bob+${++seq}@example.test`;
  const c = await ehlo(gw.port);
  try {
    const r = await send(c, 'alice@sender.test', [rcpt], content);
    return r.data?.text ?? '';
  } finally {
    c.end();
  }
}

/** The header lines of the message last sent, as stored in `root`, unfolded, as `Name: value`. */
async function lastHeaders(root: string): Promise<string[]> {
  const all = await stored(root, rcpt);
  assert.equal(all.length, 1, `one message stored for ${rcpt}`);
  return split(all[0]!).headers.replace(/\r\n(?=[ \t])/g, '').split('\r\n').filter(Boolean);
}

/** How many messages were stored in `root` for the recipient of the message last sent. */
async function count(root: string): Promise<number> {
  return (await stored(root, rcpt)).length;
}

const spamLines = (headers: readonly string[]): string[] => headers.filter((h) => /^X-Spam-/i.test(h));
const valueOf = (headers: readonly string[], name: string): string[] =>
  headers.filter((h) => h.toLowerCase().startsWith(name.toLowerCase() + ':')).map((h) => h.slice(name.length + 1).trim());

test('spam: X-Spam-Flag, -Score, -Level, -Status exactly as SpamAssassin writes them', async () => {
  const gw = await gateway();
  try {
    assert.match(await deliver(gw, msg('X-Test-Score: 3.2 RULE_B, 3.1 RULE_A\r\n')), /^250 /);
    assert.deepEqual(spamLines(await lastHeaders(gw.root)), [
      'X-Spam-Flag: YES',
      'X-Spam-Score: 6.3',
      'X-Spam-Level: ******',
      'X-Spam-Status: Yes, score=6.3 required=5.0 tests=RULE_A,RULE_B',
    ]);
    // Exactly at the required score is spam.
    await deliver(gw, msg('X-Test-Score: 5 EXACT\r\n'));
    assert.deepEqual(spamLines(await lastHeaders(gw.root)), [
      'X-Spam-Flag: YES',
      'X-Spam-Score: 5.0',
      'X-Spam-Level: *****',
      'X-Spam-Status: Yes, score=5.0 required=5.0 tests=EXACT',
    ]);
  } finally {
    await gw.close();
  }
});

test('ham, zero and negative scores: no flag; Level has one star per whole point, empty under 1', async () => {
  const gw = await gateway({ requiredScore: 6.5 });
  try {
    await deliver(gw, msg('X-Test-Score: 4.99 NEAR\r\n'));
    assert.deepEqual(spamLines(await lastHeaders(gw.root)), [
      'X-Spam-Score: 5.0',
      'X-Spam-Level: ****',
      'X-Spam-Status: No, score=5.0 required=6.5 tests=NEAR',
    ]);
    await deliver(gw, msg(''));
    assert.deepEqual(spamLines(await lastHeaders(gw.root)), ['X-Spam-Score: 0.0', 'X-Spam-Level: ', 'X-Spam-Status: No, score=0.0 required=6.5 tests=none']);
    await deliver(gw, msg('X-Test-Score: -2.5 DKIM_VALID, 0.4 SOME_RULE\r\n'));
    assert.deepEqual(spamLines(await lastHeaders(gw.root)), [
      'X-Spam-Score: -2.1',
      'X-Spam-Level: ',
      'X-Spam-Status: No, score=-2.1 required=6.5 tests=DKIM_VALID,SOME_RULE',
    ]);
  } finally {
    await gw.close();
  }
  assert.equal(spamLevel(0.99), '');
  assert.equal(spamLevel(1), '*');
  assert.equal(spamLevel(7.9), '*******');
  assert.equal(spamLevel(500), '*'.repeat(50));
  assert.equal(formatScore(-0.04), '0.0');
});

test('what a Sieve rule `header :contains "X-Spam-Level" "*****"` sees: five stars from 5 points on', async () => {
  const gw = await gateway();
  try {
    for (const [points, matches] of [['4.9', false], ['5.0', true], ['12.7', true]] as const) {
      await deliver(gw, msg(`X-Test-Score: ${points} R\r\n`));
      const level = valueOf(await lastHeaders(gw.root), 'X-Spam-Level');
      assert.equal(level.length, 1);
      assert.equal(level[0]!.includes('*****'), matches, `${points} points → ${JSON.stringify(level[0])}`);
    }
  } finally {
    await gw.close();
  }
});

test('spoofed X-Spam-* headers from the client are removed before spamTag adds its own', async () => {
  const gw = await gateway();
  try {
    const spoof =
      'X-Spam-Flag: NO\r\nX-Spam-Status: No, score=-100.0 required=5.0 tests=ALL_TRUSTED\r\n' +
      'X-Spam-Score: -100\r\nx-spam-score: -99\r\nX-Spam-Level: \r\nX-Test-Score: 7.2 BAD_STUFF\r\n';
    assert.match(await deliver(gw, msg(spoof)), /^250 /);
    const headers = await lastHeaders(gw.root);
    assert.deepEqual(spamLines(headers), [
      'X-Spam-Flag: YES',
      'X-Spam-Score: 7.2',
      'X-Spam-Level: *******',
      'X-Spam-Status: Yes, score=7.2 required=5.0 tests=BAD_STUFF',
    ]);
    // And a ham message cannot smuggle in a flag.
    await deliver(gw, msg('X-Spam-Flag: YES\r\nX-Spam-Level: **********\r\n'));
    assert.deepEqual(spamLines(await lastHeaders(gw.root)), ['X-Spam-Score: 0.0', 'X-Spam-Level: ', 'X-Spam-Status: No, score=0.0 required=5.0 tests=none']);
  } finally {
    await gw.close();
  }
});

test('subject tag: prepended once to spam, never doubled (plain or encoded), not on ham; added when missing', async () => {
  const gw = await gateway({ subjectTag: '[SPAM]' });
  try {
    const subjectOf = async (content: string): Promise<string[]> => {
      assert.match(await deliver(gw, content), /^250 /);
      return valueOf(await lastHeaders(gw.root), 'Subject');
    };
    assert.deepEqual(await subjectOf(msg('X-Test-Score: 6 R\r\n', 'cheap pills')), ['[SPAM] cheap pills']);
    assert.deepEqual(await subjectOf(msg('X-Test-Score: 6 R\r\n', '[SPAM] cheap pills')), ['[SPAM] cheap pills']);
    // "=?UTF-8?B?W1NQQU1dIGNoZWFw?=" is "[SPAM] cheap": already tagged.
    assert.deepEqual(await subjectOf(msg('X-Test-Score: 6 R\r\n', '=?UTF-8?B?W1NQQU1dIGNoZWFw?=')), ['=?UTF-8?B?W1NQQU1dIGNoZWFw?=']);
    assert.deepEqual(await subjectOf(msg('X-Test-Score: 6 R\r\n', '=?UTF-8?Q?gr=C3=BC=C3=9Fe?=')), ['[SPAM] =?UTF-8?Q?gr=C3=BC=C3=9Fe?=']);
    assert.deepEqual(await subjectOf(msg('X-Test-Score: 1 R\r\n', 'lunch')), ['lunch']);
    assert.deepEqual(await subjectOf(msg('X-Test-Score: 9 R\r\n', null)), ['[SPAM]']);
  } finally {
    await gw.close();
  }
});

test('rejectScore refuses with 550 5.7.1 at the end of DATA; quarantineScore sends tagged spam to quarantine', async () => {
  const gw = await gateway({ quarantineScore: 8, rejectScore: 15 });
  try {
    assert.equal(await deliver(gw, msg('X-Test-Score: 15.0 HUGE\r\n')), '550 5.7.1 Message rejected as spam');
    assert.equal(await deliver(gw, msg('X-Test-Score: 20 HUGE, -3 DKIM_VALID\r\n')), '550 5.7.1 Message rejected as spam');
    assert.equal(await count(gw.root), 0);
    assert.equal(await count(gw.quarantineRoot), 0);

    assert.match(await deliver(gw, msg('X-Test-Score: 9.5 PHISH\r\n')), /^250 /);
    assert.equal(await count(gw.root), 0);
    const q = await lastHeaders(gw.quarantineRoot);
    assert.deepEqual(valueOf(q, 'X-Dovetail-Quarantine'), ['spam score 9.5 >= 8.0']);
    assert.deepEqual(spamLines(q), ['X-Spam-Flag: YES', 'X-Spam-Score: 9.5', 'X-Spam-Level: *********', 'X-Spam-Status: Yes, score=9.5 required=5.0 tests=PHISH']);

    // Spam under the quarantine score is delivered, tagged.
    assert.match(await deliver(gw, msg('X-Test-Score: 7.9 MEH\r\n')), /^250 /);
    assert.deepEqual(valueOf(await lastHeaders(gw.root), 'X-Spam-Flag'), ['YES']);
    assert.equal(await count(gw.quarantineRoot), 0);
  } finally {
    await gw.close();
  }
  assert.throws(() => spamTag({ requiredScore: Number.NaN }), { code: 'DOVETAIL_ERR_INVALID_OPTIONS' });
  assert.throws(() => spamTag({ subjectTag: '[SPAM]\r\nBcc: x@y' }), { code: 'DOVETAIL_ERR_INVALID_OPTIONS' });
});

test('remote filters’ headers: rspamd’s X-Spamd-Result and SpamAssassin’s X-Spam-Status / X-Spam-Score count when asked, the filter’s copy wins over a spoofed one', async () => {
  let gw = await gateway({ remoteHeaders: true }, [scorer, remoteFilter]);
  try {
    // rspamd 3.40 + our 2.0 = 5.4. The client's own X-Spamd-Result (-50) comes before the filter's.
    await deliver(
      gw,
      msg('X-Spamd-Result: default: False [-50.00 / 15.00]\r\nX-Test-Score: 2 RBL_HIT\r\nX-Test-Remote: X-Spamd-Result: default: False [3.40 / 15.00];\r\n\tR_SPF_FAIL(1.00)[-all];\r\n'),
    );
    assert.deepEqual(spamLines(await lastHeaders(gw.root)), [
      'X-Spam-Flag: YES',
      'X-Spam-Score: 5.4',
      'X-Spam-Level: *****',
      'X-Spam-Status: Yes, score=5.4 required=5.0 tests=RBL_HIT,RSPAMD',
    ]);
    // SpamAssassin's status line (spamass-milter), replaced by ours.
    await deliver(gw, msg('X-Test-Remote: X-Spam-Status: Yes, score=5.2 required=5.0 tests=BAYES_99,URIBL_BLACK autolearn=no\r\n'));
    assert.deepEqual(spamLines(await lastHeaders(gw.root)), [
      'X-Spam-Flag: YES',
      'X-Spam-Score: 5.2',
      'X-Spam-Level: *****',
      'X-Spam-Status: Yes, score=5.2 required=5.0 tests=SPAMASSASSIN',
    ]);
    // A bare X-Spam-Score, negative.
    await deliver(gw, msg('X-Test-Score: 1 R\r\nX-Test-Remote: X-Spam-Score: -3.5\r\n'));
    assert.deepEqual(valueOf(await lastHeaders(gw.root), 'X-Spam-Score'), ['-2.5']);
  } finally {
    await gw.close();
  }
  // Without remoteHeaders the filter's header is not counted (and ours replaces it).
  gw = await gateway({}, [scorer, remoteFilter]);
  try {
    await deliver(gw, msg('X-Test-Score: 2 RBL_HIT\r\nX-Test-Remote: X-Spam-Status: Yes, score=9.9 required=5.0 tests=X\r\n'));
    assert.deepEqual(spamLines(await lastHeaders(gw.root)), ['X-Spam-Score: 2.0', 'X-Spam-Level: **', 'X-Spam-Status: No, score=2.0 required=5.0 tests=RBL_HIT']);
  } finally {
    await gw.close();
  }
});

test('a client’s own score header is never trusted, even when it is the only one (regression: headers carry their origin)', async () => {
  const gw = await gateway({ remoteHeaders: true }, [scorer, remoteFilter]);
  try {
    // No remote filter header this time: the client's X-Spamd-Result / X-Spam-Score are forgeries.
    await deliver(gw, msg('X-Spamd-Result: default: False [-50.00 / 15.00]\r\nX-Spam-Score: -40\r\nX-Test-Score: 6 RBL_HIT\r\n'));
    assert.deepEqual(spamLines(await lastHeaders(gw.root)), [
      'X-Spam-Flag: YES',
      'X-Spam-Score: 6.0',
      'X-Spam-Level: ******',
      'X-Spam-Status: Yes, score=6.0 required=5.0 tests=RBL_HIT',
    ]);
  } finally {
    await gw.close();
  }
});
