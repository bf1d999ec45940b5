/**
 * A scripted SMTP session for milters, in process, with no sockets: the gateway's session
 * logic (lib/smtp/gateway.ts) step by step, over the same parts the gateway runs —
 * MilterChain / ChainSession / MessageRun (lib/milter/chain.ts) for every stage, with their
 * timeouts, default actions, verdict checks and stage skipping; sessionFacts() and
 * MESSAGE_MACROS (lib/smtp/session.ts) for the facts and the Postfix macros; ingest()
 * (lib/smtp/ingest.ts) to split the raw message into header fields and body and enforce the
 * size, header-size, line-length and bare CR/LF rules; the gateway's Received header
 * (lib/smtp/received.ts); MessageState and its edit application (lib/milter/message.ts).
 * A remote filter is a Milter made by connectMilter(), and goes through the same path.
 *
 * What the session adds is only the orchestration the gateway does inside smtp-server's
 * callbacks (when each stage runs, which verdict becomes which reply, when a message is
 * aborted), written after gateway.ts line for line; test/integration/testing-kit-gateway
 * checks that the kit and a real gateway over a socket agree.
 *
 * Deliberately not modelled: delivery (the reply after DATA is the one the gateway gives
 * when the transport stores the message), routing and recipient verification, smtp-server's
 * own syntax checks and replies to HELO/EHLO, AUTH itself (the script says who is
 * authenticated), client limits (anvil), submission's AUTH requirement, and the
 * X-Dovetail-Quarantine header the handoff prepends to a quarantined message.
 */
import { randomBytes } from 'node:crypto';
import { Readable } from 'node:stream';
import { DovetailError, ErrorCodes } from '../errors.js';
import { MilterChain, type ChainSession, type MessageRun, type SessionFacts, type StageOutcome } from '../milter/chain.js';
import { checkAddress, MessageState, type MessageEdit } from '../milter/message.js';
import type { Stage } from '../milter/stages.js';
import type { AuthInfo, EnvelopeAddress, HeaderField, Milter, MilterTimeouts, ScoreEntry, TlsInfo } from '../milter/types.js';
import { smtpReply, type SmtpReply } from '../milter/verdict.js';
import { connectMilter } from '../milter/protocol/client.js';
import type { SpoolOptions } from '../message/spool.js';
import { domainOf } from '../delivery/domains.js';
import { ingest } from '../smtp/ingest.js';
import { newQueueId } from '../smtp/received.js';
import { contentState, hopCount } from '../smtp/content.js';
import { MESSAGE_MACROS, sessionFacts } from '../smtp/session.js';
import type { SMTPServerSession } from 'smtp-server';
import { recordingMilter, summarizeEdits, type EditSink, type EditSummary, type RecordedEdit } from './edits.js';
import { traceSession, tracing, type MilterEvent } from './trace.js';

/**
 * What to test: one milter, several (a chain, run in this order), or a socket spec
 * (`inet:127.0.0.1:8891`, `unix:/path`) of a remote filter, which the kit reaches with
 * `connectMilter(spec)`. A `connectMilter()` result is an ordinary Milter and may be given
 * as one, with its options.
 */
export type MilterUnderTest = Milter | string | readonly (Milter | string)[];

/** The SMTP client of a test session (the facts behind `ctx.client` and the connect macros). */
export interface TestClient {
  /** Its IP address. Default `127.0.0.1`. */
  readonly address?: string;
  /** Its port. Default `40000`. */
  readonly port?: number;
  /**
   * Its reverse-resolved host name. Default: none, so `ctx.client.hostname` is
   * `[address]` and `{client_name}` is `unknown`, as in a gateway with
   * `resolveClientNames: false`.
   */
  readonly hostname?: string;
}

/** Our end of a test session (`ctx.server`, macros `j`, `{daemon_name}`, `{daemon_addr}`, `{daemon_port}`). */
export interface TestServer {
  /** The listener's name. Default `dovetail`. */
  readonly name?: string;
  /** Default `127.0.0.1`. */
  readonly address?: string;
  /** Default `25`. */
  readonly port?: number;
}

