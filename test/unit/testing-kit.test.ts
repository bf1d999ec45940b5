/**
 * dovetail/testing in process: runMilter() and TestSession over bundled milters and
 * small milters written here, asserting the verdicts and edits the chain really produced —
 * stage skipping after a final verdict, default actions on a throw and a timeout, macros,
 * several transactions with RSET, the gateway's own refusals of bad input.
 */
import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { Readable } from 'node:stream';
import { accept, defineMilter, discard, quarantine, reject, tempfail, type Milter } from '../../lib/index.js';
import { runMilter, startSession, type MilterEvent } from '../../lib/testing/index.js';
import { aliases, relayControl, sizeLimit, spamTag } from '../../milters/index.js';

const MSG = 'From: a@example.net\r\nTo: b@example.com\r\nSubject: hi\r\n\r\nbody\r\n';

/** A milter that writes down which stages it was called for. */
function recorder(name: string, calls: string[], extra: Partial<Milter> = {}): Milter {
  const note = (s: string) => async () => {
    calls.push(`${name}:${s}`);
  };
  return defineMilter({
    name,
    connect: note('connect'),
    helo: note('helo'),
    mail: note('mail'),
    rcpt: note('rcpt'),
    data: note('data'),
    header: note('header'),
    eoh: note('eoh'),
    body: note('body'),
    eom: note('eom'),
    abort: note('abort'),
    close: note('close'),
    ...extra,
  } as Milter);
}

