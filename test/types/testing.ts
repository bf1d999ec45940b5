/**
 * Compile-time tests of dovetail/testing. Type-checked by the build (`tsc`), not run: every
 * `@ts-expect-error` line MUST fail to compile, or the build fails with "Unused
 * '@ts-expect-error' directive".
 */
import { connectMilter, defineMilter } from '../../lib/index.js';
import { runMilter, startSession, type EditSummary, type StepResult, type TestRun, type TestScript, type TestVerdict } from '../../lib/testing/index.js';

const m = defineMilter({ name: 'm', async eom() {} });

export async function shapes(): Promise<void> {
  // A milter, a chain, a socket spec, a connectMilter() result.
  const a: TestRun = await runMilter(m, { from: 'a@example.net', to: ['b@example.com'], message: 'Subject: x\r\n\r\nbody\r\n' });
  await runMilter([m, connectMilter('inet:127.0.0.1:8891')], {});
  await runMilter('inet:127.0.0.1:8891');
  await runMilter(m, { from: { address: 'a@example.net', args: { SIZE: '10', BODY: '8BITMIME' } }, to: 'b@example.com', message: Buffer.from('x') });
  const v: TestVerdict = a.verdict;
  const stage: 'eom' | 'connect' | 'helo' | 'mail' | 'rcpt' | 'data' | 'header' | 'eoh' | 'body' | 'abort' | 'close' | 'unknown' = v.stage;
  const e: EditSummary = a.edits;
  const added: readonly { name: string; value: string }[] = e.headersAdded;
  const s = await startSession(m);
  const step: StepResult = await s.rcpt('b@example.com');
  if (step.outcome.type === 'reject') {
    const code: number = step.outcome.reply.code;
    void code;
  }
  void [stage, added];

  // @ts-expect-error a milter is an object (or a spec string), not a number
  await runMilter(8891, {});
  // @ts-expect-error a chain holds milters and specs only
  await runMilter([m, { stage: 'eom' }], {});
  // @ts-expect-error the message is a string or bytes
  await runMilter(m, { from: 'a@example.net', to: 'b@example.com', message: 42 });
  const bad: TestScript = {
    // @ts-expect-error TLS facts need version, cipher and bits
    tls: { version: 'TLSv1.3' },
  };
  // @ts-expect-error the result is read-only
  a.edits.headersAdded.push({ name: 'X', value: 'y' });
  // @ts-expect-error an outcome without a refusal has no reply
  void step.outcome.reply;
  void bad;
}