/**
 * Options of a test session: where it runs and the gateway options that change what
 * milters see or what the gateway refuses, with the gateway's defaults.
 */
export interface TestSessionOptions {
  /** Our host name (`j`, `ctx.server.hostname`, the Received header). Default `localhost`. */
  readonly hostname?: string;
  readonly client?: TestClient;
  readonly server?: TestServer;
  /** The session id milters see as `ctx.sessionId`. Default: a new random one. */
  readonly sessionId?: string;
  /** The gateway's size limit (lowered by milters' `limits.maxMessageBytes`). Default 50 MiB. */
  readonly maxMessageBytes?: number;
  /** Header block limit. Default 102 400. */
  readonly maxHeaderBytes?: number;
  /** Longest line of the message. Default 102 400. */
  readonly maxLineBytes?: number;
  /** Most Received:/Delivered-To: headers before `554 5.4.6`. Default 50. */
  readonly maxHops?: number;
  /** Recipients a milter's edits may leave. Default 1000. */
  readonly maxRecipients?: number;
  /** Edits one milter may make at one end of message. Default 1000. */
  readonly maxMilterEdits?: number;
  /** A bare CR or LF in the message: refused (`550 5.5.2`, the default) or rewritten to CRLF. */
  readonly bareLineEndings?: 'reject' | 'normalize';
  /** Timeouts for milters that set none (the gateway's `milterTimeouts`). */
  readonly milterTimeouts?: MilterTimeouts;
  /** Where the message and replacement bodies are spooled. */
  readonly spool?: SpoolOptions;
}

/** An envelope address with ESMTP parameters; a plain string means no parameters. */
export type TestAddress = string | { readonly address: string; readonly args?: Readonly<Record<string, string | true>> };

/** What the client is told and what the chain decided for one command. */
export interface StepResult {
  /** The SMTP command of the step. */
  readonly command: 'connect' | 'helo' | 'starttls' | 'auth' | 'mail' | 'rcpt' | 'data' | 'rset' | 'unknown' | 'quit';
  /**
   * The milter stage whose outcome this is (for `data`: the stage that decided, `eom`
   * when the content pass completed; for a refusal the gateway itself made, the stage at
   * which it made it); undefined for a command that runs no stage (STARTTLS, AUTH, RSET).
   */
  readonly stage: Stage | undefined;
  /**
   * The chain's outcome: `continue`, or the `reject`/`tempfail` (with the milter's reply)
   * or `discard` that ended the stage, with the milter's name. A refusal made by the
   * gateway or smtp-server itself (size, bare line endings, too many hops, no recipient
   * left, address syntax, commands out of order) is a `reject`/`tempfail` with no milter.
   */
  readonly outcome: StageOutcome | { readonly type: 'reject' | 'tempfail'; readonly reply: SmtpReply; readonly milter?: undefined };
  /**
   * The reply the gateway sends for this command, undefined where smtp-server answers
   * itself with text the kit does not model (the greeting, HELO/EHLO, STARTTLS, AUTH,
   * RSET, QUIT). A HELO refusal is the reply to the next MAIL FROM, as in the gateway.
   */
  readonly reply: SmtpReply | undefined;
  /** What each milter answered during this step (continue is not listed). */
  readonly events: readonly MilterEvent[];
}

/** The result of DATA: the step, plus what became of the message. */
export interface MessageResult extends StepResult {
  readonly command: 'data';
  /** The queue id (macro `i`). */
  readonly queueId: string;
  /** The edits the chain applied (empty when the content pass did not run to its end). */
  readonly edits: EditSummary;
  /**
   * The message as the milters left it — the gateway's Received header first, edits
   * applied — as the transport would get it; undefined when it was refused or discarded.
   */
  readonly message: Buffer | undefined;
  /** The header fields of {@link message}. */
  readonly headers: readonly HeaderField[] | undefined;
  /** The envelope after the edits; undefined when the message was refused or discarded. */
  readonly envelope: { readonly sender: EnvelopeAddress; readonly recipients: readonly EnvelopeAddress[] } | undefined;
  /** Why the message goes to quarantine, if it does. */
  readonly quarantine: string | undefined;
  /** The message's spam score as the milters left it. */
  readonly score: { readonly total: number; readonly entries: readonly ScoreEntry[] };
}

