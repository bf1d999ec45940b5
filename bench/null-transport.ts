/**
 * Bench fixture: a delivery transport that stores nothing. deliver() reads the whole
 * message stream (so the gateway still pays for producing it: Received header, edited
 * headers, body from the spool) and answers `delivered` for every recipient.
 *
 * It deliberately does not keep, count or check the bytes; it is not a test double for
 * durability (a real transport answers only once the message is durable).
 */
import { finished } from 'node:stream/promises';
import { smtpReply, type DeliveryEnvelope, type MessageSource, type RecipientResult, type Transport } from '../lib/index.js';

const DELIVERED = smtpReply(250, '2.0.0', 'Ok: discarded by the null transport');

/**
 * Reads the message stream to its end in flowing mode: the cheapest consumer there is, so
 * what the bench charges to the gateway is producing the stream, not reading it (a
 * `for await` loop would add async-iterator cost of the fixture's own).
 */
async function drain(message: MessageSource): Promise<void> {
  const stream = message.stream();
  stream.resume();
  await finished(stream);
}

/** A Transport whose deliver() drains message.stream() and reports every recipient delivered. */
export function nullTransport(name = 'null'): Transport {
  return {
    name,
    async deliver(envelope: DeliveryEnvelope, message: MessageSource): Promise<RecipientResult[]> {
      await drain(message);
      return envelope.recipients.map((r) => ({ recipient: r.address, status: 'delivered', reply: DELIVERED }));
    },
  };
}
