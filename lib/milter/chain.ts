/**
 * The milter chain, with Postfix's semantics (src/smtpd/smtpd_milter.c, src/milter/milter.c):
 * milters run in the configured order; the first verdict other than continue ends the
 * stage; a reject or tempfail at RCPT refuses that recipient only; accept drops that milter
 * for the rest of the message (at connect/helo: for the session); a milter that throws,
 * times out, or answers with a verdict its stage does not allow takes its default action
 * (tempfail unless set). Content (header, eoh, body, eom) is given to each milter in turn
 * once the whole message is in, and each sees the edits of the milters before it.
 *
 * The chain never knows whether a milter is in-process or a remote filter behind
 * connectMilter(): both are the same Milter object. It does not speak SMTP; the gateway
 * turns its outcomes into replies.
 */
import { DovetailError, ErrorCodes } from '../errors.js';
import { channels, type MilterCallEvent, type MilterDecision } from '../diagnostics.js';
import { CONTENT_STAGES, type Stage } from './stages.js';
import { validateMilter } from './define.js';
import {
  DEFAULT_REJECT_REPLY,
  DEFAULT_TEMPFAIL_REPLY,
  toVerdict,
  type SmtpReply,
  type Verdict,
} from './verdict.js';
import { EditRecorder, type EditLimits, type MessageState } from './message.js';
import type {
  AuthInfo,
  ClientInfo,
  ContentContext,
  EnvelopeAddress,
  EomContext,
  HeaderField,
  MessageContext,
  Milter,
  MilterTimeouts,
  Score,
  ScoreEntry,
  ServerInfo,
  SessionContext,
  TlsInfo,
} from './types.js';
import type { SpoolOptions } from '../message/spool.js';

/** Postfix's milter_command_timeout default. */
export const DEFAULT_COMMAND_TIMEOUT = 30_000;
/** Postfix's milter_content_timeout default. */
export const DEFAULT_CONTENT_TIMEOUT = 300_000;
/** The largest body chunk a milter is given (the protocol's MILTER_CHUNK_SIZE). */
export const BODY_CHUNK_SIZE = 65_535;

/** The session facts the chain reads; the gateway keeps them current. */
export interface SessionFacts {
  readonly sessionId: string;
  readonly client: ClientInfo;
  readonly server: ServerInfo;
  helo: string | undefined;
  tls: TlsInfo | undefined;
  auth: AuthInfo | undefined;
  readonly macros: Record<string, string>;
}

export interface ChainOptions {
  /** Timeouts for milters that do not set their own. */
  readonly timeouts?: MilterTimeouts;
  /** Where replacement bodies are spooled. */
  readonly spool?: SpoolOptions;
  /**
   * What one milter's end-of-message edits may do: the limits that bind the client bind the
   * milters too (a remote filter must not grow a message past them). An edit past a limit
   * makes that milter fail (its default action). Default: no limits (the gateway sets them).
   */
  readonly editLimits?: EditLimits;
}

/** What a stage came to, for the gateway to turn into an SMTP reply. */
export type StageOutcome =
  | { readonly type: 'continue' }
  | { readonly type: 'reject' | 'tempfail'; readonly reply: SmtpReply; readonly milter: string }
  | { readonly type: 'discard'; readonly milter: string };

const CONTINUE: StageOutcome = Object.freeze({ type: 'continue' });

const ALLOWED: Record<Stage, ReadonlySet<Verdict['type']>> = {
  connect: new Set(['continue', 'accept', 'reject', 'tempfail']),
  helo: new Set(['continue', 'accept', 'reject', 'tempfail']),
  mail: new Set(['continue', 'accept', 'reject', 'tempfail', 'discard']),
  rcpt: new Set(['continue', 'accept', 'reject', 'tempfail', 'discard']),
  data: new Set(['continue', 'accept', 'reject', 'tempfail', 'discard']),
  header: new Set(['continue', 'accept', 'reject', 'tempfail', 'discard']),
  eoh: new Set(['continue', 'accept', 'reject', 'tempfail', 'discard']),
  body: new Set(['continue', 'accept', 'reject', 'tempfail', 'discard', 'skip']),
  eom: new Set(['continue', 'accept', 'reject', 'tempfail', 'discard', 'quarantine']),
  unknown: new Set(['continue', 'accept', 'reject', 'tempfail', 'discard']),
  abort: new Set(['continue']),
  close: new Set(['continue']),
};

