/**
 * connectMilter(): a Milter that forwards every stage to a remote filter over the Sendmail
 * milter protocol (libmilter filters, opendkim, rspamd, clamav-milter …), so the chain runs
 * it like any in-process milter. The MTA side of the protocol, after Postfix's
 * src/milter/milter8.c:
 *
 * - One filter connection per SMTP session (keyed by sessionId), opened at the first stage
 *   the session reaches, OPTNEG offering version 6, every action we can apply and every
 *   protocol flag we honour (all NO*, all NR_*, SKIP, HDR_LEADSPC; not RCPT_REJ, not the
 *   MDS_* sizes). The filter's reply is checked as Postfix checks it (version above ours or
 *   actions we did not offer: protocol error). Events the filter's version does not know
 *   are never sent; NO* events are not sent (for envelope events the macro packet still
 *   is, as Postfix does); NR_* events are not waited for; SKIP stops that event type.
 * - Before each event a macro packet with that stage's list: Postfix's defaults
 *   (postfix-macros.ts), replaced per stage by options.macros, replaced again per stage by
 *   the lists the filter asks for in its OPTNEG reply. Only macros with a value are sent.
 * - ABORT when a message ends (after eom; in the abort handler; before the next MAIL if the
 *   message was left open by an accept or discard), QUIT when the session ends. A
 *   connection the filter closed between messages is reopened (CONNECT and HELO replayed).
 * - The gateway's own Received header (the first header, carrying this message's queue
 *   id) is not shown to the filter, and CHGHEADER indexes for Received skip it, as
 *   Postfix does (milter8_header, cleanup_milter.c); INSHEADER positions count it.
 * - Header values from the stored bytes: one leading space removed unless the filter
 *   negotiated HDR_LEADSPC, folding sent as LF (as Postfix and Sendmail send it).
 * - Replies become verdicts; at eom every modification is applied, in order, through the
 *   EomContext's editors. REPLYCODE is checked as Postfix checks it (4xx/5xx, `-` or space,
 *   enhanced code class matching), `%%` becomes `%`.
 *
 * Failures: a connection that cannot be opened, a timeout (connect, command, content —
 * PROGRESS restarts the content wait), a closed connection mid-message, a malformed or
 * unexpected packet (MilterProtocolError) or a malformed reply/edit: the handler throws,
 * so the chain takes this milter's `defaultAction` (the returned Milter carries it), and
 * the filter is treated as failed for the rest of the SMTP session (every later stage
 * throws at once without talking to it), as Postfix's MILTER8_STAT_ERROR does.
 *
 * Deliberately not done: RCPT_REJ (the chain never shows refused recipients), MDS_256K/1M,
 * SMFIR_CONN_FAIL (Postfix treats it as an unexpected reply: protocol error, so do we),
 * SETSYMLIST packets after OPTNEG (no MTA defines them: protocol error).
 */
import net from 'node:net';
import { DovetailError, ErrorCodes } from '../../errors.js';
import { Spool, type SpoolOptions } from '../../message/spool.js';
import type { StoredHeader } from '../message.js';
import {
  accept as acceptVerdict,
  continue_,
  DEFAULT_REJECT_REPLY,
  DEFAULT_TEMPFAIL_REPLY,
  discard as discardVerdict,
  skip as skipVerdict,
  smtpReply,
  type SmtpReply,
  type Verdict,
} from '../verdict.js';
import type {
  ContentContext,
  DefaultAction,
  EnvelopeAddress,
  EomContext,
  HeaderField,
  MessageContext,
  Milter,
  SessionContext,
} from '../types.js';
import { encodeFrame, FrameDecoder, type Frame } from './codec.js';
import { encodeCommand } from './commands.js';
import {
  MILTER_CHUNK_SIZE,
  SMFIC,
  SMFIF_ALL,
  SMFIP,
  SMFIP_NOREPLY_MASK,
  SMFIP_NOSEND_MASK,
  SMFIP_VERSION_MASK,
  SMFI_PROT_VERSION,
  SMFI_PROT_VERSION_MIN,
  type CommandCode,
} from './constants.js';
import { MilterProtocolError } from './error.js';
import { MACRO_STAGE_BY_SMFIM, POSTFIX_DEFAULT_MACROS, type MacroStageName } from './postfix-macros.js';
import { decodeReply, type MilterReply } from './replies.js';
import { connectOptions, parseSocketSpec, type SocketSpec } from './socket.js';
import { drainWithin } from '../../drain.js';

export type { MacroStageName } from './postfix-macros.js';
export { POSTFIX_DEFAULT_MACROS } from './postfix-macros.js';

/** Options of {@link connectMilter}. Times in milliseconds. */
export interface ConnectMilterOptions {
  /** The milter's name in the chain (logs, diagnostics). Default: the socket spec. */
  readonly name?: string;
  /** What the chain does when the filter is down, slow or speaks garbage. Default `tempfail`. */
  readonly defaultAction?: DefaultAction;
  /** Opening the connection (Postfix milter_connect_timeout). Default 30 000. */
  readonly connectTimeout?: number;
  /** Each reply to OPTNEG, CONNECT, HELO, MAIL, RCPT, DATA (Postfix milter_command_timeout). Default 30 000. */
  readonly commandTimeout?: number;
  /**
   * Each reply to HEADER, EOH, BODY, end of message (Postfix milter_content_timeout); a
   * PROGRESS packet restarts it. Default 300 000.
   */
  readonly contentTimeout?: number;
  /**
   * Macro lists per stage, replacing Postfix's defaults for the stages given (a filter that
   * asks for its own lists in OPTNEG gets those instead, per stage).
   */
  readonly macros?: Partial<Record<MacroStageName, readonly string[]>>;
  /** Largest replacement body (SMFIR_REPLBODY, all chunks) accepted from the filter. Default 64 MiB. */
  readonly maxReplacementBodyBytes?: number;
  /** Where replacement bodies are spooled while the message is edited (RAM threshold, temp dir). */
  readonly spool?: SpoolOptions;
}

