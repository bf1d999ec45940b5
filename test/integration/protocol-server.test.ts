/**
 * serveMilter() at the codec level: raw milter sessions over real loopback sockets, built
 * with the codec's encoders (MTA side) and decoded with its decoders. Negotiation for
 * milters with different stage sets, every stage and edit on the wire, ABORT reuse,
 * QUIT_NC reset, default actions, hostile frames, many connections, close() draining.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import net from 'node:net';
import { Readable } from 'node:stream';
import { defineMilter, reject, tempfail, accept, discard, skip, type Milter } from '../../lib/index.js';
import { FrameDecoder, encodeCommand, decodeReply, SMFIF, SMFIF_ALL, SMFIP, SMFIP_CURR_PROT, SMFIM, type MilterCommand, type MilterReply, type OptNeg } from '../../lib/milter/protocol/index.js';
import { negotiate, serveMilter, type MilterServer, type ServeMilterOptions } from '../../lib/milter/protocol/server.js';
import { frame, u32 } from '../helpers/milter-frames.js';

/** The MTA side of one milter connection. */
class Mta {
  private readonly decoder = new FrameDecoder({ maxDataSize: 1 << 20 });
  private readonly replies: MilterReply[] = [];
  private waiters: (() => void)[] = [];
  closed = false;
  private constructor(readonly socket: net.Socket) {
    socket.on('data', (chunk: Buffer) => {
      for (const f of this.decoder.push(chunk)) this.replies.push(decodeReply(f));
      this.wake();
    });
    socket.on('close', () => {
      this.closed = true;
      this.wake();
    });
    socket.on('error', () => undefined);
  }
  private wake(): void {
    const w = this.waiters;
    this.waiters = [];
    for (const f of w) f();
  }
  static async connect(port: number): Promise<Mta> {
    const socket = net.connect(port, '127.0.0.1');
    await new Promise<void>((resolve, reject) => {
      socket.once('connect', resolve);
      socket.once('error', reject);
    });
    return new Mta(socket);
  }
  send(...cmds: MilterCommand[]): void {
    for (const c of cmds) this.socket.write(encodeCommand(c));
  }
  raw(buf: Buffer): void {
    this.socket.write(buf);
  }
  async next(ms = 5000): Promise<MilterReply> {
    const deadline = Date.now() + ms;
    while (this.replies.length === 0) {
      if (this.closed) throw new Error('connection closed, no reply');
      const left = deadline - Date.now();
      if (left <= 0) throw new Error(`no reply within ${ms} ms`);
      await new Promise<void>((resolve) => {
        const t = setTimeout(resolve, left);
        this.waiters.push(() => {
          clearTimeout(t);
          resolve();
        });
      });
    }
    return this.replies.shift() as MilterReply;
  }
  /** Replies up to and including the first final one (not an edit, not progress). */
  async untilFinal(ms = 5000): Promise<MilterReply[]> {
    const out: MilterReply[] = [];
    for (;;) {
      const r = await this.next(ms);
      out.push(r);
      if (['continue', 'accept', 'reject', 'tempfail', 'discard', 'replyCode', 'skip'].includes(r.type)) return out;
    }
  }
  async none(ms = 200): Promise<void> {
    await new Promise((r) => setTimeout(r, ms));
    assert.deepEqual(this.replies, [], 'expected no reply');
  }
  async optneg(version = 6, actions = SMFIF_ALL, protocol = SMFIP_CURR_PROT): Promise<OptNeg> {
    this.send({ type: 'optneg', version, actions, protocol, macros: [] });
    const r = await this.next();
    assert.equal(r.type, 'optneg');
    return r as OptNeg;
  }
  async waitClosed(ms = 5000): Promise<void> {
    const deadline = Date.now() + ms;
    while (!this.closed) {
      if (Date.now() > deadline) throw new Error('server did not close the connection');
      await new Promise((r) => setTimeout(r, 10));
    }
  }
  end(): void {
    this.socket.end();
  }
}

async function serve(milter: Milter, options: Partial<ServeMilterOptions> = {}): Promise<MilterServer> {
  return serveMilter(milter, { listen: 'inet:127.0.0.1:0', ...options });
}

const OFFER = { version: 6, actions: SMFIF_ALL, protocol: SMFIP_CURR_PROT };
const NOSTAGE = SMFIP.NOCONNECT | SMFIP.NOHELO | SMFIP.NOMAIL | SMFIP.NORCPT | SMFIP.NODATA | SMFIP.NOHDRS | SMFIP.NOEOH | SMFIP.NOBODY | SMFIP.NOUNKNOWN;
const EDITS = SMFIF.ADDHDRS | SMFIF.CHGHDRS | SMFIF.CHGBODY | SMFIF.ADDRCPT | SMFIF.ADDRCPT_PAR | SMFIF.DELRCPT | SMFIF.CHGFROM | SMFIF.QUARANTINE;

const connectCmd: MilterCommand = { type: 'connect', hostname: 'client.example.test', family: 'ipv4', port: 40000, address: '192.0.2.10' };
const conMacros: MilterCommand = {
  type: 'macro',
  stage: 'C',
  macros: [
    { name: 'j', value: 'mx.example.test' },
    { name: '{daemon_addr}', value: '127.0.0.1' },
    { name: '{daemon_port}', value: '25' },
    { name: 'daemon_name', value: 'smtpd' },
  ],
};