function scoreView(entries: ScoreEntry[], milter: string): Score {
  return {
    add(points: number, reason: string, detail?: string): void {
      if (typeof points !== 'number' || !Number.isFinite(points)) {
        throw new DovetailError(ErrorCodes.INVALID_EDIT, 'score points must be a finite number');
      }
      if (typeof reason !== 'string' || !reason) throw new DovetailError(ErrorCodes.INVALID_EDIT, 'a score entry needs a reason');
      entries.push(detail === undefined ? { points, reason, milter } : { points, reason, detail, milter });
    },
    get total(): number {
      let t = 0;
      for (const e of entries) t += e.points;
      return Math.round(t * 1000) / 1000;
    },
    get entries(): readonly ScoreEntry[] {
      return entries;
    },
  };
}

/**
 * A verdict after default actions: what the loop acts on. `failed` marks a default action
 * taken for a handler that threw or timed out (its edits are dropped).
 */
type Resolved = (Verdict & { readonly failed?: true }) | { readonly type: 'failed-quarantine'; readonly reason: string; readonly failed: true };

/**
 * The handler calls of one milter's header or body stage for one message, summed into one
 * `milterCall` event (a message may have thousands of headers). Made only while the
 * channel has subscribers.
 */
class CallSum {
  private ms = 0;
  private calls = 0;
  private last = 'continue';

  static start(): CallSum | undefined {
    return channels.milterCall.hasSubscribers ? new CallSum() : undefined;
  }

  add(ms: number, verdict: string): void {
    this.ms += ms;
    this.calls++;
    this.last = verdict;
  }

  publish(sessionId: string, queueId: string, milter: string, stage: Stage): void {
    if (this.calls === 0 || !channels.milterCall.hasSubscribers) return;
    channels.milterCall.publish({ sessionId, queueId, milter, stage, verdict: this.last, durationMs: this.ms, calls: this.calls } satisfies MilterCallEvent);
  }
}

/** An ordered, validated list of milters; one {@link ChainSession} per SMTP session. */
export class MilterChain {
  readonly milters: readonly Milter[];
  readonly options: ChainOptions;

  constructor(milters: readonly Milter[], options: ChainOptions = {}) {
    const names = new Set<string>();
    for (const m of milters) {
      validateMilter(m);
      if (names.has(m.name)) throw new DovetailError(ErrorCodes.INVALID_MILTER, `two milters are named ${m.name}`);
      names.add(m.name);
    }
    this.milters = [...milters];
    this.options = options;
  }

  /** Starts the chain's view of one SMTP session. */
  session(facts: SessionFacts): ChainSession {
    return new ChainSession(this, facts);
  }
}

/** The chain within one SMTP session. */
export class ChainSession {
  /** Milters still in the session (accept at connect/helo removes one). */
  readonly active: Set<Milter>;
  /** Score entries made at connect/helo; each message starts with them. */
  readonly scoreEntries: ScoreEntry[] = [];
  /** A quarantine decided at connect/helo (by a default action): applies to every message. */
  quarantine: string | undefined;
  private readonly states = new Map<Milter, Map<string, unknown>>();
  private current: MessageRun | undefined;

  constructor(
    readonly chain: MilterChain,
    readonly facts: SessionFacts,
  ) {
    this.active = new Set(chain.milters);
  }

  /** The message in progress, if any. */
  get message(): MessageRun | undefined {
    return this.current;
  }

  /** The connect stage. */
  connect(): Promise<StageOutcome> {
    return this.runSimple('connect', this.active, undefined, (m, ctx) => m.connect?.(ctx));
  }

  /** The helo stage. */
  helo(hostname: string): Promise<StageOutcome> {
    return this.runSimple('helo', this.active, undefined, (m, ctx) => m.helo?.(ctx, hostname));
  }