/** Postfix's milter_connect_timeout default. */
export const DEFAULT_CONNECT_TIMEOUT = 30_000;
/** Postfix's milter_command_timeout default. */
export const DEFAULT_MILTER_COMMAND_TIMEOUT = 30_000;
/** Postfix's milter_content_timeout default. */
export const DEFAULT_MILTER_CONTENT_TIMEOUT = 300_000;
/** One stage's total time, PROGRESS included, as a multiple of contentTimeout (the chain's backstop). */
export const PROGRESS_LIMIT_FACTOR = 10;

/** The protocol flags we offer: every NO*, every NR_*, SKIP, HDR_LEADSPC. */
export const OFFERED_PROTOCOL = SMFIP_NOSEND_MASK | SMFIP_NOREPLY_MASK | SMFIP.SKIP | SMFIP.HDR_LEADSPC;
/** The actions we offer: all of them (Postfix's my_actions). */
export const OFFERED_ACTIONS = SMFIF_ALL;

const MAX_TIMER = 0x7fff_ffff;
/** Decoded-but-unread reply bytes at which we stop reading the socket (flow control, not an error). */
const QUEUE_HIGH_WATER = 256 * 1024;
const DEFAULT_MAX_REPLBODY = 64 * 1024 * 1024;
/** Modification actions accepted in one end of message. */
const MAX_EDITS = 100_000;
/** One decision may take at most this many command/content timeouts, progress replies or not. */
const PROGRESS_CAP = 4;

type Kind = 'command' | 'content';

/** The result of OPTNEG. */
interface Negotiated {
  readonly version: number;
  readonly actions: number;
  /** The filter's SMFIP_* flags. */
  readonly protocol: number;
  /** Events outside the filter's protocol version (never sent, not even their macros). */
  readonly nonProtocol: number;
  /** Macro lists the filter asked for, per stage. */
  readonly macros: Partial<Record<MacroStageName, readonly string[]>>;
}

function milterError(code: (typeof ErrorCodes)[keyof typeof ErrorCodes], message: string, cause?: unknown): DovetailError {
  return cause === undefined ? new DovetailError(code, message) : new DovetailError(code, message, { cause });
}

function checkTime(what: string, v: number | undefined, def: number): number {
  if (v === undefined) return def;
  if (typeof v !== 'number' || !Number.isFinite(v) || v <= 0 || v > MAX_TIMER) {
    throw new DovetailError(ErrorCodes.INVALID_OPTIONS, `connectMilter: ${what} must be a positive number of ms`);
  }
  return v;
}

/** One socket to the filter: frames in (bounded, with flow control), bytes out. */
class FilterConnection {
  readonly socket: net.Socket;
  private readonly decoder = new FrameDecoder();
  private readonly queue: Frame[] = [];
  private queued = 0;
  private waiter: (() => void) | undefined;
  /** A terminal error (socket error, protocol error). */
  error: Error | undefined;
  /** The peer closed (or we did). */
  closed = false;
  /** Bytes received since the last request was written (used to tell a dead idle connection). */
  received = 0;

  constructor(socket: net.Socket) {
    this.socket = socket;
    socket.setNoDelay(true);
    socket.on('data', (chunk: Buffer) => this.onData(chunk));
    socket.on('error', (err) => {
      this.error ??= err;
      this.wake();
    });
    socket.on('close', () => {
      this.closed = true;
      this.wake();
    });
    socket.on('end', () => {
      this.closed = true;
      this.wake();
    });
  }

  private onData(chunk: Buffer): void {
    this.received += chunk.length;
    if (this.error) return;
    try {
      for (const f of this.decoder.push(chunk)) {
        this.queue.push(f);
        this.queued += f.data.length + 5;
      }
    } catch (err) {
      this.error = err as Error;
      this.socket.destroy();
    }
    if (this.queued > QUEUE_HIGH_WATER) this.socket.pause();
    this.wake();
  }

  private wake(): void {
    const w = this.waiter;
    this.waiter = undefined;
    w?.();
  }

  get alive(): boolean {
    return !this.closed && !this.error && !this.socket.destroyed;
  }

  /** Writes bytes; resolves once the kernel took them or `ms` passed (then rejects). */
  async write(data: Buffer, ms: number): Promise<void> {
    if (!this.alive) throw this.deadError();
    if (this.socket.write(data)) return;
    await drainWithin(
      this.socket,
      ms,
      () => this.deadError(),
      () => milterError(ErrorCodes.MILTER_TIMEOUT, `filter did not read within ${ms} ms`),
    );
  }