const ACCEPTED_MAIL = smtpReply(250, '2.1.0', 'Accepted');
const ACCEPTED_RCPT = smtpReply(250, '2.1.5', 'Accepted');
/** The gateway's replies (lib/smtp/gateway.ts REPLIES), and smtp-server's for the cases the kit models. */
const REPLIES = {
  headerTooLarge: smtpReply(552, '5.3.4', 'Error: message header too big'),
  tooManyHops: smtpReply(554, '5.4.6', 'Error: too many hops (mail forwarding loop)'),
  bareLineEnding: smtpReply(550, '5.5.2', 'Error: bare <CR> or <LF> in message data (RFC 5321 2.3.8)'),
  noRecipients: smtpReply(554, '5.5.1', 'Error: no valid recipients'),
  needMail: smtpReply(503, '5.5.1', 'Error: need MAIL command'),
  needRcpt: smtpReply(503, '5.5.1', 'Error: need RCPT command'),
  nestedMail: smtpReply(503, '5.5.1', 'Error: nested MAIL command'),
  needHelo: smtpReply(503, '5.5.1', 'Error: send HELO/EHLO first'),
  unknownCommand: smtpReply(500, '5.5.2', 'Error: command not recognized'),
  badSender: smtpReply(501, '5.1.7', 'Error: Bad sender address syntax'),
  badRecipient: smtpReply(501, '5.1.3', 'Error: Bad recipient address syntax'),
} as const;

const CONTINUE: StageOutcome = Object.freeze({ type: 'continue' });

/** The script's address as the gateway would get it from smtp-server; undefined for one smtp-server refuses (501). */
function toAddress(a: TestAddress, allowEmpty: boolean): EnvelopeAddress | undefined {
  const raw = typeof a === 'string' ? a : a?.address;
  let address: string;
  try {
    address = checkAddress(raw, allowEmpty);
  } catch {
    return undefined;
  }
  const args: Record<string, string | true> = {};
  if (typeof a !== 'string') {
    for (const [k, v] of Object.entries(a.args ?? {})) {
      if (!/^[A-Za-z0-9][A-Za-z0-9-]*$/.test(k) || (v !== true && (typeof v !== 'string' || /[\x00-\x20\x7f]/.test(v)))) return undefined;
      args[k.toUpperCase()] = v;
    }
  }
  return { address, args };
}

function toMilters(m: MilterUnderTest): Milter[] {
  const list: readonly (Milter | string)[] = Array.isArray(m) ? (m as readonly (Milter | string)[]) : [m as Milter | string];
  return list.map((x) => (typeof x === 'string' ? connectMilter(x) : x));
}

/** The outcome of a refusal the gateway (or smtp-server) makes itself: no milter. */
const own = (reply: SmtpReply): StepResult['outcome'] => ({ type: reply.code >= 500 ? 'reject' : 'tempfail', reply });

const refusal = (out: StageOutcome): SmtpReply | undefined => (out.type === 'reject' || out.type === 'tempfail' ? out.reply : undefined);

/**
 * One SMTP session run against a chain of milters, one command at a time, in process. Make
 * one with {@link startSession} (it runs the connect stage), then call the commands in the
 * order a client would; each resolves with what the client would be told and what each
 * milter answered. Always end with {@link TestSession.close} (it runs abort and close, and
 * lets a remote filter's connection go).
 */