test('negotiation: only the stages the milter implements, only offered flags, version min(MTA, 6)', () => {
  const rcptOnly = defineMilter({ name: 'r', async rcpt() {} });
  let n = negotiate(rcptOnly, {}, OFFER);
  assert.equal(n.version, 6);
  assert.equal(n.actions, 0, 'no eom: no edit actions');
  assert.equal(n.protocol, NOSTAGE & ~SMFIP.NORCPT);

  const all = defineMilter({
    name: 'all',
    async connect() {},
    async helo() {},
    async mail() {},
    async rcpt() {},
    async data() {},
    async header() {},
    async eoh() {},
    async body() {},
    async eom() {},
    async unknown() {},
  });
  n = negotiate(all, {}, OFFER);
  assert.equal(n.protocol, SMFIP.SKIP, 'every stage wanted, SKIP because of the body handler');
  assert.equal(n.actions, EDITS);

  // eom only: headers and body are still needed (for ctx.message), without replies.
  const eomOnly = defineMilter({ name: 'e', async eom() {} });
  n = negotiate(eomOnly, {}, OFFER);
  assert.equal(n.protocol, (NOSTAGE & ~(SMFIP.NOHDRS | SMFIP.NOBODY)) | SMFIP.NR_HDR | SMFIP.NR_BODY);
  assert.equal(n.actions, EDITS);

  // eom declared not to read headers/body (Milter.needs): SMFIP_NOHDRS / SMFIP_NOBODY.
  const adder = defineMilter({ name: 'a', needs: { headers: false, body: false }, async eom() {} });
  n = negotiate(adder, {}, OFFER);
  assert.equal(n.protocol, NOSTAGE, 'nothing of the message is sent, only end of message');
  assert.equal(n.actions, EDITS);
  n = negotiate(defineMilter({ name: 'h', needs: { body: false }, async eom() {} }), {}, OFFER);
  assert.equal(n.protocol, (NOSTAGE & ~SMFIP.NOHDRS) | SMFIP.NR_HDR, 'headers for eom, without replies; no body');
  n = negotiate(defineMilter({ name: 'b', needs: { headers: false }, async eom() {} }), {}, OFFER);
  assert.equal(n.protocol, (NOSTAGE & ~SMFIP.NOBODY) | SMFIP.NR_BODY);
  // A handler of its own still gets its stage, with replies.
  n = negotiate(defineMilter({ name: 'hb', needs: { headers: false, body: false }, async header() {}, async body() {}, async eom() {} }), {}, OFFER);
  assert.equal(n.protocol, (NOSTAGE & ~(SMFIP.NOHDRS | SMFIP.NOBODY)) | SMFIP.SKIP);
  // needs without an eom handler changes nothing.
  n = negotiate(defineMilter({ name: 'r2', needs: { headers: true }, async rcpt() {} }), {}, OFFER);
  assert.equal(n.protocol, NOSTAGE & ~SMFIP.NORCPT);
  // An MTA that cannot leave the headers out (no NOHDRS offered) sends them without replies.
  n = negotiate(adder, {}, { ...OFFER, protocol: SMFIP_CURR_PROT & ~SMFIP.NOHDRS });
  assert.equal(n.protocol & (SMFIP.NOHDRS | SMFIP.NR_HDR), SMFIP.NR_HDR);

  // An old MTA: version 2, fewer actions and flags offered.
  n = negotiate(all, {}, { version: 2, actions: SMFIF.ADDHDRS | SMFIF.CHGBODY, protocol: 0x7f });
  assert.equal(n.version, 2);
  assert.equal(n.actions, SMFIF.ADDHDRS | SMFIF.CHGBODY);
  assert.equal(n.protocol, 0);
  n = negotiate(rcptOnly, {}, { version: 2, actions: 0x3f, protocol: 0x7f });
  assert.equal(n.protocol, 0x7f & ~SMFIP.NORCPT, 'no NOUNKNOWN/NODATA in v2');
  n = negotiate(rcptOnly, {}, { version: 9, actions: SMFIF_ALL, protocol: SMFIP_CURR_PROT });
  assert.equal(n.version, 6);

  // Options: restricted actions, macro lists, NR for observers, HDR_LEADSPC.
  n = negotiate(eomOnly, { actions: ['addHeader'] }, OFFER);
  assert.equal(n.actions, SMFIF.ADDHDRS);
  n = negotiate(rcptOnly, { macros: { rcpt: ['{rcpt_addr}', 'i'], connect: ['{client_addr}'] } }, OFFER);
  assert.equal(n.actions, SMFIF.SETSYMLIST);
  assert.deepEqual(n.macros, [
    { stage: SMFIM.ENVRCPT, names: ['{rcpt_addr}', 'i'] },
    { stage: SMFIM.CONNECT, names: ['{client_addr}'] },
  ]);
  n = negotiate(rcptOnly, { macros: { rcpt: ['i'] } }, { ...OFFER, actions: SMFIF_ALL & ~SMFIF.SETSYMLIST });
  assert.equal(n.actions, 0);
  assert.deepEqual(n.macros, [], 'no macro lists when the MTA does not offer SETSYMLIST');
  const observer = defineMilter({ name: 'o', async header() {} });
  n = negotiate(observer, { noReply: ['header'], headerLeadingSpace: true }, OFFER);
  assert.equal(n.protocol & (SMFIP.NR_HDR | SMFIP.HDR_LEADSPC), SMFIP.NR_HDR | SMFIP.HDR_LEADSPC);
  n = negotiate(observer, { headerLeadingSpace: true }, { ...OFFER, protocol: SMFIP_CURR_PROT & ~SMFIP.HDR_LEADSPC });
  assert.equal(n.protocol & SMFIP.HDR_LEADSPC, 0, 'never a flag the MTA did not offer');

  // defaultAction quarantine needs SMFIF_QUARANTINE even without eom.
  n = negotiate(defineMilter({ name: 'q', defaultAction: 'quarantine', async rcpt() {} }), {}, OFFER);
  assert.equal(n.actions, SMFIF.QUARANTINE);
  assert.throws(() => negotiate(rcptOnly, {}, { ...OFFER, version: 1 }), /older than 2/);
});

