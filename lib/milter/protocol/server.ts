/**
 * serveMilter(): serves a Milter (the same object the gateway runs in-process) to an MTA —
 * Postfix, Sendmail, miltertest, our own connectMilter() — over the Sendmail milter
 * protocol, versions 2–6 (the filter side of libmilter engine.c / smfi.c, and what Postfix
 * milter8.c expects of a filter).
 *
 * Per MTA connection: OPTNEG first (we ask only for what the milter implements: SMFIP_NO*
 * for stages without a handler, SMFIP_NOHDRS / SMFIP_NOBODY when its eom declares it does
 * not read them (Milter.needs), SMFIP_NR_* for stages sent only for eom's sake, the SMFIF_*
 * actions its eom may use, SKIP when it has a body handler), then the commands in order, each answered as libmilter would. Handlers run
 * through the chain's machinery (ChainSession.invoke: timeouts, defaultAction, the verdicts
 * each stage allows, diagnostics), so a milter behaves the same served as in-process.
 * Headers are kept in memory up to a bound, the body goes to a Spool (RAM, then a temp
 * file), so the eom handler gets ctx.message.stream()/body()/size as in the gateway.
 *
 * Does not: speak SMTP, apply edits (the MTA does), authenticate the MTA (listen on
 * loopback or a unix socket), or negotiate SMFIP_MDS_* (frames stay ≤ 65535 data bytes).
 */
import net from 'node:net';
import { randomBytes } from 'node:crypto';
import { DovetailError, ErrorCodes } from '../../errors.js';
import { channels } from '../../diagnostics.js';
import { ChainSession, MessageRun, MilterChain, type SessionFacts } from '../chain.js';
import { EditRecorder, formatHeader, MessageState, spoolBody, type MessageEdit, type StoredHeader } from '../message.js';
import { DEFAULT_REJECT_REPLY, DEFAULT_TEMPFAIL_REPLY, smtpReply, type SmtpReply } from '../verdict.js';
import type { Stage } from '../stages.js';
import type {
  AddressFamily,
  AuthInfo,
  ClientInfo,
  ContentContext,
  EnvelopeAddress,
  EomContext,
  MessageContext,
  Milter,
  MilterTimeouts,
  ServerInfo,
  SessionContext,
  TlsInfo,
} from '../types.js';
import { drained, Spool, type SpoolOptions } from '../../message/spool.js';
import { FrameDecoder, encodeFrame, type Frame } from './codec.js';
import { decodeCommand, type ConnectCommand, type Macro, type MilterCommand } from './commands.js';
import { MILTER_CHUNK_SIZE, SMFIC, SMFIF, SMFIM, SMFIP, SMFIP_VERSION_MASK, SMFI_PROT_VERSION, SMFI_PROT_VERSION_MIN } from './constants.js';
import { MilterProtocolError } from './error.js';
import type { MacroList, OptNeg } from './optneg.js';
import { encodeReply, type MilterReply } from './replies.js';
import { replyCodeText } from './reply-text.js';
import { listenOptions, parseSocketSpec } from './socket.js';

/** An edit action a served milter may be allowed (each one SMFIF_* bit). */
export type MilterAction =
  | 'addHeader' // SMFIF_ADDHDRS: addHeader, insertHeader
  | 'changeHeader' // SMFIF_CHGHDRS: changeHeader, deleteHeader
  | 'replaceBody' // SMFIF_CHGBODY
  | 'addRecipient' // SMFIF_ADDRCPT
  | 'addRecipientWithArgs' // SMFIF_ADDRCPT_PAR
  | 'removeRecipient' // SMFIF_DELRCPT
  | 'changeSender' // SMFIF_CHGFROM
  | 'quarantine'; // SMFIF_QUARANTINE

const ACTION_BITS: Readonly<Record<MilterAction, number>> = {
  addHeader: SMFIF.ADDHDRS,
  changeHeader: SMFIF.CHGHDRS,
  replaceBody: SMFIF.CHGBODY,
  addRecipient: SMFIF.ADDRCPT,
  addRecipientWithArgs: SMFIF.ADDRCPT_PAR,
  removeRecipient: SMFIF.DELRCPT,
  changeSender: SMFIF.CHGFROM,
  quarantine: SMFIF.QUARANTINE,
};
const ALL_EDIT_ACTIONS = Object.values(ACTION_BITS).reduce((a, b) => a | b, 0);

/** Stages whose macros a served milter may ask the MTA for (SMFIM_*). */
export type MacroStage = 'connect' | 'helo' | 'mail' | 'rcpt' | 'data' | 'eoh' | 'eom';
const MACRO_STAGES: Readonly<Record<MacroStage, number>> = {
  connect: SMFIM.CONNECT,
  helo: SMFIM.HELO,
  mail: SMFIM.ENVFROM,
  rcpt: SMFIM.ENVRCPT,
  data: SMFIM.DATA,
  eoh: SMFIM.EOH,
  eom: SMFIM.EOM,
};

/** Stages the MTA sends as a command, with their "do not send" and "no reply" flags. */
type WireStage = 'connect' | 'helo' | 'mail' | 'rcpt' | 'data' | 'header' | 'eoh' | 'body' | 'unknown';
const WIRE_STAGES: Readonly<Record<WireStage, { readonly no: number; readonly nr: number }>> = {
  connect: { no: SMFIP.NOCONNECT, nr: SMFIP.NR_CONN },
  helo: { no: SMFIP.NOHELO, nr: SMFIP.NR_HELO },
  mail: { no: SMFIP.NOMAIL, nr: SMFIP.NR_MAIL },
  rcpt: { no: SMFIP.NORCPT, nr: SMFIP.NR_RCPT },
  data: { no: SMFIP.NODATA, nr: SMFIP.NR_DATA },
  header: { no: SMFIP.NOHDRS, nr: SMFIP.NR_HDR },
  eoh: { no: SMFIP.NOEOH, nr: SMFIP.NR_EOH },
  body: { no: SMFIP.NOBODY, nr: SMFIP.NR_BODY },
  unknown: { no: SMFIP.NOUNKNOWN, nr: SMFIP.NR_UNKN },
};

