/**
 * The SMTP gateway: the adapter between smtp-server (the protocol) and the milter chain (at
 * every stage), with a bounded spool for DATA; at the end of DATA it hands the message to
 * lib/handoff (local recipients delivered, outbound ones queued) and answers the client
 * with the one reply that hands back. Its parts: options.ts (options and their checks),
 * connection.ts (smtp-server's connection class with our hooks), session.ts (session facts
 * and macros), auth.ts (SMTP AUTH), ingest.ts (DATA into the spool), received.ts (trace
 * header); this file wires them to smtp-server and runs the stages.
 *
 * How each milter stage is reached on smtp-server (which has callbacks for connect, MAIL,
 * RCPT and DATA only):
 * - connect: smtp-server's onConnect, before the greeting; a reject/tempfail is the
 *   greeting (554 / 421) and the connection closes.
 * - helo: smtp-server answers HELO/EHLO itself and has no callback for it; our connection
 *   subclass starts the helo stage as soon as smtp-server has accepted the name (once per
 *   name), and its verdict is the reply to the next MAIL FROM (which waits for it) and to
 *   every MAIL FROM until the client says HELO again. That is where Postfix gives a HELO
 *   reject by default (smtpd_delay_reject = yes).
 * - data: smtp-server writes 354 as it hands the data stream to onData, without waiting
 *   for it, so the data stage's verdict is the reply at the end of DATA.
 * - abort: when a new MAIL FROM, the end of the session, or a refusal ends a message.
 * - unknown: before smtp-server answers a command it does not recognise (500), our
 *   connection subclass runs the unknown stage; a reject/tempfail is the reply instead.
 *
 * The reply after DATA is lib/handoff's (see there): never a 250 for a message that is not
 * stored, queued on disk, or discarded by a milter.
 *
 * Behind a load balancer (docs/deployment.md): on a listener with `proxyProtocol`, the
 * server class reads the PROXY header of trusted peers itself (proxy.ts; smtp-server's
 * `useProxy` is v1-only with exact-address trust), so the session starts with the real
 * client; after XCLIENT / XFORWARD from a trusted peer, renew() starts the milters' session
 * over with the forwarded client before the next HELO or MAIL is looked at.
 */
import { mkdir } from 'node:fs/promises';
import { createSecureContext } from 'node:tls';
import type { GatewayReconfiguration } from './options.js';
import os from 'node:os';
import path from 'node:path';
import crypto from 'node:crypto';
import type net from 'node:net';
import type tls from 'node:tls';
import { SMTPServer, type SMTPServerAddress, type SMTPServerDataStream, type SMTPServerOptions, type SMTPServerSession } from 'smtp-server';
import { adoptConnection, isReplyError, replyError, type ConnectionOptions } from '../smtp-server/exact-replies.js';
import { DovetailError, ErrorCodes, isNoStorage } from '../errors.js';
import { channels, type CloseEvent } from '../diagnostics.js';
import { ChainSession, MilterChain, type MessageRun, type SessionFacts, type StageOutcome } from '../milter/chain.js';
import type { MessageState } from '../milter/message.js';
import { smtpReply, type SmtpReply } from '../milter/verdict.js';
import type { Milter } from '../milter/types.js';
import { maildir } from '../delivery/maildir.js';
import { isRouting } from '../delivery/routes.js';
import { handoff } from '../handoff/handoff.js';
import { authHandler } from './auth.js';
import { memoryAnvil, type Anvil } from './anvil.js';
import { GatewayConnection, sessionEnd } from './connection.js';
import { TransactionRecord, type TransactionSession } from './transaction.js';
import { ingest, type IngestProblem } from './ingest.js';
import { validateOptions, type CloseOptions, type Gateway, type GatewayOptions, type ListenOptions } from './options.js';
import { newQueueId } from './received.js';
import { contentState, hopCount } from './content.js';
import { cipherBits, MESSAGE_MACROS, sessionFacts, tlsInfo, toEnvelopeAddress } from './session.js';
import { domainOf } from '../delivery/domains.js';
import { networkList } from '../networks.js';
import { ProxyHeaderDecoder, type ProxyHeader } from './proxy.js';

export type { AuthRequest, CloseOptions, Gateway, GatewayOptions, ListenOptions } from './options.js';


const REPLIES = {
  headerTooLarge: smtpReply(552, '5.3.4', 'Error: message header too big'),
  tooManyHops: smtpReply(554, '5.4.6', 'Error: too many hops (mail forwarding loop)'),
  bareLineEnding: smtpReply(550, '5.5.2', 'Error: bare <CR> or <LF> in message data (RFC 5321 2.3.8)'),
  noRecipients: smtpReply(554, '5.5.1', 'Error: no valid recipients'),
  authRequired: smtpReply(530, '5.7.0', 'Authentication required'),
  noRoute: smtpReply(550, '5.1.2', 'Error: recipient address rejected: no route to this domain'),
  internal: smtpReply(451, '4.3.0', 'Error: internal error, try again later'),
  noStorage: smtpReply(452, '4.3.1', 'Error: insufficient system storage'),
  closing: smtpReply(421, '4.3.2', 'Service shutting down, try again later'),
} as const;