export class TestSession {
  /** The session facts milters see (client, server, HELO, TLS, AUTH, macros), kept current as the gateway keeps them. */
  readonly facts: SessionFacts;
  /** The result of the connect stage. */
  connectResult!: StepResult;
  private readonly chain: ChainSession;
  private readonly hostname: string;
  private readonly maxMessageBytes: number;
  private readonly maxHeaderBytes: number;
  private readonly options: TestSessionOptions;
  private events: MilterEvent[] = [];
  private readonly untrace: () => void;
  private edits: Map<string, MessageEdit[]> | undefined;
  private refusedAtConnect = false;
  private closed = false;
  private esmtp = true;
  private heloRanFor: string | undefined;
  /** The helo stage's refusal for the current name (given at every MAIL FROM), with the milter that refused. */
  private heloRefusal: StageOutcome | undefined;
  private user: AuthInfo | undefined;
  /** The open transaction as smtp-server sees it (MAIL given, not yet ended by DATA or RSET). */
  private transaction: MessageRun | undefined;
  /** Where the open transaction was discarded (mail or rcpt), to report at DATA. */
  private discardedBy: { stage: Stage; outcome: StageOutcome } | undefined;

  /** @internal Use {@link startSession}. */
  constructor(milters: MilterUnderTest, options: TestSessionOptions = {}) {
    this.options = options;
    this.hostname = options.hostname ?? 'localhost';
    const list = toMilters(milters).map((m) => recordingMilter(m, () => this.editSink()));
    this.maxHeaderBytes = options.maxHeaderBytes ?? 102_400;
    // The gateway's chainFor()/sizeLimitOf(): milters' limits lower the size limit, and edits are bound by the client's limits.
    this.maxMessageBytes = Math.min(options.maxMessageBytes ?? 50 * 1024 * 1024, ...list.map((m) => m.limits?.maxMessageBytes ?? Infinity));
    const chain = new MilterChain(list, {
      ...(options.milterTimeouts ? { timeouts: options.milterTimeouts } : {}),
      ...(options.spool ? { spool: options.spool } : {}),
      editLimits: {
        maxHeaderBytes: this.maxHeaderBytes,
        maxMessageBytes: this.maxMessageBytes,
        maxRecipients: options.maxRecipients ?? 1000,
        maxEdits: options.maxMilterEdits ?? 1000,
      },
    });
    const client = options.client ?? {};
    const server = options.server ?? {};
    const address = client.address ?? '127.0.0.1';
    // The gateway builds its facts and connect macros from smtp-server's session object; so does the kit.
    const session = {
      id: options.sessionId ?? `test-${randomBytes(6).toString('hex')}`,
      remoteAddress: address,
      remotePort: client.port ?? 40000,
      clientHostname: client.hostname ?? `[${address}]`,
      localAddress: server.address ?? '127.0.0.1',
      localPort: server.port ?? 25,
    } as SMTPServerSession;
    this.facts = sessionFacts(session, this.hostname, server.name ?? 'dovetail');
    if (typeof session.id !== 'string' || !session.id || tracing(session.id)) {
      throw new DovetailError(ErrorCodes.INVALID_OPTIONS, `test session id ${JSON.stringify(session.id)} is empty or already in use`);
    }
    this.untrace = traceSession(this.facts.sessionId, (e) => this.events.push(e));
    this.chain = chain.session(this.facts);
  }

  private editSink(): EditSink | undefined {
    const edits = this.edits;
    if (!edits) return undefined;
    return (milter, edit) => {
      let list = edits.get(milter);
      if (!list) edits.set(milter, (list = []));
      list.push(edit);
    };
  }

  private step(command: StepResult['command'], stage: Stage | undefined, outcome: StepResult['outcome'], reply: SmtpReply | undefined): StepResult {
    const events = this.events;
    this.events = [];
    return { command, stage, outcome, reply, events };
  }

  private checkOpen(): void {
    if (this.closed) throw new DovetailError(ErrorCodes.INVALID_OPTIONS, 'the test session is closed');
    if (this.refusedAtConnect) throw new DovetailError(ErrorCodes.INVALID_OPTIONS, 'the connect stage refused the session: the gateway closed the connection');
  }

