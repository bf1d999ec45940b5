/**
 * Milter socket specs in Postfix's spelling (`inet:host:port`, `unix:/path`) and Sendmail's
 * (`inet:port@host`, `inet6:port@host`, `local:/path`), turned into node:net options.
 *
 * Does not: resolve host names (node:net does), or open anything.
 */
import { DovetailError, ErrorCodes } from '../../errors.js';

/** A parsed socket spec. `host` undefined (for `inet:port`) means all interfaces when listening, loopback when connecting. */
export type SocketSpec =
  | { readonly kind: 'inet'; readonly host: string | undefined; readonly port: number }
  | { readonly kind: 'unix'; readonly path: string };

function port(text: string, spec: string): number {
  const n = /^\d{1,5}$/.test(text) ? Number(text) : NaN;
  if (!(n >= 0 && n <= 65535)) throw new DovetailError(ErrorCodes.INVALID_OPTIONS, `bad port in milter socket spec ${JSON.stringify(spec)}`);
  return n;
}

/** Parses `inet:host:port`, `inet:[v6]:port`, `inet:port@host`, `inet6:port@host`, `inet:port`, `unix:/path`, `local:/path`. */
export function parseSocketSpec(spec: string): SocketSpec {
  const bad = (): never => {
    throw new DovetailError(ErrorCodes.INVALID_OPTIONS, `bad milter socket spec ${JSON.stringify(spec)} (want inet:host:port, inet:port@host or unix:/path)`);
  };
  if (typeof spec !== 'string') bad();
  const colon = spec.indexOf(':');
  if (colon < 0) bad();
  const scheme = spec.slice(0, colon).toLowerCase();
  const rest = spec.slice(colon + 1);
  if (scheme === 'unix' || scheme === 'local') {
    if (!rest || rest.includes('\0')) bad();
    return { kind: 'unix', path: rest };
  }
  if (scheme !== 'inet' && scheme !== 'inet6') bad();
  const at = rest.indexOf('@');
  if (at >= 0) {
    const host = rest.slice(at + 1).replace(/^\[(.*)\]$/, '$1');
    if (!host) bad();
    return { kind: 'inet', host, port: port(rest.slice(0, at), spec) };
  }
  const v6 = /^\[([^\]]+)\]:(\d+)$/.exec(rest);
  if (v6) return { kind: 'inet', host: v6[1], port: port(v6[2] as string, spec) };
  const last = rest.lastIndexOf(':');
  if (last < 0) return { kind: 'inet', host: undefined, port: port(rest, spec) };
  const host = rest.slice(0, last);
  if (!host || host.includes(':')) bad();
  return { kind: 'inet', host, port: port(rest.slice(last + 1), spec) };
}

/** node:net connect options for a spec (an `inet:port` spec connects to 127.0.0.1). */
export function connectOptions(spec: SocketSpec): { host: string; port: number } | { path: string } {
  return spec.kind === 'unix' ? { path: spec.path } : { host: spec.host ?? '127.0.0.1', port: spec.port };
}

/** node:net listen options for a spec (an `inet:port` spec listens on every interface). */
export function listenOptions(spec: SocketSpec): { host?: string; port: number } | { path: string } {
  if (spec.kind === 'unix') return { path: spec.path };
  return spec.host === undefined ? { port: spec.port } : { host: spec.host, port: spec.port };
}