  /** The next frame from the filter within `ms`. */
  async next(ms: number): Promise<Frame> {
    const deadline = Date.now() + ms;
    for (;;) {
      const f = this.queue.shift();
      if (f) {
        this.queued -= f.data.length + 5;
        if (this.queued <= QUEUE_HIGH_WATER && this.socket.isPaused()) this.socket.resume();
        return f;
      }
      if (this.error || this.closed) throw this.deadError();
      const left = deadline - Date.now();
      if (left <= 0) throw milterError(ErrorCodes.MILTER_TIMEOUT, `filter did not reply within ${ms} ms`);
      await new Promise<void>((resolve) => {
        const t = setTimeout(resolve, left);
        this.waiter = () => {
          clearTimeout(t);
          resolve();
        };
      });
    }
  }

  deadError(): Error {
    if (this.error instanceof DovetailError) return this.error;
    if (this.error) return milterError(ErrorCodes.MILTER_FAILED, `filter connection failed: ${this.error.message}`, this.error);
    return milterError(ErrorCodes.MILTER_FAILED, 'filter closed the connection');
  }

  /** Polite close: optional last frames, FIN, and a hard close if the peer lingers. */
  end(last?: Buffer): void {
    if (this.socket.destroyed) return;
    this.closed = true;
    try {
      if (last && !this.error) this.socket.end(last);
      else this.socket.end();
    } catch {
      /* closing anyway */
    }
    setTimeout(() => this.socket.destroy(), 2000).unref();
  }

  destroy(): void {
    this.closed = true;
    this.socket.destroy();
  }
}

/** Per-message state. */
interface MessageState {
  /** The gateway's own Received header was hidden from the filter. */
  hidReceived: boolean;
  /** A QUARANTINE reply before end of message, applied at eom. */
  quarantine: string | undefined;
  /** Spools of replacement bodies, disposed when the message is over. */
  spools: Spool[];
}

/** Per-SMTP-session state. */
interface SessionState {
  conn: FilterConnection | undefined;
  neg: Negotiated | undefined;
  /** MILTER8_STAT_ERROR: every later stage throws this. */
  failed: Error | undefined;
  /** MILTER8_STAT_REJECT_CON: the reply every later stage gives. */
  sticky: Verdict | undefined;
  /** MILTER8_STAT_ACCEPT_CON: the filter accepted the whole session. */
  acceptedConn: boolean;
  /** A message is open at the filter (MAIL sent, ABORT not yet). */
  inMessage: boolean;
  /** The HELO name sent, for replay on a new connection. */
  helo: string | undefined;
  /** SMFIR_SKIP: further events of this command are not sent. */
  skipEvent: string | undefined;
  msg: MessageState;
  /** A handler is talking to the filter. */
  busy: boolean;
}

/** What one event sends. */
interface EventSpec {
  readonly stage: MacroStageName | 'header' | 'body';
  readonly command: CommandCode;
  /** The SMFIP_NO* flag of this event (0: cannot be switched off, BODYEOB). */
  readonly noFlag: number;
  /** The SMFIP_NR_* flag (0: always answered). */
  readonly nrFlag: number;
  readonly kind: Kind;
  /** The command frame(s). */
  readonly frames: Buffer;
}

const CONNECT_STAGES = new Set<string>([SMFIC.CONNECT, SMFIC.HELO]);

/** Macro stage of each event's macro packet (HEADER: eoh list, BODY: eom list, as Postfix). */
function macroStageOf(stage: EventSpec['stage']): MacroStageName {
  return stage === 'header' ? 'eoh' : stage === 'body' ? 'eom' : stage;
}

/**
 * Parses a SMFIR_REPLYCODE text as Postfix does (milter8.c): the first line must be
 * `[45]dd[ -]`, an enhanced code, if present, must be of the same class; `%%` becomes `%`
 * and a lone `%` is dropped. Returns undefined when it is malformed. Lines are made to fit
 * our reply rules (control characters dropped, long lines cut, at most 32 lines) rather
 * than refused, so a filter's reject never turns into the default action for a cosmetic
 * reason.
 */
export function parseReplyCode(text: string): SmtpReply | undefined {
  if (!/^[45]\d\d[ -]/.test(text) && !/^[45]\d\d$/.test(text)) return undefined;
  if (/^\d/.test(text[4] ?? '') && text[4] !== text[0]) return undefined;
  const unpercent = text.replace(/%(.?)/gs, '$1');
  const code = Number(unpercent.slice(0, 3));
  const raw = unpercent.split(/\r\n|\n/);
  let enhanced: string | undefined;
  const lines: string[] = [];
  for (const [i, line] of raw.entries()) {
    if (i > 0 && line === '' && i === raw.length - 1) break;
    const m = /^(\d{3})(?:[ -]|$)(?:([245]\.\d{1,3}\.\d{1,3})(?: |$))?(.*)$/s.exec(line);
    if (!m || Number(m[1]) !== code) return undefined;
    if (i === 0) enhanced = m[2];
    // eslint-disable-next-line no-control-regex
    let t = (m[3] ?? '').replace(/[\x00-\x1f\x7f]/g, ' ').trimEnd();
    while (Buffer.byteLength(t) > 496) t = t.slice(0, -1);
    lines.push(t);
  }
  const cls = String(code)[0];
  if (enhanced !== undefined && enhanced[0] !== cls) return undefined;
  try {
    return smtpReply(code, enhanced ?? `${cls}.7.1`, lines.slice(0, 32));
  } catch {
    return undefined;
  }
}

