/**
 * Exact SMTP replies through smtp-server. Its callbacks take an Error and format the reply
 * themselves: one line, and an enhanced status code derived from the reply code rather
 * than the one we mean (a relay refusal would go out as 5.1.1). An error made by
 * {@link replyError} carries the whole reply in its message behind a marker; the
 * connection class below sends such a reply as it is, every line with our enhanced code,
 * and leaves every other reply to smtp-server.
 *
 * Shared by the gateway and the embedded LMTP store. Does not: change any reply that does
 * not carry the marker.
 */
import type { SMTPServer } from 'smtp-server';
import { SMTPConnection } from 'smtp-server/lib/smtp-connection.js';
import { formatReply, type SmtpReply } from '../milter/verdict.js';

const MARK = '\u0001dovetail-reply:';

/** An Error for an smtp-server callback that makes the client see exactly `reply`. */
export function replyError(reply: SmtpReply): Error & { responseCode: number; reply: SmtpReply } {
  return Object.assign(new Error(MARK + formatReply(reply)), { responseCode: reply.code, reply });
}

/** True for an Error made by {@link replyError} (a deliberate reply, not a failure). */
export function isReplyError(err: unknown): err is Error & { responseCode: number; reply: SmtpReply } {
  return err instanceof Error && err.message.startsWith(MARK);
}

/** The wire text of a marked reply, for sending one outside a callback. */
export function markedReply(reply: SmtpReply): string {
  return MARK + formatReply(reply);
}

/** An SMTPConnection that sends marked replies exactly. */
export class ExactConnection extends SMTPConnection {
  /** True while this connection's socket is corked until the end of the event-loop turn. */
  private corked = false;

  override send(code: number, data?: string | string[] | null, context?: string | false): void {
    // Replies made in one turn of the event loop (a pipelined MAIL, RCPT… DATA whose
    // handlers answer at once) go out in one socket write instead of one each: each write
    // is a syscall, and they were the largest single cost in the gateway's profile.
    // Not for 220 (the greeting, and STARTTLS's "ready", after which the socket is
    // wrapped in TLS: nothing may wait in the plain socket then). A close() after a reply
    // ends the socket, which flushes it.
    const socket = (this as unknown as { _socket?: import('node:net').Socket })._socket;
    if (code !== 220 && !this.corked && socket && !socket.destroyed && socket.writable && !(this as unknown as { _upgrading?: boolean })._upgrading) {
      this.corked = true;
      socket.cork();
      setImmediate(() => {
        this.corked = false;
        if (!socket.destroyed) socket.uncork();
      });
    }
    if (typeof data === 'string' && data.startsWith(MARK)) {
      // "550-5.7.1 text" lines: drop the code and separator, smtp-server puts them back.
      const lines = data.slice(MARK.length).split('\r\n').map((l) => l.slice(4));
      super.send(code, lines.length === 1 ? (lines[0] as string) : lines, false);
      return;
    }
    super.send(code, data, context);
  }
}

/**
 * What SMTPServer.connect() does, with a connection of our own class: register it, wire its
 * events to the server (smtp-server's private handlers), and start it.
 */
export function adoptConnection(server: SMTPServer, connection: SMTPConnection): void {
  const s = server as unknown as { _onError(e: Error): void; _onClientConnect(d: unknown): void };
  server.connections.add(connection);
  connection.on('error', (err: Error) => s._onError(err));
  connection.on('connect', (data: unknown) => s._onClientConnect(data));
  connection.init();
}

/** The socket options smtp-server passes to connect(). */
export type ConnectionOptions = ConstructorParameters<typeof SMTPConnection>[2];