describe('runMilter: verdicts and edits of one milter', () => {
  it('reports every kind of eom edit, the refused recipient, and the message with the edits applied', async () => {
    const m = defineMilter({
      name: 'editor',
      async rcpt(_ctx, rcpt) {
        if (rcpt.address.startsWith('nobody@')) return reject(550, '5.1.1', 'No such user');
      },
      async eom(ctx) {
        ctx.message.addHeader('X-Checked', 'yes');
        ctx.message.insertHeader(1, 'X-First', 'yes');
        ctx.message.changeHeader('Subject', 1, '[ext] hi');
        ctx.message.deleteHeader('X-Internal', 1);
        ctx.message.replaceBody('new body\n');
        ctx.envelope.changeSender('<bounce@example.net>', 'BODY=8BITMIME');
        ctx.envelope.addRecipient('archive@example.com');
        ctx.envelope.removeRecipient('old@example.com');
        ctx.quarantine('looked odd');
      },
    });
    const r = await runMilter(m, {
      client: { address: '192.0.2.1', hostname: 'mx.example.net' },
      helo: 'mx.example.net',
      from: 'a@example.net',
      to: ['b@example.com', 'nobody@example.com', 'old@example.com'],
      message: 'Subject: hi\r\nX-Internal: secret\r\n\r\nbody\r\n',
    });
    assert.equal(r.verdict.stage, 'eom');
    assert.equal(r.verdict.type, 'continue');
    assert.equal(r.verdict.reply?.code, 250);
    assert.match(r.verdict.reply?.lines[0] ?? '', /^Ok: queued as [0-9A-Z]{12}$/);
    assert.deepEqual(r.transactions[0]?.rcpt.map((s) => `${s.reply?.code} ${s.reply?.enhanced} ${s.reply?.lines.join('|')}`), [
      '250 2.1.5 Accepted',
      '550 5.1.1 No such user',
      '250 2.1.5 Accepted',
    ]);
    assert.deepEqual(r.edits.headersAdded, [{ name: 'X-Checked', value: 'yes' }]);
    assert.deepEqual(r.edits.headersInserted, [{ position: 1, name: 'X-First', value: 'yes' }]);
    assert.deepEqual(r.edits.headersChanged, [{ name: 'Subject', index: 1, value: '[ext] hi' }]);
    assert.deepEqual(r.edits.headersDeleted, [{ name: 'X-Internal', index: 1 }]);
    assert.equal(r.edits.body?.toString(), 'new body\r\n');
    assert.deepEqual(r.edits.sender, { address: 'bounce@example.net', args: { BODY: '8BITMIME' } });
    assert.deepEqual(r.edits.recipientsAdded, [{ address: 'archive@example.com', args: {} }]);
    assert.deepEqual(r.edits.recipientsRemoved, ['old@example.com']);
    assert.equal(r.edits.quarantine, 'looked odd');
    assert.equal(r.quarantine, 'looked odd');
    assert.equal(r.edits.all.length, 9);
    assert.ok(r.edits.all.every((e) => e.milter === 'editor'));
    assert.deepEqual(
      r.envelope?.recipients.map((x) => x.address),
      ['b@example.com', 'archive@example.com'],
    );
    assert.equal(r.envelope?.sender.address, 'bounce@example.net');
    const text = r.message?.toString() ?? '';
    // X-First before the gateway's Received header; Subject changed in place; X-Internal gone; body replaced.
    assert.match(text, /^X-First: yes\r\nReceived: from mx\.example\.net \(mx\.example\.net \[192\.0\.2\.1\]\)\r\n\tby localhost \(dovetail\) with ESMTP id [0-9A-Z]{12}; \w{3}, /);
    assert.match(text, /\r\nSubject: \[ext\] hi\r\nX-Checked: yes\r\n\r\nnew body\r\n$/);
    assert.doesNotMatch(text, /X-Internal/);
    assert.deepEqual(
      r.headers?.map((h) => [h.name, h.origin]),
      [
        ['X-First', 'editor'],
        ['Received', undefined],
        ['Subject', 'editor'],
        ['X-Checked', 'editor'],
      ],
    );
    assert.deepEqual(
      r.events.map((e) => `${e.milter}:${e.stage}:${'verdict' in e ? e.verdict.type : 'error'}`),
      ['editor:rcpt:reject'],
    );
  });

  it('a quarantine verdict at eom is an edit; a reject at eom drops the edits made before it', async () => {
    const q = await runMilter(
      defineMilter({
        name: 'q',
        async eom(ctx) {
          ctx.message.addHeader('X-Q', '1');
          return quarantine('suspicious');
        },
      }),
      { from: 'a@example.net', to: 'b@example.com', message: MSG },
    );
    assert.equal(q.quarantine, 'suspicious');
    assert.deepEqual(
      q.edits.all.map((e) => e.edit.op),
      ['addHeader', 'quarantine'],
    );
    const rej = await runMilter(
      defineMilter({
        name: 'rej',
        async eom(ctx) {
          ctx.message.addHeader('X-Never', '1');
          return reject(554, '5.7.1', 'Content refused');
        },
      }),
      { from: 'a@example.net', to: 'b@example.com', message: MSG },
    );
    assert.deepEqual(rej.verdict, { stage: 'eom', type: 'reject', reply: { code: 554, enhanced: '5.7.1', lines: ['Content refused'] }, milter: 'rej' });
    assert.deepEqual(rej.edits.all, []);
    assert.equal(rej.message, undefined);
  });

  it('the same script drives a chain: each milter sees the edits of those before it', async () => {
    const seen: string[] = [];
    const first = defineMilter({
      name: 'first',
      async eom(ctx) {
        ctx.message.changeHeader('Subject', 1, 'changed');
        ctx.score.add(6, 'FIRST_RULE');
      },
    });
    const second = defineMilter({
      name: 'second',
      async header(_ctx, h) {
        if (h.name === 'Subject') seen.push(`${h.value}/${h.origin}`);
      },
    });
    const r = await runMilter([first, second, spamTag({ requiredScore: 5, subjectTag: '[SPAM]' })], {
      from: 'a@example.net',
      to: 'b@example.com',
      message: MSG,
    });
    assert.deepEqual(seen, ['changed/first']);
    assert.equal(r.score.total, 6);
    assert.deepEqual(r.score.entries, [{ points: 6, reason: 'FIRST_RULE', milter: 'first' }]);
    assert.deepEqual(
      r.edits.headersAdded.map((h) => h.name),
      ['X-Spam-Flag', 'X-Spam-Score', 'X-Spam-Level', 'X-Spam-Status'],
    );
    assert.deepEqual(r.edits.headersChanged, [
      { name: 'Subject', index: 1, value: 'changed' },
      { name: 'Subject', index: 1, value: '[SPAM] changed' },
    ]);
    assert.deepEqual(
      r.edits.all.map((e) => e.milter),
      ['first', 'spam-tag', 'spam-tag', 'spam-tag', 'spam-tag', 'spam-tag'],
    );
    assert.match(r.message?.toString() ?? '', /\r\nSubject: \[SPAM\] changed\r\n[^]*X-Spam-Status: Yes, score=6\.0 required=5\.0 tests=FIRST_RULE\r\n\r\nbody\r\n$/);
  });
});