test('OPTNEG over the wire: the reply carries the negotiated values and the macro lists', async () => {
  const server = await serve(defineMilter({ name: 'r', async rcpt() {} }), { macros: { mail: ['{mail_addr}', 'i'] } });
  try {
    const mta = await Mta.connect(server.port);
    const r = await mta.optneg();
    assert.equal(r.version, 6);
    assert.equal(r.actions, SMFIF.SETSYMLIST);
    assert.equal(r.protocol, NOSTAGE & ~SMFIP.NORCPT);
    assert.deepEqual(r.macros, [{ stage: SMFIM.ENVFROM, names: ['{mail_addr}', 'i'] }]);
    mta.send({ type: 'quit' });
    await mta.waitClosed();
  } finally {
    await server.close();
  }
});

test('a whole session: macros and typed fields, every stage, custom and default replies, every edit', async () => {
  const seen: Record<string, unknown> = {};
  const milter = defineMilter({
    name: 'full',
    async connect(ctx) {
      seen['connect'] = { client: ctx.client, server: ctx.server, macros: { ...ctx.macros } };
      ctx.state.set('n', 1);
    },
    async helo(ctx, name) {
      seen['helo'] = [name, ctx.helo];
    },
    async mail(ctx, sender) {
      seen['mail'] = { sender, queueId: ctx.queueId, auth: ctx.auth, tls: ctx.tls };
    },
    async rcpt(ctx, rcpt) {
      if (rcpt.address === 'nobody@example.test') return reject(550, '5.1.1', ['No such user', 'at 100% certainty']);
      if (rcpt.address === 'later@example.test') return tempfail();
      if (rcpt.address === 'bob@example.test') seen['rcpt'] = { rcpt, before: ctx.envelope.recipients.map((r) => r.address), macros: ctx.macros['{rcpt_addr}'] };
    },
    async data(ctx) {
      seen['data'] = ctx.envelope.recipients.map((r) => r.address);
    },
    async header(ctx, h) {
      (seen['headers'] ??= [] as unknown[]) && (seen['headers'] as unknown[]).push([h.name, h.value, ctx.headers.length]);
    },
    async eoh(ctx) {
      seen['eoh'] = ctx.headers.length;
    },
    async body(_ctx, chunk) {
      seen['bodyBytes'] = ((seen['bodyBytes'] as number | undefined) ?? 0) + chunk.length;
    },
    async eom(ctx) {
      seen['eom'] = {
        size: ctx.message.size,
        message: await new Promise<string>((resolve) => {
          const parts: Buffer[] = [];
          ctx.message.stream().on('data', (d: Buffer) => parts.push(d)).on('end', () => resolve(Buffer.concat(parts).toString()));
        }),
        state: ctx.state.get('n'),
        recipients: ctx.envelope.recipients.map((r) => r.address),
      };
      ctx.message.addHeader('X-Checked', 'yes');
      ctx.message.insertHeader(1, 'X-First', 'first');
      ctx.message.changeHeader('Subject', 1, '[ext] hello');
      ctx.message.deleteHeader('X-Internal', 1);
      ctx.envelope.changeSender('bounce@example.test', 'BODY=8BITMIME');
      ctx.envelope.addRecipient('archive@example.test');
      ctx.envelope.addRecipient('copy@example.test', 'NOTIFY=NEVER');
      ctx.envelope.removeRecipient('old@example.test');
      ctx.message.replaceBody('x'.repeat(70_000) + '\n');
      ctx.message.replaceBody(Readable.from([Buffer.from('tail\r\n')]));
      ctx.quarantine('looks odd');
    },
  });
  const server = await serve(milter);
  try {
    const mta = await Mta.connect(server.port);
    const neg = await mta.optneg();
    assert.equal(neg.protocol, SMFIP.NOUNKNOWN | SMFIP.SKIP);
    mta.send(conMacros, connectCmd);
    assert.deepEqual(await mta.next(), { type: 'continue' });
    mta.send({ type: 'helo', hostname: 'client.example.test' });
    assert.deepEqual(await mta.next(), { type: 'continue' });
    mta.send(
      { type: 'macro', stage: 'M', macros: [{ name: 'i', value: 'QID1' }, { name: '{auth_type}', value: 'PLAIN' }, { name: '{auth_authen}', value: 'alice' }, { name: '{tls_version}', value: 'TLSv1.3' }, { name: '{cipher}', value: 'TLS_AES_256_GCM_SHA384' }, { name: '{cipher_bits}', value: '256' }] },
      { type: 'mail', address: '<alice@sender.test>', args: ['SIZE=100', 'BODY=8BITMIME'] },
    );
    assert.deepEqual(await mta.next(), { type: 'continue' });
    for (const [addr, want] of [
      ['nobody@example.test', { type: 'replyCode', reply: '550-5.1.1 No such user\r\n550 5.1.1 at 100%% certainty' }],
      ['later@example.test', { type: 'tempfail' }],
      ['bob@example.test', { type: 'continue' }],
      ['old@example.test', { type: 'continue' }],
    ] as const) {
      mta.send({ type: 'macro', stage: 'R', macros: [{ name: '{rcpt_addr}', value: addr }] }, { type: 'rcpt', address: `<${addr}>`, args: [] });
      assert.deepEqual(await mta.next(), want, addr);
    }
    mta.send({ type: 'data' });
    assert.deepEqual(await mta.next(), { type: 'continue' });
    for (const [name, value] of [
      ['Subject', 'hello'],
      ['X-Internal', 'secret'],
      ['Received', 'from a\n\tby b'],
    ]) {
      mta.send({ type: 'header', name: name as string, value: value as string });
      assert.deepEqual(await mta.next(), { type: 'continue' });
    }
    mta.send({ type: 'eoh' });
    assert.deepEqual(await mta.next(), { type: 'continue' });
    mta.send({ type: 'body', chunk: Buffer.from('Hello there.\r\n') });
    assert.deepEqual(await mta.next(), { type: 'continue' });
    mta.send({ type: 'bodyEob', chunk: Buffer.alloc(0) });
    const replies = await mta.untilFinal();
    const types = replies.map((r) => r.type);
    assert.deepEqual(types.slice(0, 8), ['addHeader', 'insertHeader', 'changeHeader', 'changeHeader', 'changeFrom', 'addRcpt', 'addRcptPar', 'deleteRcpt']);
    assert.deepEqual(replies[0], { type: 'addHeader', name: 'X-Checked', value: 'yes' });
    assert.deepEqual(replies[1], { type: 'insertHeader', index: 0, name: 'X-First', value: 'first' });
    assert.deepEqual(replies[2], { type: 'changeHeader', index: 1, name: 'Subject', value: '[ext] hello' });
    assert.deepEqual(replies[3], { type: 'changeHeader', index: 1, name: 'X-Internal', value: '' });
    assert.deepEqual(replies[4], { type: 'changeFrom', address: '<bounce@example.test>', args: 'BODY=8BITMIME' });
    assert.deepEqual(replies[5], { type: 'addRcpt', address: '<archive@example.test>' });
    assert.deepEqual(replies[6], { type: 'addRcptPar', address: '<copy@example.test>', args: 'NOTIFY=NEVER' });
    assert.deepEqual(replies[7], { type: 'deleteRcpt', address: '<old@example.test>' });
    const bodies = replies.filter((r): r is Extract<MilterReply, { type: 'replaceBody' }> => r.type === 'replaceBody');
    assert.ok(bodies.length >= 2 && bodies.every((b) => b.chunk.length <= 65535));
    assert.equal(Buffer.concat(bodies.map((b) => b.chunk)).toString(), 'x'.repeat(70_000) + '\r\ntail\r\n');
    assert.deepEqual(replies.at(-2), { type: 'quarantine', reason: 'looks odd' });
    assert.deepEqual(replies.at(-1), { type: 'continue' });

    assert.deepEqual(seen['connect'], {
      client: { address: '192.0.2.10', port: 40000, hostname: 'client.example.test', family: 'ipv4' },
      server: { hostname: 'mx.example.test', name: 'smtpd', address: '127.0.0.1', port: 25 },
      macros: { j: 'mx.example.test', '{daemon_addr}': '127.0.0.1', '{daemon_port}': '25', '{daemon_name}': 'smtpd' },
    });
    assert.deepEqual(seen['helo'], ['client.example.test', 'client.example.test']);
    assert.deepEqual(seen['mail'], {
      sender: { address: 'alice@sender.test', args: { SIZE: '100', BODY: '8BITMIME' } },
      queueId: 'QID1',
      auth: { method: 'PLAIN', user: 'alice' },
      tls: { version: 'TLSv1.3', cipher: 'TLS_AES_256_GCM_SHA384', bits: 256 },
    });
    assert.deepEqual(seen['rcpt'], { rcpt: { address: 'bob@example.test', args: {} }, before: [], macros: 'bob@example.test' });
    assert.deepEqual(seen['data'], ['bob@example.test', 'old@example.test']);
    assert.deepEqual(seen['headers'], [
      ['Subject', 'hello', 1],
      ['X-Internal', 'secret', 2],
      ['Received', 'from a\r\n\tby b', 3],
    ]);
    assert.equal(seen['eoh'], 3);
    assert.equal(seen['bodyBytes'], 14);
    const msg = 'Subject: hello\r\nX-Internal: secret\r\nReceived: from a\r\n\tby b\r\n\r\nHello there.\r\n';
    assert.deepEqual(seen['eom'], { size: Buffer.byteLength(msg), message: msg, state: 1, recipients: ['bob@example.test', 'old@example.test'] });
    mta.send({ type: 'quit' });
    await mta.waitClosed();
  } finally {
    await server.close();
  }
});

