/**
 * Seeing a milter's end-of-message edits: each milter with an `eom` handler is put in the
 * chain behind a Proxy that is the milter itself in every respect (name, defaultAction,
 * timeouts, limits, the same handlers, called with the milter as `this`) except that its
 * eom context's editors note each edit after the chain's own recorder (EditRecorder,
 * lib/milter/message.ts) has taken it. The chain still records, checks and applies the
 * edits itself; the notes only say what was asked, and the session keeps a milter's notes
 * only when the chain applied its edits (no failure at eom, no reject/tempfail/discard).
 * A remote filter behind connectMilter() makes its SMFIR_* edits through the same
 * editors, so its edits are seen the same way.
 *
 * Does not: change what the milter sees or does, or read a replacement body given as a
 * stream (the chain reads it; the session reports the body the chain ended up with).
 */
import type { Readable } from 'node:stream';
import { checkAddress, parseEsmtpArgs, type MessageEdit } from '../milter/message.js';
import type { EnvelopeAddress, EomContext, Milter } from '../milter/types.js';

/** One edit with the milter that made it. */
export interface RecordedEdit {
  readonly milter: string;
  readonly edit: MessageEdit;
}

/** Where a recording milter puts the edits of one eom call. */
export type EditSink = (milter: string, edit: MessageEdit) => void;

/**
 * The milter, unchanged to the chain, whose eom edits also go to `sink`. A milter without
 * an eom handler is returned as it is.
 */
export function recordingMilter(milter: Milter, sink: () => EditSink | undefined): Milter {
  const eom = milter.eom;
  if (typeof eom !== 'function') return milter;
  const wrapped: NonNullable<Milter['eom']> = function (this: unknown, ctx: EomContext) {
    const to = sink();
    if (to) record(ctx, (edit) => to(milter.name, edit));
    return eom.call(milter, ctx);
  };
  // Every handler is called with the milter itself as `this` (a class instance with
  // #private fields must not see the proxy); bound once, so each key keeps one identity.
  const bound = new Map<PropertyKey, unknown>();
  return new Proxy(milter, {
    get(target, key) {
      if (key === 'eom') return wrapped;
      const value = Reflect.get(target, key, target) as unknown;
      if (typeof value !== 'function') return value;
      let b = bound.get(key);
      if (b === undefined || (b as { original?: unknown }).original !== value) {
        b = Object.assign((value as (...args: unknown[]) => unknown).bind(target), { original: value });
        bound.set(key, b);
      }
      return b;
    },
  });
}

/** Replaces the eom context's editors (in place: the context object is the chain's, made for this call) with noting ones. */
function record(ctx: EomContext, note: (e: MessageEdit) => void): void {
  const m = ctx.message;
  const env = ctx.envelope;
  const quarantine = ctx.quarantine;
  const message: EomContext['message'] = {
    headers: m.headers,
    get size() {
      return m.size;
    },
    stream: () => m.stream(),
    body: () => m.body(),
    addHeader(name, value) {
      m.addHeader(name, value);
      note({ op: 'addHeader', name, value });
    },
    insertHeader(position, name, value) {
      m.insertHeader(position, name, value);
      note({ op: 'insertHeader', position, name, value });
    },
    changeHeader(name, index, value) {
      m.changeHeader(name, index, value);
      note({ op: 'changeHeader', name, index, value });
    },
    deleteHeader(name, index) {
      m.deleteHeader(name, index);
      note({ op: 'changeHeader', name, index, value: '' });
    },
    replaceBody(body: string | Buffer | Readable) {
      m.replaceBody(body);
      note({ op: 'replaceBody', data: typeof body === 'string' ? Buffer.from(body, 'utf8') : body });
    },
  };
  const envelope: EomContext['envelope'] = {
    sender: env.sender,
    recipients: env.recipients,
    changeSender(address, args) {
      env.changeSender(address, args);
      note({ op: 'changeSender', address: checkAddress(address, true), args: parseEsmtpArgs(args) });
    },
    addRecipient(address, args) {
      env.addRecipient(address, args);
      note({ op: 'addRecipient', address: checkAddress(address, false), args: parseEsmtpArgs(args) });
    },
    removeRecipient(address) {
      env.removeRecipient(address);
      note({ op: 'removeRecipient', address: checkAddress(address, false) });
    },
  };
  Object.assign(ctx, {
    message,
    envelope,
    quarantine(reason: string) {
      quarantine(reason);
      note({ op: 'quarantine', reason: String(reason).replace(/[\r\n]+/g, ' ').trim() });
    },
  });
}