describe('runMilter with bundled milters', () => {
  it('sizeLimit: SIZE= over the limit is refused at MAIL, a bigger message at the end of DATA', async () => {
    const limit = sizeLimit({ maxBytes: 100 });
    const declared = await runMilter(limit, { from: { address: 'a@example.net', args: { SIZE: '5000' } }, to: 'b@example.com', message: MSG });
    assert.equal(declared.verdict.stage, 'mail');
    assert.deepEqual(declared.verdict.reply, { code: 552, enhanced: '5.3.4', lines: ['Error: message exceeds fixed maximum message size 100'] });
    assert.equal(declared.transactions[0]?.rcpt.length, 0);
    const big = await runMilter(limit, { hostname: 'mx.test', from: 'a@example.net', to: 'b@example.com', message: `Subject: big\r\n\r\n${'x'.repeat(200)}\r\n` });
    assert.deepEqual(big.verdict, {
      stage: 'data',
      type: 'reject',
      reply: { code: 552, enhanced: '5.3.4', lines: ['Error: message size exceeds the 100-byte limit of mx.test'] },
      milter: undefined,
    });
    const small = await runMilter(limit, { from: 'a@example.net', to: 'b@example.com', message: 'Subject: s\r\n\r\nok\r\n' });
    assert.equal(small.verdict.type, 'continue');
    // served without the gateway's SIZE check, its own mail handler answers (Postfix's text): step by step, the SIZE is under the kit's limit
    const s = await startSession(limit, { maxMessageBytes: 10_000 });
    try {
      await s.helo('client.test');
      const mail = await s.mail({ address: 'a@example.net', args: { SIZE: '5000' } });
      assert.equal(mail.reply?.code, 552);
    } finally {
      await s.close();
    }
  });

  it('relayControl: our domains and mynetworks pass, relaying for a stranger is refused at RCPT', async () => {
    const relay = relayControl({ relayDomains: ['example.com'], mynetworks: ['10.0.0.0/8'] });
    const r = await runMilter(relay, {
      client: { address: '192.0.2.7' },
      from: 'a@example.net',
      to: ['b@example.com', 'c@elsewhere.example'],
      message: MSG,
    });
    assert.deepEqual(
      r.transactions[0]?.rcpt.map((s) => [s.reply?.code, s.reply?.lines[0]]),
      [
        [250, 'Accepted'],
        [554, '<c@elsewhere.example>: Relay access denied'],
      ],
    );
    assert.deepEqual(r.envelope?.recipients.map((x) => x.address), ['b@example.com']);
    const onlyStranger = await runMilter(relay, { client: { address: '192.0.2.7' }, from: 'a@example.net', to: 'c@elsewhere.example', message: MSG });
    assert.equal(onlyStranger.verdict.stage, 'rcpt');
    assert.equal(onlyStranger.verdict.milter, 'relay-control');
    assert.equal(onlyStranger.transactions[0]?.data, undefined);
    const inside = await runMilter(relay, { client: { address: '10.1.2.3' }, from: 'a@example.net', to: 'c@elsewhere.example', message: MSG });
    assert.equal(inside.verdict.type, 'continue');
  });

  it('aliases: the recipient list after eom is the expansion', async () => {
    const r = await runMilter(aliases({ map: { team: ['alice', 'carol@example.org'] }, domains: ['example.com'] }), {
      from: 'a@example.net',
      to: ['team@example.com', 'dave@example.com'],
      message: MSG,
    });
    assert.equal(r.verdict.type, 'continue');
    assert.deepEqual(
      r.envelope?.recipients.map((x) => x.address).sort(),
      ['alice@example.com', 'carol@example.org', 'dave@example.com'],
    );
    assert.deepEqual(r.edits.recipientsRemoved, ['team@example.com']);
    assert.deepEqual(r.edits.recipientsAdded.map((x) => x.address).sort(), ['alice@example.com', 'carol@example.org']);
  });

  it('spamTag with rejectScore refuses at eom, naming itself', async () => {
    const scorer = defineMilter({
      name: 'scorer',
      async rcpt(ctx) {
        ctx.score.add(20, 'VERY_BAD');
      },
    });
    const r = await runMilter([scorer, spamTag({ rejectScore: 15 })], { from: 'a@example.net', to: 'b@example.com', message: MSG });
    assert.deepEqual(r.verdict, { stage: 'eom', type: 'reject', reply: { code: 550, enhanced: '5.7.1', lines: ['Message rejected as spam'] }, milter: 'spam-tag' });
  });
});

