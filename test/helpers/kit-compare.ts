/**
 * Test helper for the honesty checks of dovetail/testing: runs the same milters and the same
 * SMTP input once through a real gateway on a loopback socket (a raw SMTP client, optional
 * STARTTLS and AUTH, a transport that records exactly what the gateway hands to delivery)
 * and once through runMilter(), and gives both in one comparable shape (queue ids and the
 * Received date masked).
 */
import diagnostics_channel from 'node:diagnostics_channel';
import { Channels, createGateway, formatReply, type DeliveryEnvelope, type GatewayOptions, type Milter, type Transport } from '../../lib/index.js';
import { runMilter, type MilterEvent, type StepResult, type TestScript } from '../../lib/testing/index.js';
import { RawClient, type Reply } from './smtp.js';
import { selfSignedCert } from './tls.js';

/** One transaction of the input. */
export interface KitTransaction {
  readonly from: string;
  readonly to: readonly string[];
  readonly message: string;
}

/** The SMTP input both sides get. */
export interface KitInput {
  readonly helo: string;
  readonly unknown?: readonly string[];
  /** STARTTLS after EHLO (the gateway gets a self-signed certificate), then EHLO again. */
  readonly tls?: boolean;
  /** AUTH PLAIN as this user (after TLS); the gateway accepts any password. */
  readonly user?: string;
  readonly transactions: readonly KitTransaction[];
}

/** What both sides are compared on (masked). */
export interface Observed {
  /** Every reply after EHLO (STARTTLS and AUTH excluded), as on the wire. */
  readonly replies: string[];
  /** Every milter verdict other than continue: `milter stage type [reply]`. */
  readonly events: string[];
  /** What was handed to delivery: `sender -> recipients\n` + the message bytes; quarantined ones prefixed `QUARANTINE `. */
  readonly handed: string[];
}

interface Handed {
  readonly envelope: DeliveryEnvelope;
  readonly message: Buffer;
}

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

/** Replaces the queue ids and the Received date with fixed text. */
function masker(queueIds: readonly string[]): (s: string) => string {
  return (s) => {
    let out = s;
    for (const id of queueIds) out = out.split(id).join('QUEUEID');
    return out.replace(/; \w{3}, \d{1,2} \w{3} \d{4} \d\d:\d\d:\d\d \+0000/g, '; DATE');
  };
}

const eventText = (e: MilterEvent): string =>
  'verdict' in e ? `${e.milter} ${e.stage} ${e.verdict.type}${'reply' in e.verdict ? ' ' + formatReply(e.verdict.reply) : ''}` : `${e.milter} ${e.stage} failed ${e.action}`;

const envelopeText = (sender: string, recipients: readonly { address: string }[]): string => `${sender} -> ${recipients.map((r) => r.address).join(',')}\n`;