test('ABORT: abort handler, message state reset, the connection is reused for the next message', async () => {
  const events: string[] = [];
  const milter = defineMilter({
    name: 'abort',
    async mail(ctx, s) {
      events.push(`mail ${s.address} i=${ctx.macros['i'] ?? '-'} rcpts=${ctx.envelope.recipients.length}`);
    },
    async rcpt(_ctx, r) {
      events.push(`rcpt ${r.address}`);
    },
    async abort(ctx) {
      events.push(`abort ${ctx.envelope.sender.address}`);
    },
    async eom(ctx) {
      events.push(`eom ${ctx.envelope.recipients.map((r) => r.address).join(',')} ${ctx.message.size}`);
    },
    async close() {
      events.push('close');
    },
  });
  const server = await serve(milter);
  try {
    const mta = await Mta.connect(server.port);
    await mta.optneg();
    mta.send({ type: 'macro', stage: 'M', macros: [{ name: 'i', value: 'Q1' }] }, { type: 'mail', address: '<a@x.test>', args: [] });
    await mta.next();
    mta.send({ type: 'rcpt', address: '<r1@x.test>', args: [] });
    await mta.next();
    mta.send({ type: 'header', name: 'Subject', value: 'one' });
    mta.send({ type: 'abort' });
    await mta.none(100);
    mta.send({ type: 'mail', address: '<b@x.test>', args: [] });
    assert.deepEqual(await mta.next(), { type: 'continue' });
    mta.send({ type: 'rcpt', address: '<r2@x.test>', args: [] });
    await mta.next();
    mta.send({ type: 'bodyEob', chunk: Buffer.alloc(0) });
    assert.deepEqual(await mta.untilFinal(), [{ type: 'continue' }]);
    // A message that ended at eom is not aborted by the next one.
    mta.send({ type: 'mail', address: '<c@x.test>', args: [] });
    await mta.next();
    mta.send({ type: 'quit' });
    await mta.waitClosed();
    await new Promise((r) => setImmediate(r));
    assert.deepEqual(events, [
      'mail a@x.test i=Q1 rcpts=0',
      'rcpt r1@x.test',
      'abort a@x.test',
      'mail b@x.test i=- rcpts=0',
      'rcpt r2@x.test',
      'eom r2@x.test 2',
      'mail c@x.test i=- rcpts=0',
      'abort c@x.test',
      'close',
    ]);
  } finally {
    await server.close();
  }
});

