/**
 * The embedded Maildir transport: delivers a message into one maildir per recipient,
 * `<root>/<mailbox>/{tmp,new,cur}`, as qmail's maildir spec (https://cr.yp.to/proto/maildir.html,
 * "How a message is delivered") and Dovecot's deliver/LMTP do it:
 *
 * 1. write the message once into `tmp/` of the first usable recipient's maildir and fsync it
 *    (once per folder when each copy carries its own Delivered-To line, see below);
 * 2. hard-link it into `new/` of every recipient's maildir under its own unique name
 *    (`<sec>.M<usec>P<pid>Q<n>.<host>,S=<size>`, Dovecot's form; S= is the stored size),
 *    copying through that maildir's `tmp/` when a link is not possible (EXDEV, EPERM, EMLINK);
 * 3. fsync each `new/` directory, then report `delivered`;
 * 4. unlink the `tmp/` file, on every path.
 *
 * Recipients whose addresses lead to the same folder (duplicates, a custom mailbox()
 * that maps several addresses to one folder, or `bob+a@` and `bob+b@` with a
 * recipientDelimiter) get one copy and share its result, as Postfix's local(8) drops
 * duplicate deliveries.
 *
 * Each copy starts with `Return-Path: <sender>` and `Delivered-To: <recipient>` (Postfix's
 * local(8)/virtual(8) order), unless turned off. Since the Delivered-To line names one
 * recipient, each folder then gets its own file (written once per folder, not hard-linked
 * across recipients); with `deliveredTo: false` the message is written once and linked into
 * every folder. A message that already carries `Delivered-To: <that recipient>` is a mail
 * forwarding loop: that recipient fails with `554 5.4.6` and nothing is written for it.
 *
 * It deliberately does not: create `root` (a missing root is an unmounted or mistyped
 * store, so it defers instead of writing mail elsewhere), enforce quotas (the file system's
 * ENOSPC/EDQUOT are mapped to 452 4.3.1), write into `cur/` or add `:2,` flags, rewrite line
 * endings (the file holds the message's own CRLF bytes), or run Sieve.
 */
import { constants as fsConstants } from 'node:fs';
import { copyFile, link, mkdir, open, rename, unlink } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { performance } from 'node:perf_hooks';
import type { Readable } from 'node:stream';
import { channels } from '../diagnostics.js';
import { DovetailError, ErrorCodes } from '../errors.js';
import type { EnvelopeAddress } from '../milter/types.js';
import { smtpReply } from '../milter/verdict.js';
import type { SmtpReply } from '../milter/verdict.js';
import type { DeliveryEnvelope, MessageSource, RecipientResult, Transport } from './types.js';
import { syncDir, writeFileDurably } from './durable.js';
import { canonicalDomain, domainOf, domainSet } from './domains.js';
import Headers from 'mailsplit/lib/headers.js';

