/**
 * The Milter interface: one typed object with an optional async handler per stage, and the
 * contexts those handlers receive. The same object runs in-process in the gateway's chain,
 * is served to Postfix/Sendmail by serveMilter(), or is implemented by connectMilter() for
 * a remote filter. Context fields carry what Postfix sends as milter macros.
 */
import type { Readable } from 'node:stream';
import type { Stage } from './stages.js';
import type { BodyVerdict, EomVerdict, MessageVerdict, SessionVerdict } from './verdict.js';

/** How the client reached us. `unix` for a local socket, `unknown` where the address is not known. */
export type AddressFamily = 'ipv4' | 'ipv6' | 'unix' | 'unknown';

/** The SMTP client, as Postfix reports it in {client_addr}, {client_port}, {client_name}. */
export interface ClientInfo {
  /** IP address, without brackets (IPv4-mapped IPv6 addresses are given as IPv4). */
  readonly address: string;
  readonly port: number;
  /** Reverse-resolved host name, or `[address]` when none was found or lookups are off. */
  readonly hostname: string;
  readonly family: AddressFamily;
}

/** Our own end of the connection: {daemon_addr}, {daemon_port}, `j`. */
export interface ServerInfo {
  readonly hostname: string;
  /** The name of the listener that took the connection ({daemon_name}). */
  readonly name: string;
  readonly address: string;
  readonly port: number;
}

/** TLS facts ({tls_version}, {cipher}, {cipher_bits}); undefined on a plain-text session. */
export interface TlsInfo {
  readonly version: string;
  readonly cipher: string;
  readonly bits: number;
}

/** SMTP AUTH facts ({auth_type}, {auth_authen}); undefined when the client did not authenticate. */
export interface AuthInfo {
  readonly method: string;
  readonly user: string;
}

/** An envelope address with its ESMTP parameters (`SIZE`, `BODY`, `NOTIFY` …, upper-case keys). */
export interface EnvelopeAddress {
  /** The address without angle brackets; `''` for the null sender `<>`. */
  readonly address: string;
  readonly args: Readonly<Record<string, string | true>>;
}

/** One header field as it stands in the message. */
export interface HeaderField {
  /** The field name as written (case kept). */
  readonly name: string;
  /**
   * The value as written: after the colon, with one leading space removed (as libmilter
   * passes it without SMFIP_HDR_LEADSPC), folding kept as CRLF + whitespace.
   */
  readonly value: string;
  /**
   * Who wrote it: undefined for a header as received from the client (and the gateway's
   * own Received header); otherwise the name of the milter that added or last changed it.
   * Lets a milter trust a remote filter's verdict header but not a client's forgery.
   */
  readonly origin?: string;
}

/** The message's spam score: milters add to it; `spamTag` reads it. */
export interface Score {
  /** Adds `points` (may be negative) under a rule name such as `RBL_SPAMHAUS` or `DKIM_VALID`. */
  add(points: number, reason: string, detail?: string): void;
  /** The sum of every entry. */
  readonly total: number;
  readonly entries: readonly ScoreEntry[];
}

export interface ScoreEntry {
  readonly points: number;
  readonly reason: string;
  readonly detail?: string;
  /** The name of the milter that added it. */
  readonly milter: string;
}

/** What every handler gets: the session's facts. */
export interface SessionContext {
  /** The stage being run. */
  readonly stage: Stage;
  /** The name of the milter being called. */
  readonly milter: string;
  /** Unique per SMTP session. */
  readonly sessionId: string;
  readonly client: ClientInfo;
  readonly server: ServerInfo;
  /** The HELO/EHLO name, once the client has sent one. */
  readonly helo: string | undefined;
  readonly tls: TlsInfo | undefined;
  readonly auth: AuthInfo | undefined;
  /**
   * The macros Postfix would send at this point (`j`, `{daemon_name}`, `{client_addr}`,
   * `i`, `{mail_addr}`, `{rcpt_addr}` …). Cumulative: later stages see earlier stages' macros.
   */
  readonly macros: Readonly<Record<string, string>>;
  /**
   * This milter's own scratch space for the session (libmilter's smfi_setpriv). Cleared
   * when the session ends.
   */
  readonly state: Map<string, unknown>;
  /** Aborted when the handler's timeout fires (its default action has then been taken): stop work when it does. */
  readonly signal: AbortSignal;
  /** The spam score of the current message (at connect/helo: of the session, carried into each message). */
  readonly score: Score;
}

