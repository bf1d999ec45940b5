#!/usr/bin/env node
// Sends a test message to a running gateway (`npm run send -- --to bob@example.test`).
// Options: --server host:port (default 127.0.0.1:2525), --from, --to (repeatable), --subject, --body.
import { parseArgs } from 'node:util';
import { ensureSetup } from './setup.mjs';

await ensureSetup({ build: false });
const { default: nodemailer } = await import('nodemailer');

const { values } = parseArgs({
  options: {
    server: { type: 'string', default: `${process.env.HOST ?? '127.0.0.1'}:${process.env.PORT ?? 2525}` },
    from: { type: 'string', default: 'alice@sender.example' },
    to: { type: 'string', multiple: true, default: ['bob@example.test'] },
    subject: { type: 'string', default: 'Hello from dovetail' },
    body: { type: 'string', default: 'This is a test message sent through the dovetail quick start.' },
  },
});
const [host, port] = values.server.split(/:(?=\d+$)/);
const transport = nodemailer.createTransport({ host, port: Number(port), secure: false, ignoreTLS: true, name: 'client.example' });
try {
  const info = await transport.sendMail({ from: values.from, to: values.to, subject: values.subject, text: values.body });
  console.log(`accepted: ${info.accepted.join(', ') || '-'}`);
  if (info.rejected.length) console.log(`rejected: ${info.rejected.join(', ')}`);
  console.log(`server said: ${info.response}`);
} catch (err) {
  console.error(`not sent: ${err.response ?? err.message}`);
  process.exitCode = 1;
} finally {
  transport.close();
}