/** Options of {@link maildir}. */
export interface MaildirOptions {
  /**
   * Directory holding one maildir per recipient: `<root>/<mailbox>/{tmp,new,cur}`. It must
   * exist; the per-recipient maildirs below it are created on demand (mode 0o700).
   */
  root: string;
  /**
   * Folder name for a recipient; default: the lower-cased address (ASCII letters), with
   * every byte outside `[a-z0-9._+=@-]` percent-encoded (`%XX`), and a leading `.` encoded
   * too, so distinct addresses never share a folder and no name escapes root. A returned
   * name that is `''`, `.`, `..`, longer than 255 bytes, or holds `/` or NUL fails that
   * recipient with `550 5.1.3`; a callback that throws defers it (`451 4.3.0`).
   */
  mailbox?: (recipient: EnvelopeAddress) => string;
  /** Prepend `Return-Path: <sender>` (as local delivery agents do). Default true. */
  returnPath?: boolean;
  /** fsync the file and the new/ directory before reporting delivered. Default true (tests may keep it on). */
  fsync?: boolean;
  /** Host name used in unique file names. Default os.hostname(). */
  hostname?: string;
  /**
   * The domains this store holds mail for (`example.com`, `.example.com` for subdomains).
   * A recipient of any other domain fails with `550 5.1.1` and nothing is written for it, so
   * relayed mail never lands in a local folder. Default: every domain (give it whenever the
   * gateway can relay).
   */
  domains?: readonly string[];
  /**
   * Prepend `Delivered-To: <recipient address>` to each recipient's copy (after Return-Path,
   * as Postfix's local(8) and virtual(8) do), and treat a message that already carries a
   * `Delivered-To:` field with that same address (case-insensitive) as a mail forwarding
   * loop: that recipient fails with `554 5.4.6 mail forwarding loop for <address>` and
   * nothing is stored for it. Default true. Give false for a store that holds mail rather
   * than delivering it (a quarantine), so that a released message is not a "loop".
   */
  deliveredTo?: boolean;
  /**
   * Postfix `recipient_delimiter`: the characters that separate an address extension
   * (`bob+tag@example.com`). Each character of the string is a delimiter; the local part is
   * cut at the first one (a local part that starts with one is not cut). With it, the default
   * folder name is that of the address without its extension, so `bob+tag@example.com` is
   * stored in `bob@example.com`'s maildir; the extension stays in the envelope and in the
   * Delivered-To line. A custom `mailbox()` still gets the full address. Default: none.
   */
  recipientDelimiter?: string;
}

const DELIVERY_ERROR = smtpReply(451, '4.3.0', 'Local delivery error');
const NO_STORAGE = smtpReply(452, '4.3.1', 'Insufficient system storage');
const BAD_MAILBOX = smtpReply(550, '5.1.3', 'Bad destination mailbox address syntax');

/** The reply for a recipient of a domain the store does not hold mail for. */
export function notServed(address: string): SmtpReply {
  return smtpReply(550, '5.1.1', `<${address}>: Recipient address rejected: this mailstore does not hold mail for its domain`);
}

/** The reply for a recipient whose address the message already carries in a Delivered-To field. */
export function forwardingLoop(address: string): SmtpReply {
  return smtpReply(554, '5.4.6', `mail forwarding loop for ${headerSafe(address)}`);
}

/**
 * The address without its extension, as Postfix splits it with `recipient_delimiter`: the
 * local part is cut at the first delimiter character that is not its first character.
 * Returns the address unchanged without delimiters or without an extension.
 */
export function withoutExtension(address: string, delimiters: string | undefined): string {
  if (!delimiters) return address;
  const at = address.lastIndexOf('@');
  const local = at < 0 ? address : address.slice(0, at);
  for (let i = 1; i < local.length; i++) {
    if (delimiters.includes(local[i] as string)) return local.slice(0, i) + (at < 0 ? '' : address.slice(at));
  }
  return address;
}

