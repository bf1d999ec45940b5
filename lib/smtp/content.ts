/**
 * What the gateway does between the end of DATA and the content stages, shared with the
 * test kit (lib/testing) so both build the same message: the hop count (RFC 5321 section
 * 6.3 loop detection) and the message state the content stages see, with our Received
 * header above the client's headers and the body left in the spool.
 */
import type { MessageRun, SessionFacts } from '../milter/chain.js';
import { formatHeader, MessageState, spoolBody, type StoredHeader } from '../milter/message.js';
import type { IngestResult } from './ingest.js';
import { receivedValue } from './received.js';
import { utf8Protocol } from './session.js';

/** How many Received and Delivered-To fields a message carries: more than maxHops is a loop. */
export function hopCount(headers: readonly { readonly name: string }[]): number {
  let hops = 0;
  for (const h of headers) if (/^(received|delivered-to)$/i.test(h.name)) hops++;
  return hops;
}

/**
 * The message state of one transaction for the content stages: our Received header (with
 * `protocol` as the session spoke it — ESMTP, ESMTPS, ESMTPSA …, made UTF8SMTP… for an
 * SMTPUTF8 sender, RFC 6531 3.7.3) above the headers as received, the body in the spool.
 */
export function contentState(got: IngestResult, run: MessageRun, facts: SessionFacts, hostname: string, protocol: string): MessageState {
  const received: StoredHeader = formatHeader(
    'Received',
    receivedValue({
      helo: facts.helo,
      clientHostname: facts.client.hostname,
      clientAddress: facts.client.address,
      hostname,
      protocol: utf8Protocol(protocol, run.sender),
      queueId: run.queueId,
      tls: facts.tls,
      recipients: run.recipients.map((r) => r.address),
    }),
  );
  return new MessageState({
    headers: [received, ...got.headers],
    body: spoolBody(got.spool, got.bodyOffset),
    sender: run.sender,
    recipients: [...run.recipients],
  });
}