  /** @internal The connect stage (run by startSession). */
  async connect(): Promise<StepResult> {
    const out = await this.chain.connect();
    const reply = refusal(out);
    if (reply) {
      this.refusedAtConnect = true;
      // A refused greeting: 554 for a reject, 421 for a tempfail (RFC 5321 3.1), with the milter's text.
      const code = out.type === 'tempfail' ? 421 : 554;
      this.connectResult = this.step('connect', 'connect', out, smtpReply(code, `${String(code)[0]}${reply.enhanced.slice(1)}`, reply.lines));
      await this.close();
    } else {
      this.connectResult = this.step('connect', 'connect', out, undefined);
    }
    return this.connectResult;
  }

  /** True when the connect stage refused the session (the gateway closes the connection). */
  get refused(): boolean {
    return this.refusedAtConnect;
  }

  /**
   * HELO or EHLO (`esmtp`, the default): the helo stage runs once per name (not again for
   * the same name), as soon as the name is accepted. A refusal is not the reply to HELO
   * (smtp-server has sent 250): it is the reply to the next MAIL FROM. Like RSET, it ends
   * an open transaction (smtp-server's rule; the milters' abort comes at the next MAIL FROM
   * or at close).
   */
  async helo(name: string, esmtp = true): Promise<StepResult> {
    this.checkOpen();
    this.esmtp = esmtp;
    this.transaction = undefined;
    const helo = name.toLowerCase();
    let out = CONTINUE;
    if (helo !== this.heloRanFor) {
      this.heloRanFor = helo;
      this.facts.helo = helo;
      out = await this.chain.helo(helo);
      this.heloRefusal = refusal(out) ? out : undefined;
    }
    return this.step('helo', 'helo', out, undefined);
  }

  /**
   * STARTTLS: sets the TLS facts and `{tls_version}`, `{cipher}`, `{cipher_bits}` as the
   * gateway does once the handshake is done. No milter stage runs. Default facts:
   * TLSv1.3, TLS_AES_256_GCM_SHA384, 256 bits. A client says EHLO again after it; with
   * the same name the helo stage does not run again.
   */
  async starttls(info: TlsInfo = { version: 'TLSv1.3', cipher: 'TLS_AES_256_GCM_SHA384', bits: 256 }): Promise<StepResult> {
    this.checkOpen();
    this.facts.tls = info;
    const m = this.facts.macros;
    m['{tls_version}'] = info.version;
    m['{cipher}'] = info.cipher;
    m['{cipher_bits}'] = String(info.bits);
    this.transaction = undefined;
    return this.step('starttls', undefined, CONTINUE, undefined);
  }

  /**
   * A successful AUTH as `user` (with `method`, default `PLAIN`). No milter stage runs: as
   * in the gateway, milters see `ctx.auth`, `{auth_type}` and `{auth_authen}` from the next
   * MAIL FROM on.
   */
  async auth(user: string | AuthInfo): Promise<StepResult> {
    this.checkOpen();
    this.user = typeof user === 'string' ? { method: 'PLAIN', user } : user;
    return this.step('auth', undefined, CONTINUE, undefined);
  }