test('QUIT_NC: close handler, then a new session on the same connection starts from scratch', async () => {
  const events: string[] = [];
  const sessions = new Set<string>();
  const milter = defineMilter({
    name: 'nc',
    async connect(ctx) {
      sessions.add(ctx.sessionId);
      events.push(`connect ${ctx.client.address}:${ctx.client.port} ${ctx.client.family} helo=${ctx.helo} state=${String(ctx.state.get('k'))} j=${ctx.macros['j'] ?? '-'}`);
      ctx.state.set('k', 'v');
    },
    async helo(ctx, h) {
      events.push(`helo ${h}`);
    },
    async close(ctx) {
      events.push(`close ${ctx.client.address}`);
    },
  });
  const server = await serve(milter);
  try {
    const mta = await Mta.connect(server.port);
    await mta.optneg();
    mta.send(conMacros, connectCmd);
    await mta.next();
    mta.send({ type: 'helo', hostname: 'one.test' });
    await mta.next();
    mta.send({ type: 'quitNc' });
    await mta.none(100);
    mta.send({ type: 'connect', hostname: 'unknown', family: 'ipv6', port: 5, address: 'IPv6:2001:db8::1' });
    assert.deepEqual(await mta.next(), { type: 'continue' });
    mta.send({ type: 'quitNc' });
    // A new session may negotiate again, too.
    const again = await mta.optneg(4, SMFIF_ALL, SMFIP_CURR_PROT);
    assert.equal(again.version, 4);
    mta.send({ type: 'connect', hostname: 'local', family: 'unix', port: 0, address: '/run/smtp.sock' });
    await mta.next();
    mta.send({ type: 'quit' });
    await mta.waitClosed();
    await new Promise((r) => setImmediate(r));
    assert.deepEqual(events, [
      'connect 192.0.2.10:40000 ipv4 helo=undefined state=undefined j=mx.example.test',
      'helo one.test',
      'close 192.0.2.10',
      'connect 2001:db8::1:5 ipv6 helo=undefined state=undefined j=-',
      'close 2001:db8::1',
      'connect /run/smtp.sock:0 unix helo=undefined state=undefined j=-',
      'close /run/smtp.sock',
    ]);
    assert.equal(sessions.size, 3);
  } finally {
    await server.close();
  }
});