/** A header added at the end of the header block (SMFIR_ADDHEADER). */
export interface AddedHeader {
  readonly name: string;
  readonly value: string;
}
/** A header inserted at a 1-based position (SMFIR_INSHEADER). */
export interface InsertedHeader {
  readonly position: number;
  readonly name: string;
  readonly value: string;
}
/** The `index`-th (1-based) header of that name changed (SMFIR_CHGHEADER). */
export interface ChangedHeader {
  readonly name: string;
  readonly index: number;
  readonly value: string;
}
/** The `index`-th (1-based) header of that name deleted (SMFIR_CHGHEADER with an empty value). */
export interface DeletedHeader {
  readonly name: string;
  readonly index: number;
}

/**
 * The edits the chain applied to one message, by kind, in the order they were made (over
 * the whole chain: each milter's in chain order). Only edits that were applied are here: a
 * milter that failed at eom, or answered reject, tempfail or discard there, has none.
 */
export interface EditSummary {
  /** `addHeader` calls. */
  readonly headersAdded: readonly AddedHeader[];
  /** `insertHeader` calls. */
  readonly headersInserted: readonly InsertedHeader[];
  /** `changeHeader` calls with a value. */
  readonly headersChanged: readonly ChangedHeader[];
  /** `deleteHeader` calls (and `changeHeader` with an empty value). */
  readonly headersDeleted: readonly DeletedHeader[];
  /**
   * The body after the content pass, when a milter replaced it (CRLF line endings, as the
   * chain stores it); undefined when no milter replaced the body.
   */
  readonly body: Buffer | undefined;
  /** The last `changeSender`, if any. */
  readonly sender: EnvelopeAddress | undefined;
  /** `addRecipient` calls. */
  readonly recipientsAdded: readonly EnvelopeAddress[];
  /** `removeRecipient` calls (the addresses as given, brackets stripped). */
  readonly recipientsRemoved: readonly string[];
  /** The quarantine reason set at eom (`quarantine()` verdict or `ctx.quarantine()`), the last one winning. */
  readonly quarantine: string | undefined;
  /**
   * Every applied edit, in order, with the milter that made it. A `replaceBody` edit's
   * `data` may be a stream the chain has already read (a remote filter's SMFIR_REPLBODY
   * always is): read {@link EditSummary.body} for the body.
   */
  readonly all: readonly RecordedEdit[];
}

/** Sorts recorded edits into an {@link EditSummary}. */
export function summarizeEdits(all: readonly RecordedEdit[], body: Buffer | undefined): EditSummary {
  const headersAdded: AddedHeader[] = [];
  const headersInserted: InsertedHeader[] = [];
  const headersChanged: ChangedHeader[] = [];
  const headersDeleted: DeletedHeader[] = [];
  const recipientsAdded: EnvelopeAddress[] = [];
  const recipientsRemoved: string[] = [];
  let sender: EnvelopeAddress | undefined;
  let quarantine: string | undefined;
  let replaced = false;
  for (const { edit: e } of all) {
    switch (e.op) {
      case 'addHeader':
        headersAdded.push({ name: e.name, value: e.value });
        break;
      case 'insertHeader':
        headersInserted.push({ position: e.position, name: e.name, value: e.value });
        break;
      case 'changeHeader':
        if (e.value === '') headersDeleted.push({ name: e.name, index: e.index });
        else headersChanged.push({ name: e.name, index: e.index, value: e.value });
        break;
      case 'changeSender':
        sender = { address: e.address, args: e.args };
        break;
      case 'addRecipient':
        recipientsAdded.push({ address: e.address, args: e.args });
        break;
      case 'removeRecipient':
        recipientsRemoved.push(e.address);
        break;
      case 'replaceBody':
        replaced = true;
        break;
      case 'quarantine':
        quarantine = e.reason;
        break;
    }
  }
  return {
    headersAdded,
    headersInserted,
    headersChanged,
    headersDeleted,
    body: replaced ? body : undefined,
    sender,
    recipientsAdded,
    recipientsRemoved,
    quarantine,
    all,
  };
}