/** The value bytes of a header as the filter sees it (Postfix milter8_header). */
function headerValueBytes(h: HeaderField, leadingSpace: boolean): Buffer {
  const raw = (h as Partial<StoredHeader>).raw;
  let v: Buffer;
  if (Buffer.isBuffer(raw)) {
    const colon = raw.indexOf(0x3a);
    v = raw.subarray(colon + 1);
    if (v.length >= 2 && v[v.length - 2] === 0x0d && v[v.length - 1] === 0x0a) v = v.subarray(0, v.length - 2);
    else if (v.length >= 1 && v[v.length - 1] === 0x0a) v = v.subarray(0, v.length - 1);
    if (!leadingSpace && v[0] === 0x20) v = v.subarray(1);
  } else {
    v = Buffer.from((leadingSpace ? ' ' : '') + h.value, 'utf8');
  }
  // Folding as LF, as Postfix and Sendmail pass it; a NUL ends the value (C string).
  const nul = v.indexOf(0);
  if (nul >= 0) v = v.subarray(0, nul);
  if (v.includes('\r\n')) v = Buffer.from(v.toString('latin1').replace(/\r\n/g, '\n'), 'latin1');
  return v;
}

function headerFrame(h: HeaderField, leadingSpace: boolean): Buffer {
  let name = Buffer.from(h.name, 'utf8');
  const nul = name.indexOf(0);
  if (nul >= 0) name = name.subarray(0, nul);
  const value = headerValueBytes(h, leadingSpace);
  return encodeFrame(SMFIC.HEADER, Buffer.concat([name, Buffer.of(0), value, Buffer.of(0)]));
}

function esmtpArgs(a: EnvelopeAddress): string[] {
  return Object.entries(a.args).map(([k, v]) => (v === true ? k : `${k}=${v}`).replace(/\0/g, ''));
}

const clean = (s: string): string => s.replace(/\0/g, '');

/**
 * A Milter that forwards to the filter at `spec` (`inet:host:port`, `inet:port@host`,
 * `unix:/path`). Put it in a gateway's `milters` like any other.
 */