  /** The unknown stage: a command the SMTP server does not recognise (SMFIC_UNKNOWN). */
  unknown(command: string): Promise<StageOutcome> {
    return this.runSimple('unknown', this.active, undefined, (m, ctx) => m.unknown?.(ctx, command));
  }

  /** Opens a message (at MAIL FROM). Aborts the one before, if it was left open. */
  async begin(queueId: string, sender: EnvelopeAddress): Promise<MessageRun> {
    await this.current?.abort();
    this.current = new MessageRun(this, queueId, sender);
    return this.current;
  }

  /** Ends the session: aborts an open message, then calls every milter's close handler. */
  async close(): Promise<void> {
    await this.current?.abort();
    this.current = undefined;
    for (const m of this.chain.milters) {
      if (m.close) await this.invoke(m, 'close', undefined, (ctx) => m.close?.(ctx));
    }
    this.states.clear();
  }

  /** @internal Per-milter private state (smfi_setpriv). */
  stateOf(m: Milter): Map<string, unknown> {
    let s = this.states.get(m);
    if (!s) this.states.set(m, (s = new Map()));
    return s;
  }

  /** @internal The base context of one handler call. */
  baseContext(m: Milter, stage: Stage, signal: () => AbortSignal, run: MessageRun | undefined): SessionContext {
    const f = this.facts;
    // Stage contexts extend this object in place (Object.assign / defineProperty, never a
    // spread), so the signal stays lazy: most handlers never read it, and an
    // AbortController per call is a measurable share of the chain's cost.
    return {
      stage,
      milter: m.name,
      sessionId: f.sessionId,
      client: f.client,
      server: f.server,
      helo: f.helo,
      tls: f.tls,
      auth: f.auth,
      macros: f.macros,
      state: this.stateOf(m),
      get signal() {
        return signal();
      },
      score: scoreView(run ? run.scoreEntries : this.scoreEntries, m.name),
    };
  }

  /**
   * @internal Runs one stage over `milters` in chain order until a verdict ends it.
   * `run` is the message for message stages.
   */
  async runSimple<C extends SessionContext>(
    stage: Stage,
    milters: Set<Milter>,
    run: MessageRun | undefined,
    call: (m: Milter, ctx: C) => Promise<unknown> | undefined,
    extend?: (base: SessionContext) => C,
  ): Promise<StageOutcome> {
    for (const m of this.chain.milters) {
      if (!milters.has(m) || typeof m[stage] !== 'function') continue;
      const v = await this.invoke(m, stage, run, (base) => call(m, (extend ? extend(base) : base) as C));
      const outcome = this.settle(m, v, milters, run);
      if (outcome) return outcome;
    }
    return CONTINUE;
  }

  /**
   * @internal Acts on one milter's verdict: returns the outcome that ends the stage, or
   * undefined to go on with the next milter.
   */
  settle(m: Milter, v: Resolved, milters: Set<Milter>, run: MessageRun | undefined): StageOutcome | undefined {
    switch (v.type) {
      case 'continue':
      case 'skip':
        return undefined;
      case 'accept':
        milters.delete(m);
        return undefined;
      case 'failed-quarantine':
      case 'quarantine':
        if (run) run.quarantine ??= v.reason;
        else this.quarantine ??= v.reason;
        milters.delete(m);
        return undefined;
      case 'reject':
      case 'tempfail':
        return { type: v.type, reply: v.reply, milter: m.name };
      case 'discard':
        return { type: 'discard', milter: m.name };
    }
  }