/** Checks a recipientDelimiter option; returns it (undefined when not set). */
export function checkDelimiter(who: string, value: unknown): string | undefined {
  if (value === undefined) return undefined;
  if (typeof value !== 'string' || value === '' || /[@\s"\x00-\x1f\x7f]/.test(value) || value.length > 8) {
    throw new DovetailError(ErrorCodes.INVALID_OPTIONS, `${who}: recipientDelimiter must be a few characters such as '+' (no '@', quotes, spaces or control characters)`);
  }
  return value;
}

/** A test for "this store holds mail for the address's domain" from a `domains` option (undefined: every domain). */
export function servedDomains(who: string, domains: readonly string[] | undefined): (address: string) => boolean {
  if (domains === undefined) return () => true;
  if (!Array.isArray(domains)) throw new DovetailError(ErrorCodes.INVALID_OPTIONS, `${who}: domains must be an array of domain names`);
  let has: (canonical: string) => boolean;
  try {
    has = domainSet(domains);
  } catch (err) {
    throw new DovetailError(ErrorCodes.INVALID_OPTIONS, `${who}: domains: ${(err as Error).message}`);
  }
  return (address) => {
    const d = canonicalDomain(domainOf(address));
    return d !== undefined && has(d);
  };
}

/** Longest single path component on the file systems we run on (NAME_MAX). */
const NAME_MAX = 255;
/** Attempts at a fresh unique name when one is taken (the spec's "try again"). */
const NAME_ATTEMPTS = 3;
/** Longest escaped host part of unique names. */
const MAX_HOST = 128;

/** Folders written at the same time when each gets its own file (Delivered-To). */
const PARALLEL_WRITES = 8;

/** Per-process delivery counter: the `Q` part of unique names. */
let deliveries = 0;

/** A failure of the message source itself (not of the mailstore): defers every recipient. */
class SourceError extends Error {
  constructor(cause: unknown) {
    super('the message stream failed', { cause });
    this.name = 'SourceError';
  }
}

/** One distinct destination folder and the envelope positions that lead to it. */
interface Box {
  readonly dir: string;
  readonly indexes: number[];
  /** The lines written before the message (Return-Path, Delivered-To). */
  readonly prefix: string;
  outcome?: { readonly filename: string } | { readonly error: unknown };
}

/** The written tmp/ file. */
interface Stored {
  readonly path: string;
  readonly size: number;
}

/**
 * Creates a Maildir delivery transport. Each call of `deliver()` writes the message once
 * and hard-links it into `new/` of every recipient's maildir; it answers `delivered`
 * (`250 2.0.0 Ok: stored as <file>`) only after the file and the `new/` directory are
 * fsynced. Per recipient: an unusable mailbox name is `failed` (`550 5.1.3`), a full disk
 * or quota (ENOSPC, EDQUOT) `deferred` (`452 4.3.1`), any other I/O error `deferred`
 * (`451 4.3.0`, the error itself goes to the `dovetail:gateway:error` diagnostics channel
 * as `{ queueId, recipient, error }`). A failing message stream, or one that yields a
 * different number of bytes than `message.size`, defers every recipient.
 *
 * @throws DovetailError `DOVETAIL_ERR_INVALID_OPTIONS` when the options are malformed.
 */
export function maildir(options: MaildirOptions): Transport {
  if (typeof options !== 'object' || options === null) {
    throw new DovetailError(ErrorCodes.INVALID_OPTIONS, 'maildir() needs an options object');
  }
  if (typeof options.root !== 'string' || options.root === '' || options.root.includes('\0')) {
    throw new DovetailError(ErrorCodes.INVALID_OPTIONS, 'maildir(): root must be a non-empty path');
  }
  if (options.mailbox !== undefined && typeof options.mailbox !== 'function') {
    throw new DovetailError(ErrorCodes.INVALID_OPTIONS, 'maildir(): mailbox must be a function');
  }
  if (options.hostname !== undefined && (typeof options.hostname !== 'string' || options.hostname === '')) {
    throw new DovetailError(ErrorCodes.INVALID_OPTIONS, 'maildir(): hostname must be a non-empty string');
  }
  if (options.deliveredTo !== undefined && typeof options.deliveredTo !== 'boolean') {
    throw new DovetailError(ErrorCodes.INVALID_OPTIONS, 'maildir(): deliveredTo must be a boolean');
  }
  const delimiter = checkDelimiter('maildir()', options.recipientDelimiter);
  const root = path.resolve(options.root);
  const mailboxOf =
    options.mailbox ?? (delimiter ? (r: EnvelopeAddress) => defaultMailbox({ address: withoutExtension(r.address, delimiter), args: r.args }) : defaultMailbox);
  const deliveredTo = options.deliveredTo ?? true;
  const serves = servedDomains('maildir()', options.domains);
  const returnPath = options.returnPath ?? true;
  const sync = options.fsync ?? true;
  const host = escapeHost(options.hostname ?? os.hostname());
  if (host.length > MAX_HOST) {
    // Keeps every unique name well under NAME_MAX and every reply line under its limit.
    throw new DovetailError(ErrorCodes.INVALID_OPTIONS, `maildir(): hostname is longer than ${MAX_HOST} bytes once escaped`);
  }

  /** Maildirs known to exist, by path; a pending entry is a creation in flight. */
  const known = new Map<string, Promise<void>>();

  function ensure(dir: string): Promise<void> {
    let p = known.get(dir);
    if (!p) {
      p = createMaildir(dir);
      known.set(dir, p);
      // A failed creation is not cached: the next delivery tries again.
      p.catch(() => {
        if (known.get(dir) === p) known.delete(dir);
      });
    }
    return p;
  }

  /** Runs `op`; when it fails with ENOENT (the maildir was removed), recreates the maildir and runs it once more. */
  async function recovering<T>(dir: string, op: () => Promise<T>): Promise<T> {
    try {
      return await op();
    } catch (err) {
      if (errno(err) !== 'ENOENT') throw err;
      known.delete(dir);
      await ensure(dir);
      return await op();
    }
  }

  async function deliver(envelope: DeliveryEnvelope, message: MessageSource): Promise<RecipientResult[]> {
    const recipients = envelope.recipients;
    const results: (RecipientResult | undefined)[] = new Array<RecipientResult | undefined>(recipients.length);
    const report = (i: number, error: unknown): void => {
      const recipient = recipients[i]?.address ?? '';
      channels.error.publish({ queueId: envelope.queueId, recipient, error });
      results[i] = { recipient, status: 'deferred', reply: replyFor(error) };
    };

    // 0. The addresses this message was already delivered to (its Delivered-To fields).
    let delivered: Set<string> | undefined;
    if (deliveredTo) {
      try {
        delivered = await deliveredToAddresses(message);
      } catch (error) {
        recipients.forEach((_r, i) => report(i, error));
        return Array.from(recipients, (rcpt, i) => results[i] ?? { recipient: rcpt.address, status: 'deferred', reply: DELIVERY_ERROR });
      }
    }
    const returnLine = returnPath ? `Return-Path: <${headerSafe(envelope.sender.address)}>\r\n` : '';

    // 1. Folder per recipient; one Box per distinct folder, in order of first appearance.
    const boxes = new Map<string, Box>();
    recipients.forEach((rcpt, i) => {
      if (!serves(rcpt.address)) {
        results[i] = { recipient: rcpt.address, status: 'failed', reply: notServed(rcpt.address) };
        return;
      }
      if (delivered?.has(rcpt.address.toLowerCase())) {
        results[i] = { recipient: rcpt.address, status: 'failed', reply: forwardingLoop(rcpt.address) };
        return;
      }
      let name: unknown;
      try {
        name = mailboxOf(rcpt);
      } catch (err) {
        report(i, err);
        return;
      }
      if (typeof name !== 'string') {
        report(i, new DovetailError(ErrorCodes.INVALID_OPTIONS, 'maildir(): mailbox() did not return a string'));
        return;
      }
      if (!usableName(name)) {
        results[i] = { recipient: rcpt.address, status: 'failed', reply: BAD_MAILBOX };
        return;
      }
      const dir = path.join(root, name);
      const box = boxes.get(dir);
      if (box) box.indexes.push(i);
      else boxes.set(dir, { dir, indexes: [i], prefix: returnLine + (deliveredTo ? `Delivered-To: ${headerSafe(rcpt.address)}\r\n` : '') });
    });
    const all = [...boxes.values()];

    // 2. Every maildir exists.
    await Promise.all(
      all.map(async (box) => {
        try {
          await ensure(box.dir);
        } catch (error) {
          box.outcome = { error };
        }
      }),
    );

    // 3. Per distinct prefix (one per folder with Delivered-To, one in all without): write
    //    the message once, into tmp/ of the first maildir of that group that takes it.
    const groups = new Map<string, Box[]>();
    for (const box of all) {
      if (box.outcome) continue;
      const g = groups.get(box.prefix);
      if (g) g.push(box);
      else groups.set(box.prefix, [box]);
    }
    const queue = [...groups];
    const worker = async (): Promise<void> => {
      for (let next = queue.shift(); next; next = queue.shift()) await storeGroup(next[0], next[1], message);
    };
    await Promise.all(Array.from({ length: Math.min(PARALLEL_WRITES, queue.length) }, worker));

    // 4. One result per recipient, from its folder's outcome.
    for (const box of all) {
      const outcome = box.outcome ?? { error: new DovetailError(ErrorCodes.DELIVERY_FAILED, 'maildir: not delivered') };
      for (const i of box.indexes) {
        if ('filename' in outcome) {
          results[i] = {
            recipient: recipients[i]?.address ?? '',
            status: 'delivered',
            reply: smtpReply(250, '2.0.0', `Ok: stored as ${outcome.filename}`),
          };
        } else {
          report(i, outcome.error);
        }
      }
    }
    return Array.from(recipients, (rcpt, i) => results[i] ?? { recipient: rcpt.address, status: 'deferred', reply: DELIVERY_ERROR });
  }

  /**
   * Writes the message once (with `prefix` before it) into tmp/ of the first maildir of the
   * group that takes it, links it into new/ of every maildir of the group, fsyncs each new/,
   * then drops the tmp/ file. Sets every box's outcome.
   */
  async function storeGroup(prefix: string, group: readonly Box[], message: MessageSource): Promise<void> {
    let stored: Stored | undefined;
    for (const box of group) {
      if (box.outcome) continue;
      try {
        stored = await recovering(box.dir, () => writeTmp(box.dir, prefix, message));
        break;
      } catch (error) {
        if (error instanceof SourceError) {
          for (const b of group) if (!b.outcome) b.outcome = { error };
          break;
        }
        // This maildir cannot take the file (its disk is full, its tmp/ is unwritable …):
        // its recipients are deferred, the next maildir may still take it.
        box.outcome = { error };
      }
    }
    if (!stored) return;
    const file = stored;
    try {
      await Promise.all(
        group.map(async (box) => {
          if (box.outcome) return;
          try {
            box.outcome = { filename: await recovering(box.dir, () => place(box.dir, file)) };
          } catch (error) {
            box.outcome = { error };
          }
        }),
      );
    } finally {
      await unlink(file.path).catch(() => {});
    }
  }

  /** Streams the message (after `prefix`: the Return-Path and Delivered-To lines) into a new file in `<dir>/tmp/`, fsynced and closed. */
  async function writeTmp(dir: string, prefix: string, message: MessageSource): Promise<Stored> {
    const file = path.join(dir, 'tmp', uniqueName(host));
    async function* chunks(): AsyncGenerator<Buffer> {
      if (prefix) yield Buffer.from(prefix, 'utf8');
      let body = 0;
      for await (const chunk of source(message)) {
        body += chunk.length;
        yield chunk;
      }
      if (body !== message.size) {
        throw new SourceError(
          new DovetailError(ErrorCodes.DELIVERY_FAILED, `the message stream gave ${body} bytes, not the announced ${message.size}`),
        );
      }
    }
    const size = await writeFileDurably(file, chunks(), { sync });
    return { path: file, size };
  }

  /** Puts the stored file into `<dir>/new/` under a fresh unique name and makes that durable; returns the name. */
  async function place(dir: string, stored: Stored): Promise<string> {
    for (let attempt = 1; ; attempt++) {
      const name = uniqueName(host, stored.size);
      const target = path.join(dir, 'new', name);
      try {
        await link(stored.path, target);
      } catch (err) {
        const code = errno(err);
        if (code === 'EEXIST' && attempt < NAME_ATTEMPTS) continue;
        if (code !== 'EXDEV' && code !== 'EPERM' && code !== 'EMLINK') throw err;
        await copyInto(dir, stored.path, name);
      }
      if (sync) {
        try {
          await syncDir(path.join(dir, 'new'));
        } catch (err) {
          // Not durable, so not delivered: take it back so a retry does not make a duplicate.
          await unlink(target).catch(() => {});
          throw err;
        }
      }
      return name;
    }
  }

  /** The link fallback: copies into `<dir>/tmp/<name>`, fsyncs, and renames it into `<dir>/new/<name>`. */
  async function copyInto(dir: string, from: string, name: string): Promise<void> {
    const tmp = path.join(dir, 'tmp', name);
    try {
      await copyFile(from, tmp, fsConstants.COPYFILE_EXCL);
      if (sync) {
        const fh = await open(tmp, 'r');
        try {
          await fh.sync();
        } finally {
          await fh.close();
        }
      }
      await rename(tmp, path.join(dir, 'new', name));
    } catch (err) {
      await unlink(tmp).catch(() => {});
      throw err;
    }
  }

  return Object.freeze({ name: 'maildir', deliver });
}

/**
 * The default folder name: the address with ASCII letters lower-cased, every byte outside
 * `[a-z0-9._+=@-]` (of its UTF-8 form) written as `%XX`, and a leading `.` as `%2E`.
 * Injective on lower-cased addresses, and never `''` for a non-empty address, `.`, `..`,
 * or a name with `/` or NUL.
 */
export function defaultMailbox(recipient: EnvelopeAddress): string {
  const bytes = Buffer.from(recipient.address.replace(/[A-Z]/g, (c) => c.toLowerCase()), 'utf8');
  let out = '';
  for (let i = 0; i < bytes.length; i++) {
    const b = bytes[i] ?? 0;
    const plain =
      (b >= 0x61 && b <= 0x7a) || // a-z
      (b >= 0x30 && b <= 0x39) || // 0-9
      b === 0x2b || // +
      b === 0x2d || // -
      b === 0x3d || // =
      b === 0x40 || // @
      b === 0x5f || // _
      (b === 0x2e && i > 0); // . (not leading)
    out += plain ? String.fromCharCode(b) : '%' + b.toString(16).toUpperCase().padStart(2, '0');
  }
  return out;
}

function usableName(name: string): boolean {
  return (
    name !== '' &&
    name !== '.' &&
    name !== '..' &&
    !name.includes('/') &&
    !name.includes('\0') &&
    Buffer.byteLength(name) <= NAME_MAX
  );
}

/** `<sec>.M<usec>P<pid>Q<n>.<host>`, plus `,S=<size>` when the size is known. */
function uniqueName(host: string, size?: number): string {
  const now = performance.timeOrigin + performance.now(); // milliseconds, sub-millisecond precision
  const sec = Math.floor(now / 1000);
  const usec = Math.min(999_999, Math.max(0, Math.floor((now - sec * 1000) * 1000)));
  deliveries += 1;
  // Zero-padded microseconds, so names of one second sort in time order.
  const base = `${sec}.M${String(usec).padStart(6, '0')}P${process.pid}Q${deliveries}.${host}`;
  return size === undefined ? base : `${base},S=${size}`;
}

/**
 * The host part of unique names: `/` becomes `\057` and `:` `\072` (as the spec says);
 * control characters, `,`, `\` and non-ASCII are escaped the same way, so the name stays one
 * printable path component that Dovecot's `,S=` parsing and an SMTP reply line both accept.
 */
function escapeHost(hostname: string): string {
  let out = '';
  for (const b of Buffer.from(hostname, 'utf8')) {
    const escape = b < 0x21 || b > 0x7e || b === 0x2f || b === 0x3a || b === 0x2c || b === 0x5c;
    out += escape ? '\\' + b.toString(8).padStart(3, '0') : String.fromCharCode(b);
  }
  return out;
}

/** The sender as it may stand in a header: no control characters (no header injection through CR/LF). */
function headerSafe(address: string): string {
  // eslint-disable-next-line no-control-regex
  return address.replace(/[\x00-\x1f\x7f]/g, '');
}

/** The message's chunks as Buffers; any failure of the source becomes a SourceError. */
async function* source(message: MessageSource): AsyncGenerator<Buffer> {
  let stream: Readable;
  try {
    stream = message.stream();
  } catch (err) {
    throw new SourceError(err);
  }
  try {
    for await (const chunk of stream as AsyncIterable<unknown>) {
      if (typeof chunk === 'string') yield Buffer.from(chunk, 'utf8');
      else if (chunk instanceof Uint8Array) yield Buffer.isBuffer(chunk) ? chunk : Buffer.from(chunk.buffer, chunk.byteOffset, chunk.byteLength);
      else throw new TypeError('the message stream yielded something that is not bytes');
    }
  } catch (err) {
    throw new SourceError(err);
  } finally {
    stream.destroy();
  }
}


/** The most of the message read to find its header block for the loop check. */
const MAX_HEAD_BYTES = 1024 * 1024;

/**
 * The addresses of the message's `Delivered-To:` fields, lower-cased, without angle
 * brackets. Reads the header block only (at most MAX_HEAD_BYTES); parsed with mailsplit.
 */
async function deliveredToAddresses(message: MessageSource): Promise<Set<string>> {
  const parts: Buffer[] = [];
  let length = 0;
  let end = -1;
  for await (const chunk of source(message)) {
    parts.push(chunk);
    const from = Math.max(0, length - 3);
    length += chunk.length;
    const head = parts.length === 1 ? chunk : Buffer.concat(parts);
    if (parts.length > 1) parts.splice(0, parts.length, head);
    if (head.subarray(0, 2).toString('latin1') === '\r\n') {
      end = 0;
      break;
    }
    const at = head.indexOf('\r\n\r\n', from);
    if (at >= 0) {
      end = at + 2;
      break;
    }
    if (length >= MAX_HEAD_BYTES) break;
  }
  const head = parts[0] ?? Buffer.alloc(0);
  const block = end >= 0 ? head.subarray(0, end) : head.subarray(0, Math.max(0, head.lastIndexOf('\r\n') + 2));
  const out = new Set<string>();
  if (block.length === 0) return out;
  for (const field of new Headers(block).getList()) {
    if (field.key !== 'delivered-to') continue;
    const line = Buffer.from(field.line, 'latin1').toString('utf8');
    let value = line.slice(line.indexOf(':') + 1).replace(/\r?\n/g, '').trim();
    if (value.startsWith('<') && value.endsWith('>')) value = value.slice(1, -1).trim();
    if (value) out.add(value.toLowerCase());
  }
  return out;
}

async function createMaildir(dir: string): Promise<void> {
  // Not recursive: root must exist (see the header).
  await mkdirOnce(dir);
  await Promise.all(['tmp', 'new', 'cur'].map((sub) => mkdirOnce(path.join(dir, sub))));
}

async function mkdirOnce(dir: string): Promise<void> {
  try {
    await mkdir(dir, { mode: 0o700 });
  } catch (err) {
    if (errno(err) !== 'EEXIST') throw err;
  }
}


function errno(err: unknown): string | undefined {
  if (typeof err !== 'object' || err === null) return undefined;
  const code = (err as { code?: unknown }).code;
  return typeof code === 'string' ? code : undefined;
}

function replyFor(err: unknown): SmtpReply {
  const code = err instanceof SourceError ? undefined : errno(err);
  return code === 'ENOSPC' || code === 'EDQUOT' ? NO_STORAGE : DELIVERY_ERROR;
}