describe('the chain semantics the kit inherits from the gateway', () => {
  it('a reject at mail ends the stage: later milters are not asked, the transaction stops, abort runs', async () => {
    const calls: string[] = [];
    const r = await runMilter(
      [recorder('a', calls, { mail: async () => (calls.push('a:mail'), reject(550, '5.7.1', 'Sender refused')) } as Partial<Milter>), recorder('b', calls)],
      { from: 'a@example.net', to: 'b@example.com', message: MSG },
    );
    assert.deepEqual(r.verdict, { stage: 'mail', type: 'reject', reply: { code: 550, enhanced: '5.7.1', lines: ['Sender refused'] }, milter: 'a' });
    assert.deepEqual(calls, ['a:connect', 'b:connect', 'a:helo', 'b:helo', 'a:mail', 'a:abort', 'b:abort', 'a:close', 'b:close']);
  });

  it('accept at connect drops the milter for the session but not its close; accept at eoh skips its body and eom', async () => {
    const calls: string[] = [];
    const r = await runMilter(
      [
        recorder('a', calls, { connect: async () => (calls.push('a:connect'), accept()) } as Partial<Milter>),
        recorder('b', calls, { eoh: async () => (calls.push('b:eoh'), accept()) } as Partial<Milter>),
      ],
      { from: 'a@example.net', to: 'b@example.com', message: 'Subject: x\r\n\r\nbody\r\n' },
    );
    assert.equal(r.verdict.type, 'continue');
    assert.deepEqual(calls, [
      'a:connect',
      'b:connect',
      'b:helo',
      'b:mail',
      'b:rcpt',
      'b:data',
      'b:header',
      'b:header',
      'b:eoh',
      'a:close',
      'b:close',
    ]);
  });

  it('discard at rcpt: the client hears 250 for the recipient and the data, no content stage runs, nothing is kept', async () => {
    const calls: string[] = [];
    const r = await runMilter(recorder('d', calls, { rcpt: async () => (calls.push('d:rcpt'), discard()) } as Partial<Milter>), {
      from: 'a@example.net',
      to: ['b@example.com', 'c@example.com'],
      message: MSG,
    });
    assert.deepEqual(
      r.transactions[0]?.rcpt.map((s) => s.reply?.code),
      [250, 250],
    );
    assert.equal(r.verdict.type, 'discard');
    assert.equal(r.verdict.stage, 'rcpt');
    assert.equal(r.verdict.milter, 'd');
    assert.equal(r.verdict.reply?.code, 250);
    assert.equal(r.message, undefined);
    assert.deepEqual(calls, ['d:connect', 'd:helo', 'd:mail', 'd:rcpt', 'd:close']);
  });

  it('a handler that throws takes its default action (tempfail unless set); the event carries the error', async () => {
    const r = await runMilter(
      defineMilter({
        name: 'broken',
        async rcpt() {
          throw new Error('database down');
        },
      }),
      { from: 'a@example.net', to: 'b@example.com', message: MSG },
    );
    assert.deepEqual(r.verdict.reply, { code: 451, enhanced: '4.7.1', lines: ['Service unavailable - try again later'] });
    assert.equal(r.verdict.stage, 'rcpt');
    const e = r.events[0] as Extract<MilterEvent, { error: Error }>;
    assert.equal(e.action, 'tempfail');
    assert.equal((e.error.cause as Error).message, 'database down');

    const rejecting = await runMilter(
      defineMilter({
        name: 'broken',
        defaultAction: 'reject',
        async mail() {
          throw new Error('x');
        },
      }),
      { from: 'a@example.net', to: 'b@example.com', message: MSG },
    );
    assert.deepEqual(rejecting.verdict.reply, { code: 550, enhanced: '5.7.1', lines: ['Command rejected'] });
  });

  it('a handler that hangs past its timeout takes its default action; a failed eom with accept keeps no edits', async () => {
    const r = await runMilter(
      defineMilter({
        name: 'slow',
        defaultAction: 'accept',
        timeouts: { content: 50 },
        async eom(ctx) {
          ctx.message.addHeader('X-Too-Late', 'yes');
          await new Promise((resolve) => setTimeout(resolve, 10_000).unref());
        },
      }),
      { from: 'a@example.net', to: 'b@example.com', message: MSG },
    );
    assert.equal(r.verdict.type, 'continue');
    assert.deepEqual(r.edits.all, []);
    assert.doesNotMatch(r.message?.toString() ?? '', /X-Too-Late/);
    const e = r.events[0] as Extract<MilterEvent, { error: Error }>;
    assert.equal(e.stage, 'eom');
    assert.equal(e.action, 'accept');
    assert.equal((e.error as { code?: string }).code, 'DOVETAIL_ERR_MILTER_TIMEOUT');
  });

  it('a verdict the stage does not allow counts as a failure', async () => {
    const r = await runMilter(
      { name: 'wrong', rcpt: async () => quarantine('not here') } as unknown as Milter,
      { from: 'a@example.net', to: 'b@example.com', message: MSG },
    );
    assert.equal(r.verdict.reply?.code, 451);
    assert.equal((r.events[0] as Extract<MilterEvent, { error: Error }>).error.message, 'milter wrong answered quarantine at rcpt, which that stage does not allow');
  });

  it('a HELO refusal is the reply to MAIL FROM; a connect refusal is the greeting, 554/421', async () => {
    const helo = await runMilter(
      defineMilter({
        name: 'helo-check',
        async helo(_ctx, name) {
          if (name === 'localhost') return reject(550, '5.7.1', 'Bad HELO');
        },
      }),
      { helo: 'LOCALHOST', from: 'a@example.net', to: 'b@example.com', message: MSG },
    );
    assert.equal(helo.helo?.reply, undefined);
    assert.deepEqual(helo.verdict, { stage: 'helo', type: 'reject', reply: { code: 550, enhanced: '5.7.1', lines: ['Bad HELO'] }, milter: 'helo-check' });
    assert.equal(helo.transactions[0]?.mail.reply?.lines[0], 'Bad HELO');
    const slow = await runMilter(
      defineMilter({
        name: 'helo-later',
        async helo() {
          return tempfail(450, '4.7.1', 'Try HELO later');
        },
      }),
      { messages: [{ from: 'a@example.net', to: 'b@example.com' }, { from: 'a@example.net', to: 'b@example.com' }] },
    );
    assert.deepEqual(
      slow.transactions.map((t) => `${t.verdict.stage} ${t.verdict.type} ${t.verdict.reply?.code} ${t.verdict.milter}`),
      ['helo tempfail 450 helo-later', 'helo tempfail 450 helo-later'],
    );

    const calls: string[] = [];
    const conn = await runMilter([recorder('gate', calls, { connect: async () => (calls.push('gate:connect'), tempfail(450, '4.7.1', 'Busy')) } as Partial<Milter>)], {
      from: 'a@example.net',
      to: 'b@example.com',
      message: MSG,
    });
    assert.deepEqual(conn.verdict, { stage: 'connect', type: 'tempfail', reply: { code: 421, enhanced: '4.7.1', lines: ['Busy'] }, milter: 'gate' });
    assert.equal(conn.transactions.length, 0);
    assert.deepEqual(calls, ['gate:connect', 'gate:close']);
  });
});