/** What shapes the OPTNEG answer (a subset of {@link ServeMilterOptions}). */
export interface NegotiationOptions {
  /**
   * The edit actions the milter may use (default: all of them when it has an eom handler,
   * none otherwise). An edit not negotiated throws in the eom handler.
   */
  readonly actions?: readonly MilterAction[];
  /** Macro names to ask the MTA for, per stage (SMFIR_SETSYMLIST lists in the OPTNEG reply, v6). */
  readonly macros?: Partial<Record<MacroStage, readonly string[]>>;
  /**
   * Stages whose handler only observes (its verdict is never needed at once): asked as
   * SMFIP_NR_* when the MTA offers it, so the MTA does not wait. A refusal such a handler
   * returns is given at the next command that gets a reply.
   */
  readonly noReply?: readonly WireStage[];
  /** Ask for SMFIP_HDR_LEADSPC: header values arrive and leave with their leading white space. */
  readonly headerLeadingSpace?: boolean;
}

export interface ServeMilterOptions extends NegotiationOptions {
  /** Where to listen: `inet:host:port` (port 0 picks one), `inet:port@host`, `unix:/path`. */
  readonly listen: string;
  /** Handler timeouts for a milter that sets none (defaults: command 30 s, content 300 s). */
  readonly timeouts?: MilterTimeouts;
  /** Idle time waiting for the MTA's next command before the connection is dropped, ms. Default 7 210 000 (libmilter's). */
  readonly readTimeout?: number;
  /** Concurrent MTA connections. Default 1000. */
  readonly maxConnections?: number;
  /**
   * A frame begun must be complete within this time, ms, or the connection is dropped (a
   * peer parked inside a frame would otherwise hold a slot for readTimeout). Default 10 000.
   */
  readonly frameTimeout?: number;
  /** Header bytes kept per message; beyond it the message is refused (552 5.3.4). Default 1 MiB. */
  readonly maxHeaderBytes?: number;
  /** Message bytes (headers + body) accepted; beyond it the message is refused (552 5.3.4). Default `milter.limits.maxMessageBytes`, else 50 MiB. */
  readonly maxMessageBytes?: number;
  /** Where the body of a message is spooled for the eom handler. */
  readonly spool?: SpoolOptions;
  /** While an eom handler runs, SMFIR_PROGRESS is sent this often (ms) so the MTA's content timer does not fire. Default 10 000; 0 disables. */
  readonly progressInterval?: number;
  /** How long close() lets commands in flight finish before it drops connections, ms. Default 30 000. */
  readonly closeTimeout?: number;
}

/** A running milter server. */
export interface MilterServer {
  /** Where it listens, in Postfix's spelling (`inet:127.0.0.1:8891`, `unix:/path`): what `smtpd_milters` needs. */
  readonly address: string;
  /** The TCP port (0 for a unix socket). */
  readonly port: number;
  /** MTA connections open now. */
  readonly connections: number;
  /** Stops accepting, lets commands in flight finish and answers them, then closes every connection. */
  close(): Promise<void>;
}

type Resolved = Awaited<ReturnType<ChainSession['invoke']>>;

/** The message size a served milter holds at most unless told otherwise (the gateway's default too). */
const DEFAULT_MAX_MESSAGE_BYTES = 50 * 1024 * 1024;
const DEFAULT_FRAME_TIMEOUT = 10_000;
const DEFAULT_READ_TIMEOUT = 7_210_000;
const QUEUE_HIGH_WATER = 64;
const TOO_BIG_HEADER = smtpReply(552, '5.3.4', 'Error: message header too big');
const tooLarge = (n: number): SmtpReply => smtpReply(552, '5.3.4', `Error: message size exceeds the ${n}-byte limit`);
/** Macro stages that belong to one message (cleared when a message ends or a new one starts). */
const MESSAGE_MACRO_STAGES: readonly string[] = [SMFIC.MAIL, SMFIC.RCPT, SMFIC.DATA, SMFIC.HEADER, SMFIC.EOH, SMFIC.BODY, SMFIC.BODYEOB];
/** The order macros are merged in (later stages win). */
const MACRO_ORDER: readonly string[] = [SMFIC.CONNECT, SMFIC.HELO, SMFIC.MAIL, SMFIC.RCPT, SMFIC.DATA, SMFIC.HEADER, SMFIC.EOH, SMFIC.BODY, SMFIC.BODYEOB, SMFIC.UNKNOWN];

function has(m: Milter, stage: Stage): boolean {
  return typeof m[stage] === 'function';
}

/**
 * The filter's OPTNEG answer to the MTA's offer: version min(MTA's, 6); actions and
 * protocol flags only among those offered. Throws MilterProtocolError for a version < 2.
 */
export function negotiate(milter: Milter, options: NegotiationOptions, offer: Pick<OptNeg, 'version' | 'actions' | 'protocol'>): OptNeg {
  if (offer.version < SMFI_PROT_VERSION_MIN) {
    throw new MilterProtocolError(`OPTNEG: MTA protocol version ${offer.version} is older than ${SMFI_PROT_VERSION_MIN}`);
  }
  const version = Math.min(offer.version, SMFI_PROT_VERSION) as 2 | 3 | 4 | 5 | 6;
  const allowedActions = options.actions ? options.actions.reduce((a, n) => a | (ACTION_BITS[n] ?? 0), 0) : ALL_EDIT_ACTIONS;
  let actions = 0;
  if (has(milter, 'eom')) actions |= allowedActions;
  // A failed handler whose default action is quarantine needs SMFIR_QUARANTINE at eom.
  if (milter.defaultAction === 'quarantine') actions |= allowedActions & SMFIF.QUARANTINE;
  const macros: MacroList[] = [];
  if (options.macros && version >= 6 && offer.actions & SMFIF.SETSYMLIST) {
    for (const [stage, names] of Object.entries(options.macros) as [MacroStage, readonly string[] | undefined][]) {
      const code = MACRO_STAGES[stage];
      if (code !== undefined && names && names.length > 0) macros.push({ stage: code, names: [...names] });
    }
    if (macros.length > 0) actions |= SMFIF.SETSYMLIST;
  }
  actions &= offer.actions;

  const offered = offer.protocol & SMFIP_VERSION_MASK[version];
  const noReply = new Set(options.noReply ?? []);
  const eom = has(milter, 'eom');
  // What the eom handler reads of the message (Milter.needs; both unless declared false).
  const eomHeaders = eom && milter.needs?.headers !== false;
  const eomBody = eom && milter.needs?.body !== false;
  let protocol = 0;
  for (const [stage, f] of Object.entries(WIRE_STAGES) as [WireStage, { no: number; nr: number }][]) {
    const handler = has(milter, stage);
    // The eom handler needs the message: headers and body are sent, but need no reply.
    const needed = handler || (stage === 'header' && eomHeaders) || (stage === 'body' && eomBody);
    if (!needed) {
      if (offered & f.no) protocol |= f.no;
      else if (offered & f.nr) protocol |= f.nr;
    } else if (!handler || noReply.has(stage)) {
      protocol |= offered & f.nr;
    }
  }
  if (has(milter, 'body')) protocol |= offered & SMFIP.SKIP;
  if (options.headerLeadingSpace) protocol |= offered & SMFIP.HDR_LEADSPC;
  return { type: 'optneg', version, actions, protocol, macros: actions & SMFIF.SETSYMLIST ? macros : [] };
}

