/**
 * The honesty check of dovetail/testing: the same milters and the same input, once through
 * a real gateway over a real SMTP socket (a raw client; a transport that records exactly
 * what the gateway hands to delivery), once through runMilter() in process. Every reply,
 * every milter verdict, the envelope and the message bytes handed on must be the same
 * (queue ids and the Received date, which differ by nature, are masked).
 */
import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { defineMilter, reject, type Milter } from '../../lib/index.js';
import { relayControl, spamTag } from '../../milters/index.js';
import { kitAndGateway, type KitInput, type Observed } from '../helpers/kit-compare.js';

/** Fresh milters for each run (so no state is shared between the gateway's and the kit's). */
function milters(): Milter[] {
  return [
    relayControl({ relayDomains: ['example.test'] }),
    defineMilter({
      name: 'policy',
      async helo(_ctx, name) {
        if (name === 'bad.helo.test') return reject(550, '5.7.1', ['Bad HELO', 'go away']);
      },
      async rcpt(ctx, rcpt) {
        if (rcpt.address.startsWith('nobody@')) return reject(550, '5.1.1', 'No such user');
        ctx.score.add(0.5, 'RCPT_SEEN');
      },
      async unknown(_ctx, command) {
        if (command.startsWith('XEVIL')) return reject(502, '5.5.1', 'No evil here');
      },
      async eom(ctx) {
        const subject = ctx.headers.find((h) => h.name === 'Subject')?.value ?? '';
        if (subject.includes('refuse me')) {
          ctx.message.addHeader('X-Never', 'dropped');
          return reject(554, '5.7.1', 'Content refused');
        }
        const m = ctx.macros;
        const shown = Object.keys(m)
          .sort()
          .map((k) => `${k}=${m[k]}`)
          .join(' ');
        ctx.message.addHeader('X-Macros', shown);
        ctx.message.insertHeader(1, 'X-First', `${ctx.client.address} ${ctx.helo}`);
        ctx.message.changeHeader('Subject', 1, `[checked] ${subject}`);
        ctx.message.deleteHeader('X-Internal', 1);
        ctx.envelope.addRecipient('archive@example.test');
        ctx.envelope.removeRecipient('drop@example.test');
        if (subject.includes('quarantine')) ctx.quarantine('asked for');
        if (subject.includes('body')) ctx.message.replaceBody('replaced\nbody\n');
      },
    }),
    spamTag({ requiredScore: 1, subjectTag: '[SPAM]' }),
  ];
}

const MESSAGE = (subject: string) =>
  `From: a@sender.test\r\nTo: bob@example.test\r\nSubject: ${subject}\r\nX-Internal: secret\r\nMessage-ID: <1@sender.test>\r\n\r\nHello.\r\n.leading dot\r\n`;

async function compare(input: KitInput): Promise<Observed> {
  const { gateway, kit } = await kitAndGateway(milters, input);
  assert.deepEqual(kit.replies, gateway.replies, 'replies');
  assert.deepEqual(kit.events, gateway.events, 'milter verdicts');
  assert.deepEqual(kit.handed, gateway.handed, 'what is handed to delivery');
  return gateway;
}

