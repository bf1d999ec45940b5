/**
 * The honesty check of dovetail/testing: the same milters and the same input, once through
 * a real gateway over a real SMTP socket (a raw client; a transport that records exactly
 * what the gateway hands to delivery), once through runMilter() in process. Every reply,
 * every milter verdict, the envelope and the message bytes handed on must be the same
 * (queue ids and the Received date, which differ by nature, are masked).
 */
import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import diagnostics_channel from 'node:diagnostics_channel';
import { Channels, createGateway, defineMilter, formatReply, reject, type DeliveryEnvelope, type Milter, type Transport } from '../../lib/index.js';
import { runMilter, type MilterEvent, type StepResult, type TestScript } from '../../lib/testing/index.js';
import { relayControl, spamTag } from '../../milters/index.js';
import { RawClient, type Reply } from '../helpers/smtp.js';

interface Handed {
  readonly envelope: DeliveryEnvelope;
  readonly message: Buffer;
}

/** A transport that keeps what it is given and says delivered. */
function recordingTransport(name: string, into: Handed[]): Transport {
  return {
    name,
    async deliver(envelope, source) {
      const chunks: Buffer[] = [];
      for await (const c of source.stream() as AsyncIterable<Buffer>) chunks.push(c);
      into.push({ envelope, message: Buffer.concat(chunks) });
      return envelope.recipients.map((r) => ({ recipient: r.address, status: 'delivered' as const, reply: { code: 250, enhanced: '2.0.0', lines: ['ok'] } }));
    },
  };
}

/** Fresh milters for each run (so no state is shared between the gateway's and the kit's). */
function milters(): Milter[] {
  return [
    relayControl({ relayDomains: ['example.test'] }),
    defineMilter({
      name: 'policy',
      async helo(_ctx, name) {
        if (name === 'bad.helo.test') return reject(550, '5.7.1', ['Bad HELO', 'go away']);
      },
      async rcpt(ctx, rcpt) {
        if (rcpt.address.startsWith('nobody@')) return reject(550, '5.1.1', 'No such user');
        ctx.score.add(0.5, 'RCPT_SEEN');
      },
      async unknown(_ctx, command) {
        if (command.startsWith('XEVIL')) return reject(502, '5.5.1', 'No evil here');
      },
      async eom(ctx) {
        const subject = ctx.headers.find((h) => h.name === 'Subject')?.value ?? '';
        if (subject.includes('refuse me')) {
          ctx.message.addHeader('X-Never', 'dropped');
          return reject(554, '5.7.1', 'Content refused');
        }
        const m = ctx.macros;
        const shown = Object.keys(m)
          .sort()
          .map((k) => `${k}=${m[k]}`)
          .join(' ');
        ctx.message.addHeader('X-Macros', shown);
        ctx.message.insertHeader(1, 'X-First', `${ctx.client.address} ${ctx.helo}`);
        ctx.message.changeHeader('Subject', 1, `[checked] ${subject}`);
        ctx.message.deleteHeader('X-Internal', 1);
        ctx.envelope.addRecipient('archive@example.test');
        ctx.envelope.removeRecipient('drop@example.test');
        if (subject.includes('quarantine')) ctx.quarantine('asked for');
        if (subject.includes('body')) ctx.message.replaceBody('replaced\nbody\n');
      },
    }),
    spamTag({ requiredScore: 1, subjectTag: '[SPAM]' }),
  ];
}

interface Transaction {
  readonly from: string;
  readonly to: readonly string[];
  readonly message: string;
}

const MESSAGE = (subject: string) =>
  `From: a@sender.test\r\nTo: bob@example.test\r\nSubject: ${subject}\r\nX-Internal: secret\r\nMessage-ID: <1@sender.test>\r\n\r\nHello.\r\n.leading dot\r\n`;