test('verdicts: accept, discard, skip (when negotiated), NR stages get no reply, refusals at connect', async () => {
  const milter = defineMilter({
    name: 'v',
    async connect(ctx) {
      if (ctx.client.address === '192.0.2.66') return reject(554, '5.7.1', 'go away');
    },
    async mail(_ctx, s) {
      if (s.address === 'acc@x.test') return accept();
      if (s.address === 'dis@x.test') return discard();
    },
    async rcpt() {
      throw new Error('must not run after accept/discard');
    },
    async header() {},
    async body() {
      return skip();
    },
  });
  const server = await serve(milter, { noReply: ['header'] });
  try {
    const mta = await Mta.connect(server.port);
    const neg = await mta.optneg();
    assert.equal(neg.protocol & (SMFIP.SKIP | SMFIP.NR_HDR), SMFIP.SKIP | SMFIP.NR_HDR);
    mta.send({ type: 'mail', address: '<acc@x.test>', args: [] });
    assert.deepEqual(await mta.next(), { type: 'accept' });
    mta.send({ type: 'rcpt', address: '<r@x.test>', args: [] });
    assert.deepEqual(await mta.next(), { type: 'continue' }, 'milter done with this message');
    mta.send({ type: 'abort' }, { type: 'mail', address: '<dis@x.test>', args: [] });
    assert.deepEqual(await mta.next(), { type: 'discard' });
    mta.send({ type: 'abort' }, { type: 'mail', address: '<ok@x.test>', args: [] });
    assert.deepEqual(await mta.next(), { type: 'continue' });
    mta.send({ type: 'header', name: 'A', value: 'b' }, { type: 'header', name: 'C', value: 'd' });
    await mta.none(100);
    mta.send({ type: 'body', chunk: Buffer.from('x') });
    assert.deepEqual(await mta.next(), { type: 'skip' });
    mta.send({ type: 'bodyEob', chunk: Buffer.alloc(0) });
    assert.deepEqual(await mta.next(), { type: 'continue' });
    mta.end();

    const refused = await Mta.connect(server.port);
    await refused.optneg();
    refused.send({ type: 'connect', hostname: 'bad', family: 'ipv4', port: 1, address: '192.0.2.66' });
    assert.deepEqual(await refused.next(), { type: 'replyCode', reply: '554 5.7.1 go away' });
    refused.end();

    // Without SMFIP_SKIP negotiated, skip is answered with continue and the handler is not called again.
    const old = await Mta.connect(server.port);
    await old.optneg(6, SMFIF_ALL, SMFIP_CURR_PROT & ~SMFIP.SKIP);
    old.send({ type: 'mail', address: '<ok@x.test>', args: [] });
    await old.next();
    old.send({ type: 'body', chunk: Buffer.from('x') });
    assert.deepEqual(await old.next(), { type: 'continue' });
    old.end();
  } finally {
    await server.close();
  }
});

test('handler failures take the default action, as in the gateway', async () => {
  const slowMail = {
    async mail() {
      await new Promise((r) => setTimeout(r, 500));
    },
  };
  const base = {
    async rcpt() {
      throw new Error('boom');
    },
    async eom(ctx: { message: { addHeader(n: string, v: string): void } }) {
      ctx.message.addHeader('X-Never', 'sent');
    },
  };
  const server1 = await serve(defineMilter({ name: 'f1', timeouts: { command: 50 }, ...slowMail, ...base }));
  const server2 = await serve(defineMilter({ name: 'f2', defaultAction: 'reject', ...base }));
  const server3 = await serve(defineMilter({ name: 'f3', defaultAction: 'quarantine', ...base }));
  try {
    const a = await Mta.connect(server1.port);
    await a.optneg();
    a.send({ type: 'mail', address: '<a@x.test>', args: [] });
    assert.deepEqual(await a.next(), { type: 'tempfail' }, 'timeout → tempfail');
    a.end();
    const b = await Mta.connect(server2.port);
    await b.optneg();
    b.send({ type: 'rcpt', address: '<a@x.test>', args: [] });
    assert.deepEqual(await b.next(), { type: 'reject' }, 'throw → reject');
    b.end();
    const c = await Mta.connect(server3.port);
    await c.optneg();
    c.send({ type: 'rcpt', address: '<a@x.test>', args: [] });
    assert.deepEqual(await c.next(), { type: 'continue' }, 'quarantine is given at eom');
    c.send({ type: 'bodyEob', chunk: Buffer.alloc(0) });
    assert.deepEqual(await c.untilFinal(), [{ type: 'quarantine', reason: 'milter f3 failed at rcpt' }, { type: 'continue' }]);
    c.end();
  } finally {
    await Promise.all([server1.close(), server2.close(), server3.close()]);
  }
});

