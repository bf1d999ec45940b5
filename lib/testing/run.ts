/**
 * runMilter(): a whole scripted SMTP session against a milter (or a chain, or a remote
 * filter) in one call — connect, HELO/EHLO, optional STARTTLS and AUTH facts, unknown
 * commands, then one or more transactions (MAIL, RCPT…, DATA or RSET) — driving a
 * {@link TestSession} the way a well-behaved SMTP client does: it stops a transaction at a
 * refused MAIL, sends DATA only when a recipient was accepted, and always ends the session
 * (abort, close; a remote filter's connection is closed).
 *
 * Does not: retry, pipeline, or send anything a refused stage would make a client skip.
 */
import type { StageOutcome } from '../milter/chain.js';
import type { Stage } from '../milter/stages.js';
import type { AuthInfo, EnvelopeAddress, HeaderField, ScoreEntry, TlsInfo } from '../milter/types.js';
import type { SmtpReply } from '../milter/verdict.js';
import { summarizeEdits, type EditSummary } from './edits.js';
import { startSession, type MessageResult, type MilterUnderTest, type StepResult, type TestAddress, type TestSessionOptions } from './session.js';
import type { MilterEvent } from './trace.js';

/** One transaction of a {@link TestScript}. */
export interface TestTransaction {
  /** MAIL FROM: an address (`''` for `<>`), or `{ address, args }` with ESMTP parameters (`{ SIZE: '1000' }`). */
  readonly from: TestAddress;
  /** RCPT TO, one or several, in order. */
  readonly to: TestAddress | readonly TestAddress[];
  /**
   * The raw message (header fields, empty line, body; CRLF line endings) sent after DATA.
   * Omitted: the transaction ends with RSET instead of DATA.
   */
  readonly message?: string | Buffer | Uint8Array;
}

/** A scripted SMTP session: who connects, what it says, and the transaction(s) it makes. */
export interface TestScript extends TestSessionOptions, Partial<TestTransaction> {
  /** The HELO/EHLO name. Default: the client's host name if given, else `[address]`. */
  readonly helo?: string;
  /** EHLO (true, the default) or HELO: changes the Received header's `with ESMTP`/`SMTP`. */
  readonly esmtp?: boolean;
  /** STARTTLS after EHLO: `true` for default facts (TLSv1.3, TLS_AES_256_GCM_SHA384, 256 bits), or the facts. */
  readonly tls?: boolean | TlsInfo;
  /** A successful AUTH before the first MAIL FROM: the user name (method PLAIN), or `{ method, user }`. */
  readonly auth?: string | AuthInfo;
  /** Commands smtp-server does not recognise, sent after HELO (each runs the unknown stage). */
  readonly unknown?: readonly string[];
  /**
   * Transactions, in order, after the one given by `from`/`to`/`message` at the top level
   * (if any). The session is the same: `ctx.state` and session score carry over, and each
   * MAIL FROM gets a new queue id and fresh message macros.
   */
  readonly messages?: readonly TestTransaction[];
}

/**
 * How a transaction (or the session) ended, in one place: the stage that decided, the
 * chain's outcome there, the reply the client got, and the milter that decided (undefined
 * when nothing was refused, or when the gateway itself refused).
 */
export interface TestVerdict {
  /**
   * The deciding stage: `eom` when the message went through the whole content pass; the
   * stage of the refusal or discard otherwise (`helo` for a HELO refusal given at MAIL
   * FROM, `rcpt` when every recipient was refused, `data` for the data stage and for the
   * gateway's own checks of the message).
   */
  readonly stage: Stage;
  /** `continue` (accepted for delivery), `reject`, `tempfail` or `discard`. */
  readonly type: StageOutcome['type'];
  /** The reply the client got for it (undefined for a session that went through without a transaction). */
  readonly reply: SmtpReply | undefined;
  /** The milter that refused or discarded; undefined otherwise. */
  readonly milter: string | undefined;
}

/** What happened to one transaction. */
export interface TransactionResult {
  readonly verdict: TestVerdict;
  /** MAIL FROM. */
  readonly mail: StepResult;
  /** Each RCPT TO, in order (none when MAIL was refused). */
  readonly rcpt: readonly StepResult[];
  /** DATA and the message; undefined when it was not sent (MAIL refused, no recipient accepted, no message in the script). */
  readonly data: MessageResult | undefined;
  /** The queue id, when MAIL FROM was accepted. */
  readonly queueId: string | undefined;
  /** The edits the chain applied (empty unless the content pass completed). */
  readonly edits: EditSummary;
  /** The message as it would be handed to delivery (Received header first, edits applied); undefined unless accepted. */
  readonly message: Buffer | undefined;
  /** The header fields of {@link message}. */
  readonly headers: readonly HeaderField[] | undefined;
  /** The envelope after the edits; undefined unless accepted. */
  readonly envelope: { readonly sender: EnvelopeAddress; readonly recipients: readonly EnvelopeAddress[] } | undefined;
  /** The quarantine reason, when the message goes to quarantine. */
  readonly quarantine: string | undefined;
  /** The spam score at the end. */
  readonly score: { readonly total: number; readonly entries: readonly ScoreEntry[] };
}

/**
 * The result of {@link runMilter}: the session's steps, each transaction, and — for the
 * usual one-message test — the first transaction's fields at the top level (when the
 * session was refused before any transaction, `verdict` is that refusal and the message
 * fields are empty).
 */