/** Replaces this run's queue ids and the Received date with fixed text. */
function masker(queueIds: readonly string[]): (s: string) => string {
  return (s) => {
    let out = s;
    for (const id of queueIds) out = out.split(id).join('QUEUEID');
    return out.replace(/; \w{3}, \d{1,2} \w{3} \d{4} \d\d:\d\d:\d\d \+0000/g, '; DATE');
  };
}

interface Observed {
  readonly replies: string[];
  readonly events: string[];
  readonly handed: string[];
  readonly queueIds: string[];
}

const eventText = (e: MilterEvent): string =>
  'verdict' in e ? `${e.milter} ${e.stage} ${e.verdict.type}${'reply' in e.verdict ? ' ' + formatReply(e.verdict.reply) : ''}` : `${e.milter} ${e.stage} failed ${e.action}`;

function handedText(h: readonly Handed[]): string[] {
  return h.map((x) => `${x.envelope.sender.address} -> ${x.envelope.recipients.map((r) => r.address).join(',')}\n${x.message.toString('latin1')}`);
}

/** Through a real gateway on a socket, with a raw SMTP client. */
async function throughGateway(helo: string, unknown: readonly string[], transactions: readonly Transaction[]): Promise<Observed & { clientPort: number; serverPort: number }> {
  const delivered: Handed[] = [];
  const quarantined: Handed[] = [];
  const gateway = createGateway({
    hostname: 'mx.test',
    resolveClientNames: false,
    listen: { host: '127.0.0.1', port: 0 },
    milters: milters(),
    delivery: recordingTransport('rec', delivered),
    quarantine: recordingTransport('q', quarantined),
  });
  const events: MilterEvent[] = [];
  const onVerdict = (m: unknown): void => {
    const v = m as { milter: string; stage: MilterEvent['stage']; verdict: Extract<MilterEvent, { verdict: unknown }>['verdict'] };
    events.push({ milter: v.milter, stage: v.stage, verdict: v.verdict });
  };
  const [addr] = await gateway.listen();
  diagnostics_channel.subscribe(Channels.verdict, onVerdict);
  const replies: Reply[] = [];
  let clientPort = 0;
  try {
    const c = await RawClient.connect(addr!.port);
    clientPort = c.socket.localPort!;
    await c.reply();
    await c.cmd(`EHLO ${helo}`);
    for (const u of unknown) replies.push(await c.cmd(u));
    for (const t of transactions) {
      const mail = await c.cmd(`MAIL FROM:<${t.from}>`);
      replies.push(mail);
      if (mail.code !== 250) continue;
      const rcpt: Reply[] = [];
      for (const to of t.to) rcpt.push(await c.cmd(`RCPT TO:<${to}>`));
      replies.push(...rcpt);
      if (rcpt.some((r) => r.code === 250)) replies.push(await c.data(t.message));
      else await c.cmd('RSET');
    }
    await c.cmd('QUIT');
    await c.waitClosed();
  } finally {
    diagnostics_channel.unsubscribe(Channels.verdict, onVerdict);
    await gateway.close();
  }
  const queueIds = replies.flatMap((r) => /queued as ([0-9A-Z]{12})/.exec(r.text)?.slice(1) ?? []);
  return {
    replies: replies.map((r) => r.lines.join('\r\n')),
    events: events.map(eventText),
    handed: [...handedText(delivered), ...handedText(quarantined).map((q) => `QUARANTINE ${q}`)],
    queueIds,
    clientPort,
    serverPort: addr!.port,
  };
}