describe('runMilter() agrees with a real gateway over a socket', () => {
  it('relay refusal, a milter refusal at RCPT, every edit, spamTag, an eom reject, a quarantine, an unknown command', async () => {
    const seen = await compare({
      helo: 'client.sender.test',
      unknown: ['XEVIL now', 'XFINE'],
      transactions: [
        { from: 'a@sender.test', to: ['bob@example.test', 'nobody@example.test', 'x@elsewhere.test', 'drop@example.test'], message: MESSAGE('hello body') },
        { from: 'a@sender.test', to: ['bob@example.test'], message: MESSAGE('refuse me') },
        { from: 'a@sender.test', to: ['x@elsewhere.test'], message: MESSAGE('never sent') },
        { from: 'a@sender.test', to: ['carol@example.test'], message: MESSAGE('quarantine this') },
      ],
    });
    // The comparison above is only worth something if the scenario did what it says.
    assert.deepEqual(seen.replies.slice(0, 2), ['502 5.5.1 No evil here', '500 5.5.2 Error: command not recognized']);
    assert.ok(seen.replies.includes('554 5.7.1 Content refused'));
    assert.ok(seen.replies.includes('554 5.7.1 <x@elsewhere.test>: Relay access denied'));
    assert.equal(seen.handed.length, 2);
    assert.match(seen.handed[0]!, /^a@sender\.test -> bob@example\.test,archive@example\.test\nX-First: 127\.0\.0\.1 client\.sender\.test\r\nReceived: /);
    assert.match(seen.handed[0]!, /X-Macros: \S+/);
    assert.match(seen.handed[0]!, /\r\n\r\nreplaced\r\nbody\r\n$/);
    assert.match(seen.handed[1]!, /^QUARANTINE a@sender\.test -> carol@example\.test,archive@example\.test\nX-Dovetail-Quarantine: asked for\r\n/);
  });

  it('a HELO refusal given at every MAIL FROM', async () => {
    const seen = await compare({
      helo: 'bad.helo.test',
      transactions: [
        { from: 'a@sender.test', to: ['bob@example.test'], message: MESSAGE('x') },
        { from: 'b@sender.test', to: ['bob@example.test'], message: MESSAGE('y') },
      ],
    });
    assert.deepEqual(seen.replies, ['550-5.7.1 Bad HELO\r\n550 5.7.1 go away', '550-5.7.1 Bad HELO\r\n550 5.7.1 go away']);
  });

  it('after STARTTLS and AUTH: the TLS and AUTH facts, macros and Received header are the same', async () => {
    const seen = await compare({
      helo: 'client.sender.test',
      tls: true,
      user: 'alice',
      transactions: [{ from: 'alice@sender.test', to: ['bob@example.test'], message: MESSAGE('hello') }],
    });
    assert.match(seen.handed[0]!, /\(using TLSv1\.3 with cipher TLS_AES_256_GCM_SHA384 \(256\/256 bits\)\)\r\n\tby mx\.test \(dovetail\) with ESMTPSA id QUEUEID/);
    assert.match(seen.handed[0]!, /X-Macros: .*\{auth_authen\}=alice \{auth_type\}=PLAIN \{cipher_bits\}=256 \{cipher\}=TLS_AES_256_GCM_SHA384 .*\{tls_version\}=TLSv1\.3\r\n/);
  });

  it('a failing milter takes its default action in both', async () => {
    const failing = (): Milter[] => [
      defineMilter({
        name: 'flaky',
        defaultAction: 'reject',
        async rcpt(_ctx, rcpt) {
          if (rcpt.address.startsWith('boom@')) throw new Error('boom');
        },
        async eom(ctx) {
          ctx.message.addHeader('X-Flaky', 'ok');
        },
      }),
    ];
    const { gateway, kit } = await kitAndGateway(failing, {
      helo: 'client.sender.test',
      transactions: [{ from: 'a@sender.test', to: ['boom@example.test', 'bob@example.test'], message: MESSAGE('x') }],
    });
    assert.deepEqual(kit, gateway);
    assert.deepEqual(gateway.events, ['flaky rcpt failed reject']);
    assert.equal(gateway.replies[1], '550 5.7.1 Command rejected');
  });

  it('a refusal at connect is the greeting in both', async () => {
    const gate = (): Milter[] => [
      defineMilter({
        name: 'gate',
        async connect() {
          return reject(550, '5.7.1', 'Not from here');
        },
      }),
    ];
    const { gateway, kit } = await kitAndGateway(gate, { helo: 'x.test', transactions: [{ from: 'a@sender.test', to: ['bob@example.test'], message: MESSAGE('x') }] });
    assert.deepEqual(kit, gateway);
    assert.deepEqual(gateway.replies, ['554 5.7.1 Not from here']);
  });
});