describe('facts and macros', () => {
  it('client, HELO, TLS and AUTH facts and the Postfix macros, message macros fresh per MAIL FROM', async () => {
    const seen: Record<string, unknown>[] = [];
    const m = defineMilter({
      name: 'macros',
      async connect(ctx) {
        seen.push({ stage: 'connect', ...ctx.macros, client: ctx.client, server: ctx.server });
      },
      async mail(ctx) {
        seen.push({ stage: 'mail', ...ctx.macros, tls: ctx.tls, auth: ctx.auth, helo: ctx.helo });
      },
      async rcpt(ctx) {
        seen.push({ stage: 'rcpt', ...ctx.macros });
      },
    });
    const r = await runMilter(m, {
      hostname: 'mx.example.com',
      client: { address: '192.0.2.1', port: 2345, hostname: 'mail.example.net' },
      server: { name: 'smtpd', address: '192.0.2.25', port: 25 },
      helo: 'mail.example.net',
      tls: true,
      auth: 'alice',
      from: 'a@example.net',
      to: 'b@example.com',
      message: MSG,
      messages: [{ from: 'second@example.org', to: 'c@example.com', message: MSG }],
    });
    const [connect, mail1, rcpt1, mail2] = seen;
    assert.deepEqual(connect, {
      stage: 'connect',
      j: 'mx.example.com',
      '{daemon_name}': 'smtpd',
      '{daemon_addr}': '192.0.2.25',
      '{daemon_port}': '25',
      v: 'dovetail',
      _: 'mail.example.net [192.0.2.1]',
      '{client_addr}': '192.0.2.1',
      '{client_port}': '2345',
      '{client_name}': 'mail.example.net',
      '{client_ptr}': 'mail.example.net',
      client: { address: '192.0.2.1', port: 2345, hostname: 'mail.example.net', family: 'ipv4' },
      server: { hostname: 'mx.example.com', name: 'smtpd', address: '192.0.2.25', port: 25 },
    });
    assert.equal(mail1?.['i'], r.transactions[0]?.queueId);
    assert.equal(mail1?.['{mail_addr}'], 'a@example.net');
    assert.equal(mail1?.['{mail_host}'], 'example.net');
    assert.equal(mail1?.['{tls_version}'], 'TLSv1.3');
    assert.equal(mail1?.['{auth_authen}'], 'alice');
    assert.equal(mail1?.['{auth_type}'], 'PLAIN');
    assert.deepEqual(mail1?.['auth'], { method: 'PLAIN', user: 'alice' });
    assert.equal(mail1?.['helo'], 'mail.example.net');
    assert.equal(rcpt1?.['{rcpt_addr}'], 'b@example.com');
    assert.equal(mail2?.['{mail_addr}'], 'second@example.org');
    assert.equal(mail2?.['{rcpt_addr}'], undefined, 'message macros are cleared at MAIL FROM');
    assert.notEqual(r.transactions[0]?.queueId, r.transactions[1]?.queueId);
    assert.match(r.message?.toString() ?? '', /with ESMTPSA id /);
  });
});