  /**
   * @internal Calls one handler with its timeout; a throw, a timeout, or a verdict the stage
   * does not allow becomes the milter's default action.
   */
  async invoke(
    m: Milter,
    stage: Stage,
    run: MessageRun | undefined,
    call: (ctx: SessionContext) => Promise<unknown> | undefined,
    sum?: CallSum,
  ): Promise<Resolved> {
    const t = m.timeouts ?? {};
    const o = this.chain.options.timeouts ?? {};
    const ms = CONTENT_STAGES.has(stage)
      ? (t.content ?? o.content ?? DEFAULT_CONTENT_TIMEOUT)
      : (t.command ?? o.command ?? DEFAULT_COMMAND_TIMEOUT);
    let ac: AbortController | undefined;
    const signal = (): AbortSignal => (ac ??= new AbortController()).signal;
    let timer: NodeJS.Timeout | undefined;
    // Timed only when someone listens (logs, metrics): a gateway nobody watches reads no clock.
    const timed = run?.decisions !== undefined || channels.milterCall.hasSubscribers;
    const t0 = timed ? performance.now() : 0;
    const took = (): number => {
      const ms = timed ? performance.now() - t0 : 0;
      if (run?.decisions) run.milterMs += ms;
      return ms;
    };
    try {
      const result = await new Promise<unknown>((resolve, reject) => {
        timer = setTimeout(
          () => reject(new DovetailError(ErrorCodes.MILTER_TIMEOUT, `milter ${m.name} did not answer ${stage} within ${ms} ms`)),
          ms,
        );
        try {
          Promise.resolve(call(this.baseContext(m, stage, signal, run))).then(resolve, reject);
        } catch (err) {
          reject(err);
        }
      });
      const v = toVerdict(result);
      if (!ALLOWED[stage].has(v.type)) {
        throw new DovetailError(ErrorCodes.INVALID_VERDICT, `milter ${m.name} answered ${v.type} at ${stage}, which that stage does not allow`);
      }
      const durationMs = took();
      if (sum) sum.add(durationMs, v.type);
      else if (channels.milterCall.hasSubscribers) {
        channels.milterCall.publish({ sessionId: this.facts.sessionId, queueId: run?.queueId, milter: m.name, stage, verdict: v.type, durationMs, calls: 1 } satisfies MilterCallEvent);
      }
      if (v.type !== 'continue') {
        channels.verdict.publish({ sessionId: this.facts.sessionId, queueId: run?.queueId, milter: m.name, stage, verdict: v, durationMs });
        if (run?.decisions && v.type !== 'skip') {
          run.decisions.push({
            milter: m.name,
            stage,
            verdict: v.type,
            ...(v.type === 'reject' || v.type === 'tempfail' ? { reply: v.reply } : {}),
            ...(v.type === 'quarantine' ? { reason: v.reason } : {}),
          });
        }
      }
      return v;
    } catch (err) {
      ac?.abort(err);
      const error =
        err instanceof DovetailError ? err : new DovetailError(ErrorCodes.MILTER_FAILED, `milter ${m.name} failed at ${stage}`, { cause: err });
      const action = stage === 'abort' || stage === 'close' ? 'none' : (m.defaultAction ?? 'tempfail');
      const durationMs = took();
      if (sum) sum.add(durationMs, 'error');
      else if (channels.milterCall.hasSubscribers) {
        channels.milterCall.publish({ sessionId: this.facts.sessionId, queueId: run?.queueId, milter: m.name, stage, verdict: 'error', durationMs, calls: 1 } satisfies MilterCallEvent);
      }
      channels.milterError.publish({ sessionId: this.facts.sessionId, queueId: run?.queueId, milter: m.name, stage, error, action, durationMs });
      run?.decisions?.push({ milter: m.name, stage, verdict: action, error: error.code });
      switch (action) {
        case 'none':
          return { type: 'continue', failed: true };
        case 'accept':
          return { type: 'accept', failed: true };
        case 'reject':
          return { type: 'reject', reply: DEFAULT_REJECT_REPLY, failed: true };
        case 'quarantine':
          return { type: 'failed-quarantine', reason: `milter ${m.name} failed at ${stage}`, failed: true };
        case 'tempfail':
          return { type: 'tempfail', reply: DEFAULT_TEMPFAIL_REPLY, failed: true };
      }
    } finally {
      clearTimeout(timer);
    }
  }
}