/** One listener: its options and what follows from them. */
interface Listener {
  readonly spec: ListenOptions;
  readonly name: string;
  readonly chain: MilterChain;
  readonly maxMessageBytes: number;
  readonly tooLarge: SmtpReply;
  /** Who may send a PROXY header / XCLIENT / XFORWARD here (undefined: nobody, PROXY not expected). */
  readonly proxyTrusted: ((address: string) => boolean) | undefined;
  readonly xclientTrusted: (address: string) => boolean;
  readonly xforwardTrusted: (address: string) => boolean;
}

interface GatewaySession {
  readonly listener: Listener;
  /** Replaced when XCLIENT / XFORWARD names another client (see renew()). */
  facts: SessionFacts;
  chain: ChainSession;
  /** The HELO name XCLIENT HELO= forwarded: it stays the session's, whatever the proxy says in its own EHLO. */
  forwardedHelo: string | undefined;
  /** A connect-stage refusal after XCLIENT / XFORWARD: the reply to every MAIL FROM. */
  connectRefusal: SmtpReply | undefined;
  /** The HELO name the helo stage last ran for, its run (maybe in flight), and its refusal if any. */
  heloRanFor: string | undefined;
  heloRun: Promise<void> | undefined;
  heloRefusal: SmtpReply | undefined;
  /** Failed AUTH attempts on this connection. */
  authFailures: number;
  /** The client reached a trusted proxy over TLS (PROXY v2 SSL TLV): AUTH counts as encrypted. */
  proxiedTls: boolean;
  /** For the close event: when it began, transactions begun and accepted, a refused greeting. */
  readonly started: number;
  transactions: number;
  accepted: number;
  refused: boolean;
  /** The transaction being recorded for the transaction event (only while someone subscribes). */
  tx: TransactionRecord | undefined;
}

/** The session facts the transaction event repeats. */
function txSession(gs: GatewaySession, session: SMTPServerSession): TransactionSession {
  return {
    sessionId: gs.facts.sessionId,
    listener: gs.listener.name,
    client: gs.facts.client,
    helo: gs.facts.helo ?? (session.hostNameAppearsAs || undefined),
    user: session.user ? String(session.user.username ?? session.user) : undefined,
  };
}