describe('several transactions and RSET', () => {
  it('state carries over, an RSET transaction is aborted at the next MAIL FROM', async () => {
    const calls: string[] = [];
    const counter = defineMilter({
      name: 'counter',
      async mail(ctx) {
        const n = ((ctx.state.get('n') as number | undefined) ?? 0) + 1;
        ctx.state.set('n', n);
        calls.push(`mail ${n}`);
      },
      async abort() {
        calls.push('abort');
      },
      async eom(ctx) {
        ctx.message.addHeader('X-Message-Number', String(ctx.state.get('n')));
      },
    });
    const r = await runMilter(counter, {
      messages: [
        { from: 'a@example.net', to: 'b@example.com' },
        { from: 'a@example.net', to: 'b@example.com', message: MSG },
      ],
    });
    assert.deepEqual(calls, ['mail 1', 'abort', 'mail 2']);
    assert.equal(r.transactions.length, 2);
    assert.equal(r.transactions[0]?.data, undefined);
    assert.deepEqual(r.transactions[1]?.edits.headersAdded, [{ name: 'X-Message-Number', value: '2' }]);
  });

  it('stepping: one command at a time, with what the client would be told', async () => {
    const s = await startSession(relayControl({ relayDomains: ['example.com'] }), { client: { address: '192.0.2.9' } });
    try {
      assert.equal(s.refused, false);
      assert.equal((await s.rcpt('b@example.com')).reply?.code, 503);
      assert.equal((await s.mail('a@example.net')).reply?.code, 503, 'no HELO yet');
      await s.helo('client.example.net');
      assert.equal((await s.mail('a@example.net')).reply?.code, 250);
      assert.equal((await s.mail('a@example.net')).reply?.lines[0], 'Error: nested MAIL command');
      assert.equal((await s.data(MSG)).reply?.lines[0], 'Error: need RCPT command');
      const refused = await s.rcpt('x@elsewhere.example');
      assert.equal(refused.outcome.type, 'reject');
      assert.equal((await s.rcpt('b@example.com')).reply?.code, 250);
      const data = await s.data(MSG);
      assert.equal(data.reply?.code, 250);
      assert.deepEqual(data.envelope?.recipients.map((x) => x.address), ['b@example.com']);
      assert.equal((await s.unknown('XFOO bar')).reply?.code, 500);
    } finally {
      await s.close();
    }
  });

  it('the unknown stage: a refusal replaces the 500', async () => {
    const r = await runMilter(
      defineMilter({
        name: 'u',
        async unknown(_ctx, command) {
          if (command.startsWith('XSPAM')) return reject(502, '5.5.1', 'Not here');
        },
      }),
      { unknown: ['XSPAM 1', 'XOTHER'] },
    );
    assert.deepEqual(
      r.unknown.map((s) => `${s.reply?.code} ${s.reply?.lines[0]}`),
      ['502 Not here', '500 Error: command not recognized'],
    );
  });
});

