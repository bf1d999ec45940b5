/**
 * Serving a TypeScript milter to Postfix (or Sendmail): the same Milter object the gateway
 * runs in-process, behind serveMilter() on a milter socket.
 *
 *   npm run build && node dist/examples/serve-milter.js      # listens on inet:127.0.0.1:8891
 *
 * then in Postfix's main.cf:
 *
 *   smtpd_milters = inet:127.0.0.1:8891
 *   milter_default_action = tempfail
 *
 * The milter refuses `nobody@` recipients, tags the subject of mail from outside
 * `example.test`, and adds a header naming the Postfix queue id it saw.
 */
import { defineMilter, reject, serveMilter, type MilterServer } from '../lib/index.js';

/** The milter served: nothing here knows whether it runs in the gateway or behind Postfix. */
export const tagger = defineMilter({
  name: 'tagger',
  async rcpt(_ctx, rcpt) {
    if (rcpt.address.toLowerCase().startsWith('nobody@')) return reject(550, '5.1.1', `<${rcpt.address}>: no such user here`);
  },
  async eom(ctx) {
    const sender = ctx.envelope.sender.address.toLowerCase();
    if (!sender.endsWith('@example.test')) {
      const subject = ctx.headers.find((h) => h.name.toLowerCase() === 'subject');
      if (subject && !subject.value.startsWith('[ext] ')) ctx.message.changeHeader('Subject', 1, `[ext] ${subject.value}`);
    }
    ctx.message.addHeader('X-Tagged-By', `tagger (queue id ${ctx.queueId || 'unknown'})`);
  },
});

/** Serves the tagger on a milter socket spec (`inet:host:port`, `unix:/path`). */
export function serveTagger(listen = 'inet:127.0.0.1:8891'): Promise<MilterServer> {
  return serveMilter(tagger, { listen });
}

// Run as a script: serve until Ctrl-C.
if (import.meta.url === `file://${process.argv[1]}`) {
  const server = await serveTagger(process.env.MILTER_LISTEN ?? 'inet:127.0.0.1:8891');
  console.log(`milter "tagger" listening on ${server.address}\nin Postfix's main.cf: smtpd_milters = ${server.address}`);
  process.once('SIGINT', () => void server.close().then(() => process.exit(0)));
  process.once('SIGTERM', () => void server.close().then(() => process.exit(0)));
}