test('an edit the MTA did not grant makes eom fail (default action); size limits refuse the message', async () => {
  const server = await serve(
    defineMilter({
      name: 'limits',
      async eom(ctx) {
        ctx.message.replaceBody('nope');
      },
    }),
    { actions: ['addHeader'], maxMessageBytes: 100 },
  );
  try {
    const mta = await Mta.connect(server.port);
    const neg = await mta.optneg();
    assert.equal(neg.actions, SMFIF.ADDHDRS);
    assert.equal(neg.protocol & (SMFIP.NOMAIL | SMFIP.NR_HDR | SMFIP.NR_BODY), SMFIP.NOMAIL | SMFIP.NR_HDR | SMFIP.NR_BODY);
    const mailMacros: MilterCommand = { type: 'macro', stage: 'M', macros: [{ name: '{mail_addr}', value: 'a@x.test' }] };
    mta.send(mailMacros, { type: 'header', name: 'Subject', value: 'hi' }, { type: 'bodyEob', chunk: Buffer.alloc(0) });
    assert.deepEqual(await mta.untilFinal(), [{ type: 'tempfail' }]);
    // Headers and body have no reply (NR_HDR, NR_BODY): the size refusal comes at eom.
    mta.send(mailMacros, { type: 'body', chunk: Buffer.alloc(200, 0x61) }, { type: 'bodyEob', chunk: Buffer.alloc(0) });
    assert.deepEqual(await mta.untilFinal(), [{ type: 'replyCode', reply: '552 5.3.4 Error: message size exceeds the 100-byte limit' }]);
    mta.end();
  } finally {
    await server.close();
  }
});

test('hostile frames close that connection only; the server goes on', async () => {
  const closes: string[] = [];
  const server = await serve(
    defineMilter({
      name: 'h',
      async helo() {},
      async close() {
        closes.push('close');
      },
    }),
  );
  try {
    const cases: [string, Buffer[]][] = [
      ['length 0', [Buffer.from([0, 0, 0, 0])]],
      ['length over the maximum', [Buffer.from([0x7f, 0xff, 0xff, 0xff, 0x4f])]],
      ['unknown command', [frame('O', u32(6), u32(0x1ff), u32(0x1fffff)), frame('Z', 'x')]],
      ['command before OPTNEG', [frame('H', 'x\0')]],
      ['HELO without NUL', [frame('O', u32(6), u32(0x1ff), u32(0x1fffff)), frame('H', 'abc')]],
      ['left-over bytes', [frame('O', u32(6), u32(0x1ff), u32(0x1fffff)), frame('H', 'a\0b')]],
      ['OPTNEG version 1', [frame('O', u32(1), u32(0), u32(0))]],
      ['second OPTNEG', [frame('O', u32(6), u32(0x1ff), u32(0x1fffff)), frame('O', u32(6), u32(0x1ff), u32(0x1fffff))]],
      ['short OPTNEG', [frame('O', u32(6))]],
    ];
    for (const [name, bufs] of cases) {
      const mta = await Mta.connect(server.port);
      for (const b of bufs) mta.raw(b);
      await mta.waitClosed(3000).catch(() => assert.fail(`${name}: connection not closed`));
    }
    // A frame cut short by EOF.
    const cut = await Mta.connect(server.port);
    cut.raw(frame('O', u32(6), u32(0x1ff), u32(0x1fffff)).subarray(0, 7));
    cut.end();
    await cut.waitClosed();
    // Still serving.
    const ok = await Mta.connect(server.port);
    await ok.optneg();
    ok.send({ type: 'helo', hostname: 'fine' });
    assert.deepEqual(await ok.next(), { type: 'continue' });
    ok.send({ type: 'quit' });
    await ok.waitClosed();
    await new Promise((r) => setTimeout(r, 50));
    assert.equal(closes.length, 5, 'close handler ran for every session that negotiated');
    assert.equal(server.connections, 0);
  } finally {
    await server.close();
  }
});

test('many MTA connections at once, each with its own session', async () => {
  const server = await serve(
    defineMilter({
      name: 'many',
      async rcpt(ctx, r) {
        await new Promise((res) => setTimeout(res, 5 + Math.random() * 20));
        if (r.address !== `${ctx.helo}@x.test`) return reject(550, '5.1.1', `mixed up: ${r.address} in ${ctx.helo}`);
      },
      async helo() {},
    }),
  );
  try {
    const N = 60;
    await Promise.all(
      Array.from({ length: N }, async (_, i) => {
        const mta = await Mta.connect(server.port);
        await mta.optneg();
        mta.send({ type: 'helo', hostname: `c${i}` });
        assert.deepEqual(await mta.next(), { type: 'continue' });
        for (let k = 0; k < 5; k++) {
          mta.send({ type: 'rcpt', address: `<c${i}@x.test>`, args: [] });
          assert.deepEqual(await mta.next(), { type: 'continue' });
        }
        mta.send({ type: 'quit' });
        await mta.waitClosed();
      }),
    );
  } finally {
    await server.close();
  }
});

test('close() answers the command in flight, then closes; idle connections close at once', async () => {
  const server = await serve(
    defineMilter({
      name: 'slow',
      async rcpt() {
        await new Promise((r) => setTimeout(r, 300));
        return tempfail(451, '4.3.2', 'draining');
      },
    }),
  );
  const busy = await Mta.connect(server.port);
  await busy.optneg();
  const idle = await Mta.connect(server.port);
  await idle.optneg();
  busy.send({ type: 'rcpt', address: '<a@x.test>', args: [] });
  await new Promise((r) => setTimeout(r, 50));
  const started = Date.now();
  const closing = server.close();
  await idle.waitClosed(1000);
  assert.deepEqual(await busy.next(), { type: 'replyCode', reply: '451 4.3.2 draining' });
  await busy.waitClosed(2000);
  await closing;
  assert.ok(Date.now() - started >= 200, 'close waited for the command in flight');
  await assert.rejects(Mta.connect(server.port));
});

