/**
 * Compile-time tests of the public API. This file is type-checked by the build (`tsc`);
 * every `@ts-expect-error` line MUST fail to compile, or the build fails with "Unused
 * '@ts-expect-error' directive". It is not run.
 */
import { accept, defineMilter, discard, quarantine, reject, skip, tempfail, type Milter } from '../../lib/index.js';

// The shape a milter author writes compiles, with parameters inferred from the stage.
export const good = defineMilter({
  name: 'good',
  async connect(ctx) {
    if (ctx.client.family === 'ipv6') return accept();
    if (ctx.client.address === '192.0.2.1') return reject(554, '5.7.1', 'Go away');
  },
  async helo(ctx, hostname: string) {
    if (hostname === ctx.server.hostname) return tempfail(450, '4.7.1', 'Not me');
  },
  async mail(ctx, sender) {
    ctx.score.add(1, 'SENDER');
    if (sender.args['SIZE'] === '1') return discard();
  },
  async rcpt(_ctx, rcpt) {
    if (rcpt.address.startsWith('nobody@')) return reject(550, '5.1.1', ['No such user', 'here']);
  },
  async header(ctx, h) {
    if (h.name === 'X-Spam' && ctx.headers.length > 0) return reject();
  },
  async body(_ctx, chunk: Buffer) {
    if (chunk.length > 10) return skip();
  },
  async eom(ctx) {
    ctx.message.addHeader('X-Checked', 'yes');
    ctx.message.insertHeader(1, 'X-First', 'yes');
    ctx.message.changeHeader('Subject', 1, '[ext] hello');
    ctx.message.deleteHeader('X-Internal', 1);
    ctx.message.replaceBody('new body\r\n');
    ctx.envelope.changeSender('bounce@example.com');
    ctx.envelope.addRecipient('archive@example.com');
    ctx.envelope.removeRecipient('old@example.com');
    ctx.quarantine('held');
    return quarantine('why');
  },
});
export const asMilter: Milter = good;

// A verdict a stage does not allow fails to compile.
defineMilter({
  name: 'bad1',
  // @ts-expect-error quarantine is for end of message only
  async rcpt() {
    return quarantine('no');
  },
});
defineMilter({
  name: 'bad2',
  // @ts-expect-error discard is not a session-level verdict (connect)
  async connect() {
    return discard();
  },
});
defineMilter({
  name: 'bad3',
  // @ts-expect-error skip is for the body stage only
  async eom() {
    return skip();
  },
});
defineMilter({
  name: 'bad4',
  // @ts-expect-error a verdict is an object from the helpers, not a string
  async mail() {
    return 'reject';
  },
});
defineMilter({
  name: 'bad5',
  // @ts-expect-error a hand-made reject needs a full reply
  async mail() {
    return { type: 'reject' as const };
  },
});
defineMilter({
  name: 'bad6',
  // @ts-expect-error handlers are async: a plain value is not accepted
  mail() {
    return accept();
  },
});
defineMilter({
  name: 'bad7',
  async rcpt(ctx) {
    // @ts-expect-error the message can only be edited at end of message
    ctx.message.addHeader('X', 'y');
  },
});
defineMilter({
  name: 'bad8',
  async eoh(ctx) {
    // @ts-expect-error envelope edits are for end of message only
    ctx.envelope.addRecipient('x@example.com');
  },
});
// @ts-expect-error a milter needs a name
defineMilter({ async connect() {} });
// @ts-expect-error reply code is a number
reject('550', '5.7.1', 'x');
