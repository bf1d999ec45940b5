/**
 * An example config for `dovetail start -c examples/dovetail.config.ts`: the quick start
 * (examples/quickstart.ts) as a config file. A gateway on 127.0.0.1:2525 with the default
 * chain, delivering example.test into the embedded LMTP store (Maildir under ./var/mail),
 * everything else outbound over SMTP through the durable queue. Paths are relative to this
 * file. docs/configuration.md describes every field; the same in JSON is
 * examples/dovetail.config.json.
 */
import { defineConfig, defineMilter, reject } from 'dovetail';

/** A small in-process milter (TS configs may give Milter objects): refuses nobody@, stamps each message. */
const stamp = defineMilter({
  name: 'stamp',
  async rcpt(_ctx, rcpt) {
    if (rcpt.address.toLowerCase().startsWith('nobody@')) return reject(550, '5.1.1', `<${rcpt.address}>: Recipient address rejected: no such user`);
  },
  async eom(ctx) {
    ctx.score.add(0.1, 'DOVETAIL_QUICKSTART');
    ctx.message.addHeader('X-Dovetail', `checked by ${ctx.server.hostname} (queue id ${ctx.queueId})`);
  },
});

export default defineConfig({
  hostname: 'mx.dovetail.test',
  listen: [{ host: '127.0.0.1', port: 2525, name: 'mx' }],
  milters: [
    { use: 'sizeLimit', maxBytes: 25 * 1024 * 1024 },
    { use: 'relayControl', localDomains: ['example.test'] },
    stamp,
    { use: 'spamTag', requiredScore: 5 },
    // A remote filter over the milter protocol, e.g. rspamd:
    // { connect: 'inet:127.0.0.1:11332', defaultAction: 'accept' },
  ],
  delivery: {
    store: { root: './var/mail', domains: ['example.test'], unknownUser: 'accept' },
    routes: {
      'example.test': { store: true },
      '*': { smtp: true },
    },
    verifyRecipients: true,
  },
  queue: { dir: './var/queue' },
  quarantine: './var/quarantine',
  log: { level: 'info' },
  // metrics: { listen: '127.0.0.1:9464' },
  // authenticate: { dovecot: '/run/dovecot/auth-client' },
});