/** One message (transaction) within a session, from MAIL FROM to the end of DATA. */
export class MessageRun {
  /** Milters still in this message (accept removes one). */
  readonly active: Set<Milter>;
  readonly scoreEntries: ScoreEntry[];
  /** Recipients accepted so far. */
  readonly recipients: EnvelopeAddress[] = [];
  /** A quarantine decided by a default action before end of message. */
  quarantine: string | undefined;
  /** A milter discarded the message: no more stages; the client is told 250. */
  discarded = false;
  /**
   * @internal The milters' decisions (verdicts other than continue, default actions) and the
   * time spent in handlers, for the transaction event; kept only when the gateway asks
   * ({@link MessageRun.observe}: someone subscribes to it).
   */
  decisions: MilterDecision[] | undefined;
  /** @internal Milliseconds spent in this message's milter handlers (when observed). */
  milterMs = 0;
  private done = false;

  constructor(
    readonly session: ChainSession,
    readonly queueId: string,
    readonly sender: EnvelopeAddress,
  ) {
    this.active = new Set(session.active);
    this.scoreEntries = [...session.scoreEntries];
    this.quarantine = session.quarantine;
  }

  /** @internal Starts keeping decisions and milter time for the transaction event. */
  observe(): void {
    this.decisions ??= [];
  }

  private extend = (base: SessionContext): MessageContext =>
    Object.assign(base, { queueId: this.queueId, envelope: { sender: this.sender, recipients: [...this.recipients] } });

  private async stage(stage: Stage, call: (m: Milter, ctx: MessageContext) => Promise<unknown> | undefined): Promise<StageOutcome> {
    if (this.discarded || this.done) return CONTINUE;
    const out = await this.session.runSimple(stage, this.active, this, call, this.extend);
    if (out.type === 'discard') this.discarded = true;
    return out;
  }

  /** The mail stage. */
  mail(): Promise<StageOutcome> {
    return this.stage('mail', (m, ctx) => m.mail?.(ctx, this.sender));
  }

  /** The rcpt stage; on continue the caller adds the recipient with {@link accepted}. */
  rcpt(recipient: EnvelopeAddress): Promise<StageOutcome> {
    return this.stage('rcpt', (m, ctx) => m.rcpt?.(ctx, recipient));
  }

  /** Records a recipient the client was told 250 for. */
  accepted(recipient: EnvelopeAddress): void {
    // A repeated RCPT for the same address is one recipient (Postfix's cleanup drops duplicates).
    const lower = recipient.address.toLowerCase();
    if (!this.recipients.some((r) => r.address.toLowerCase() === lower)) this.recipients.push(recipient);
  }

  /** The data stage. */
  data(): Promise<StageOutcome> {
    return this.stage('data', (m, ctx) => m.data?.(ctx));
  }

  /**
   * The content stages: each milter in turn gets header…, eoh, body…, eom over the message
   * as the milters before it left it, and its edits are applied before the next one runs.
   */
  async content(state: MessageState): Promise<StageOutcome> {
    if (this.discarded || this.done) return CONTINUE;
    const s = this.session;
    for (const m of s.chain.milters) {
      if (!this.active.has(m)) continue;
      const out = await this.contentFor(m, state);
      if (out) {
        if (out.type === 'discard') this.discarded = true;
        return out;
      }
    }
    this.done = true;
    if (this.quarantine !== undefined) state.quarantine ??= this.quarantine;
    return CONTINUE;
  }

