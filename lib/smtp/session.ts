/**
 * What the gateway knows of an SMTP session, as milters see it: the session facts (client,
 * server, HELO, TLS, AUTH) and the Postfix/Sendmail macros built from smtp-server's session,
 * and the small conversions between smtp-server's shapes and ours.
 */
import net from 'node:net';
import type tls from 'node:tls';
import type { SMTPServerAddress, SMTPServerSession } from 'smtp-server';
import type { SessionFacts } from '../milter/chain.js';
import type { AddressFamily, EnvelopeAddress, TlsInfo } from '../milter/types.js';

/** Macros that belong to one message and are cleared at each MAIL FROM. */
export const MESSAGE_MACROS = ['i', '{mail_addr}', '{mail_host}', '{mail_mailer}', '{rcpt_addr}', '{rcpt_host}', '{rcpt_mailer}', '{auth_type}', '{auth_authen}'];

function family(address: string): AddressFamily {
  if (net.isIPv4(address)) return 'ipv4';
  if (net.isIPv6(address)) return 'ipv6';
  return 'unknown';
}

export function toEnvelopeAddress(a: SMTPServerAddress): EnvelopeAddress {
  const args: Record<string, string | true> = {};
  if (a.args) for (const [k, v] of Object.entries(a.args)) args[k.toUpperCase()] = v === true ? true : String(v);
  return { address: a.address, args };
}

/** Key bits of a cipher by its name (the gateway's TLS facts, and a proxy's SSL TLVs). */
export function cipherBits(name: string): number {
  if (/CHACHA20|AES_?256|AES256/i.test(name)) return 256;
  if (/AES_?128|AES128/i.test(name)) return 128;
  return 0;
}

export function utf8Protocol(protocol: string, sender: EnvelopeAddress): string {
  return sender.args['SMTPUTF8'] ? protocol.replace(/^E?SMTP/, 'UTF8SMTP') : protocol;
}


/** The negotiated TLS facts of a socket (undefined before the handshake). */
export function tlsInfo(socket: tls.TLSSocket): TlsInfo | undefined {
  const c = socket.getCipher?.();
  if (!c) return undefined;
  return { version: socket.getProtocol() ?? c.version, cipher: c.standardName || c.name, bits: cipherBits(c.standardName || c.name) };
}

/** The facts and connect-time macros of a new session. */
export function sessionFacts(session: SMTPServerSession, hostname: string, listener: string): SessionFacts {
  const address = session.remoteAddress;
  const named = !!session.clientHostname && !session.clientHostname.startsWith('[');
  return {
    sessionId: session.id,
    client: { address, port: session.remotePort, hostname: session.clientHostname || `[${address}]`, family: family(address) },
    server: { hostname, name: listener, address: session.localAddress, port: session.localPort },
    helo: undefined,
    tls: undefined,
    auth: undefined,
    macros: {
      j: hostname,
      '{daemon_name}': listener,
      '{daemon_addr}': session.localAddress,
      '{daemon_port}': String(session.localPort),
      v: 'dovetail',
      _: `${named ? session.clientHostname : 'unknown'} [${address}]`,
      '{client_addr}': address,
      '{client_port}': String(session.remotePort),
      '{client_name}': named ? session.clientHostname : 'unknown',
      '{client_ptr}': named ? session.clientHostname : 'unknown',
    },
  };
}