/** `{i}` → `i`, `daemon_name` → `{daemon_name}`: the names the gateway uses. */
function macroName(name: string): string {
  const inner = name.startsWith('{') && name.endsWith('}') ? name.slice(1, -1) : name;
  return inner.length === 1 ? inner : `{${inner}}`;
}

function stripBrackets(a: string): string {
  const t = a.trim();
  return t.startsWith('<') && t.endsWith('>') ? t.slice(1, -1) : t;
}

function envelopeAddress(address: string, args: readonly string[]): EnvelopeAddress {
  const out: Record<string, string | true> = {};
  for (const a of args) {
    for (const part of a.split(/\s+/)) {
      if (!part) continue;
      const eq = part.indexOf('=');
      if (eq < 0) out[part.toUpperCase()] = true;
      else out[part.slice(0, eq).toUpperCase()] = part.slice(eq + 1);
    }
  }
  return { address: stripBrackets(address), args: out };
}

function esmtpArgs(args: Readonly<Record<string, string | true>>): string | undefined {
  const parts = Object.entries(args).map(([k, v]) => (v === true ? k : `${k}=${v}`));
  return parts.length ? parts.join(' ') : undefined;
}

function normalizeAddress(address: string): { address: string; family: AddressFamily } {
  let a = address.replace(/^\[(.*)\]$/, '$1').replace(/^IPv6:/i, '');
  const mapped = /^::ffff:(\d+\.\d+\.\d+\.\d+)$/i.exec(a);
  if (mapped) a = mapped[1] as string;
  return { address: a, family: net.isIPv4(a) ? 'ipv4' : net.isIPv6(a) ? 'ipv6' : 'unknown' };
}

/** Header value bytes on the wire: LF folding (Postfix cleanup splits header lines at LF). */
function wireHeaderValue(value: string, leadingSpace: boolean): string {
  const v = value.replace(/\r\n/g, '\n');
  return leadingSpace && !/^[ \t]/.test(v) ? ' ' + v : v;
}

interface MessageInProgress {
  readonly run: MessageRun;
  sender: EnvelopeAddress;
  /** The MAIL command itself arrived (a message may be opened by its macros first). */
  gotMail: boolean;
  readonly recipients: EnvelopeAddress[];
  readonly headers: StoredHeader[];
  headerBytes: number;
  size: number;
  spool: Spool | undefined;
  /** Handlers are still called (false after accept, discard, a refusal, a default quarantine). */
  active: boolean;
  /** The body handler said skip. */
  bodySkipped: boolean;
  /** Quarantine decided before eom (a default action), sent at eom. */
  quarantine: string | undefined;
  /** A refusal that could not be answered yet (NR_* stage, size limit): given at the next reply. */
  pending: Resolved | undefined;
  /** End of message was answered. */
  finished: boolean;
}

interface ServerContext {
  readonly milter: Milter;
  readonly chain: MilterChain;
  readonly options: ServeMilterOptions;
  closing: boolean;
}

/** One MTA connection: the protocol engine. */
class MilterConnection {
  private readonly decoder = new FrameDecoder();
  /** Runs while a frame is partly received (frameTimeout). */
  private frameTimer: NodeJS.Timeout | undefined;
  private readonly queue: Frame[] = [];
  private busy = false;
  /** No more commands are processed (QUIT, a fatal error, the socket closed, close()). */
  private dead = false;
  private peerEnded = false;
  private socketClosed = false;
  private wentAway = false;
  private finalized: Promise<void> | undefined;
  /** The OPTNEG answer; undefined until negotiated. */
  private neg: OptNeg | undefined;
  /** OPTNEG may come (again): at the start and after QUIT_NC. */
  private optnegAllowed = true;
  private session!: ChainSession;
  private sessionStarted = false;
  private sessionActive = true;
  private sessionQuarantine: string | undefined;
  private connectInfo: ConnectCommand | undefined;
  private heloName: string | undefined;
  private readonly macroStages = new Map<string, Record<string, string>>();
  private readonly macros: Record<string, string> = {};
  private msg: MessageInProgress | undefined;
  private readonly milter: Milter;
  private readonly maxMessageBytes: number;

  constructor(
    readonly socket: net.Socket,
    private readonly server: ServerContext,
    private readonly onGone: () => void,
  ) {
    this.milter = server.milter;
    this.maxMessageBytes = server.options.maxMessageBytes ?? server.milter.limits?.maxMessageBytes ?? DEFAULT_MAX_MESSAGE_BYTES;
    this.newSession();
    socket.setNoDelay(true);
    socket.setTimeout(server.options.readTimeout ?? DEFAULT_READ_TIMEOUT);
    socket.on('timeout', () => {
      if (!this.busy) this.fail(new MilterProtocolError('read timeout: no command from the MTA'));
    });
    socket.on('data', (chunk: Buffer) => this.onData(chunk));
    socket.on('end', () => {
      // The MTA closed its half: answer what it sent, then close ours.
      this.peerEnded = true;
      try {
        this.decoder.end();
      } catch (err) {
        this.fail(err);
        return;
      }
      if (!this.busy && this.queue.length === 0) this.shutdown();
    });
    socket.on('error', (err) => this.report(err));
    socket.on('close', () => {
      clearTimeout(this.frameTimer);
      this.dead = true;
      this.socketClosed = true;
      if (!this.busy) this.gone();
    });
  }

  /** Ends our half (written replies are flushed first); a peer that does not close is dropped after a second. */
  private shutdown(): void {
    this.dead = true;
    if (this.socket.destroyed) return;
    this.socket.end();
    setTimeout(() => this.socket.destroy(), 1000).unref();
  }

  /** The socket is closed and no command runs: end the milter's session, once. */
  private gone(): void {
    if (this.wentAway) return;
    this.wentAway = true;
    void this.finalize().finally(this.onGone);
  }