/** Creates a gateway (call listen() to start it). */
export function createGateway(options: GatewayOptions): Gateway {
  const hostname = options.hostname ?? os.hostname();
  const listenSpecs: readonly ListenOptions[] =
    options?.listen === undefined ? [{ port: 2525 }] : Array.isArray(options.listen) ? options.listen : [options.listen as ListenOptions];
  validateOptions(options, listenSpecs);
  const chainOptions = {
    ...(options.milterTimeouts ? { timeouts: options.milterTimeouts } : {}),
    ...(options.spool ? { spool: options.spool } : {}),
  };
  const maxHeaderBytes = options.maxHeaderBytes ?? 102_400;
  const lineTooLong = smtpReply(554, '5.6.0', `Error: message has a line longer than ${options.maxLineBytes ?? 102_400} bytes`);
  /** The size limit of a chain: the gateway's, lowered by its milters' limits. */
  const sizeLimitOf = (milters: readonly Milter[]): number => Math.min(options.maxMessageBytes ?? 50 * 1024 * 1024, ...milters.map((m) => m.limits?.maxMessageBytes ?? Infinity));
  /** A chain whose milters' edits are bound by the limits that bind the client. */
  const chainFor = (milters: readonly Milter[]): MilterChain =>
    new MilterChain(milters, {
      ...chainOptions,
      editLimits: { maxHeaderBytes, maxMessageBytes: sizeLimitOf(milters), maxRecipients: options.maxRecipients ?? 1000, maxEdits: options.maxMilterEdits ?? 1000 },
    });
  const defaultChain = chainFor(options.milters ?? []);
  /** Each listener's profile: its chain, and the size limit its chain's milters allow. */
  const listeners: Listener[] = listenSpecs.map((spec) => {
    const chain = spec.milters === undefined ? defaultChain : chainFor(spec.milters);
    const maxMessageBytes = sizeLimitOf(chain.milters);
    return {
      spec,
      name: spec.name ?? 'dovetail',
      chain,
      maxMessageBytes,
      // RFC 5321 4.5.3.1.10 / RFC 1870: say who refused and what the limit is.
      tooLarge: smtpReply(552, '5.3.4', `Error: message size exceeds the ${maxMessageBytes}-byte limit of ${hostname}`),
      proxyTrusted: spec.proxyProtocol ? networkList(spec.proxyProtocol.trusted) : undefined,
      xclientTrusted: networkList(spec.xclient?.trusted ?? []),
      xforwardTrusted: networkList(spec.xforward?.trusted ?? []),
    };
  });
  const maxHops = options.maxHops ?? 50;
  const DEFAULT_QUARANTINE_ROOT = path.resolve('var/quarantine');
  const quarantineTransport = options.quarantine ?? maildir({ root: DEFAULT_QUARANTINE_ROOT, deliveredTo: false });
  const sessions = new WeakMap<SMTPServerSession, GatewaySession>();
  const insecureAuth = options.allowInsecureAuth ?? false;
  const errorLimits = { soft: options.errorLimits?.soft ?? 10, hard: options.errorLimits?.hard ?? 20, sleep: options.errorLimits?.sleep ?? 1000 };
  const anvil: Anvil | undefined = options.anvil ?? (options.clientLimits === false ? undefined : memoryAnvil(options.clientLimits ?? {}));
  /** What to call when a counted connection goes. */
  const releases = new WeakMap<SMTPServerSession, () => void>();
  /** Sessions that have closed (an anvil answer arriving later releases at once). */
  const gone = new WeakSet<SMTPServerSession>();
  /** Each session's connection (for what the PROXY header said about it). */
  const connectionOf = new WeakMap<SMTPServerSession, GatewayConnection>();
  /** What a trusted proxy's header said, per accepted socket, until connect() picks it up. */
  const proxied = new WeakMap<net.Socket, ProxyHeader>();
  let inflight = 0;
  let closing = false;
  let drained: (() => void) | undefined;
  let addresses: { host: string; port: number }[] = [];


  const refusal = (out: StageOutcome): SmtpReply | undefined => (out.type === 'reject' || out.type === 'tempfail' ? out.reply : undefined);

  /** Counts a connection from `client` (Postfix anvil); the 421 that refuses it, if over a limit. */
  async function countConnection(session: SMTPServerSession, client: string): Promise<SmtpReply | undefined> {
    if (!anvil) return undefined;
    // One client address may not hold every slot, nor open them too fast.
    const got = await anvil.connect(client);
    if (!got.ok) {
      if (got.why === 'unavailable') return smtpReply(421, '4.3.0', `${hostname} Error: temporary failure of a shared store, try again later`);
      channels.error.publish({ sessionId: session.id, error: new DovetailError(ErrorCodes.CLIENT_LIMIT, `${client}: ${got.why === 'count' ? 'too many connections' : 'connection rate'} limit`) });
      return smtpReply(421, '4.7.0', `${hostname} Error: too many ${got.why === 'count' ? 'connections' : 'connection requests'} from ${client}`);
    }
    if (gone.has(session)) {
      // The client left while the store answered: nothing will release it later.
      got.release();
      return undefined;
    }
    releases.get(session)?.();
    releases.set(session, got.release);
    return undefined;
  }

  /** A refused greeting: 554 for a reject, 421 for a tempfail (RFC 5321 3.1), with the milter's text. */
  function greetingRefusal(out: StageOutcome): SmtpReply | undefined {
    const reply = refusal(out);
    if (!reply) return undefined;
    const code = out.type === 'tempfail' ? 421 : 554;
    return smtpReply(code, `${String(code)[0]}${reply.enhanced.slice(1)}`, reply.lines);
  }

  async function onConnect(listener: Listener, session: SMTPServerSession): Promise<void> {
    // A front MTA that forwards its clients with XCLIENT / XFORWARD is not itself counted:
    // the clients it names are (renew()).
    const forwarder = listener.xclientTrusted(session.remoteAddress) || listener.xforwardTrusted(session.remoteAddress);
    if (!forwarder) {
      const over = await countConnection(session, session.remoteAddress);
      if (over) throw replyError(over);
    }
    const facts = sessionFacts(session, hostname, listener.name);
    const header = connectionOf.get(session)?.proxyHeader;
    if (header?.tls) {
      // TLS between the client and the proxy (HAProxy send-proxy-v2-ssl): what ctx.tls, the macros and Received say.
      facts.tls = { version: header.tls.version ?? 'TLS', cipher: header.tls.cipher ?? 'unknown', bits: cipherBits(header.tls.cipher ?? '') };
      facts.macros['{tls_version}'] = facts.tls.version;
      facts.macros['{cipher}'] = facts.tls.cipher;
      facts.macros['{cipher_bits}'] = String(facts.tls.bits);
    }
    const gs: GatewaySession = {
      listener, facts, chain: listener.chain.session(facts), forwardedHelo: undefined, connectRefusal: undefined, heloRanFor: undefined, heloRun: undefined, heloRefusal: undefined, authFailures: 0,
      proxiedTls: header?.tls !== undefined, started: Date.now(), transactions: 0, accepted: 0, refused: false, tx: undefined,
    };
    sessions.set(session, gs);
    channels.connect.publish({ sessionId: session.id, client: facts.client, listener: listener.name });
    const reply = greetingRefusal(await gs.chain.connect());
    if (reply) {
      gs.refused = true;
      throw replyError(reply);
    }
  }

  /**
   * After XCLIENT or XFORWARD named another client: the session starts over for the milters
   * with the forwarded client (close, then connect with the new facts), as Postfix's smtpd
   * does for XCLIENT; the anvil counts the forwarded client. A refusal of the new connect
   * stage is the reply to every MAIL FROM that follows (smtpd_delay_reject).
   */
  async function renew(gs: GatewaySession, session: SMTPServerSession): Promise<void> {
    const addr = session.remoteAddress;
    if (addr === gs.facts.client.address && session.remotePort === gs.facts.client.port) return;
    const x = session.xClient?.has('ADDR') ? session.xClient : session.xForward;
    await gs.chain.close().catch((err: unknown) => channels.error.publish({ sessionId: session.id, error: err }));
    const fresh = sessionFacts(session, hostname, gs.listener.name);
    const named = x?.get('NAME');
    // smtp-server keeps the proxy's own host name when NAME is not forwarded; the client's is unknown.
    const facts: SessionFacts = named ? fresh : { ...fresh, client: { ...fresh.client, hostname: `[${addr}]` } };
    if (!named) {
      facts.macros['_'] = `unknown [${addr}]`;
      facts.macros['{client_name}'] = 'unknown';
      facts.macros['{client_ptr}'] = 'unknown';
    }
    facts.tls = gs.facts.tls;
    for (const k of ['{tls_version}', '{cipher}', '{cipher_bits}']) if (gs.facts.macros[k] !== undefined) facts.macros[k] = gs.facts.macros[k]!;
    const helo = session.xClient?.get('HELO');
    if (typeof helo === 'string' && helo) gs.forwardedHelo = helo.toLowerCase();
    gs.facts = facts;
    gs.chain = gs.listener.chain.session(facts);
    gs.heloRefusal = undefined;
    gs.connectRefusal = await countConnection(session, addr);
    channels.connect.publish({ sessionId: session.id, client: facts.client, listener: gs.listener.name });
    if (!gs.connectRefusal) gs.connectRefusal = greetingRefusal(await gs.chain.connect());
  }

  /**
   * Runs the helo stage for the session's current HELO name, once per name, after any run
   * still in flight for an earlier name; resolves when its verdict is known. Started when
   * smtp-server has answered HELO/EHLO, awaited (or started) at MAIL FROM.
   */
  function runHelo(gs: GatewaySession, session: SMTPServerSession): Promise<void> {
    const clientChanged = session.remoteAddress !== gs.facts.client.address || session.remotePort !== gs.facts.client.port;
    const helo = gs.forwardedHelo ?? (session.hostNameAppearsAs || undefined);
    if (!clientChanged && helo === gs.heloRanFor) return gs.heloRun ?? Promise.resolve();
    gs.heloRanFor = helo;
    const previous = gs.heloRun;
    gs.heloRun = (async () => {
      await previous;
      // XCLIENT / XFORWARD named another client: the milters see a new session first.
      await renew(gs, session);
      const name = gs.forwardedHelo ?? (session.hostNameAppearsAs || undefined);
      gs.heloRanFor = name;
      gs.facts.helo = name;
      gs.heloRefusal = name === undefined ? undefined : refusal(await gs.chain.helo(name));
    })();
    return gs.heloRun;
  }

  async function onMailFrom(from: SMTPServerAddress, session: SMTPServerSession): Promise<void> {
    const gs = sessions.get(session);
    if (!gs) throw replyError(REPLIES.internal);
    // A transaction left without DATA (RSET, or MAIL FROM again) ends here.
    gs.tx?.end(txSession(gs, session), undefined);
    gs.tx = undefined;
    try {
      await mailFrom(gs, from, session);
    } catch (err) {
      // A refusal ends the transaction (with no queue id when it came before one was given).
      if (channels.transaction.hasSubscribers) {
        const tx = gs.tx ?? new TransactionRecord(undefined, from.address, undefined);
        tx.end(txSession(gs, session), isReplyError(err) ? err.reply : REPLIES.internal);
      }
      gs.tx = undefined;
      throw err;
    }
  }

  async function mailFrom(gs: GatewaySession, from: SMTPServerAddress, session: SMTPServerSession): Promise<void> {
    if (closing) throw replyError(REPLIES.closing);
    // Submission: nothing before AUTH. Checked here, not left to smtp-server, whose own check
    // is skipped on a connection where AUTH is not (yet) available (ours: before TLS).
    if (gs.listener.spec.submission && !session.user) throw replyError(REPLIES.authRequired);
    const user = session.user ? String(session.user.username ?? session.user) : undefined;
    // XCLIENT / XFORWARD may have named another client since: the milters see it first.
    await runHelo(gs, session);
    if (gs.connectRefusal) throw replyError(gs.connectRefusal);
    const allowed = anvil?.message ? await anvil.message(session.remoteAddress, user) : true;
    if (allowed !== true) {
      if (allowed === 'unavailable') throw replyError(smtpReply(451, '4.3.0', 'Error: temporary failure of a shared store, try again later'));
      // Postfix's reply for smtpd_client_message_rate_limit.
      throw replyError(smtpReply(450, '4.7.1', `Error: too much mail from ${user ?? session.remoteAddress}`));
    }
    gs.facts.auth = session.user && user !== undefined ? { method: String(session.user.method ?? 'PLAIN'), user } : undefined;
    if (gs.heloRefusal) throw replyError(gs.heloRefusal);
    const sender = toEnvelopeAddress(from);
    const queueId = newQueueId();
    const m = gs.facts.macros;
    // Message macros start afresh with each MAIL FROM.
    for (const k of MESSAGE_MACROS) delete m[k];
    m['i'] = queueId;
    m['{mail_addr}'] = sender.address;
    m['{mail_host}'] = domainOf(sender.address);
    m['{mail_mailer}'] = 'smtp';
    if (gs.facts.auth) {
      m['{auth_type}'] = gs.facts.auth.method;
      m['{auth_authen}'] = gs.facts.auth.user;
    }
    const run = await gs.chain.begin(queueId, sender);
    gs.transactions++;
    if (channels.transaction.hasSubscribers) gs.tx = new TransactionRecord(queueId, sender.address, run);
    const reply = refusal(await run.mail());
    if (reply) {
      await run.abort();
      throw replyError(reply);
    }
  }

  async function onRcptTo(to: SMTPServerAddress, session: SMTPServerSession): Promise<void> {
    const gs = sessions.get(session);
    const run = gs?.chain.message;
    if (!gs || !run) throw replyError(REPLIES.internal);
    if (gs.listener.spec.submission && !session.user) throw replyError(REPLIES.authRequired);
    const rcpt = toEnvelopeAddress(to);
    const m = gs.facts.macros;
    m['{rcpt_addr}'] = rcpt.address;
    m['{rcpt_host}'] = domainOf(rcpt.address);
    m['{rcpt_mailer}'] = 'smtp';
    const refuse = (r: SmtpReply): Error => {
      gs.tx?.recipients.push({ address: rcpt.address, refused: r });
      return replyError(r);
    };
    const reply = refusal(await run.rcpt(rcpt));
    if (reply) throw refuse(reply);
    // A recipient the routing table has no route for is refused now, not bounced later.
    if (isRouting(options.delivery) && !options.delivery.route(rcpt.address)) throw refuse(REPLIES.noRoute);
    const verify = options.verifyRecipients ? options.delivery.verifyRecipient : undefined;
    if (verify) {
      let answer: SmtpReply | undefined;
      try {
        answer = await verify.call(options.delivery, { queueId: run.queueId, sender: run.sender }, rcpt);
      } catch (err) {
        // Verification is advisory: a mailstore that cannot answer now does not refuse mail.
        channels.error.publish({ sessionId: gs.facts.sessionId, queueId: run.queueId, recipient: rcpt.address, error: err });
      }
      if (answer && answer.code >= 400) throw refuse(answer);
    }
    run.accepted(rcpt);
    gs.tx?.recipients.push({ address: rcpt.address });
  }

  async function onData(stream: SMTPServerDataStream, session: SMTPServerSession): Promise<string> {
    const gs = sessions.get(session);
    const run = gs?.chain.message;
    if (!gs || !run) {
      stream.resume();
      await new Promise((r) => stream.once('end', r));
      throw replyError(REPLIES.internal);
    }
    const tx = gs.tx;
    try {
      const text = await receive(gs, run, stream, session);
      gs.accepted++;
      // smtp-server sends it as 250 2.6.0 (its DATA_OK enhanced code).
      tx?.end(txSession(gs, session), smtpReply(250, '2.6.0', text));
      return text;
    } catch (err) {
      tx?.end(txSession(gs, session), isReplyError(err) ? err.reply : REPLIES.internal);
      throw err;
    } finally {
      if (gs.tx === tx) gs.tx = undefined;
    }
  }

  async function receive(gs: GatewaySession, run: MessageRun, stream: SMTPServerDataStream, session: SMTPServerSession): Promise<string> {
    const dataOutcome = run.data();
    let got: Awaited<ReturnType<typeof ingest>>;
    try {
      got = await ingest(stream, {
        maxBytes: gs.listener.maxMessageBytes,
        maxHeaderBytes,
        bareLineEndings: options.bareLineEndings ?? 'reject',
        maxLineBytes: options.maxLineBytes ?? 102_400,
        ...(options.spool ? { spool: options.spool } : {}),
      });
    } catch (err) {
      // The spool's filesystem (or quota) is full: the message was not kept, say so with
      // 452 4.3.1 (the client retries later). Any other failure stays internal (451 4.3.0).
      if (!isNoStorage(err)) throw err;
      channels.error.publish({ sessionId: gs.facts.sessionId, queueId: run.queueId, error: err });
      await dataOutcome.catch(() => undefined);
      await run.abort();
      throw replyError(REPLIES.noStorage);
    }
    let state: MessageState | undefined;
    try {
      // The data stage ran while the message streamed in; settle it before anything else.
      const dataReply = refusal(await dataOutcome);
      const problem: IngestProblem | undefined = got.problem;
      if (problem) {
        await run.abort();
        throw replyError(
          problem === 'too-large' ? gs.listener.tooLarge : problem === 'header-too-large' ? REPLIES.headerTooLarge : problem === 'line-too-long' ? lineTooLong : REPLIES.bareLineEnding,
        );
      }
      if (dataReply) {
        await run.abort();
        throw replyError(dataReply);
      }
      // RFC 5321 6.3: a message that went round too often is a loop (Postfix counts Received: and Delivered-To:).
      if (hopCount(got.headers) > maxHops) {
        await run.abort();
        throw replyError(REPLIES.tooManyHops);
      }
      if (run.discarded) {
        run.finish();
        return `Ok: queued as ${run.queueId}`;
      }
      // RFC 3848: ESMTPS when the client's TLS ended at a trusted proxy too.
      const protocol = gs.proxiedTls ? (session.transmissionType || 'ESMTP').replace(/^(E?SMTP)(?!S)/, '$1S') : session.transmissionType || 'ESMTP';
      state = contentState(got, run, gs.facts, hostname, protocol);
      const contentReply = refusal(await run.content(state));
      if (contentReply) {
        await run.abort();
        throw replyError(contentReply);
      }
      if (run.discarded) {
        run.finish();
        return `Ok: queued as ${run.queueId}`;
      }
      if (state.recipients.length === 0) throw replyError(REPLIES.noRecipients);
      const tx = gs.tx;
      const h0 = tx ? performance.now() : 0;
      const outcome = await handoff(gs.facts.sessionId, run.queueId, state, {
        delivery: options.delivery,
        quarantine: quarantineTransport,
        queue: options.queue,
        ...(tx ? { arrival: tx.start } : {}),
      });
      if (tx) {
        tx.handoffMs = performance.now() - h0;
        tx.size = state.size;
        tx.results = outcome.results.map((r, i) => r ?? { recipient: state?.recipients[i]?.address ?? '', status: 'queued' });
        tx.queued = outcome.queued;
        tx.quarantined = state.quarantine !== undefined;
      }
      channels.message.publish({
        sessionId: gs.facts.sessionId,
        queueId: run.queueId,
        size: state.size,
        quarantine: state.quarantine,
        results: outcome.results,
        queued: outcome.queued,
        reply: outcome.reply,
      });
      if (!outcome.ok) throw replyError(outcome.reply);
      return outcome.reply.lines.join(' ');
    } finally {
      run.finish();
      await state?.dispose();
      await got.spool.dispose();
    }
  }

  const servers: SMTPServer[] = [];

  class GatewayServer extends SMTPServer {
    constructor(readonly listener: Listener) {
      super(smtpOptions(listener));
    }

    /** PROXY headers are ours to read on a listener with proxyProtocol (smtp-server's reader is v1 only, exact-address trust). */
    override _expectsProxyHeader(socket: net.Socket): boolean {
      return this.listener.proxyTrusted?.(socket.remoteAddress ?? '') ?? false;
    }

    /**
     * Reads the PROXY header (v1 or v2) of a trusted peer with our decoder, bounded in bytes
     * and in time (proxyProtocol.timeout), and hands smtp-server the client it names.
     * Anything else closes the connection before SMTP starts.
     */
    override _handleProxy(socket: net.Socket, callback: Parameters<SMTPServer['_handleProxy']>[1]): void {
      if (!this._expectsProxyHeader(socket)) return super._handleProxy(socket, callback);
      const id = BigInt('0x' + crypto.randomBytes(10).toString('hex')).toString(32).padStart(16, '0');
      const decoder = new ProxyHeaderDecoder();
      let finished = false;
      const finish = (err: Error | null, header?: ProxyHeader): void => {
        if (finished) return;
        finished = true;
        clearTimeout(timer);
        socket.off('readable', read);
        socket.off('error', onClose);
        socket.off('close', onClose);
        socket.off('end', onClose);
        if (err || !header) {
          socket.on('error', () => undefined);
          socket.destroy();
          channels.error.publish({ error: new DovetailError(ErrorCodes.PROXY_PROTOCOL, `PROXY header from ${socket.remoteAddress}: ${err?.message ?? 'none'}`) });
          return callback(err ?? new Error('no PROXY header'));
        }
        proxied.set(socket, header);
        const src = header.command === 'proxy' ? header.source : undefined;
        callback(null, { id, ...(src ? { remoteAddress: src.address, remotePort: src.port } : {}) } as Parameters<typeof callback>[1]);
      };
      const read = (): void => {
        let chunk: Buffer | null;
        try {
          while (!finished && (chunk = socket.read() as Buffer | null) !== null) {
            const r = decoder.push(chunk);
            if (r.done) {
              if (r.rest.length) socket.unshift(r.rest);
              return finish(null, r.header);
            }
          }
        } catch (err) {
          finish(err as Error);
        }
      };
      const onClose = (): void => finish(new Error('connection closed before the PROXY header'));
      const timer = setTimeout(() => finish(new Error('no PROXY header in time')), this.listener.spec.proxyProtocol?.timeout ?? 10_000);
      socket.on('readable', read);
      socket.on('error', onClose);
      socket.on('close', onClose);
      socket.on('end', onClose);
    }

    override connect(socket: net.Socket | tls.TLSSocket, socketOptions: unknown): void {
      // Same as SMTPServer.connect, with our connection class.
      const connection = new GatewayConnection(this, socket, socketOptions as ConnectionOptions);
      connection.proxyHeader = proxied.get(socket);
      connectionOf.set(connection.session, connection);
      connection.xclientTrusted = this.listener.xclientTrusted;
      connection.xforwardTrusted = this.listener.xforwardTrusted;
      connection.hostname = hostname;
      const peer = socket.remoteAddress ?? '';
      // Whoever sends a PROXY header where it is not trusted (any listener without proxyProtocol,
      // or a peer outside its list) is refused and reported: nobody else picks their address.
      if (!this.listener.proxyTrusted?.(peer)) {
        const why = this.listener.proxyTrusted ? 'which is not in proxyProtocol.trusted' : 'on a listener without proxyProtocol';
        connection.onUntrustedProxy = (what) =>
          channels.error.publish({ sessionId: connection.session.id, error: new DovetailError(ErrorCodes.PROXY_UNTRUSTED, `${what} from ${peer}, ${why}: refused`) });
      }
      connection.onUntrustedX = (command) =>
        channels.error.publish({ sessionId: connection.session.id, error: new DovetailError(ErrorCodes.PROXY_UNTRUSTED, `${command} from ${peer}, which is not in ${command.toLowerCase()}.trusted: 550 5.7.0`) });
      // TLS that a trusted proxy terminated (PROXY v2 SSL TLV) counts for AUTH: the password crossed it encrypted.
      connection.authNeedsTls = !insecureAuth && !proxied.get(socket)?.tls;
      connection.authEnabled = options.authenticate !== undefined && this.listener.spec.auth !== false;
      connection.errorLimits = errorLimits;
      connection.tooManyErrors = `4.7.0 ${hostname} Error: too many errors`;
      connection.onUnknown = async (session, command) => {
        const gs = sessions.get(session);
        return gs ? refusal(await gs.chain.unknown(command)) : undefined;
      };
      connection.onHelo = (session) => {
        const gs = sessions.get(session);
        // Its outcome is awaited (and any failure answered) at MAIL FROM.
        if (gs) runHelo(gs, session).catch(() => undefined);
      };
      adoptConnection(this, connection);
    }
  }

  const callbackify =
    <A extends unknown[], R>(fn: (...args: A) => Promise<R>) =>
    (...args: [...A, (err?: Error | null, result?: R) => void]): void => {
      const cb = args.pop() as (err?: Error | null, result?: R) => void;
      fn(...(args as unknown as A)).then(
        (r) => cb(null, r),
        (err: unknown) => {
          if (isReplyError(err)) return cb(err);
          // An internal failure: the client gets a generic 451, the error goes to the channel.
          const session = args[args.length - 1] as SMTPServerSession;
          channels.error.publish({ sessionId: session.id, error: err });
          cb(replyError(REPLIES.internal));
        },
      );
    };

  function smtpOptions(listener: Listener): SMTPServerOptions {
    const tlsMode = options.tls ? (listener.spec.tls ?? 'starttls') : 'none';
    const disabled = [];
    if (tlsMode !== 'starttls') disabled.push('STARTTLS');
    if (!options.authenticate || listener.spec.auth === false) disabled.push('AUTH');
    return {
      name: hostname,
      ...(options.banner ? { banner: options.banner } : {}),
      size: listener.maxMessageBytes,
      maxClients: options.maxClients ?? 1000,
      disabledCommands: disabled,
      // Submission: MAIL, RCPT and DATA before AUTH get 530 5.7.0 (smtp-server's check).
      authOptional: !listener.spec.submission,
      authRequiredMessage: 'Authentication required',
      secure: tlsMode === 'implicit',
      allowInsecureAuth: insecureAuth,
      authMethods: ['PLAIN', 'LOGIN'],
      // DSN (RFC 3461) only with a queue: without one we could not send the notifications.
      hideDSN: options.queue === undefined,
      hideENHANCEDSTATUSCODES: false,
      disableReverseLookup: options.resolveClientNames === false,
      socketTimeout: options.socketTimeout ?? 300_000,
      // close() below decides when to cut connections off; smtp-server's own timer would
      // say 421 to a client whose message is still being delivered.
      closeTimeout: 0x7fffffff,
      maxRecipients: options.maxRecipients ?? 1000,
      ...(options.tls ? { key: options.tls.key, cert: options.tls.cert } : {}),
      logger: false,
      // XCLIENT / XFORWARD are advertised and accepted per our trust lists (GatewayConnection._proxyCommandAllowed).
      ...(listener.spec.xclient ? { useXClient: true } : {}),
      ...(listener.spec.xforward ? { useXForward: true } : {}),
      onConnect: callbackify((session: SMTPServerSession) => onConnect(currentProfile(listener), session)),
      onSecure: (socket, session, cb) => {
        const gs = sessions.get(session);
        if (gs) {
          gs.facts.tls = tlsInfo(socket as tls.TLSSocket);
          const m = gs.facts.macros;
          if (gs.facts.tls) {
            m['{tls_version}'] = gs.facts.tls.version;
            m['{cipher}'] = gs.facts.tls.cipher;
            m['{cipher_bits}'] = String(gs.facts.tls.bits);
          }
        }
        cb();
      },
      onAuth: authHandler(auth, (session) => sessions.get(session)),
      onMailFrom: callbackify((a: SMTPServerAddress, s: SMTPServerSession) => onMailFrom(a, s)),
      onRcptTo: callbackify((a: SMTPServerAddress, s: SMTPServerSession) => onRcptTo(a, s)),
      onData: (stream, session, cb) => {
        // In flight from DATA until its reply is written: close() waits for these.
        inflight++;
        callbackify(onData)(stream, session, (err, message) => {
          cb(err ?? null, message);
          if (--inflight === 0) drained?.();
        });
      },
      onClose: (session) => {
        gone.add(session);
        releases.get(session)?.();
        releases.delete(session);
        const gs = sessions.get(session);
        sessions.delete(session);
        if (gs) {
          gs.tx?.end(txSession(gs, session), undefined);
          gs.tx = undefined;
          const end: CloseEvent = {
            sessionId: session.id,
            client: gs.facts.client,
            listener: gs.listener.name,
            helo: gs.facts.helo ?? (session.hostNameAppearsAs || undefined),
            tls: gs.facts.tls,
            user: session.user ? String(session.user.username ?? session.user) : undefined,
            transactions: gs.transactions,
            accepted: gs.accepted,
            durationMs: Date.now() - gs.started,
            end: gs.refused ? 'refused' : (sessionEnd(session) ?? 'disconnect'),
          };
          gs.chain.close().then(
            () => channels.close.publish(end),
            (err: unknown) => {
              channels.error.publish({ sessionId: session.id, error: err });
              // The session ended all the same: every connect has its close.
              channels.close.publish(end);
            },
          );
        }
      },
    };
  }

  /**
   * reconfigure(): the profiles new connections get, in `listeners` order. A session keeps
   * the Listener it started with, so a connection in flight finishes with its old chain.
   */
  let current: readonly Listener[] = listeners;
  let currentMilters: readonly Milter[] = options.milters ?? [];
  let currentListenerMilters: readonly (readonly Milter[] | undefined)[] = listenSpecs.map((l) => l.milters);
  const currentProfile = (l: Listener): Listener => current[listeners.indexOf(l)] ?? l;
  /** What AUTH checks with; reconfigure() may replace `authenticate` (authHandler reads it per attempt). */
  const auth: Pick<GatewayOptions, 'allowInsecureAuth' | 'authFailureDelay' | 'maxAuthFailures'> & { authenticate?: NonNullable<GatewayOptions['authenticate']> } = {
    ...(options.authenticate ? { authenticate: options.authenticate } : {}),
    ...(options.allowInsecureAuth !== undefined ? { allowInsecureAuth: options.allowInsecureAuth } : {}),
    ...(options.authFailureDelay !== undefined ? { authFailureDelay: options.authFailureDelay } : {}),
    ...(options.maxAuthFailures !== undefined ? { maxAuthFailures: options.maxAuthFailures } : {}),
  };

  function reconfigure(changes: GatewayReconfiguration): void {
    const bad = (why: string): never => {
      throw new DovetailError(ErrorCodes.INVALID_OPTIONS, `reconfigure: ${why}`);
    };
    if (changes.listeners !== undefined && changes.listeners.length !== listeners.length) {
      bad(`listeners has ${changes.listeners.length} entries, the gateway has ${listeners.length} listeners (changing listeners needs a restart)`);
    }
    if (changes.tls !== undefined && (!options.tls || !changes.tls.key || !changes.tls.cert)) bad('tls: needs key and cert, and a gateway created with tls (turning TLS on or off needs a restart)');
    if (changes.authenticate !== undefined && (!options.authenticate || typeof changes.authenticate !== 'function')) {
      bad('authenticate: must be a function, on a gateway created with authenticate (turning AUTH on or off needs a restart)');
    }
    // Build everything first (MilterChain checks each milter; a bad key or certificate
    // throws here): a bad part changes nothing.
    const milters = changes.milters ?? currentMilters;
    const perListener = changes.listeners?.map((l) => l.milters) ?? currentListenerMilters;
    const gatewayChain = chainFor(milters);
    const next = listeners.map((l, i): Listener => {
      const own = perListener[i];
      const chain = own === undefined ? gatewayChain : chainFor(own);
      const maxMessageBytes = sizeLimitOf(chain.milters);
      return { ...l, chain, maxMessageBytes, tooLarge: smtpReply(552, '5.3.4', `Error: message size exceeds the ${maxMessageBytes}-byte limit of ${hostname}`) };
    });
    const tlsOptions = changes.tls ? { key: changes.tls.key, cert: changes.tls.cert } : undefined;
    if (tlsOptions) createSecureContext(tlsOptions);
    for (const s of servers) if (tlsOptions) s.updateSecureContext(tlsOptions);
    if (changes.authenticate) auth.authenticate = changes.authenticate;
    currentMilters = milters;
    currentListenerMilters = perListener;
    current = next;
    // The SIZE new EHLOs advertise.
    for (const s of servers) (s.options as { size?: number }).size = currentProfile((s as GatewayServer).listener).maxMessageBytes;
  }

  return {
    reconfigure,
    get addresses() {
      return addresses;
    },
    async listen() {
      if (servers.length) throw new DovetailError(ErrorCodes.INVALID_OPTIONS, 'the gateway is already listening');
      await options.queue?.start?.();
      // The default quarantine store's root must exist (maildir() never creates its root).
      if (options.quarantine === undefined) await mkdir(DEFAULT_QUARANTINE_ROOT, { recursive: true, mode: 0o700 });
      const bound: { host: string; port: number }[] = [];
      for (const listener of listeners) {
        const spec = listener.spec;
        const server = new GatewayServer(listener);
        server.on('error', (err: Error) => channels.error.publish({ error: err }));
        servers.push(server);
        await new Promise<void>((resolve, reject) => {
          server.server.once('error', reject);
          server.listen(spec.port, spec.host ?? '127.0.0.1', () => {
            server.server.off('error', reject);
            resolve();
          });
        });
        const a = server.server.address() as net.AddressInfo;
        bound.push({ host: a.address, port: a.port });
      }
      addresses = bound;
      return bound;
    },
    async close(how: CloseOptions = {}) {
      if (servers.length === 0) return;
      if ((how.sessions ?? 0) > 0) {
        // Stop accepting on the net.Server only: smtp-server's close() would answer every
        // later command 421, and these clients are to finish their sessions as usual.
        for (const s of servers) s.server.close();
        const until = Date.now() + how.sessions!;
        while (Date.now() < until && servers.some((s) => s.connections.size > 0)) await new Promise((r) => setTimeout(r, 50));
      }
      closing = true;
      const closed = servers.map((s) => new Promise<void>((resolve) => s.close(() => resolve())));
      if (inflight > 0) {
        // Let transactions in flight finish, up to closeTimeout.
        let timer: NodeJS.Timeout | undefined;
        await Promise.race([
          new Promise<void>((resolve) => (drained = resolve)),
          new Promise<void>((resolve) => (timer = setTimeout(resolve, options.closeTimeout ?? 30_000))),
        ]);
        clearTimeout(timer);
        drained = undefined;
      }
      // Tell every remaining client we are going (send() closes the connection after a 421).
      for (const s of servers) {
        for (const c of s.connections) {
          (c as GatewayConnection).ending('shutdown');
          c.send(421, `${hostname} Service shutting down, closing transmission channel`);
        }
      }
      await Promise.all(closed);
      servers.length = 0;
      addresses = [];
      closing = false;
      // The queue's retries use the transports: stop it before they close.
      await options.queue?.close?.();
      await options.delivery.close?.();
      if (options.quarantine === undefined) await quarantineTransport.close?.();
    },
  };
}