  /**
   * MAIL FROM: a SIZE= over the size limit is refused first (smtp-server's 552); then the
   * helo stage's refusal, if any, is the reply; then a new queue id and the message macros,
   * an open message is aborted, and the mail stage runs.
   */
  async mail(from: TestAddress): Promise<StepResult> {
    this.checkOpen();
    if (this.heloRanFor === undefined) return this.step('mail', 'mail', own(REPLIES.needHelo), REPLIES.needHelo);
    if (this.transaction) return this.step('mail', 'mail', own(REPLIES.nestedMail), REPLIES.nestedMail);
    const sender = toAddress(from, true);
    if (!sender) return this.step('mail', 'mail', own(REPLIES.badSender), REPLIES.badSender);
    const size = sender.args['SIZE'];
    if (typeof size === 'string' && /^\d{1,20}$/.test(size) && Number(size) > this.maxMessageBytes) {
      const tooBig = smtpReply(552, '5.3.4', `Error: message exceeds fixed maximum message size ${this.maxMessageBytes}`);
      return this.step('mail', 'mail', own(tooBig), tooBig);
    }
    const f = this.facts;
    f.auth = this.user;
    if (this.heloRefusal) return this.step('mail', 'helo', this.heloRefusal, refusal(this.heloRefusal));
    const queueId = newQueueId();
    const m = f.macros;
    // Message macros start afresh with each MAIL FROM.
    for (const k of MESSAGE_MACROS) delete m[k];
    m['i'] = queueId;
    m['{mail_addr}'] = sender.address;
    m['{mail_host}'] = domainOf(sender.address);
    m['{mail_mailer}'] = 'smtp';
    if (f.auth) {
      m['{auth_type}'] = f.auth.method;
      m['{auth_authen}'] = f.auth.user;
    }
    const run = await this.chain.begin(queueId, sender);
    const out = await run.mail();
    const reply = refusal(out);
    if (reply) {
      await run.abort();
      return this.step('mail', 'mail', out, reply);
    }
    this.transaction = run;
    this.discardedBy = out.type === 'discard' ? { stage: 'mail', outcome: out } : undefined;
    return this.step('mail', 'mail', out, ACCEPTED_MAIL);
  }

  /** RCPT TO: the rcpt stage; a refusal refuses this recipient only. */
  async rcpt(to: TestAddress): Promise<StepResult> {
    this.checkOpen();
    const run = this.transaction;
    if (!run) return this.step('rcpt', 'rcpt', own(REPLIES.needMail), REPLIES.needMail);
    const rcpt = toAddress(to, false);
    if (!rcpt) return this.step('rcpt', 'rcpt', own(REPLIES.badRecipient), REPLIES.badRecipient);
    const m = this.facts.macros;
    m['{rcpt_addr}'] = rcpt.address;
    m['{rcpt_host}'] = domainOf(rcpt.address);
    m['{rcpt_mailer}'] = 'smtp';
    const out = await run.rcpt(rcpt);
    const reply = refusal(out);
    if (reply) return this.step('rcpt', 'rcpt', out, reply);
    run.accepted(rcpt);
    if (out.type === 'discard') this.discardedBy ??= { stage: 'rcpt', outcome: out };
    return this.step('rcpt', 'rcpt', out, ACCEPTED_RCPT);
  }