describe('bad input gets the gateway reply, never a crash', () => {
  const pass = defineMilter({ name: 'pass', async eom() {} });
  it('bare LF is refused (550 5.5.2) unless normalised; the message gets a final CRLF', async () => {
    const bare = await runMilter(pass, { from: 'a@example.net', to: 'b@example.com', message: 'Subject: x\n\nbody\n' });
    assert.deepEqual(bare.verdict.reply, { code: 550, enhanced: '5.5.2', lines: ['Error: bare <CR> or <LF> in message data (RFC 5321 2.3.8)'] });
    const norm = await runMilter(pass, { bareLineEndings: 'normalize', from: 'a@example.net', to: 'b@example.com', message: 'Subject: x\n\nbody' });
    assert.equal(norm.verdict.type, 'continue');
    assert.match(norm.message?.toString() ?? '', /\r\nSubject: x\r\n\r\nbody\r\n$/);
  });

  it('header block too big, line too long, too many hops', async () => {
    const hdr = await runMilter(pass, { maxHeaderBytes: 64, from: 'a@example.net', to: 'b@example.com', message: `Subject: ${'x'.repeat(100)}\r\n\r\nb\r\n` });
    assert.equal(hdr.verdict.reply?.lines[0], 'Error: message header too big');
    const line = await runMilter(pass, { maxLineBytes: 10, from: 'a@example.net', to: 'b@example.com', message: `Subject: x\r\n\r\n${'y'.repeat(20)}\r\n` });
    assert.equal(line.verdict.reply?.code, 554);
    const hops = await runMilter(pass, { maxHops: 2, from: 'a@example.net', to: 'b@example.com', message: 'Received: a\r\nReceived: b\r\nDelivered-To: c\r\n\r\nb\r\n' });
    assert.deepEqual(hops.verdict.reply, { code: 554, enhanced: '5.4.6', lines: ['Error: too many hops (mail forwarding loop)'] });
  });

  it('a milter that removes every recipient: 554 5.5.1; a replacement body from a failing stream is the milter failing', async () => {
    const none = await runMilter(
      defineMilter({
        name: 'drop-all',
        async eom(ctx) {
          for (const r of ctx.envelope.recipients) ctx.envelope.removeRecipient(r.address);
        },
      }),
      { from: 'a@example.net', to: ['b@example.com', 'c@example.com'], message: MSG },
    );
    assert.deepEqual(none.verdict.reply, { code: 554, enhanced: '5.5.1', lines: ['Error: no valid recipients'] });
    assert.equal(none.message, undefined);
    const failing = await runMilter(
      defineMilter({
        name: 'bad-body',
        defaultAction: 'reject',
        async eom(ctx) {
          ctx.message.replaceBody(
            new Readable({
              read() {
                this.destroy(new Error('disk gone'));
              },
            }),
          );
        },
      }),
      { from: 'a@example.net', to: 'b@example.com', message: MSG },
    );
    assert.deepEqual(failing.verdict, { stage: 'eom', type: 'reject', reply: { code: 550, enhanced: '5.7.1', lines: ['Command rejected'] }, milter: 'bad-body' });
    assert.deepEqual(failing.edits.all, []);
  });

  it('an invalid edit throws in the milter: its default action, none of its edits', async () => {
    const r = await runMilter(
      defineMilter({
        name: 'bad-edit',
        async eom(ctx) {
          ctx.message.addHeader('X-Fine', '1');
          ctx.message.addHeader('Bad Name', '1');
        },
      }),
      { from: 'a@example.net', to: 'b@example.com', message: MSG },
    );
    assert.equal(r.verdict.reply?.code, 451);
    assert.deepEqual(r.edits.all, []);
    const e = r.events[0] as Extract<MilterEvent, { error: Error }>;
    assert.equal((e.error as { code?: string }).code, 'DOVETAIL_ERR_INVALID_EDIT');
    assert.equal(e.error.message, 'invalid header name "Bad Name"');
  });
});