export function connectMilter(spec: string, options: ConnectMilterOptions = {}): Milter {
  const socketSpec: SocketSpec = parseSocketSpec(spec);
  const name = options.name ?? spec;
  if (typeof name !== 'string' || !name) throw new DovetailError(ErrorCodes.INVALID_OPTIONS, 'connectMilter: name must be a non-empty string');
  const defaultAction: DefaultAction = options.defaultAction ?? 'tempfail';
  if (!['tempfail', 'accept', 'reject', 'quarantine'].includes(defaultAction)) {
    throw new DovetailError(ErrorCodes.INVALID_OPTIONS, `connectMilter: unknown defaultAction ${JSON.stringify(defaultAction)}`);
  }
  const connectTimeout = checkTime('connectTimeout', options.connectTimeout, DEFAULT_CONNECT_TIMEOUT);
  const commandTimeout = checkTime('commandTimeout', options.commandTimeout, DEFAULT_MILTER_COMMAND_TIMEOUT);
  const contentTimeout = checkTime('contentTimeout', options.contentTimeout, DEFAULT_MILTER_CONTENT_TIMEOUT);
  const maxReplBody = options.maxReplacementBodyBytes ?? DEFAULT_MAX_REPLBODY;
  const macroLists: Record<MacroStageName, readonly string[]> = { ...POSTFIX_DEFAULT_MACROS };
  for (const [stage, names] of Object.entries(options.macros ?? {}) as [MacroStageName, readonly string[]][]) {
    if (!(stage in POSTFIX_DEFAULT_MACROS) || !Array.isArray(names) || names.some((n) => typeof n !== 'string' || !n || /[\0\s]/.test(n))) {
      throw new DovetailError(ErrorCodes.INVALID_OPTIONS, `connectMilter: macros.${stage} must be a list of macro names`);
    }
    macroLists[stage] = [...names];
  }
  const sessions = new Map<string, SessionState>();

  const session = (ctx: SessionContext): SessionState => {
    let s = sessions.get(ctx.sessionId);
    if (!s) {
      s = {
        conn: undefined,
        neg: undefined,
        failed: undefined,
        sticky: undefined,
        acceptedConn: false,
        inMessage: false,
        helo: undefined,
        skipEvent: undefined,
        msg: { hidReceived: false, quarantine: undefined, spools: [] },
        busy: false,
      };
      sessions.set(ctx.sessionId, s);
    }
    return s;
  };

  // ---- connection and negotiation ------------------------------------------

  async function open(): Promise<FilterConnection> {
    const socket = net.connect(connectOptions(socketSpec));
    await new Promise<void>((resolve, reject) => {
      const timer = setTimeout(() => {
        socket.destroy();
        reject(milterError(ErrorCodes.MILTER_TIMEOUT, `connect to milter ${spec}: no connection within ${connectTimeout} ms`));
      }, connectTimeout);
      socket.once('connect', () => {
        clearTimeout(timer);
        socket.removeAllListeners('error');
        resolve();
      });
      socket.once('error', (err) => {
        clearTimeout(timer);
        socket.destroy();
        reject(milterError(ErrorCodes.MILTER_FAILED, `connect to milter ${spec}: ${err.message}`, err));
      });
    });
    return new FilterConnection(socket);
  }

  async function negotiate(conn: FilterConnection): Promise<Negotiated> {
    await conn.write(encodeCommand({ type: 'optneg', version: SMFI_PROT_VERSION, actions: OFFERED_ACTIONS, protocol: OFFERED_PROTOCOL, macros: [] }), commandTimeout);
    const f = await conn.next(commandTimeout);
    if (f.command !== SMFIC.OPTNEG) throw new MilterProtocolError('unexpected reply in the initial handshake');
    const r = decodeReply(f);
    if (r.type !== 'optneg') throw new MilterProtocolError('unexpected reply in the initial handshake');
    if (r.version > SMFI_PROT_VERSION || r.version < SMFI_PROT_VERSION_MIN) {
      throw new MilterProtocolError(`protocol version ${r.version} conflicts with ours (${SMFI_PROT_VERSION})`);
    }
    if ((r.actions & OFFERED_ACTIONS) >>> 0 !== r.actions >>> 0) {
      throw new MilterProtocolError(`request mask 0x${r.actions.toString(16)} conflicts with ours (0x${OFFERED_ACTIONS.toString(16)})`);
    }
    const versionMask = SMFIP_VERSION_MASK[r.version as keyof typeof SMFIP_VERSION_MASK];
    const macros: Partial<Record<MacroStageName, readonly string[]>> = {};
    for (const list of r.macros) {
      const stage = MACRO_STAGE_BY_SMFIM[list.stage];
      // Unknown stages are ignored (Postfix warns); an empty list keeps the default (milter.c).
      if (stage && list.names.length > 0) macros[stage] = list.names;
    }
    return { version: r.version, actions: r.actions, protocol: r.protocol, nonProtocol: SMFIP_NOSEND_MASK & ~versionMask, macros };
  }

  // ---- sending events ------------------------------------------------------

  function macroFrame(s: SessionState, ctx: SessionContext, stage: MacroStageName, command: CommandCode): Buffer {
    const names = s.neg?.macros[stage] ?? macroLists[stage];
    const macros: { name: string; value: string }[] = [];
    for (const n of names) {
      const value = ctx.macros[n];
      if (value !== undefined) macros.push({ name: n, value: clean(String(value)) });
    }
    return encodeCommand({ type: 'macro', stage: command, macros });
  }

  function connectFrame(ctx: SessionContext): Buffer {
    const c = ctx.client;
    const hostname = clean(c.hostname || `[${c.address}]`);
    if (c.family === 'unknown') return encodeCommand({ type: 'connect', hostname, family: 'unknown' });
    return encodeCommand({ type: 'connect', hostname, family: c.family, port: c.family === 'unix' ? 0 : c.port, address: clean(c.address) });
  }

  const timeoutOf = (kind: Kind): number => (kind === 'content' ? contentTimeout : commandTimeout);

  /** Reads replies to one event until its decision; applies eom edits through `eom`. */
  async function readDecision(s: SessionState, conn: FilterConnection, ev: EventSpec, eom: EomContext | undefined): Promise<Verdict> {
    const inConnect = CONNECT_STAGES.has(ev.command);
    let edits = 0;
    let replBytes = 0;
    let replSpool: Spool | undefined;
    const finishBody = async (): Promise<void> => {
      if (!replSpool || !eom) return;
      const sp = replSpool;
      replSpool = undefined;
      await new Promise<void>((resolve, reject) => {
        sp.once('error', reject);
        sp.end(() => resolve());
      });
      eom.message.replaceBody(sp.createReadStream(0, sp.size));
    };
    // SMFIR_PROGRESS restarts the timeout, but not for ever: the whole decision must come
    // within PROGRESS_CAP timeouts (a filter sending progress every second must not hold
    // the message, and a connection slot, indefinitely).
    const timeout = timeoutOf(ev.kind);
    const deadline = Date.now() + PROGRESS_CAP * timeout;
    for (;;) {
      const left = deadline - Date.now();
      if (left <= 0) throw milterError(ErrorCodes.MILTER_TIMEOUT, `filter sent progress but no decision within ${PROGRESS_CAP} × ${timeout} ms`);
      const frame = await conn.next(Math.min(timeout, left));
      const r: MilterReply = decodeReply(frame);
      if (r.type !== 'replaceBody') await finishBody();
      switch (r.type) {
        case 'progress':
          continue;
        case 'continue':
          return continue_();
        case 'accept':
          if (inConnect) {
            s.acceptedConn = true;
            closeConn(s, true);
          }
          return acceptVerdict();
        case 'discard':
          // Not allowed for connect or helo: Postfix ignores it there.
          return inConnect ? continue_() : discardVerdict();
        case 'reject':
        case 'tempfail': {
          const v: Verdict =
            r.type === 'reject' ? { type: 'reject', reply: DEFAULT_REJECT_REPLY } : { type: 'tempfail', reply: DEFAULT_TEMPFAIL_REPLY };
          if (inConnect) sticky(s, v);
          return v;
        }
        case 'replyCode': {
          const reply = parseReplyCode(r.reply);
          if (!reply) throw new MilterProtocolError('malformed SMFIR_REPLYCODE reply');
          const v: Verdict = reply.code >= 500 ? { type: 'reject', reply } : { type: 'tempfail', reply };
          if (inConnect) sticky(s, v);
          return v;
        }
        case 'shutdown': {
          // Postfix: 421 and disconnect, for the rest of the session (the gateway closes on 421).
          const v: Verdict = { type: 'tempfail', reply: smtpReply(421, '4.7.0', 'Server closing connection') };
          sticky(s, v);
          return v;
        }
        case 'skip':
          if (ev.command === SMFIC.BODY) {
            s.skipEvent = SMFIC.BODY;
            return skipVerdict();
          }
          s.skipEvent = ev.command;
          return continue_();
        case 'quarantine':
          // Not a decision (Postfix milter8_event): remembered, applied at end of message.
          if (eom) eom.quarantine(r.reason || 'quarantined by milter');
          else s.msg.quarantine ??= r.reason || 'quarantined by milter';
          continue;
        case 'addHeader':
        case 'insertHeader':
        case 'changeHeader':
        case 'changeFrom':
        case 'addRcpt':
        case 'addRcptPar':
        case 'deleteRcpt':
        case 'replaceBody': {
          if (!eom) throw new MilterProtocolError(`unexpected filter response ${r.type} before end of message`);
          if (++edits > MAX_EDITS) throw new MilterProtocolError(`more than ${MAX_EDITS} modification requests`);
          if (r.type === 'replaceBody') {
            replBytes += r.chunk.length;
            if (replBytes > maxReplBody) throw new MilterProtocolError(`replacement body over ${maxReplBody} bytes`);
            if (!replSpool) {
              replSpool = new Spool(options.spool ?? {});
              s.msg.spools.push(replSpool);
            }
            if (!replSpool.write(Buffer.from(r.chunk))) await new Promise((resolve) => replSpool?.once('drain', resolve));
            continue;
          }
          applyEdit(s, eom, r);
          continue;
        }
        default:
          throw new MilterProtocolError(`unexpected filter response ${r.type} after event '${ev.command}'`);
      }
    }
  }

  function applyEdit(s: SessionState, eom: EomContext, r: MilterReply): void {
    const clampIndex = (n: number): number => Math.min(Math.max(n, 1), 0x7fff_ffff);
    switch (r.type) {
      case 'addHeader':
        eom.message.addHeader(r.name, r.value);
        break;
      case 'insertHeader':
        // libmilter index 0 is the top; Postfix counts the message as delivered (our Received included).
        eom.message.insertHeader(clampIndex(r.index + 1), r.name, r.value);
        break;
      case 'changeHeader': {
        if (!r.name) throw new MilterProtocolError('null change header name');
        // Index 0 is 1 (Sendmail compatibility); indexes count the headers as the filter saw them.
        let index = r.index === 0 ? 1 : r.index;
        if (s.msg.hidReceived && r.name.toLowerCase() === 'received') index += 1;
        if (r.value === '') eom.message.deleteHeader(r.name, clampIndex(index));
        else eom.message.changeHeader(r.name, clampIndex(index), r.value);
        break;
      }
      case 'changeFrom':
        eom.envelope.changeSender(r.address, r.args);
        break;
      case 'addRcpt':
        eom.envelope.addRecipient(r.address);
        break;
      case 'addRcptPar':
        eom.envelope.addRecipient(r.address, r.args);
        break;
      case 'deleteRcpt':
        eom.envelope.removeRecipient(r.address);
        break;
      default:
        break;
    }
  }

  function sticky(s: SessionState, v: Verdict): void {
    s.sticky = v;
    closeConn(s, true);
  }

  /** Closes the filter connection: ABORT if a message is open, QUIT if polite. */
  function closeConn(s: SessionState, polite: boolean): void {
    const conn = s.conn;
    s.conn = undefined;
    if (!conn) return;
    if (polite && conn.alive) {
      const parts = [encodeFrame(SMFIC.QUIT)];
      if (s.inMessage) parts.unshift(encodeFrame(SMFIC.ABORT));
      conn.end(Buffer.concat(parts));
    } else {
      conn.destroy();
    }
    s.inMessage = false;
  }

  function disposeMessage(s: SessionState): void {
    const spools = s.msg.spools;
    s.msg = { hidReceived: false, quarantine: undefined, spools: [] };
    for (const sp of spools) sp.dispose().catch(() => undefined);
  }

  /** Ends the message at the filter (SMFIC_ABORT, no reply). */
  async function endMessage(s: SessionState): Promise<void> {
    if (!s.inMessage) return;
    s.inMessage = false;
    const conn = s.conn;
    if (conn?.alive) await conn.write(encodeFrame(SMFIC.ABORT), commandTimeout);
  }

  /** Opens (or reopens, between messages) the connection; replays CONNECT and HELO on a new one. */
  async function ensureConnection(s: SessionState, ctx: SessionContext, first: EventSpec['stage']): Promise<Verdict | undefined> {
    if (s.conn?.alive) return undefined;
    if (s.conn) {
      // Closed by the filter: fine between messages, not inside one.
      if (s.inMessage) throw s.conn.deadError();
      closeConn(s, false);
    }
    const conn = await open();
    s.conn = conn;
    s.neg = await negotiate(conn);
    s.skipEvent = undefined;
    if (first !== 'connect') {
      // A new connection for a session under way: tell it what it missed.
      const v = await event(s, ctx, connectSpec(ctx), undefined);
      if (v.type !== 'continue') return v;
      if (s.helo !== undefined && first !== 'helo') {
        const h = await event(s, ctx, heloSpec(s.helo), undefined);
        if (h.type !== 'continue') return h;
      }
    }
    return undefined;
  }

  /** Sends one event (macros, command) and, unless NR_*, reads its decision. */
  async function event(s: SessionState, ctx: SessionContext, ev: EventSpec, eom: EomContext | undefined): Promise<Verdict> {
    const conn = s.conn;
    const neg = s.neg;
    if (!conn || !neg) throw milterError(ErrorCodes.MILTER_FAILED, 'no filter connection');
    if ((ev.noFlag & neg.nonProtocol) !== 0) return continue_();
    if (s.skipEvent !== undefined) {
      if (s.skipEvent === ev.command) return continue_();
      s.skipEvent = undefined;
    }
    const off = (ev.noFlag & neg.protocol) !== 0;
    // Content events the filter does not want are not sent at all (Postfix installs no
    // call-back for them); envelope events still get their macro packet (milter8_event).
    if (off && (ev.stage === 'header' || ev.stage === 'eoh' || ev.stage === 'body')) return continue_();
    const macros = macroFrame(s, ctx, macroStageOf(ev.stage), ev.command);
    if (off) {
      await conn.write(macros, timeoutOf(ev.kind));
      return continue_();
    }
    conn.received = 0;
    await conn.write(Buffer.concat([macros, ev.frames]), timeoutOf(ev.kind));
    if ((ev.nrFlag & neg.protocol) !== 0) return continue_();
    return readDecision(s, conn, ev, eom);
  }

  const connectSpec = (ctx: SessionContext): EventSpec => ({
    stage: 'connect',
    command: SMFIC.CONNECT,
    noFlag: SMFIP.NOCONNECT,
    nrFlag: SMFIP.NR_CONN,
    kind: 'command',
    frames: connectFrame(ctx),
  });
  const heloSpec = (hostname: string): EventSpec => ({
    stage: 'helo',
    command: SMFIC.HELO,
    noFlag: SMFIP.NOHELO,
    nrFlag: SMFIP.NR_HELO,
    kind: 'command',
    frames: encodeCommand({ type: 'helo', hostname: clean(hostname) }),
  });

  /**
   * Runs one stage: the failure policy around `body`. A failure marks the filter failed for
   * the session, drops its connection, and throws (the chain takes the default action).
   */
  async function run<V>(ctx: SessionContext, body: (s: SessionState) => Promise<V>): Promise<V> {
    const s = session(ctx);
    if (s.failed) throw s.failed;
    if (s.sticky) return s.sticky as V;
    if (s.acceptedConn) return acceptVerdict() as V;
    // The chain's own timer (a backstop above ours) aborts the signal: stop talking then.
    const signal = ctx.signal;
    const onAbort = (): void => {
      s.failed ??= milterError(ErrorCodes.MILTER_TIMEOUT, `milter ${name}: the chain's timeout fired`);
      s.conn?.destroy();
    };
    signal.addEventListener('abort', onAbort, { once: true });
    s.busy = true;
    try {
      return await body(s);
    } catch (err) {
      const e =
        err instanceof DovetailError ? err : milterError(ErrorCodes.MILTER_FAILED, `milter ${name} failed at ${ctx.stage}`, err);
      s.failed ??= e;
      closeConn(s, false);
      throw s.failed;
    } finally {
      s.busy = false;
      signal.removeEventListener('abort', onAbort);
    }
  }

  /** A message-stage event: the connection must still be there. */
  async function messageEvent(ctx: SessionContext, build: (s: SessionState) => EventSpec | undefined, eom?: EomContext): Promise<Verdict> {
    return run(ctx, async (s) => {
      if (!s.conn) throw milterError(ErrorCodes.MILTER_FAILED, 'no filter connection for this message');
      if (!s.conn.alive) throw s.conn.deadError();
      const ev = build(s);
      if (!ev) return continue_();
      return event(s, ctx, ev, eom);
    });
  }

  const timeouts = {
    // Worst case of one handler: (re)connect, OPTNEG, CONNECT, HELO and the event itself, once retried.
    command: Math.min(MAX_TIMER, 2 * (connectTimeout + 4 * commandTimeout) + 1000),
    content: Math.min(MAX_TIMER, PROGRESS_LIMIT_FACTOR * contentTimeout + 1000),
  };

  const milter: Milter = {
    name,
    defaultAction,
    timeouts,

    connect(ctx) {
      return run(ctx, async (s) => {
        const early = await ensureConnection(s, ctx, 'connect');
        if (early) return early;
        return event(s, ctx, connectSpec(ctx), undefined);
      }) as ReturnType<NonNullable<Milter['connect']>>;
    },

    helo(ctx, hostname) {
      return run(ctx, async (s) => {
        const early = await ensureConnection(s, ctx, 'helo');
        if (early) return early;
        // HELO/EHLO again with a message still open (the client reset it): end it first.
        await endMessage(s);
        s.helo = hostname;
        return event(s, ctx, heloSpec(hostname), undefined);
      }) as ReturnType<NonNullable<Milter['helo']>>;
    },

    mail(ctx, sender) {
      return run(ctx, async (s) => {
        // A message left open (accept, discard, refused elsewhere): ABORT it first.
        await endMessage(s);
        disposeMessage(s);
        const idle = s.conn?.alive === true;
        const frames = encodeCommand({ type: 'mail', address: `<${clean(sender.address)}>`, args: esmtpArgs(sender) });
        const spec: EventSpec = { stage: 'mail', command: SMFIC.MAIL, noFlag: SMFIP.NOMAIL, nrFlag: SMFIP.NR_MAIL, kind: 'command', frames };
        const attempt = async (): Promise<Verdict> => {
          const early = await ensureConnection(s, ctx, 'mail');
          if (early) return early;
          s.inMessage = true;
          return event(s, ctx, spec, undefined);
        };
        try {
          return await attempt();
        } catch (err) {
          // The filter closed an idle connection just as we reused it: one retry on a new one.
          const conn = s.conn;
          if (!idle || !conn || conn.received > 0 || !(conn.closed || conn.error) || conn.error instanceof MilterProtocolError) throw err;
          s.inMessage = false;
          closeConn(s, false);
          return attempt();
        }
      }) as ReturnType<NonNullable<Milter['mail']>>;
    },

    rcpt(ctx, recipient) {
      return messageEvent(ctx, () => ({
        stage: 'rcpt',
        command: SMFIC.RCPT,
        noFlag: SMFIP.NORCPT,
        nrFlag: SMFIP.NR_RCPT,
        kind: 'command',
        frames: encodeCommand({ type: 'rcpt', address: `<${clean(recipient.address)}>`, args: esmtpArgs(recipient) }),
      })) as ReturnType<NonNullable<Milter['rcpt']>>;
    },

    data(ctx) {
      return messageEvent(ctx, () => ({
        stage: 'data',
        command: SMFIC.DATA,
        noFlag: SMFIP.NODATA,
        nrFlag: SMFIP.NR_DATA,
        kind: 'command',
        frames: encodeFrame(SMFIC.DATA),
      })) as ReturnType<NonNullable<Milter['data']>>;
    },

    header(ctx: ContentContext, header: HeaderField) {
      return messageEvent(ctx, (s) => {
        // The gateway's own Received header (first, with this queue id) is not shown (Postfix).
        if (ctx.headers.length <= 1 && /^received$/i.test(header.name) && header.value.includes(`id ${ctx.queueId}`)) {
          s.msg.hidReceived = true;
          return undefined;
        }
        const leadspc = ((s.neg?.protocol ?? 0) & SMFIP.HDR_LEADSPC) !== 0;
        return { stage: 'header', command: SMFIC.HEADER, noFlag: SMFIP.NOHDRS, nrFlag: SMFIP.NR_HDR, kind: 'content', frames: headerFrame(header, leadspc) };
      }) as ReturnType<NonNullable<Milter['header']>>;
    },

    eoh(ctx) {
      return messageEvent(ctx, () => ({
        stage: 'eoh',
        command: SMFIC.EOH,
        noFlag: SMFIP.NOEOH,
        nrFlag: SMFIP.NR_EOH,
        kind: 'content',
        frames: encodeFrame(SMFIC.EOH),
      })) as ReturnType<NonNullable<Milter['eoh']>>;
    },

    body(ctx, chunk) {
      return run(ctx, async (s) => {
        if (!s.conn?.alive) throw s.conn?.deadError() ?? milterError(ErrorCodes.MILTER_FAILED, 'no filter connection for this message');
        for (let off = 0; off < chunk.length; off += MILTER_CHUNK_SIZE) {
          const part = chunk.subarray(off, off + MILTER_CHUNK_SIZE);
          const v = await event(s, ctx, { stage: 'body', command: SMFIC.BODY, noFlag: SMFIP.NOBODY, nrFlag: SMFIP.NR_BODY, kind: 'content', frames: encodeFrame(SMFIC.BODY, part) }, undefined);
          if (v.type !== 'continue') return v;
        }
        return continue_();
      }) as ReturnType<NonNullable<Milter['body']>>;
    },

    eom(ctx) {
      return run(ctx, async (s) => {
        if (!s.conn?.alive) throw s.conn?.deadError() ?? milterError(ErrorCodes.MILTER_FAILED, 'no filter connection for this message');
        if (s.msg.quarantine !== undefined) ctx.quarantine(s.msg.quarantine);
        // End of body is always sent and always answered (no NO*/NR_* flag for it).
        s.skipEvent = undefined;
        const v = await event(s, ctx, { stage: 'eom', command: SMFIC.BODYEOB, noFlag: 0, nrFlag: 0, kind: 'content', frames: encodeFrame(SMFIC.BODYEOB) }, ctx);
        await endMessage(s);
        return v.type === 'skip' ? continue_() : v;
      }) as ReturnType<NonNullable<Milter['eom']>>;
    },

    async abort(ctx: MessageContext) {
      const s = sessions.get(ctx.sessionId);
      if (!s || s.failed || s.busy) return;
      try {
        await endMessage(s);
      } catch {
        closeConn(s, false);
      }
    },

    async close(ctx) {
      const s = sessions.get(ctx.sessionId);
      if (!s) return;
      sessions.delete(ctx.sessionId);
      // A handler still waiting on the filter (the client left mid-message): cut it off.
      closeConn(s, !s.busy && !s.failed);
      disposeMessage(s);
    },

    unknown(ctx, command) {
      return messageEvent(ctx, () => ({
        stage: 'unknown',
        command: SMFIC.UNKNOWN,
        noFlag: SMFIP.NOUNKNOWN,
        nrFlag: SMFIP.NR_UNKN,
        kind: 'command',
        frames: encodeCommand({ type: 'unknown', command: clean(command) }),
      })) as ReturnType<NonNullable<Milter['unknown']>>;
    },
  };
  return milter;
}