/** Envelope facts of the message in progress (read-only before end of message). */
export interface Envelope {
  readonly sender: EnvelopeAddress;
  /** Recipients accepted so far (at RCPT: before this one). */
  readonly recipients: readonly EnvelopeAddress[];
}

/** What handlers of message stages get (mail and later). */
export interface MessageContext extends SessionContext {
  /** The queue id given at MAIL FROM (macro `i`). */
  readonly queueId: string;
  readonly envelope: Envelope;
}

/** What header, eoh and body handlers get. */
export interface ContentContext extends MessageContext {
  /** The headers as this milter sees them (after the edits of the milters before it). At `header`: those so far. */
  readonly headers: readonly HeaderField[];
}

/** The message as it stands at end of message, with the edits a milter may make. */
export interface MessageEditor {
  /** The headers as this milter sees them (after earlier milters' edits). */
  readonly headers: readonly HeaderField[];
  /** The message size in bytes (headers + blank line + body) as this milter sees it. */
  readonly size: number;
  /** The whole message (headers, blank line, body) as this milter sees it, CRLF line endings. */
  stream(): Readable;
  /** The body alone, as this milter sees it. */
  body(): Readable;
  /** Appends a header at the end of the header block (SMFIR_ADDHEADER). */
  addHeader(name: string, value: string): void;
  /**
   * Inserts a header at a 1-based position: 1 puts it first (SMFIR_INSHEADER sends
   * position - 1). A position past the end appends.
   */
  insertHeader(position: number, name: string, value: string): void;
  /**
   * Changes the `index`-th (1-based) header called `name`, compared case-insensitively
   * (SMFIR_CHGHEADER). An empty value deletes it. An index past the last one adds the header.
   */
  changeHeader(name: string, index: number, value: string): void;
  /** Deletes the `index`-th (1-based) header called `name` (SMFIR_CHGHEADER with an empty value). */
  deleteHeader(name: string, index: number): void;
  /**
   * Replaces the body (SMFIR_REPLBODY). As with smfi_replacebody, several calls in one
   * end-of-message handler append to each other: the new body is their concatenation.
   */
  replaceBody(body: string | Buffer | Readable): void;
}

/** The envelope at end of message, with the edits a milter may make. */
export interface EnvelopeEditor extends Envelope {
  /** Changes the envelope sender (SMFIR_CHGFROM), optionally with ESMTP arguments (`'SIZE=100 BODY=8BITMIME'`). */
  changeSender(address: string, args?: string): void;
  /** Adds a recipient (SMFIR_ADDRCPT / SMFIR_ADDRCPT_PAR). */
  addRecipient(address: string, args?: string): void;
  /** Removes a recipient, compared case-insensitively (SMFIR_DELRCPT). */
  removeRecipient(address: string): void;
}

/** What the eom handler gets. */
export interface EomContext extends MessageContext {
  readonly headers: readonly HeaderField[];
  readonly message: MessageEditor;
  readonly envelope: EnvelopeEditor;
  /** Quarantines the message (smfi_quarantine); the handler's verdict still counts. */
  quarantine(reason: string): void;
}

/** What a handler may return: a verdict, or nothing for continue. Handlers are async. */
type Answer<V> = Promise<V | undefined | void>;

/** What the gateway does with a milter that throws or times out. */
export type DefaultAction = 'tempfail' | 'accept' | 'reject' | 'quarantine';