/** Through a real gateway on a socket, with a raw SMTP client. */
export async function throughGateway(
  milters: () => Milter[],
  input: KitInput,
  options: Partial<GatewayOptions> = {},
): Promise<Observed & { clientPort: number; serverPort: number }> {
  const delivered: Handed[] = [];
  const quarantined: Handed[] = [];
  const gateway = createGateway({
    hostname: 'mx.test',
    resolveClientNames: false,
    listen: { host: '127.0.0.1', port: 0 },
    milters: milters(),
    delivery: recordingTransport('rec', delivered),
    quarantine: recordingTransport('q', quarantined),
    ...(input.tls ? { tls: selfSignedCert('mx.test') } : {}),
    ...(input.user !== undefined ? { authenticate: async () => true } : {}),
    ...options,
  });
  const events: MilterEvent[] = [];
  const onVerdict = (m: unknown): void => {
    const v = m as { milter: string; stage: MilterEvent['stage']; verdict: Extract<MilterEvent, { verdict: unknown }>['verdict'] };
    events.push({ milter: v.milter, stage: v.stage, verdict: v.verdict });
  };
  const onError = (m: unknown): void => {
    const v = m as { milter: string; stage: MilterEvent['stage']; error: Error; action: Extract<MilterEvent, { error: unknown }>['action'] };
    events.push({ milter: v.milter, stage: v.stage, error: v.error, action: v.action });
  };
  const [addr] = await gateway.listen();
  diagnostics_channel.subscribe(Channels.verdict, onVerdict);
  diagnostics_channel.subscribe(Channels.milterError, onError);
  const replies: Reply[] = [];
  let clientPort = 0;
  try {
    const c = await RawClient.connect(addr!.port);
    clientPort = c.socket.localPort!;
    const greeting = await c.reply();
    if (greeting.code === 220) {
      await c.cmd(`EHLO ${input.helo}`);
      if (input.tls) await c.starttls(input.helo);
      if (input.user !== undefined) {
        const auth = await c.authPlain(input.user, 'secret');
        if (auth.code !== 235) throw new Error(`AUTH: ${auth.text}`);
      }
      for (const u of input.unknown ?? []) replies.push(await c.cmd(u));
      for (const t of input.transactions) {
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
    } else {
      replies.push(greeting);
    }
    await c.waitClosed();
  } finally {
    diagnostics_channel.unsubscribe(Channels.verdict, onVerdict);
    diagnostics_channel.unsubscribe(Channels.milterError, onError);
    await gateway.close();
  }
  const mask = masker(replies.flatMap((r) => /queued as ([0-9A-Z]{12})/.exec(r.text)?.slice(1) ?? []));
  return {
    replies: replies.map((r) => mask(r.lines.join('\r\n'))),
    events: events.map(eventText),
    handed: [
      ...delivered.map((x) => mask(envelopeText(x.envelope.sender.address, x.envelope.recipients) + x.message.toString('latin1'))),
      ...quarantined.map((x) => mask(`QUARANTINE ${envelopeText(x.envelope.sender.address, x.envelope.recipients)}${x.message.toString('latin1')}`)),
    ],
    clientPort,
    serverPort: addr!.port,
  };
}

/** Through runMilter(), the same milters and input (`extra` adds to the script: client port, server port …). */
export async function throughKit(milters: () => Milter[], input: KitInput, extra: TestScript = {}): Promise<Observed> {
  const r = await runMilter(milters(), {
    hostname: 'mx.test',
    helo: input.helo,
    ...(input.unknown ? { unknown: input.unknown } : {}),
    ...(input.tls ? { tls: true } : {}),
    ...(input.user !== undefined ? { auth: input.user } : {}),
    messages: input.transactions,
    ...extra,
  });
  const mask = masker(r.transactions.flatMap((t) => (t.queueId ? [t.queueId] : [])));
  const steps: StepResult[] = [...r.unknown];
  const handed: string[] = [];
  const quarantined: string[] = [];
  for (const t of r.transactions) {
    steps.push(t.mail, ...t.rcpt);
    if (t.data) steps.push(t.data);
    if (t.message && t.envelope) {
      const env = envelopeText(t.envelope.sender.address, t.envelope.recipients);
      // The handoff prepends this header to a quarantined message; the kit reports the reason instead.
      if (t.quarantine !== undefined) quarantined.push(mask(`QUARANTINE ${env}X-Dovetail-Quarantine: ${t.quarantine}\r\n${t.message.toString('latin1')}`));
      else handed.push(mask(env + t.message.toString('latin1')));
    }
  }
  if (r.connect.reply) steps.unshift(r.connect);
  return {
    replies: steps.map((s) => (s.reply ? mask(formatReply(s.reply)) : '(none)')),
    events: r.events.map(eventText),
    handed: [...handed, ...quarantined],
  };
}

/** Both ways; returns both for the caller to compare (and to check the scenario did what it says). */
export async function kitAndGateway(milters: () => Milter[], input: KitInput, options: Partial<GatewayOptions> = {}): Promise<{ gateway: Observed; kit: Observed }> {
  const { clientPort, serverPort, ...gateway } = await throughGateway(milters, input, options);
  const kit = await throughKit(milters, input, {
    client: { address: '127.0.0.1', port: clientPort },
    server: { address: '127.0.0.1', port: serverPort },
  });
  return { gateway, kit };
}
