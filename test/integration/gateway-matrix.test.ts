/**
 * The verdict matrix: every verdict each stage allows, returned by a milter at that
 * stage, and what the SMTP client sees and what gets stored, over a real connection.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { accept, continue_, defineMilter, discard, quarantine, reject, skip, tempfail, type Milter, type Stage, type Verdict } from '../../lib/index.js';
import { message, RawClient, stored, startGateway, type Reply } from '../helpers/smtp.js';

type Where = 'greeting' | 'mail' | 'rcpt' | 'data';
const WHERE: Partial<Record<Stage, Where>> = {
  connect: 'greeting',
  helo: 'mail',
  mail: 'mail',
  rcpt: 'rcpt',
  data: 'data',
  header: 'data',
  eoh: 'data',
  body: 'data',
  eom: 'data',
};

const SESSION = [continue_(), accept(), reject(550, '5.7.9', 'Matrix says no'), tempfail(450, '4.7.9', 'Matrix says later')];
const MESSAGE = [...SESSION, discard()];
const VERDICTS: Partial<Record<Stage, Verdict[]>> = {
  connect: SESSION,
  helo: SESSION,
  mail: MESSAGE,
  rcpt: MESSAGE,
  data: MESSAGE,
  header: MESSAGE,
  eoh: MESSAGE,
  body: [...MESSAGE, skip()],
  eom: [...MESSAGE, quarantine('matrix')],
};

for (const [stage, verdicts] of Object.entries(VERDICTS) as [Stage, Verdict[]][]) {
  for (const verdict of verdicts) {
    test(`${stage} → ${verdict.type}`, async () => {
      let calls = 0;
      let laterCalls = 0;
      const handler = async () => {
        calls++;
        return verdict;
      };
      // A second handler of the same milter at end of message shows whether accept/discard took it out.
      const milter = defineMilter({
        name: 'matrix',
        [stage]: handler,
        ...(stage === 'eom' ? {} : { eom: async () => void laterCalls++ }),
      } as Milter);
      const gw = await startGateway({ milters: [milter] });
      try {
        const where = WHERE[stage]!;
        const refused = verdict.type === 'reject' || verdict.type === 'tempfail';
        const c = await RawClient.connect(gw.port);
        const greeting = await c.reply();
        const replies: Partial<Record<Where, Reply>> = { greeting };
        if (where === 'greeting' && refused) {
          const code = verdict.type === 'reject' ? 554 : 421;
          assert.equal(greeting.text, `${code} ${verdict.type === 'reject' ? '5' : '4'}.7.9 ${verdict.reply.lines[0]}`);
          await c.waitClosed();
          return;
        }
        assert.equal((await c.cmd('EHLO client.example.test')).code, 250);
        replies.mail = await c.cmd('MAIL FROM:<a@sender.test>');
        if (replies.mail.code === 250) {
          replies.rcpt = await c.cmd('RCPT TO:<bob@example.test>');
          if (replies.rcpt.code === 250) {
            // Two body chunks' worth, so skip is observable.
            replies.data = await c.data(message('matrix', 'x'.repeat(998) + '\r\n'.concat('y'.repeat(998), '\r\n').repeat(80)));
          }
        }
        c.end();
        const mail = await stored(gw.root, 'bob@example.test');
        const held = await stored(gw.quarantineRoot, 'bob@example.test');
        if (refused) {
          assert.equal(replies[where]?.text, `${verdict.reply.code} ${verdict.reply.enhanced} ${verdict.reply.lines[0]}`);
          assert.equal(mail.length, 0);
          return;
        }
        assert.equal(replies.data?.code, 250, `end of DATA: ${replies.data?.text}`);
        if (verdict.type === 'discard') {
          assert.equal(mail.length + held.length, 0, 'discard stores nothing');
          assert.equal(laterCalls, 0, 'discard ends the message for every stage');
        } else if (verdict.type === 'quarantine') {
          assert.equal(mail.length, 0);
          assert.equal(held.length, 1);
        } else {
          assert.equal(mail.length, 1);
          if (stage !== 'eom') assert.equal(laterCalls, verdict.type === 'accept' ? 0 : 1, 'accept drops the milter for the message');
        }
        if (stage === 'body') assert.equal(calls, verdict.type === 'continue' ? 2 : 1, 'body chunks seen (81 kB in 65 535-byte chunks)');
        if (stage === 'header') assert.equal(calls, verdict.type === 'continue' ? 5 : 1, 'headers seen (our Received included)');
      } finally {
        await gw.close();
      }
    });
  }
}
