/**
 * Test helper: the raw SMTP client (test/helpers/smtp.ts RawClient, which speaks plain,
 * STARTTLS and implicit TLS) with a one-call greeting + EHLO, for transcripts a mail client
 * library will not produce (AUTH before STARTTLS, MAIL before AUTH, repeated wrong
 * passwords on one connection), from a chosen local address.
 */
import { RawClient, type RawConnectOptions, type Reply } from './smtp.js';

export type TlsClientOptions = RawConnectOptions;

export class TlsRawClient extends RawClient {
  /** Connects and reads nothing yet (the greeting is the first reply()). */
  static override async connect(port: number, options: string | TlsClientOptions = {}): Promise<TlsRawClient> {
    return new TlsRawClient(await RawClient.dial(port, options));
  }

  /** Connects, reads the 220 greeting and sends EHLO (expects 250). */
  static async ehlo(port: number, options: TlsClientOptions & { name?: string } = {}): Promise<{ client: TlsRawClient; ehlo: Reply }> {
    const client = await TlsRawClient.connect(port, options);
    const greeting = await client.reply(15_000);
    if (greeting.code !== 220) throw new Error(`greeting: ${greeting.text}`);
    const ehlo = await client.cmd(`EHLO ${options.name ?? 'client.example.test'}`);
    if (ehlo.code !== 250) throw new Error(`EHLO: ${ehlo.text}`);
    return { client, ehlo };
  }
}
