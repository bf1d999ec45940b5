#!/usr/bin/env node
// The README's first command (`npm start`): installs and builds if needed, then runs a
// gateway on 127.0.0.1:2525 (HOST / PORT to change) with the default milter chain,
// delivering into ./var/mail, says how to send it a message, and logs to stdout.
import { mkdirSync } from 'node:fs';
import path from 'node:path';
import { ensureSetup, repoRoot } from './setup.mjs';

await ensureSetup();
const { startQuickstart, defaultChain } = await import(new URL('../dist/examples/quickstart.js', import.meta.url).href);

const root = process.env.MAIL_ROOT ?? `${repoRoot}/var/mail`;
mkdirSync(root, { recursive: true });
const qs = await startQuickstart({
  host: process.env.HOST ?? '127.0.0.1',
  port: Number(process.env.PORT ?? 2525),
  root,
});
const { host, port } = qs;

console.log(`
dovetail gateway listening on ${host}:${port}
  milter chain: ${defaultChain().map((m) => m.name).join(' -> ')}
  delivery:     LMTP to the embedded store on ${qs.lmtp.host}:${qs.lmtp.port} (recipients verified at RCPT),
                which writes Maildir under ${root}/<recipient>/new/; deferred queue in ${path.dirname(root)}/queue

Send it a test message (in another terminal):
  npm run send -- --to bob@example.test
  # or with swaks:  swaks --server ${host}:${port} --to bob@example.test
Then look at:
  ls ${root}/bob@example.test/new/

Ctrl-C stops it (messages in flight are finished first).
The log follows: one JSON line per connection, transaction and delivery attempt
(fields in docs/operations.md#log-lines).
`);
const { enableLogging } = await import(new URL('../dist/lib/index.js', import.meta.url).href);
const logging = enableLogging();

let stopping = false;
for (const signal of ['SIGINT', 'SIGTERM']) {
  process.on(signal, () => {
    if (stopping) process.exit(1);
    stopping = true;
    console.log('\nclosing: finishing messages in flight ...');
    qs.close().then(() => {
      logging.close();
      console.log('closed');
      process.exit(0);
    });
  });
}

// SIGHUP used to end the quick start without draining (Node's default). The quick start has
// no config file to reload: say so and go on. `dovetail start -c examples/dovetail.config.ts`
// is the same server from a config file, and reloads on SIGHUP.
process.on('SIGHUP', () => {
  console.log('SIGHUP: the quick start does not reload (dovetail start -c examples/dovetail.config.ts does); still running');
});