/** Per-milter timeouts in milliseconds (Postfix: milter_command_timeout, milter_content_timeout). */
export interface MilterTimeouts {
  /** connect, helo, mail, rcpt, data, unknown, abort, close. Default 30 000. */
  readonly command?: number;
  /** header, eoh, body, eom. Default 300 000. */
  readonly content?: number;
}

/**
 * A milter. Every handler is optional; a stage without one is never called (over the wire:
 * the matching SMFIP_NO* flag). Handlers are async; returning nothing means continue.
 */
export interface Milter {
  /** Used in logs, score entries, and diagnostics. */
  readonly name: string;
  /** Taken when a handler throws or times out. Default `tempfail`. */
  readonly defaultAction?: DefaultAction;
  readonly timeouts?: MilterTimeouts;
  /**
   * Limits this milter asks the gateway to enforce at the SMTP level (sizeLimit uses it):
   * the smallest `maxMessageBytes` of the gateway and its milters is advertised as SIZE,
   * checked against MAIL FROM's SIZE=, and enforced while DATA streams.
   */
  readonly limits?: { readonly maxMessageBytes?: number };
  /**
   * What the `eom` handler reads of the message. `headers`: `ctx.headers`,
   * `ctx.message.headers`, the header part of `ctx.message.stream()`; `body`:
   * `ctx.message.body()`, the body part of `stream()`, `size`. Each defaults to `true` when
   * the milter has an eom handler. Declared `false` (and with no `header` / `body` handler
   * that needs them anyway), {@link serveMilter} asks the MTA not to send them
   * (SMFIP_NOHDRS / SMFIP_NOBODY), so a filter that only adds a header at end of message
   * costs the MTA almost nothing per message; served that way, the eom handler sees no
   * headers and an empty body. In the gateway's own chain the message is there anyway and
   * nothing changes.
   */
  readonly needs?: { readonly headers?: boolean; readonly body?: boolean };

  /** A client connected (xxfi_connect). Reject/tempfail refuses the session at the greeting. */
  connect?(ctx: SessionContext): Answer<SessionVerdict>;
  /** The client's HELO/EHLO name (xxfi_helo). In the gateway it runs when the client says HELO/EHLO; a refusal is the reply to the next MAIL FROM (see docs). */
  helo?(ctx: SessionContext, hostname: string): Answer<SessionVerdict>;
  /** MAIL FROM (xxfi_envfrom). */
  mail?(ctx: MessageContext, sender: EnvelopeAddress): Answer<MessageVerdict>;
  /** RCPT TO (xxfi_envrcpt). Reject/tempfail refuses this recipient only. */
  rcpt?(ctx: MessageContext, recipient: EnvelopeAddress): Answer<MessageVerdict>;
  /** The DATA command (xxfi_data). In the gateway its verdict is given at the end of DATA. */
  data?(ctx: MessageContext): Answer<MessageVerdict>;
  /** One header (xxfi_header), in order. */
  header?(ctx: ContentContext, header: HeaderField): Answer<MessageVerdict>;
  /** End of headers (xxfi_eoh). */
  eoh?(ctx: ContentContext): Answer<MessageVerdict>;
  /** A body chunk of at most 65 535 bytes (xxfi_body). */
  body?(ctx: ContentContext, chunk: Buffer): Answer<BodyVerdict>;
  /** End of message (xxfi_eom): the only stage that may edit the message. */
  eom?(ctx: EomContext): Answer<EomVerdict>;
  /**
   * The message in progress was abandoned (xxfi_abort): refused at MAIL, DATA or end of
   * message, or left open by the client (RSET, or no DATA) and noticed at the next MAIL FROM
   * or when the session ends.
   */
  abort?(ctx: MessageContext): Promise<void>;
  /** The session ended (xxfi_close). */
  close?(ctx: SessionContext): Promise<void>;
  /** A command the MTA did not recognise (xxfi_unknown); a reject/tempfail is the reply to it instead of the MTA's 500/502. */
  unknown?(ctx: SessionContext, command: string): Answer<MessageVerdict>;
}