  /**
   * DATA and the message: `message` is the raw message as the client sends it after dot
   * unstuffing (header fields, an empty line, the body), CRLF line endings; a final CRLF is
   * added when it has none, as an SMTP client does before `.`. The data stage runs, the
   * message is split into header fields and body and checked (size, header size, line
   * length, bare CR/LF) exactly as in the gateway, the gateway's Received header is
   * prepended, and the content pass runs each milter in turn over the message as those
   * before it left it.
   */
  async data(message: string | Buffer | Uint8Array): Promise<MessageResult> {
    this.checkOpen();
    const run = this.transaction;
    const empty = (stage: Stage, outcome: StepResult['outcome'], reply: SmtpReply | undefined, queueId = ''): MessageResult => ({
      ...this.step('data', stage, outcome, reply),
      command: 'data',
      queueId,
      edits: summarizeEdits([], undefined),
      message: undefined,
      headers: undefined,
      envelope: undefined,
      quarantine: undefined,
      score: { total: 0, entries: [] },
    });
    if (!run) return empty('data', own(REPLIES.needMail), REPLIES.needMail);
    if (run.recipients.length === 0) return empty('data', own(REPLIES.needRcpt), REPLIES.needRcpt, run.queueId);
    this.transaction = undefined;
    let bytes = typeof message === 'string' ? Buffer.from(message, 'utf8') : Buffer.from(message.buffer, message.byteOffset, message.byteLength);
    if (bytes.length > 0 && !(bytes.length >= 2 && bytes[bytes.length - 2] === 0x0d && bytes[bytes.length - 1] === 0x0a)) {
      bytes = Buffer.concat([bytes, Buffer.from('\r\n')]);
    }
    const score = () => {
      let total = 0;
      for (const e of run.scoreEntries) total += e.points;
      return { total: Math.round(total * 1000) / 1000, entries: [...run.scoreEntries] };
    };
    const refused = (stage: Stage, outcome: StepResult['outcome'], reply: SmtpReply): MessageResult => ({ ...empty(stage, outcome, reply, run.queueId), score: score() });
    const gateway = (stage: Stage, reply: SmtpReply): MessageResult => refused(stage, own(reply), reply);
    const queued = smtpReply(250, '2.6.0', `Ok: queued as ${run.queueId}`);

    const dataOutcome = run.data();
    let got: Awaited<ReturnType<typeof ingest>>;
    try {
      got = await ingest(Readable.from([bytes]), {
        maxBytes: this.maxMessageBytes,
        maxHeaderBytes: this.maxHeaderBytes,
        bareLineEndings: this.options.bareLineEndings ?? 'reject',
        maxLineBytes: this.options.maxLineBytes ?? 102_400,
        ...(this.options.spool ? { spool: this.options.spool } : {}),
      });
    } catch (err) {
      // The spool could not be written (its directory, the disk): the gateway answers 451/452; a test wants the error.
      await dataOutcome;
      await run.abort();
      throw err;
    }
    let state: MessageState | undefined;
    try {
      const dataOut = await dataOutcome;
      const dataReply = refusal(dataOut);
      const problem = got.problem;
      if (problem) {
        await run.abort();
        return gateway(
          'data',
          problem === 'too-large'
            ? smtpReply(552, '5.3.4', `Error: message size exceeds the ${this.maxMessageBytes}-byte limit of ${this.hostname}`)
            : problem === 'header-too-large'
              ? REPLIES.headerTooLarge
              : problem === 'line-too-long'
                ? smtpReply(554, '5.6.0', `Error: message has a line longer than ${this.options.maxLineBytes ?? 102_400} bytes`)
                : REPLIES.bareLineEnding,
        );
      }
      if (dataReply) {
        await run.abort();
        return refused('data', dataOut, dataReply);
      }
      if (hopCount(got.headers) > (this.options.maxHops ?? 50)) {
        await run.abort();
        return gateway('data', REPLIES.tooManyHops);
      }
      if (run.discarded) {
        run.finish();
        const by = this.discardedBy ?? { stage: 'data' as Stage, outcome: dataOut };
        return refused(by.stage, by.outcome, queued);
      }
      let protocol = this.esmtp ? 'ESMTP' : 'SMTP';
      if (this.facts.tls) protocol += 'S';
      if (this.user) protocol += 'A';
      state = contentState(got, run, this.facts, this.hostname, protocol);
      this.edits = new Map();
      const contentOut = await run.content(state);
      const editsByMilter = this.edits;
      this.edits = undefined;
      const contentReply = refusal(contentOut);
      const decidedAt = this.decidingStage(contentOut, 'eom');
      if (contentReply) {
        await run.abort();
        return refused(decidedAt, contentOut, contentReply);
      }
      if (run.discarded) {
        run.finish();
        return refused(decidedAt, contentOut, queued);
      }
      const applied = this.appliedEdits(editsByMilter);
      const bytesOut = await readAll(state.stream());
      const body = bytesOut.subarray(bytesOut.length - state.body.size);
      const base = this.step('data', 'eom', contentOut, state.recipients.length === 0 ? REPLIES.noRecipients : queued);
      const result: MessageResult = {
        ...base,
        command: 'data',
        queueId: run.queueId,
        edits: summarizeEdits(applied, body),
        message: state.recipients.length === 0 ? undefined : bytesOut,
        headers: state.headers.map((h) => (h.origin === undefined ? { name: h.name, value: h.value } : { name: h.name, value: h.value, origin: h.origin })),
        envelope: { sender: state.sender, recipients: [...state.recipients] },
        quarantine: state.quarantine,
        score: score(),
      };
      if (state.recipients.length === 0) return { ...result, outcome: { type: 'reject', reply: REPLIES.noRecipients } };
      return result;
    } finally {
      run.finish();
      await state?.dispose();
      await got.spool.dispose();
    }
  }