describe('bad scripts get a defined answer', () => {
  const pass = defineMilter({ name: 'pass', async mail() {}, async rcpt() {} });
  it('addresses smtp-server would refuse: 501, and no stage runs', async () => {
    const r = await runMilter(pass, { from: 'a b@example.net', to: 'b@example.com', message: MSG });
    assert.deepEqual(r.verdict.reply, { code: 501, enhanced: '5.1.7', lines: ['Error: Bad sender address syntax'] });
    const s = await startSession(pass);
    try {
      await s.helo('client.test');
      assert.equal((await s.mail('')).reply?.code, 250, 'the null sender is fine');
      assert.deepEqual((await s.rcpt('<x@y>\r\nRSET')).reply, { code: 501, enhanced: '5.1.3', lines: ['Error: Bad recipient address syntax'] });
      assert.equal((await s.rcpt({ address: 'b@example.com', args: { 'BAD KEY': 'x' } })).reply?.code, 501);
      assert.equal((await s.rcpt('')).reply?.code, 501);
    } finally {
      await s.close();
    }
  });

  it('a malformed milter, a reused session id, a closed session: errors with stable codes', async () => {
    await assert.rejects(runMilter({ name: 'x', recpt: async () => undefined } as unknown as Milter, {}), { code: 'DOVETAIL_ERR_INVALID_MILTER' });
    await assert.rejects(runMilter([pass, pass], {}), { code: 'DOVETAIL_ERR_INVALID_MILTER' });
    const a = await startSession(pass, { sessionId: 'same' });
    try {
      await assert.rejects(startSession(pass, { sessionId: 'same' }), { code: 'DOVETAIL_ERR_INVALID_OPTIONS' });
    } finally {
      await a.close();
    }
    await assert.rejects(a.helo('x'), { code: 'DOVETAIL_ERR_INVALID_OPTIONS' });
    const b = await startSession(pass, { sessionId: 'same' });
    await b.close();
    await assert.rejects(runMilter('tcp:nowhere', {}), { code: 'DOVETAIL_ERR_INVALID_OPTIONS' });
  });

  it('a spool that cannot be written: data() rejects with the error, abort runs, the session still closes', async () => {
    const calls: string[] = [];
    const s = await startSession(recorder('r', calls), { spool: { dir: '/nonexistent/dovetail-kit', memoryThreshold: 1 } });
    try {
      await s.helo('client.test');
      await s.mail('a@example.net');
      await s.rcpt('b@example.com');
      await assert.rejects(s.data(MSG));
    } finally {
      await s.close();
    }
    assert.deepEqual(calls.slice(-3), ['r:data', 'r:abort', 'r:close']);
  });
});

describe('milters written as classes', () => {
  it('handlers run with the milter as `this`, #private fields included', async () => {
    class Counting implements Milter {
      readonly name = 'counting';
      #seen = 0;
      async rcpt(): Promise<undefined> {
        this.#seen++;
        return undefined;
      }
      async eom(ctx: Parameters<NonNullable<Milter['eom']>>[0]): Promise<undefined> {
        ctx.message.addHeader('X-Recipients-Seen', String(this.#seen));
        return undefined;
      }
    }
    const r = await runMilter(new Counting(), { from: 'a@example.net', to: ['b@example.com', 'c@example.com'], message: MSG });
    assert.deepEqual(r.events, []);
    assert.deepEqual(r.edits.headersAdded, [{ name: 'X-Recipients-Seen', value: '2' }]);
  });
});

describe('refusals the kit itself gives', () => {
  it('are reject/tempfail outcomes with no milter; a transaction without RCPT gets 503 at DATA', async () => {
    const pass = defineMilter({ name: 'pass', async eom() {} });
    const r = await runMilter(pass, { from: 'a@example.net', to: [], message: MSG });
    assert.deepEqual(r.verdict, { stage: 'data', type: 'reject', reply: { code: 503, enhanced: '5.5.1', lines: ['Error: need RCPT command'] }, milter: undefined });
    const s = await startSession(pass);
    try {
      const early = await s.mail('a@example.net');
      assert.deepEqual(early.outcome, { type: 'reject', reply: { code: 503, enhanced: '5.5.1', lines: ['Error: send HELO/EHLO first'] } });
    } finally {
      await s.close();
    }
  });
});

describe('sessions at once', () => {
  it('each run gets only its own milters\' events, and the kit stops listening when none is open', async () => {
    const runs = await Promise.all(
      Array.from({ length: 10 }, (_, i) =>
        runMilter(
          defineMilter({
            name: `m${i}`,
            async rcpt() {
              await new Promise((resolve) => setImmediate(resolve));
              return reject(550, '5.1.1', `no ${i}`);
            },
          }),
          { from: 'a@example.net', to: ['b@example.com', 'c@example.com'] },
        ),
      ),
    );
    runs.forEach((r, i) => {
      assert.deepEqual(
        r.events.map((e) => `${e.milter} ${e.stage}`),
        [`m${i} rcpt`, `m${i} rcpt`],
      );
    });
    const dc = await import('node:diagnostics_channel');
    assert.equal(dc.channel('dovetail:milter:verdict').hasSubscribers, false);
  });
});