test('a body or end of message before MAIL is a protocol error (the eom handler never runs); with SMFIP_NOMAIL it is a message', async () => {
  // Regression (hardening issue): the server ran end-of-message for a body that had no MAIL.
  const eoms: string[] = [];
  const withMail = await serve(defineMilter({ name: 'm', async mail() {}, async eom(ctx) { eoms.push(ctx.envelope.sender.address); } }));
  const noMail = await serve(defineMilter({ name: 'n', async eom(ctx) { eoms.push(`nomail:${ctx.envelope.sender.address}`); } }));
  try {
    const mta = await Mta.connect(withMail.port);
    await mta.optneg();
    mta.send({ type: 'body', chunk: Buffer.from('smuggled\r\n') }, { type: 'bodyEob', chunk: Buffer.alloc(0) });
    await mta.waitClosed(3000).catch(() => assert.fail('connection not closed'));
    assert.deepEqual(eoms, [], 'no end of message without MAIL');

    // The same milter, a proper message: eom runs.
    const ok = await Mta.connect(withMail.port);
    await ok.optneg();
    ok.send({ type: 'mail', address: '<a@sender.test>', args: [] });
    assert.deepEqual(await ok.next(), { type: 'continue' });
    ok.send({ type: 'bodyEob', chunk: Buffer.alloc(0) });
    assert.equal((await ok.untilFinal()).at(-1)?.type, 'continue');
    assert.deepEqual(eoms, ['a@sender.test']);
    ok.send({ type: 'quit' });

    // A milter without a mail handler negotiates NOMAIL: the MTA never sends MAIL, eom is fine.
    const nm = await Mta.connect(noMail.port);
    const neg = await nm.optneg();
    assert.ok((neg.protocol & SMFIP.NOMAIL) !== 0);
    nm.send({ type: 'macro', stage: 'M', macros: [{ name: '{mail_addr}', value: 'b@sender.test' }] }, { type: 'bodyEob', chunk: Buffer.alloc(0) });
    assert.equal((await nm.untilFinal()).at(-1)?.type, 'continue');
    assert.deepEqual(eoms, ['a@sender.test', 'nomail:b@sender.test']);
    nm.send({ type: 'quit' });
  } finally {
    await withMail.close();
    await noMail.close();
  }
});

test('a served milter holds at most 50 MiB of a message by default (552 5.3.4 beyond)', async () => {
  const server = await serve(defineMilter({ name: 'big', async mail() {}, async body() {}, async eom() {} }));
  try {
    const mta = await Mta.connect(server.port);
    await mta.optneg();
    mta.send({ type: 'mail', address: '<a@sender.test>', args: [] });
    await mta.next();
    const chunk = Buffer.alloc(60_000, 0x61);
    const n = Math.ceil((50 * 1024 * 1024) / chunk.length) + 1;
    // Body chunks one at a time, as an MTA does (each waits for its reply); the first
    // answer that is not `continue` is the refusal.
    let refusal: MilterReply | undefined;
    for (let i = 0; i < n && !refusal; i++) {
      mta.send({ type: 'body', chunk });
      const r = await mta.next(20_000);
      if (r.type !== 'continue') refusal = r;
    }
    if (!refusal) {
      mta.send({ type: 'bodyEob', chunk: Buffer.alloc(0) });
      refusal = (await mta.untilFinal(20_000)).at(-1);
    }
    assert.equal(refusal?.type, 'replyCode');
    assert.match((refusal as { reply: string }).reply, /^552 5\.3\.4 /);
    mta.send({ type: 'quit' });
  } finally {
    await server.close();
  }
});

test('connections parked inside a frame are dropped after frameTimeout, so they cannot lock the MTA out', async () => {
  // Regression (hardening issue): 1,000 connections parked inside a frame held every slot.
  const server = await serve(defineMilter({ name: 'p', async helo() {} }), { maxConnections: 50, frameTimeout: 300 });
  const parked: net.Socket[] = [];
  let closed = 0;
  try {
    for (let i = 0; i < 50; i++) {
      const s = net.connect(server.port, '127.0.0.1');
      s.on('error', () => undefined);
      s.once('close', () => closed++);
      await new Promise<void>((resolve) => s.once('connect', () => resolve()));
      s.write(Buffer.from([0, 0, 0, 20, 0x4f])); // a 20-byte OPTNEG frame, never finished
      parked.push(s);
    }
    // All 50 are dropped by the server once their frame has been pending for frameTimeout.
    const deadline = Date.now() + 10_000;
    while (closed < 50 && Date.now() < deadline) await new Promise((r) => setTimeout(r, 50));
    assert.equal(closed, 50, 'every parked connection was closed by the server');
    // And the MTA gets served.
    const ok = await Mta.connect(server.port);
    await ok.optneg();
    ok.send({ type: 'helo', hostname: 'fine' });
    assert.deepEqual(await ok.next(), { type: 'continue' });
    ok.send({ type: 'quit' });
  } finally {
    for (const s of parked) s.destroy();
    await server.close();
  }
});