  private async contentFor(m: Milter, state: MessageState): Promise<StageOutcome | undefined> {
    const s = this.session;
    const headers: readonly HeaderField[] = [...state.headers];
    const envelope = { sender: state.sender, recipients: [...state.recipients] };
    const content = (base: SessionContext, seen: number): ContentContext =>
      Object.defineProperty(Object.assign(base, { queueId: this.queueId, envelope }), 'headers', {
        // Lazy: a header handler that never looks costs no copy (a hostile message may carry many thousands).
        get: () => (seen === headers.length ? headers : headers.slice(0, seen)),
        enumerable: true,
      }) as unknown as ContentContext;
    const settle = (v: Resolved): StageOutcome | 'next' | undefined => {
      const out = s.settle(m, v, this.active, this);
      if (out) return out;
      return this.active.has(m) ? undefined : 'next';
    };

    if (m.header) {
      // One milterCall event for a milter's whole header stage, not one per header.
      const sum = CallSum.start();
      try {
        for (let i = 0; i < headers.length; i++) {
          const h = headers[i] as HeaderField;
          const r = settle(await s.invoke(m, 'header', this, (base) => m.header?.(content(base, i + 1), h), sum));
          if (r === 'next') return undefined;
          if (r) return r;
        }
      } finally {
        sum?.publish(s.facts.sessionId, this.queueId, m.name, 'header');
      }
    }
    if (m.eoh) {
      const r = settle(await s.invoke(m, 'eoh', this, (base) => m.eoh?.(content(base, headers.length))));
      if (r === 'next') return undefined;
      if (r) return r;
    }
    if (m.body) {
      // One milterCall event for a milter's whole body stage, not one per chunk.
      const sum = CallSum.start();
      try {
        for await (const chunk of state.body.stream(BODY_CHUNK_SIZE)) {
          const v = await s.invoke(m, 'body', this, (base) => m.body?.(content(base, headers.length), chunk as Buffer), sum);
          if (v.type === 'skip') break;
          const r = settle(v);
          if (r === 'next') return undefined;
          if (r) return r;
        }
      } finally {
        sum?.publish(s.facts.sessionId, this.queueId, m.name, 'body');
      }
    }
    if (m.eom) {
      const rec = new EditRecorder(s.chain.options.editLimits ?? {}, state);
      const v = await s.invoke(m, 'eom', this, (base) => m.eom?.(this.eomContext(base, state, headers, rec)));
      if (!v.failed && (v.type === 'continue' || v.type === 'accept' || v.type === 'quarantine')) {
        if (v.type === 'quarantine') rec.quarantine(v.reason);
        try {
          const max = s.chain.options.editLimits?.maxMessageBytes;
          await state.apply(rec.edits, s.chain.options.spool ?? {}, m.name, max);
          if (max !== undefined && state.size > max) throw new DovetailError(ErrorCodes.INVALID_EDIT, `the edits made the message larger than ${max} bytes`);
        } catch (err) {
          // An edit that cannot be applied (a replacement body stream that fails) is the milter failing.
          const failed = await s.invoke(m, 'eom', this, () => Promise.reject(err));
          return s.settle(m, failed, this.active, this);
        }
        return undefined;
      }
      return s.settle(m, v, this.active, this);
    }
    return undefined;
  }

  private eomContext(base: SessionContext, state: MessageState, headers: readonly HeaderField[], rec: EditRecorder): EomContext {
    const sender = state.sender;
    const recipients = [...state.recipients];
    const eom: Omit<EomContext, keyof SessionContext> = {
      queueId: this.queueId,
      headers,
      envelope: {
        sender,
        recipients,
        changeSender: (address, args) => rec.changeSender(address, args),
        addRecipient: (address, args) => rec.addRecipient(address, args),
        removeRecipient: (address) => rec.removeRecipient(address),
      },
      message: {
        headers,
        size: state.size,
        stream: () => state.stream(),
        body: () => state.body.stream(),
        addHeader: (name, value) => rec.addHeader(name, value),
        insertHeader: (position, name, value) => rec.insertHeader(position, name, value),
        changeHeader: (name, index, value) => rec.changeHeader(name, index, value),
        deleteHeader: (name, index) => rec.deleteHeader(name, index),
        replaceBody: (body) => rec.replaceBody(body),
      },
      quarantine: (reason) => rec.quarantine(reason),
    };
    return Object.assign(base, eom);
  }

  /** The message ended before every milter saw its end: tell those still in it (xxfi_abort). */
  async abort(): Promise<void> {
    if (this.done) return;
    this.done = true;
    const s = this.session;
    for (const m of s.chain.milters) {
      if (m.abort && this.active.has(m)) await s.invoke(m, 'abort', this, (base) => m.abort?.(this.extend(base)));
    }
  }

  /** Marks the message finished (delivered, or refused after every milter's eom). */
  finish(): void {
    this.done = true;
  }
}