export interface TestRun extends Omit<TransactionResult, 'mail' | 'rcpt' | 'data'> {
  /** The connect stage. */
  readonly connect: StepResult;
  /** HELO/EHLO (undefined when the connect stage refused the session). */
  readonly helo: StepResult | undefined;
  /** Each unknown command. */
  readonly unknown: readonly StepResult[];
  /** Every transaction, in script order. */
  readonly transactions: readonly TransactionResult[];
  /** The end of the session (abort of an open message, every milter's close). */
  readonly close: StepResult;
  /** Everything every milter answered over the session (continue not listed), in order. */
  readonly events: readonly MilterEvent[];
}

const NO_EDITS = summarizeEdits([], undefined);
const NO_SCORE = { total: 0, entries: [] } as const;

function verdictOf(step: StepResult): TestVerdict {
  const o = step.outcome;
  // Only steps that run a stage (connect, helo, mail, rcpt, data) are given here: stage is set.
  return { stage: step.stage ?? 'connect', type: o.type, reply: step.reply, milter: o.type === 'continue' ? undefined : (o.milter || undefined) };
}

function list<T>(v: T | readonly T[]): readonly T[] {
  return Array.isArray(v) ? (v as readonly T[]) : [v as T];
}

/**
 * Runs `milters` through a scripted SMTP session, in process, with the gateway's own chain
 * machinery, and returns each stage's outcome, the edits the chain applied and the
 * resulting message. `milters` may be a Milter, a list of them (a chain), or a remote
 * filter: a `connectMilter()` result or its socket spec.
 *
 * @example
 * ```ts
 * import { runMilter } from 'dovetail/testing';
 * const r = await runMilter(myMilter, {
 *   client: { address: '192.0.2.1', hostname: 'mx.example.net' },
 *   helo: 'mx.example.net',
 *   from: 'a@example.net',
 *   to: ['b@example.com'],
 *   message: 'Subject: hi\r\n\r\nbody\r\n',
 * });
 * assert.equal(r.verdict.stage, 'eom');
 * assert.deepEqual(r.edits.headersAdded, [{ name: 'X-Checked', value: 'yes' }]);
 * ```
 */
export async function runMilter(milters: MilterUnderTest, script: TestScript = {}): Promise<TestRun> {
  const events: MilterEvent[] = [];
  const s = await startSession(milters, script);
  const keep = <T extends StepResult>(r: T): T => {
    events.push(...r.events);
    return r;
  };
  const connect = keep(s.connectResult);
  if (s.refused) {
    return {
      connect,
      helo: undefined,
      unknown: [],
      transactions: [],
      close: connect,
      events,
      verdict: verdictOf(connect),
      queueId: undefined,
      edits: NO_EDITS,
      message: undefined,
      headers: undefined,
      envelope: undefined,
      quarantine: undefined,
      score: NO_SCORE,
    };
  }
  let close: StepResult | undefined;
  try {
    const address = script.client?.address ?? '127.0.0.1';
    const helo = keep(await s.helo(script.helo ?? script.client?.hostname ?? `[${address}]`, script.esmtp ?? true));
    if (script.tls) keep(await s.starttls(script.tls === true ? undefined : script.tls));
    if (script.auth !== undefined) keep(await s.auth(script.auth));
    const unknown: StepResult[] = [];
    for (const command of script.unknown ?? []) unknown.push(keep(await s.unknown(command)));
    const planned: TestTransaction[] = [];
    if (script.from !== undefined || script.to !== undefined || script.message !== undefined) {
      planned.push({ from: script.from ?? '', to: script.to ?? [], ...(script.message !== undefined ? { message: script.message } : {}) });
    }
    planned.push(...(script.messages ?? []));
    const transactions: TransactionResult[] = [];
    for (const t of planned) {
      const mail = keep(await s.mail(t.from));
      const rcpt: StepResult[] = [];
      let data: MessageResult | undefined;
      let verdict = verdictOf(mail);
      if (mail.reply && mail.reply.code < 400) {
        for (const to of list(t.to)) rcpt.push(keep(await s.rcpt(to)));
        const accepted = rcpt.filter((r) => r.reply !== undefined && r.reply.code < 400);
        const last = rcpt.at(-1);
        if (accepted.length === 0 && last) {
          // Every recipient refused: a client does not send DATA (smtp-server would answer 503).
          verdict = verdictOf(last);
          keep(await s.rset());
        } else if (t.message !== undefined) {
          data = keep(await s.data(t.message));
          verdict = verdictOf(data);
        } else {
          verdict = verdictOf(last ?? mail);
          keep(await s.rset());
        }
      }
      transactions.push({
        verdict,
        mail,
        rcpt,
        data,
        queueId: data?.queueId ?? (mail.reply && mail.reply.code < 400 ? (s.facts.macros['i'] ?? undefined) : undefined),
        edits: data?.edits ?? NO_EDITS,
        message: data?.message,
        headers: data?.headers,
        envelope: data?.envelope,
        quarantine: data?.quarantine,
        score: data?.score ?? NO_SCORE,
      });
    }
    close = keep(await s.close());
    const first = transactions[0];
    return {
      connect,
      helo,
      unknown,
      transactions,
      close,
      events,
      verdict: first?.verdict ?? verdictOf(helo),
      queueId: first?.queueId,
      edits: first?.edits ?? NO_EDITS,
      message: first?.message,
      headers: first?.headers,
      envelope: first?.envelope,
      quarantine: first?.quarantine,
      score: first?.score ?? NO_SCORE,
    };
  } finally {
    if (!close) await s.close().catch(() => undefined);
  }
}
