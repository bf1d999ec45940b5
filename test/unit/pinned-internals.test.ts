/**
 * dovetail reaches into two dependencies beyond their documented API, so package.json pins
 * each to one exact version (no caret), and this test fails loudly — naming the files and
 * the internals — when the installed version is any other, or when an internal we use is
 * gone. Before moving a pin: read the new version's source for every line below, then
 * update package.json and PINNED here.
 *
 * smtp-server (3.21.6):
 * - lib/smtp-server/exact-replies.ts imports `SMTPConnection` from the deep path
 *   `smtp-server/lib/smtp-connection.js` and subclasses it (`ExactConnection`), overriding
 *   `send(code, data, context)`; `adoptConnection()` repeats `SMTPServer#connect`: it adds
 *   the connection to the server's `connections` Set, wires its events to the server's
 *   private `_onError` and `_onClientConnect`, and calls `connection.init()`.
 * - lib/smtp/connection.ts (`GatewayConnection extends ExactConnection`) overrides the
 *   private `_isSupported(command)`, `_onCommand(command, callback)`,
 *   `handler_EHLO(command, callback)` and `handler_HELO(command, callback)`, and reads the
 *   private fields `_nextHandler`, `_ready`, `_upgrading`, `_closed`, `_closing`, and
 *   `secure`, `session`.
 * - lib/smtp/gateway.ts (`GatewayServer`) and lib/delivery/lmtp-server.ts (`ExactServer`)
 *   override `SMTPServer#connect(socket, socketOptions)` to build our connection class;
 *   lmtp-server.ts's close() walks `server.connections` and destroys each connection's
 *   private `_socket`, and reads the DATA stream's `sizeExceeded`.
 *
 * mailsplit (5.4.6):
 * - lib/smtp/ingest.ts, lib/delivery/maildir.ts and lib/delivery/dsn.ts import the
 *   `Headers` class from the deep path `mailsplit/lib/headers.js` (not exported by the
 *   package's main module) and call `getList()` / `getFirst()`; its types are ours, in
 *   lib/types/mailsplit.d.ts.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFile } from 'node:fs/promises';
import { createRequire } from 'node:module';
import net from 'node:net';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { SMTPServer } from 'smtp-server';
import { SMTPConnection } from 'smtp-server/lib/smtp-connection.js';
import Headers from 'mailsplit/lib/headers.js';

const repoRoot = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../..');
const require = createRequire(path.join(repoRoot, 'package.json'));

/** The versions whose internals the files below were written against. */
const PINNED = { 'smtp-server': '3.21.6', mailsplit: '5.4.6' } as const;

const INTERNALS: Record<keyof typeof PINNED, string> = {
  'smtp-server':
    'lib/smtp-server/exact-replies.ts (deep import smtp-server/lib/smtp-connection.js; subclass SMTPConnection overriding send(); ' +
    'adoptConnection uses server.connections, server._onError, server._onClientConnect, connection.init()), ' +
    'lib/smtp/connection.ts (overrides _isSupported, _onCommand, handler_EHLO, handler_HELO, and for XCLIENT/XFORWARD _proxyCommandAllowed, handler_XCLIENT, handler_XFORWARD; reads _nextHandler, _ready, _upgrading, _closed, _closing), ' +
    'lib/smtp/gateway.ts and lib/delivery/lmtp-server.ts (override SMTPServer#connect, and for PROXY SMTPServer#_handleProxy and #_expectsProxyHeader; gateway close({ sessions }) closes SMTPServer#server, the net.Server, and polls connections; lmtp-server close() destroys connection._socket, reads stream.sizeExceeded)',
  mailsplit:
    'lib/smtp/ingest.ts, lib/delivery/maildir.ts, lib/delivery/dsn.ts (deep import mailsplit/lib/headers.js: new Headers(block).getList() / getFirst(); types in lib/types/mailsplit.d.ts)',
};