  private newSession(): void {
    const self = this;
    const facts: SessionFacts = {
      sessionId: randomBytes(9).toString('base64url'),
      get client() {
        return self.clientInfo();
      },
      get server() {
        return self.serverInfo();
      },
      get helo() {
        return self.heloName ?? self.macros['s'];
      },
      get tls() {
        return self.tlsInfo();
      },
      get auth() {
        return self.authInfo();
      },
      macros: this.macros,
    };
    this.session = this.server.chain.session(facts);
    this.sessionStarted = false;
    this.sessionActive = true;
    this.sessionQuarantine = undefined;
    this.connectInfo = undefined;
    this.heloName = undefined;
    this.macroStages.clear();
    this.rebuildMacros();
    this.msg = undefined;
  }

  // ---- facts from CONNECT and macros -------------------------------------------

  private clientInfo(): ClientInfo {
    const m = this.macros;
    const c = this.connectInfo;
    const bracket = /\[([^\]]*)\]/.exec(m['_'] ?? '')?.[1];
    let address: string;
    let port: number;
    let family: AddressFamily;
    if (c && c.family !== 'unknown') {
      address = c.address;
      port = c.port;
      family = c.family;
      if (family !== 'unix') ({ address, family } = normalizeAddress(address));
    } else {
      ({ address, family } = normalizeAddress(m['{client_addr}'] ?? bracket ?? ''));
      port = Number(m['{client_port}'] ?? 0) || 0;
    }
    const named = c?.hostname ?? m['{client_name}'] ?? (m['_'] ? m['_'].split(/\s+/)[0] : undefined);
    const hostname = !named || named === 'unknown' ? (address ? `[${address}]` : '') : named;
    return { address, port, hostname, family };
  }

  private serverInfo(): ServerInfo {
    const m = this.macros;
    return { hostname: m['j'] ?? '', name: m['{daemon_name}'] ?? '', address: m['{daemon_addr}'] ?? '', port: Number(m['{daemon_port}'] ?? 0) || 0 };
  }

  private tlsInfo(): TlsInfo | undefined {
    const m = this.macros;
    const version = m['{tls_version}'];
    const cipher = m['{cipher}'];
    if (!version && !cipher) return undefined;
    return { version: version ?? '', cipher: cipher ?? '', bits: Number(m['{cipher_bits}'] ?? 0) || 0 };
  }

  private authInfo(): AuthInfo | undefined {
    const user = this.macros['{auth_authen}'];
    return user ? { method: this.macros['{auth_type}'] ?? '', user } : undefined;
  }

  private setMacros(stage: string, list: readonly Macro[]): void {
    const rec: Record<string, string> = {};
    for (const { name, value } of list) rec[macroName(name)] = value;
    this.macroStages.set(stage, rec);
    this.rebuildMacros();
  }

  private clearMessageMacros(): void {
    for (const s of MESSAGE_MACRO_STAGES) this.macroStages.delete(s);
    this.rebuildMacros();
  }

  /** ctx.macros is one object (handlers keep a reference): rebuilt in place. */
  private rebuildMacros(): void {
    for (const k of Object.keys(this.macros)) delete this.macros[k];
    for (const s of MACRO_ORDER) Object.assign(this.macros, this.macroStages.get(s));
  }

  // ---- input -------------------------------------------------------------------

  private onData(chunk: Buffer): void {
    if (this.dead) return;
    let frames: Frame[];
    try {
      frames = this.decoder.push(chunk);
    } catch (err) {
      this.fail(err);
      return;
    }
    for (const f of frames) this.queue.push(f);
    if (this.queue.length >= QUEUE_HIGH_WATER) this.socket.pause();
    // A frame begun must be finished soon: a peer parked inside a frame holds a connection
    // slot (and the MTA's other connections out) until the long idle read timeout.
    clearTimeout(this.frameTimer);
    this.frameTimer = undefined;
    if (this.decoder.buffered > 0) {
      const ms = this.server.options.frameTimeout ?? DEFAULT_FRAME_TIMEOUT;
      this.frameTimer = setTimeout(() => this.fail(new MilterProtocolError(`a frame begun was not finished within ${ms} ms`)), ms);
      this.frameTimer.unref();
    }
    void this.pump();
  }

  private async pump(): Promise<void> {
    if (this.busy) return;
    this.busy = true;
    try {
      while (this.queue.length > 0 && !this.dead) {
        await this.handle(this.queue.shift() as Frame);
      }
    } catch (err) {
      this.fail(err);
    } finally {
      this.busy = false;
    }
    if (this.socketClosed) this.gone();
    else if (this.dead || this.peerEnded) this.shutdown();
    else if (this.server.closing) this.drain();
    else if (this.socket.isPaused()) this.socket.resume();
  }

  /** close(): stop reading; once what was received is answered, close. */
  drain(): void {
    this.socket.pause();
    if (!this.busy && this.queue.length === 0) this.shutdown();
  }

  /** Closes the connection after a protocol error or an internal failure. */
  private fail(err: unknown): void {
    this.report(err);
    this.dead = true;
    this.queue.length = 0;
    this.socket.destroy();
  }

  private report(err: unknown): void {
    channels.error.publish({ sessionId: this.session.facts.sessionId, milter: this.milter.name, error: err });
  }

  // ---- output ------------------------------------------------------------------

  private async write(buf: Buffer): Promise<void> {
    if (this.socket.destroyed) return;
    if (this.socket.write(buf)) return;
    await new Promise<void>((resolve) => {
      const done = (): void => {
        this.socket.off('drain', done);
        this.socket.off('close', done);
        resolve();
      };
      this.socket.on('drain', done);
      this.socket.on('close', done);
    });
  }

  private reply(r: MilterReply): Promise<void> {
    return this.write(encodeReply(r));
  }

  private canReply(stage: WireStage): boolean {
    return ((this.neg?.protocol ?? 0) & WIRE_STAGES[stage].nr) === 0;
  }

  /** The replies for a verdict (without edits). */
  private verdictReplies(stage: Stage, v: Resolved): MilterReply[] {
    switch (v.type) {
      case 'continue':
        return [{ type: 'continue' }];
      case 'accept':
        return [{ type: 'accept' }];
      case 'discard':
        return [{ type: 'discard' }];
      case 'skip':
        return [{ type: 'continue' }];
      case 'quarantine':
      case 'failed-quarantine':
        return stage === 'eom' && (this.neg?.actions ?? 0) & SMFIF.QUARANTINE
          ? [{ type: 'quarantine', reason: v.reason }, { type: 'continue' }]
          : [{ type: 'continue' }];
      case 'reject':
      case 'tempfail': {
        const plain = v.type === 'reject' ? DEFAULT_REJECT_REPLY : DEFAULT_TEMPFAIL_REPLY;
        const text = v.reply === plain ? undefined : replyCodeText(v.type, v.reply);
        return text === undefined ? [{ type: v.type }] : [{ type: 'replyCode', reply: text }];
      }
    }
  }

  // ---- commands ----------------------------------------------------------------

  private async handle(frame: Frame): Promise<void> {
    const cmd = decodeCommand(frame);
    if (cmd.type === 'optneg') {
      if (!this.optnegAllowed) throw new MilterProtocolError('OPTNEG in the middle of a session');
      this.neg = negotiate(this.milter, this.server.options, cmd);
      this.optnegAllowed = false;
      this.sessionStarted = true;
      await this.reply(this.neg);
      return;
    }
    if (!this.neg) throw new MilterProtocolError(`expected OPTNEG first, got ${cmd.type}`);
    this.optnegAllowed = false;
    this.sessionStarted = true;
    await this.command(cmd);
  }

  private async command(cmd: Exclude<MilterCommand, OptNeg>): Promise<void> {
    switch (cmd.type) {
      case 'macro':
        return this.onMacro(cmd.stage, cmd.macros);
      case 'connect':
        this.connectInfo = cmd;
        return this.sessionStage('connect', (m, ctx) => m.connect?.(ctx));
      case 'helo':
        this.heloName = cmd.hostname;
        return this.sessionStage('helo', (m, ctx) => m.helo?.(ctx, cmd.hostname));
      case 'mail': {
        const sender = envelopeAddress(cmd.address, cmd.args);
        let msg = this.msg;
        if (!msg || msg.gotMail || msg.finished) msg = await this.openMessage(sender);
        msg.sender = sender;
        msg.gotMail = true;
        await this.messageStage('mail', msg, (m, ctx) => m.mail?.(ctx, sender));
        return;
      }
      case 'rcpt': {
        const msg = await this.messageFor('RCPT');
        const rcpt = envelopeAddress(cmd.address, cmd.args);
        const v = await this.messageStage('rcpt', msg, (m, ctx) => m.rcpt?.(ctx, rcpt));
        if (v === undefined || v.type === 'continue' || v.type === 'accept') this.addRecipient(msg, rcpt);
        return;
      }
      case 'data': {
        const msg = await this.messageFor('DATA');
        await this.messageStage('data', msg, (m, ctx) => m.data?.(ctx));
        return;
      }
      case 'header':
        return this.onHeader(cmd.name, cmd.value);
      case 'eoh': {
        const msg = await this.messageFor('EOH');
        await this.messageStage('eoh', msg, (m, ctx) => m.eoh?.(ctx as ContentContext));
        return;
      }
      case 'body':
        return this.onBody(cmd.chunk);
      case 'bodyEob':
        return this.onEom(cmd.chunk);
      case 'unknown':
        return this.sessionStage('unknown', (m, ctx) => m.unknown?.(ctx, cmd.command));
      case 'abort':
        await this.endMessage();
        return;
      case 'quit':
        await this.finalize();
        this.shutdown();
        return;
      case 'quitNc':
        await this.finalize();
        this.finalized = undefined;
        this.newSession();
        this.optnegAllowed = true;
        return;
    }
  }

  private onMacro(stage: string, list: readonly Macro[]): Promise<void> | void {
    if (stage === SMFIC.MAIL) {
      // A new message starts with its MAIL macros: earlier message macros are gone.
      this.clearMessageMacros();
      this.setMacros(stage, list);
      return this.openMessage(this.senderFromMacros()).then(() => undefined);
    }
    this.setMacros(stage, list);
    // Without RCPT commands (SMFIP_NORCPT) a recipient is known from its macros only.
    if (stage === SMFIC.RCPT && (this.neg?.protocol ?? 0) & SMFIP.NORCPT && this.msg && this.macros['{rcpt_addr}']) {
      this.addRecipient(this.msg, { address: stripBrackets(this.macros['{rcpt_addr}']), args: {} });
    }
  }

  /**
   * The message a command belongs to. A message starts with MAIL (the command, or its
   * macros); a content command before any is a protocol error — unless the MTA was told not
   * to send MAIL (SMFIP_NOMAIL), when the message starts implicitly.
   */
  private async messageFor(command: string): Promise<MessageInProgress> {
    if (this.msg) return this.msg;
    if (((this.neg?.protocol ?? 0) & SMFIP.NOMAIL) === 0) throw new MilterProtocolError(`${command} before MAIL`);
    return this.openMessage(this.senderFromMacros());
  }

  private senderFromMacros(): EnvelopeAddress {
    return { address: stripBrackets(this.macros['{mail_addr}'] ?? ''), args: {} };
  }

  private addRecipient(msg: MessageInProgress, rcpt: EnvelopeAddress): void {
    const lower = rcpt.address.toLowerCase();
    if (!msg.recipients.some((r) => r.address.toLowerCase() === lower)) msg.recipients.push(rcpt);
  }

  /** Opens a message; aborts the one before if it was left open. */
  private async openMessage(sender: EnvelopeAddress): Promise<MessageInProgress> {
    const prev = this.msg;
    if (prev && !(prev.gotMail === false && !prev.finished && prev.headers.length === 0 && prev.recipients.length === 0 && !prev.spool)) {
      await this.endMessage(false);
    } else if (prev) {
      // Opened by MAIL macros a moment ago: keep it.
      prev.sender = sender;
      return prev;
    }
    const run = new MessageRun(this.session, this.macros['i'] ?? '', sender);
    this.msg = {
      run,
      sender,
      gotMail: false,
      recipients: [],
      headers: [],
      headerBytes: 0,
      size: 0,
      spool: undefined,
      active: this.sessionActive,
      bodySkipped: false,
      quarantine: this.sessionQuarantine,
      pending: undefined,
      finished: false,
    };
    return this.msg;
  }

  /** Ends the message in progress: the abort handler if it was left unfinished, then its spool. */
  private async endMessage(clearMacros = true): Promise<void> {
    const msg = this.msg;
    this.msg = undefined;
    if (msg) {
      if (!msg.finished && msg.active && has(this.milter, 'abort')) {
        await this.session.invoke(this.milter, 'abort', msg.run, (base) => this.milter.abort?.(this.messageContext(base, msg)));
      }
      msg.finished = true;
      await msg.spool?.dispose();
    }
    if (clearMacros) this.clearMessageMacros();
  }

  /** Abort an open message, call close: the end of an MTA session (QUIT, QUIT_NC, lost connection). */
  finalize(): Promise<void> {
    this.finalized ??= (async () => {
      try {
        await this.endMessage();
        if (this.sessionStarted) await this.session.close();
      } catch (err) {
        this.report(err);
      }
    })();
    return this.finalized;
  }

  // ---- contexts --------------------------------------------------------------------

  private messageContext(base: SessionContext, msg: MessageInProgress, withHeaders = true): MessageContext {
    const macros = this.macros;
    Object.defineProperty(base, 'queueId', { get: () => macros['i'] ?? '', enumerable: true, configurable: true });
    Object.assign(base, { envelope: { sender: msg.sender, recipients: [...msg.recipients] } });
    if (withHeaders) {
      // The headers so far (at header: including this one). Lazy: most handlers never look.
      Object.defineProperty(base, 'headers', { get: () => msg.headers.slice(), enumerable: true, configurable: true });
    }
    return base as MessageContext;
  }

  // ---- stages --------------------------------------------------------------------

  /** connect, helo, unknown: session-level stages. */
  private async sessionStage(stage: 'connect' | 'helo' | 'unknown', call: (m: Milter, ctx: SessionContext) => Promise<unknown> | undefined): Promise<void> {
    const canReply = this.canReply(stage);
    const msg = this.msg;
    if (canReply && msg?.pending) return this.givePending(stage, msg);
    if (!this.sessionActive || !has(this.milter, stage) || (stage === 'unknown' && msg && !msg.active)) {
      if (canReply) await this.reply({ type: 'continue' });
      return;
    }
    const v = await this.session.invoke(this.milter, stage, msg?.run, (base) => call(this.milter, base));
    if (stage !== 'unknown') {
      if (v.type === 'accept') this.sessionActive = false;
      if (v.type === 'failed-quarantine') {
        this.sessionActive = false;
        this.sessionQuarantine ??= v.reason;
      }
    }
    if (canReply) await this.sendAll(this.verdictReplies(stage, v));
  }

  /** mail, rcpt, data, header, eoh, body: message-level stages. Returns the verdict, if a handler ran. */
  private async messageStage(
    stage: 'mail' | 'rcpt' | 'data' | 'header' | 'eoh' | 'body',
    msg: MessageInProgress,
    call: (m: Milter, ctx: MessageContext) => Promise<unknown> | undefined,
  ): Promise<Resolved | undefined> {
    const canReply = this.canReply(stage);
    if (canReply && msg.pending) {
      await this.givePending(stage, msg);
      return msg.pending;
    }
    if (!msg.active || !has(this.milter, stage) || (stage === 'body' && msg.bodySkipped)) {
      if (canReply) await this.reply({ type: 'continue' });
      return undefined;
    }
    const v = await this.session.invoke(this.milter, stage, msg.run, (base) => call(this.milter, this.messageContext(base, msg)));
    switch (v.type) {
      case 'accept':
      case 'discard':
        msg.active = false;
        break;
      case 'failed-quarantine':
        msg.active = false;
        msg.quarantine ??= v.reason;
        break;
      case 'skip':
        msg.bodySkipped = true;
        break;
      case 'reject':
      case 'tempfail':
        if (stage !== 'rcpt') msg.active = false;
        if (!canReply && stage !== 'rcpt') msg.pending ??= v;
        break;
      default:
        break;
    }
    if (!canReply) return v;
    if (v.type === 'skip' && (this.neg?.protocol ?? 0) & SMFIP.SKIP && !has(this.milter, 'eom')) {
      // The MTA stops sending the body. With an eom handler we keep receiving it: eom gets the whole message.
      await this.reply({ type: 'skip' });
      return v;
    }
    await this.sendAll(this.verdictReplies(stage, v));
    return v;
  }

  private async givePending(stage: Stage, msg: MessageInProgress): Promise<void> {
    const v = msg.pending as Resolved;
    msg.active = false;
    await this.sendAll(this.verdictReplies(stage, v));
  }

  private async sendAll(replies: readonly MilterReply[]): Promise<void> {
    await this.write(Buffer.concat(replies.map((r) => encodeReply(r))));
  }

  /** The message content is kept for the eom handler only. */
  private keeps(): boolean {
    return has(this.milter, 'eom');
  }

  private refuseSize(msg: MessageInProgress, reply: SmtpReply): void {
    msg.pending ??= { type: 'reject', reply };
  }

  private async onHeader(name: string, sent: string): Promise<void> {
    const msg = await this.messageFor('HEADER');
    const leadspc = ((this.neg?.protocol ?? 0) & SMFIP.HDR_LEADSPC) !== 0;
    const wire = sent.replace(/\r?\n/g, '\r\n');
    // Without SMFIP_HDR_LEADSPC the MTA has already removed one leading space; with it, the
    // value keeps its white space: we remove one space for ctx (HeaderField's contract) and
    // keep the exact bytes for ctx.message.stream().
    const value = leadspc && wire.startsWith(' ') ? wire.slice(1) : wire;
    const raw = Buffer.from(leadspc ? `${name}:${wire}\r\n` : `${name}:${wire ? ' ' + wire : ''}\r\n`, 'utf8');
    if (this.keeps() || has(this.milter, 'header') || has(this.milter, 'eoh') || has(this.milter, 'body')) {
      msg.headerBytes += raw.length;
      msg.size += raw.length;
      if (msg.headerBytes > (this.server.options.maxHeaderBytes ?? 1024 * 1024)) this.refuseSize(msg, TOO_BIG_HEADER);
      else if (msg.size > this.maxMessageBytes) this.refuseSize(msg, tooLarge(this.maxMessageBytes));
      else msg.headers.push({ name, value, raw });
    }
    const header = { name, value };
    await this.messageStage('header', msg, (m, ctx) => m.header?.(ctx as ContentContext, header));
  }

  private async store(msg: MessageInProgress, chunk: Buffer): Promise<void> {
    if (!this.keeps() || msg.pending || chunk.length === 0) return;
    msg.size += chunk.length;
    if (msg.size > this.maxMessageBytes) {
      this.refuseSize(msg, tooLarge(this.maxMessageBytes));
      return;
    }
    msg.spool ??= new Spool(this.server.options.spool ?? {});
    const spool = msg.spool;
    if (!spool.write(chunk)) await drained(spool);
  }

  private async onBody(chunk: Buffer): Promise<void> {
    const msg = await this.messageFor('BODY');
    await this.store(msg, chunk);
    await this.messageStage('body', msg, (m, ctx) => m.body?.(ctx as ContentContext, chunk));
  }

  private async onEom(chunk: Buffer): Promise<void> {
    const msg = await this.messageFor('BODYEOB');
    try {
      if (chunk.length > 0) {
        // libmilter hands data on BODYEOB to the body handler first; only the eom reply is sent.
        await this.store(msg, chunk);
        if (msg.active && !msg.bodySkipped && has(this.milter, 'body')) {
          const v = await this.session.invoke(this.milter, 'body', msg.run, (base) => this.milter.body?.(this.messageContext(base, msg) as ContentContext, chunk));
          if (v.type === 'reject' || v.type === 'tempfail' || v.type === 'discard') msg.pending ??= v;
          if (v.type === 'accept') msg.active = false;
        }
      }
      if (msg.pending) return await this.sendAll(this.verdictReplies('eom', msg.pending));
      if (!msg.active || !has(this.milter, 'eom')) {
        const q = msg.quarantine;
        return await this.sendAll(this.verdictReplies('eom', q === undefined ? { type: 'continue' } : { type: 'quarantine', reason: q }));
      }
      await this.runEom(msg);
    } finally {
      msg.finished = true;
      await this.endMessage();
    }
  }

  private async runEom(msg: MessageInProgress): Promise<void> {
    const spool = msg.spool ?? new Spool(this.server.options.spool ?? {});
    msg.spool = spool;
    await new Promise<void>((resolve, reject) => {
      spool.once('error', reject);
      spool.end(() => resolve());
    });
    const state = new MessageState({ headers: [...msg.headers], body: spoolBody(spool, 0), sender: msg.sender, recipients: [...msg.recipients] });
    const rec = new EditRecorder();
    const interval = this.server.options.progressInterval ?? 10_000;
    const progress = interval > 0 ? setInterval(() => void this.reply({ type: 'progress' }), interval) : undefined;
    try {
      let v = await this.session.invoke(this.milter, 'eom', msg.run, (base) => this.milter.eom?.(this.eomContext(base, msg, state, rec)));
      let frames: Buffer[] = [];
      if (!v.failed && (v.type === 'continue' || v.type === 'accept' || v.type === 'quarantine')) {
        try {
          frames = await this.editFrames(rec.edits, state);
        } catch (err) {
          // An edit that cannot be sent (a replacement body stream that fails) is the milter failing.
          v = await this.session.invoke(this.milter, 'eom', msg.run, () => Promise.reject(err));
          frames = [];
        }
      }
      clearInterval(progress);
      if (v.failed || !(v.type === 'continue' || v.type === 'accept' || v.type === 'quarantine')) {
        await this.sendAll(this.verdictReplies('eom', v));
        return;
      }
      for (const f of frames) await this.write(f);
      // A quarantine verdict, or one a default action decided earlier in the message (unless an edit sent one).
      let quarantine = v.type === 'quarantine' ? v.reason : undefined;
      if (quarantine === undefined && !rec.edits.some((e) => e.op === 'quarantine')) quarantine = msg.quarantine;
      const replies: MilterReply[] = [];
      if (quarantine !== undefined && (this.neg?.actions ?? 0) & SMFIF.QUARANTINE) replies.push({ type: 'quarantine', reason: quarantine });
      replies.push(v.type === 'accept' ? { type: 'accept' } : { type: 'continue' });
      await this.sendAll(replies);
    } finally {
      clearInterval(progress);
      await state.dispose();
    }
  }

  private need(bit: number, what: string): void {
    if (((this.neg?.actions ?? 0) & bit) === 0) {
      throw new DovetailError(ErrorCodes.INVALID_EDIT, `${what}: the MTA did not grant this action (SMFIF 0x${bit.toString(16)}) in OPTNEG`);
    }
  }

  private eomContext(base: SessionContext, msg: MessageInProgress, state: MessageState, rec: EditRecorder): EomContext {
    const headers = state.headers;
    const envelope = { sender: msg.sender, recipients: [...msg.recipients] };
    const acts = (): number => this.neg?.actions ?? 0;
    const eom: Omit<EomContext, keyof SessionContext | 'queueId'> = {
      headers,
      envelope: {
        ...envelope,
        changeSender: (address, args) => {
          this.need(SMFIF.CHGFROM, 'changeSender');
          rec.changeSender(address, args);
        },
        addRecipient: (address, args) => {
          if (args !== undefined && args.trim() !== '') this.need(SMFIF.ADDRCPT_PAR, 'addRecipient with ESMTP arguments');
          else if (!(acts() & (SMFIF.ADDRCPT | SMFIF.ADDRCPT_PAR))) this.need(SMFIF.ADDRCPT, 'addRecipient');
          rec.addRecipient(address, args);
        },
        removeRecipient: (address) => {
          this.need(SMFIF.DELRCPT, 'removeRecipient');
          rec.removeRecipient(address);
        },
      },
      message: {
        headers,
        size: state.size,
        stream: () => state.stream(),
        body: () => state.body.stream(),
        addHeader: (name, value) => {
          this.need(SMFIF.ADDHDRS, 'addHeader');
          rec.addHeader(name, value);
        },
        insertHeader: (position, name, value) => {
          this.need(SMFIF.ADDHDRS, 'insertHeader');
          rec.insertHeader(position, name, value);
        },
        changeHeader: (name, index, value) => {
          this.need(SMFIF.CHGHDRS, 'changeHeader');
          rec.changeHeader(name, index, value);
        },
        deleteHeader: (name, index) => {
          this.need(SMFIF.CHGHDRS, 'deleteHeader');
          rec.deleteHeader(name, index);
        },
        replaceBody: (body) => {
          this.need(SMFIF.CHGBODY, 'replaceBody');
          rec.replaceBody(body);
        },
      },
      quarantine: (reason) => {
        this.need(SMFIF.QUARANTINE, 'quarantine');
        rec.quarantine(reason);
      },
    };
    return Object.assign(this.messageContext(base, msg, false), eom) as unknown as EomContext;
  }

  /**
   * The SMFIR_* frames for one eom's edits, all encoded (and a replacement body spooled)
   * before anything is sent, so a failure sends nothing. Header and envelope edits go in
   * the order made, then the body in ≤ 65535-byte chunks (Postfix cannot interleave body
   * replacement with other edits), then the quarantine.
   */
  private async editFrames(edits: readonly MessageEdit[], state: MessageState): Promise<Buffer[]> {
    const leadspc = ((this.neg?.protocol ?? 0) & SMFIP.HDR_LEADSPC) !== 0;
    const acts = this.neg?.actions ?? 0;
    const frames: Buffer[] = [];
    const bodies: MessageEdit[] = [];
    let quarantine: string | undefined;
    const value = (name: string, v: string): string => wireHeaderValue(formatHeader(name, v).value, leadspc);
    for (const e of edits) {
      switch (e.op) {
        case 'addHeader':
          frames.push(encodeReply({ type: 'addHeader', name: e.name, value: value(e.name, e.value) }));
          break;
        case 'insertHeader':
          frames.push(encodeReply({ type: 'insertHeader', index: e.position - 1, name: e.name, value: value(e.name, e.value) }));
          break;
        case 'changeHeader':
          frames.push(encodeReply({ type: 'changeHeader', index: e.index, name: e.name, value: e.value === '' ? '' : value(e.name, e.value) }));
          break;
        case 'changeSender': {
          const args = esmtpArgs(e.args);
          const address = `<${e.address}>`;
          frames.push(encodeReply(args === undefined ? { type: 'changeFrom', address } : { type: 'changeFrom', address, args }));
          break;
        }
        case 'addRecipient': {
          const args = esmtpArgs(e.args);
          const address = `<${e.address}>`;
          if (args === undefined && acts & SMFIF.ADDRCPT) frames.push(encodeReply({ type: 'addRcpt', address }));
          else frames.push(encodeReply(args === undefined ? { type: 'addRcptPar', address } : { type: 'addRcptPar', address, args }));
          break;
        }
        case 'removeRecipient':
          frames.push(encodeReply({ type: 'deleteRcpt', address: `<${e.address}>` }));
          break;
        case 'replaceBody':
          bodies.push(e);
          break;
        case 'quarantine':
          quarantine ??= e.reason;
          break;
      }
    }
    if (bodies.length > 0) {
      // MessageState.apply spools the parts (CRLF-normalised) with bounded memory.
      await state.apply(bodies, this.server.options.spool ?? {});
      let any = false;
      for await (const chunk of state.body.stream(MILTER_CHUNK_SIZE)) {
        frames.push(encodeFrame('b', chunk as Buffer));
        any = true;
      }
      if (!any) frames.push(encodeReply({ type: 'replaceBody', chunk: Buffer.alloc(0) }));
    }
    if (quarantine !== undefined) frames.push(encodeReply({ type: 'quarantine', reason: quarantine }));
    return frames;
  }
}

