/**
 * Test helper: a tiny LMTP server (smtp-server in LMTP mode) on a free loopback port that
 * accepts every recipient and records each transaction: envelope sender, recipients, and
 * the message bytes as received (dot-unstuffed).
 */
import { SMTPServer } from 'smtp-server';

export interface SinkMessage {
  readonly from: string;
  readonly to: readonly string[];
  readonly data: Buffer;
}

export interface LmtpSink {
  readonly port: number;
  readonly messages: SinkMessage[];
  /** Resolves with the first message that `match` accepts; rejects after `ms`. */
  waitFor(match: (m: SinkMessage) => boolean, ms?: number): Promise<SinkMessage>;
  close(): Promise<void>;
}

export async function startLmtpSink(): Promise<LmtpSink> {
  const messages: SinkMessage[] = [];
  const server = new SMTPServer({
    lmtp: true,
    name: 'sink.test',
    authOptional: true,
    disabledCommands: ['AUTH', 'STARTTLS'],
    logger: false,
    onData(stream, session, callback) {
      const parts: Buffer[] = [];
      stream.on('data', (d: Buffer) => parts.push(d));
      stream.on('end', () => {
        messages.push({
          from: session.envelope.mailFrom ? session.envelope.mailFrom.address : '',
          to: session.envelope.rcptTo.map((r) => r.address),
          data: Buffer.concat(parts),
        });
        callback(null, 'stored');
      });
    },
  });
  await new Promise<void>((resolve, reject) => {
    server.server.once('error', reject);
    server.listen(0, '127.0.0.1', () => resolve());
  });
  const addr = server.server.address();
  const port = typeof addr === 'object' && addr ? addr.port : 0;
  return {
    port,
    messages,
    async waitFor(match, ms = 20_000) {
      const deadline = Date.now() + ms;
      for (;;) {
        const found = messages.find(match);
        if (found) return found;
        if (Date.now() > deadline) throw new Error(`LMTP sink: no matching message within ${ms} ms (have ${messages.length})`);
        await new Promise((r) => setTimeout(r, 50));
      }
    },
    close: () => new Promise<void>((resolve) => server.close(() => resolve())),
  };
}