function warning(name: keyof typeof PINNED, found: string): string {
  return (
    `\n\n*** ${name} ${found} is installed, but dovetail uses its internals as of ${name} ${PINNED[name]} ***\n` +
    `Where: ${INTERNALS[name]}.\n` +
    `Read the new version's source for each of these, then update package.json and PINNED in test/unit/pinned-internals.test.ts.\n`
  );
}

test('package.json pins smtp-server and mailsplit to one exact version each', async () => {
  const own = JSON.parse(await readFile(path.join(repoRoot, 'package.json'), 'utf8')) as { dependencies: Record<string, string> };
  for (const name of Object.keys(PINNED) as (keyof typeof PINNED)[]) {
    assert.equal(
      own.dependencies[name],
      PINNED[name],
      `package.json must pin ${name} exactly to ${PINNED[name]} (no ^ or ~): dovetail uses its internals in ${INTERNALS[name]}`,
    );
  }
});

test('the installed smtp-server and mailsplit are the pinned versions', () => {
  for (const name of Object.keys(PINNED) as (keyof typeof PINNED)[]) {
    const installed = (require(`${name}/package.json`) as { version: string }).version;
    assert.equal(installed, PINNED[name], warning(name, installed));
  }
});

test('the smtp-server internals we override or call exist', async () => {
  const where = `smtp-server: ${INTERNALS['smtp-server']}`;
  const conn = SMTPConnection.prototype as unknown as Record<string, unknown>;
  for (const method of ['send', 'init', '_isSupported', '_onCommand', 'handler_EHLO', 'handler_HELO', '_proxyCommandAllowed', 'handler_XCLIENT', 'handler_XFORWARD']) {
    assert.equal(typeof conn[method], 'function', `SMTPConnection#${method} is gone. ${where}`);
  }
  const serverProto = SMTPServer.prototype as unknown as Record<string, unknown>;
  for (const method of ['connect', '_onError', '_onClientConnect', '_handleProxy', '_expectsProxyHeader']) {
    assert.equal(typeof serverProto[method], 'function', `SMTPServer#${method} is gone. ${where}`);
  }
  const server = new SMTPServer({ logger: false });
  assert.ok((server as unknown as { connections: unknown }).connections instanceof Set, `SMTPServer#connections is not a Set. ${where}`);
  // gateway.close({ sessions }) stops accepting on the net.Server alone (smtp-server's close() would answer later commands 421).
  assert.ok((server as unknown as { server: unknown }).server instanceof net.Server, `SMTPServer#server is not a net.Server. ${where}`);

  // The private fields of a connection, on a real loopback socket (init() is not called:
  // nothing is sent).
  const listener = net.createServer();
  await new Promise<void>((resolve) => listener.listen(0, '127.0.0.1', resolve));
  const accepted = new Promise<net.Socket>((resolve) => listener.once('connection', resolve));
  const client = net.connect((listener.address() as net.AddressInfo).port, '127.0.0.1');
  const socket = await accepted;
  try {
    const connection = new SMTPConnection(server, socket, {}) as unknown as Record<string, unknown>;
    for (const field of ['_nextHandler', '_ready', '_upgrading', '_closed', '_closing', 'secure', 'session']) {
      assert.ok(field in connection, `SMTPConnection has no ${field}. ${where}`);
    }
    assert.equal(connection['_socket'], socket, `SMTPConnection#_socket is not the socket. ${where}`);
  } finally {
    client.destroy();
    socket.destroy();
    await new Promise<void>((resolve) => listener.close(() => resolve()));
  }
});

test("mailsplit's Headers (deep import) parses a header block as we use it", () => {
  const where = `mailsplit: ${INTERNALS.mailsplit}`;
  const headers = new Headers(Buffer.from('Subject: hi\r\n there\r\nX-A: 1\r\n\r\n'));
  assert.deepEqual(
    headers.getList().map((h) => [h.key, h.line]),
    [
      ['subject', 'Subject: hi\r\n there'],
      ['x-a', 'X-A: 1'],
    ],
    where,
  );
  assert.equal(headers.getFirst('x-a'), '1', where);
});