/** Through runMilter(), the same milters and input. */
async function throughKit(script: TestScript): Promise<Observed> {
  const r = await runMilter(milters(), script);
  const steps: StepResult[] = [...r.unknown];
  const handed: string[] = [];
  const quarantined: string[] = [];
  for (const t of r.transactions) {
    steps.push(t.mail, ...t.rcpt);
    if (t.data) steps.push(t.data);
    if (t.message && t.envelope) {
      const text = `${t.envelope.sender.address} -> ${t.envelope.recipients.map((x) => x.address).join(',')}\n`;
      // The handoff prepends this header to a quarantined message; the kit reports the reason instead.
      if (t.quarantine !== undefined) quarantined.push(`QUARANTINE ${text}X-Dovetail-Quarantine: ${t.quarantine}\r\n${t.message.toString('latin1')}`);
      else handed.push(text + t.message.toString('latin1'));
    }
  }
  return {
    replies: steps.map((s) => (s.reply ? formatReply(s.reply) : '(none)')),
    events: r.events.filter((e) => 'verdict' in e).map(eventText),
    handed: [...handed, ...quarantined],
    queueIds: r.transactions.flatMap((t) => (t.queueId ? [t.queueId] : [])),
  };
}

async function compare(helo: string, unknown: readonly string[], transactions: readonly Transaction[]): Promise<Observed> {
  const gw = await throughGateway(helo, unknown, transactions);
  const kit = await throughKit({
    hostname: 'mx.test',
    client: { address: '127.0.0.1', port: gw.clientPort },
    server: { address: '127.0.0.1', port: gw.serverPort },
    helo,
    unknown,
    messages: transactions,
  });
  const g = masker(gw.queueIds);
  const k = masker(kit.queueIds);
  assert.deepEqual(kit.replies.map(k), gw.replies.map(g), 'replies');
  assert.deepEqual(kit.events, gw.events, 'milter verdicts');
  assert.deepEqual(kit.handed.map(k), gw.handed.map(g), 'what is handed to delivery');
  return { ...gw, replies: gw.replies.map(g), handed: gw.handed.map(g) };
}

describe('runMilter() agrees with a real gateway over a socket', () => {
  it('relay refusal, a milter refusal at RCPT, every edit, spamTag, an eom reject, a quarantine, an unknown command', async () => {
    const seen = await compare(
      'client.sender.test',
      ['XEVIL now', 'XFINE'],
      [
        { from: 'a@sender.test', to: ['bob@example.test', 'nobody@example.test', 'x@elsewhere.test', 'drop@example.test'], message: MESSAGE('hello body') },
        { from: 'a@sender.test', to: ['bob@example.test'], message: MESSAGE('refuse me') },
        { from: 'a@sender.test', to: ['x@elsewhere.test'], message: MESSAGE('never sent') },
        { from: 'a@sender.test', to: ['carol@example.test'], message: MESSAGE('quarantine this') },
      ],
    );
    // The comparison above is only worth something if the scenario did what it says.
    assert.deepEqual(seen.replies.slice(0, 2), ['502 5.5.1 No evil here', '500 5.5.2 Error: command not recognized']);
    assert.ok(seen.replies.includes('554 5.7.1 Content refused'));
    assert.ok(seen.replies.includes('554 5.7.1 <x@elsewhere.test>: Relay access denied'));
    assert.equal(seen.handed.length, 2);
    assert.match(seen.handed[0]!, /^a@sender\.test -> bob@example\.test,archive@example\.test\nX-First: 127\.0\.0\.1 client\.sender\.test\r\nReceived: /);
    assert.match(seen.handed[0]!, /X-Macros: \S+/);
    assert.match(seen.handed[0]!, /\r\n\r\nreplaced\r\nbody\r\n$/);
    assert.match(seen.handed[1]!, /^QUARANTINE a@sender\.test -> carol@example\.test,archive@example\.test\nX-Dovetail-Quarantine: asked for\r\n/);
  });

  it('a HELO refusal given at every MAIL FROM', async () => {
    const seen = await compare('bad.helo.test', [], [
      { from: 'a@sender.test', to: ['bob@example.test'], message: MESSAGE('x') },
      { from: 'b@sender.test', to: ['bob@example.test'], message: MESSAGE('y') },
    ]);
    assert.deepEqual(seen.replies, ['550-5.7.1 Bad HELO\r\n550 5.7.1 go away', '550-5.7.1 Bad HELO\r\n550 5.7.1 go away']);
  });
});