/**
 * Serves `milter` to MTAs over the Sendmail milter protocol. Resolves once listening.
 * Point Postfix at `server.address` (`smtpd_milters = inet:127.0.0.1:8891`).
 */
export async function serveMilter(milter: Milter, options: ServeMilterOptions): Promise<MilterServer> {
  if (!options || typeof options.listen !== 'string') {
    throw new DovetailError(ErrorCodes.INVALID_OPTIONS, 'serveMilter needs options.listen (inet:host:port or unix:/path)');
  }
  const positive = (name: string, v: unknown, min = 1): void => {
    if (v !== undefined && !(typeof v === 'number' && Number.isFinite(v) && v >= min)) {
      throw new DovetailError(ErrorCodes.INVALID_OPTIONS, `serveMilter: ${name} must be a number >= ${min}`);
    }
  };
  positive('readTimeout', options.readTimeout);
  positive('maxConnections', options.maxConnections);
  positive('frameTimeout', options.frameTimeout);
  positive('maxHeaderBytes', options.maxHeaderBytes);
  positive('maxMessageBytes', options.maxMessageBytes);
  positive('progressInterval', options.progressInterval, 0);
  positive('closeTimeout', options.closeTimeout, 0);
  for (const a of options.actions ?? []) {
    if (!(a in ACTION_BITS)) throw new DovetailError(ErrorCodes.INVALID_OPTIONS, `serveMilter: unknown action ${JSON.stringify(a)}`);
  }
  for (const s of options.noReply ?? []) {
    if (!(s in WIRE_STAGES)) throw new DovetailError(ErrorCodes.INVALID_OPTIONS, `serveMilter: noReply: unknown stage ${JSON.stringify(s)}`);
  }
  for (const [s, names] of Object.entries(options.macros ?? {})) {
    if (!(s in MACRO_STAGES)) throw new DovetailError(ErrorCodes.INVALID_OPTIONS, `serveMilter: macros: unknown stage ${JSON.stringify(s)}`);
    for (const n of names ?? []) {
      if (typeof n !== 'string' || !n || /[\s,\0]/.test(n)) throw new DovetailError(ErrorCodes.INVALID_OPTIONS, `serveMilter: bad macro name ${JSON.stringify(n)}`);
    }
  }
  const spec = parseSocketSpec(options.listen);
  // Validates the milter as the gateway does; the chain gives timeouts and default actions.
  const chain = new MilterChain([milter], options.timeouts ? { timeouts: options.timeouts, ...(options.spool ? { spool: options.spool } : {}) } : options.spool ? { spool: options.spool } : {});
  const ctx: ServerContext = { milter, chain, options, closing: false };
  const connections = new Set<MilterConnection>();
  let allGone: (() => void) | undefined;

  const server = net.createServer({ allowHalfOpen: true }, (socket) => {
    if (ctx.closing) {
      socket.destroy();
      return;
    }
    const conn = new MilterConnection(socket, ctx, () => {
      connections.delete(conn);
      if (connections.size === 0) allGone?.();
    });
    connections.add(conn);
  });
  server.maxConnections = options.maxConnections ?? 1000;
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(listenOptions(spec), () => {
      server.off('error', reject);
      resolve();
    });
  });
  server.on('error', (err) => channels.error.publish({ milter: milter.name, error: err }));
  const bound = server.address();
  let address: string;
  let port = 0;
  if (bound && typeof bound === 'object') {
    port = bound.port;
    address = bound.family === 'IPv6' || bound.address.includes(':') ? `inet:[${bound.address}]:${port}` : `inet:${bound.address}:${port}`;
  } else {
    address = `unix:${String(bound ?? (spec.kind === 'unix' ? spec.path : ''))}`;
  }
  let closed: Promise<void> | undefined;

  return {
    address,
    port,
    get connections() {
      return connections.size;
    },
    close() {
      closed ??= (async () => {
        ctx.closing = true;
        const stopped = new Promise<void>((resolve) => server.close(() => resolve()));
        if (connections.size > 0) {
          const gone = new Promise<void>((resolve) => (allGone = resolve));
          for (const c of connections) c.drain();
          let timer: NodeJS.Timeout | undefined;
          await Promise.race([gone, new Promise<void>((resolve) => (timer = setTimeout(resolve, options.closeTimeout ?? 30_000)))]);
          clearTimeout(timer);
          for (const c of connections) c.socket.destroy();
          if (connections.size > 0) await gone;
        }
        await stopped;
      })();
      return closed;
    },
  };
}