  /** The stage at which `out`'s milter ended the content pass (its last event in this step), or `fallback`. */
  private decidingStage(out: StageOutcome, fallback: Stage): Stage {
    if (out.type === 'continue') return fallback;
    for (let i = this.events.length - 1; i >= 0; i--) {
      const e = this.events[i] as MilterEvent;
      if (e.milter === out.milter && e.stage !== 'abort') return e.stage;
    }
    return fallback;
  }

  /** The edits the chain applied: of milters with no failure at eom and no reject/tempfail/discard there. */
  private appliedEdits(byMilter: Map<string, MessageEdit[]>): RecordedEdit[] {
    const dropped = new Set<string>();
    const quarantined = new Map<string, string>();
    for (const e of this.events) {
      if (e.stage !== 'eom') continue;
      if ('error' in e) dropped.add(e.milter);
      else if (e.verdict.type === 'reject' || e.verdict.type === 'tempfail' || e.verdict.type === 'discard') dropped.add(e.milter);
      else if (e.verdict.type === 'quarantine') quarantined.set(e.milter, e.verdict.reason);
    }
    const out: RecordedEdit[] = [];
    // Chain order: the order the milters made their edits in.
    const names = new Set([...byMilter.keys(), ...quarantined.keys()]);
    for (const m of this.chain.chain.milters) {
      if (!names.has(m.name) || dropped.has(m.name)) continue;
      for (const edit of byMilter.get(m.name) ?? []) out.push({ milter: m.name, edit });
      const q = quarantined.get(m.name);
      if (q !== undefined) out.push({ milter: m.name, edit: { op: 'quarantine', reason: q } });
    }
    return out;
  }

  /**
   * RSET: smtp-server forgets the transaction. As in the gateway, the milters are not told
   * now: their abort runs at the next MAIL FROM or when the session ends.
   */
  async rset(): Promise<StepResult> {
    this.checkOpen();
    this.transaction = undefined;
    return this.step('rset', undefined, CONTINUE, undefined);
  }

  /**
   * A command smtp-server does not recognise (`command` is the whole line): the unknown
   * stage runs; a reject/tempfail is the reply, anything else leaves smtp-server's `500`.
   */
  async unknown(command: string): Promise<StepResult> {
    this.checkOpen();
    const out = await this.chain.unknown(command);
    return this.step('unknown', 'unknown', out, refusal(out) ?? REPLIES.unknownCommand);
  }

  /** QUIT, or the client going away: abort for an open message, then every milter's close. Safe to call twice. */
  async close(): Promise<StepResult> {
    if (this.closed) return this.step('quit', 'close', CONTINUE, undefined);
    this.closed = true;
    this.transaction = undefined;
    try {
      await this.chain.close();
      return this.step('quit', 'close', CONTINUE, undefined);
    } finally {
      this.untrace();
    }
  }
}

async function readAll(stream: Readable): Promise<Buffer> {
  const chunks: Buffer[] = [];
  for await (const c of stream as AsyncIterable<Buffer>) chunks.push(c);
  return Buffer.concat(chunks);
}

/**
 * Starts a test session against `milters` (runs the connect stage). Check
 * `session.refused` / `session.connectResult` before going on; end with `close()`.
 *
 * @example
 * ```ts
 * const s = await startSession(myMilter, { client: { address: '192.0.2.1' } });
 * await s.helo('mx.example.net');
 * await s.mail('a@example.net');
 * const r = await s.rcpt('nobody@example.com');
 * assert.equal(r.reply?.code, 550);
 * await s.close();
 * ```
 */
export async function startSession(milters: MilterUnderTest, options: TestSessionOptions = {}): Promise<TestSession> {
  const s = new TestSession(milters, options);
  try {
    await s.connect();
  } catch (err) {
    await s.close().catch(() => undefined);
    throw err;
  }
  return s;
}
