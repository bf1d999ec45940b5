/**
 * Benchmark of the milter client side (issue 3):
 *
 * 1. codec throughput: encode + decode of a realistic frame mix (macro, header, 64 KiB
 *    body chunk, small replies), frames/s and MB/s, several rounds for the spread;
 * 2. gateway → remote milter, messages/s over reused SMTP connections: the gateway with
 *    connectMilter() in front of the python3-milter reference filter in `minimal` mode
 *    (real C libmilter; continue everywhere, one added header at eom), next to the same
 *    gateway with no milter, with an in-process milter doing the same work, and with
 *    connectMilter() in front of OUR serveMilter() serving that same in-process milter
 *    (so our server is measured against libmilter doing the same work), in one run,
 *    ratios taken against the no-milter gateway.
 *
 *   npm run build && node dist/bench/milter-client.js [--connections=8] [--messages=200] [--rounds=3]
 *
 * The SMTP client here runs in the same process (simple, not pipelined; bench/load.ts is
 * the full harness): figures compare targets with each other, not with other machines.
 */
import fs from 'node:fs/promises';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { performance } from 'node:perf_hooks';
import { createGateway, defineMilter, type Milter } from '../lib/index.js';
import { connectMilter } from '../lib/milter/protocol/client.js';
import { serveMilter } from '../lib/milter/protocol/server.js';
import { decodeCommand, encodeCommand, FrameDecoder } from '../lib/milter/protocol/index.js';
import { startReferenceFilter } from '../test/helpers/libmilter.js';
import { nullTransport } from './null-transport.js';
import { spread } from './stats.js';

const arg = (name: string, def: number): number => {
  const a = process.argv.find((x) => x.startsWith(`--${name}=`));
  return a ? Number(a.split('=')[1]) : def;
};
const CONNECTIONS = arg('connections', 8);
const MESSAGES = arg('messages', 200);
const ROUNDS = arg('rounds', 3);

function codecRound(): { framesPerSec: number; mbPerSec: number } {
  const frames = [
    encodeCommand({ type: 'macro', stage: 'M', macros: [{ name: 'i', value: 'ABCDEF123456' }, { name: '{mail_addr}', value: 'alice@sender.test' }] }),
    encodeCommand({ type: 'header', name: 'Subject', value: 'a fairly ordinary subject line' }),
    encodeCommand({ type: 'body', chunk: Buffer.alloc(65535, 0x61) }),
    encodeCommand({ type: 'rcpt', address: '<bob@example.test>', args: ['NOTIFY=NEVER'] }),
    encodeCommand({ type: 'eoh' }),
  ];
  const wire = Buffer.concat(frames);
  const N = 2000;
  const t0 = performance.now();
  let count = 0;
  let bytes = 0;
  const dec = new FrameDecoder();
  for (let i = 0; i < N; i++) {
    // encode (what the client does per event) + decode (what a peer does), in 1500-byte slices.
    encodeCommand({ type: 'header', name: 'X-N', value: String(i) });
    for (let off = 0; off < wire.length; off += 1500) {
      for (const f of dec.push(wire.subarray(off, off + 1500))) {
        decodeCommand(f);
        count++;
      }
    }
    bytes += wire.length;
  }
  const s = (performance.now() - t0) / 1000;
  return { framesPerSec: (count + N) / s, mbPerSec: bytes / s / 1e6 };
}

/** One SMTP connection sending `n` messages in turn; resolves with per-message latencies. */
async function smtpRun(port: number, n: number): Promise<number[]> {
  const socket = net.connect(port, '127.0.0.1');
  socket.setEncoding('latin1');
  let buf = '';
  let wake: (() => void) | undefined;
  socket.on('data', (d: string) => {
    buf += d;
    wake?.();
  });
  socket.on('error', () => wake?.());
  const reply = async (): Promise<string> => {
    for (;;) {
      const m = /(^|\r\n)(\d{3}) [^\r]*\r\n/.exec(buf);
      if (m) {
        const end = (m.index ?? 0) + m[0].length;
        const r = buf.slice(0, end);
        buf = buf.slice(end);
        return r;
      }
      if (socket.destroyed) throw new Error('closed');
      await new Promise<void>((r) => (wake = r));
    }
  };
  const expect = async (code: string): Promise<void> => {
    const r = await reply();
    if (!r.match(new RegExp(`(^|\\n)${code} `))) throw new Error(`expected ${code}, got ${r}`);
  };
  await expect('220');
  socket.write('EHLO bench.example.test\r\n');
  await expect('250');
  const body = 'From: a@sender.test\r\nTo: b@example.test\r\nSubject: bench\r\nMessage-ID: <x@sender.test>\r\n\r\n' + 'Hello.\r\n'.repeat(200) + '.\r\n';
  const lat: number[] = [];
  for (let i = 0; i < n; i++) {
    const t = performance.now();
    socket.write('MAIL FROM:<a@sender.test>\r\nRCPT TO:<b@example.test>\r\nDATA\r\n');
    await expect('250');
    await expect('250');
    await expect('354');
    socket.write(body);
    await expect('250');
    lat.push(performance.now() - t);
  }
  socket.end('QUIT\r\n');
  return lat;
}

async function target(name: string, milters: Milter[]): Promise<{ name: string; rates: number[]; p50: number; p99: number }> {
  const gw = createGateway({ hostname: 'bench.test', listen: { host: '127.0.0.1', port: 0 }, resolveClientNames: false, delivery: nullTransport(), milters });
  const [addr] = await gw.listen();
  const rates: number[] = [];
  const all: number[] = [];
  try {
    await Promise.all(Array.from({ length: CONNECTIONS }, () => smtpRun(addr!.port, 5))); // warm-up
    for (let r = 0; r < ROUNDS; r++) {
      const t0 = performance.now();
      const lats = await Promise.all(Array.from({ length: CONNECTIONS }, () => smtpRun(addr!.port, MESSAGES)));
      const s = (performance.now() - t0) / 1000;
      rates.push((CONNECTIONS * MESSAGES) / s);
      for (const l of lats) all.push(...l);
    }
  } finally {
    await gw.close();
  }
  all.sort((a, b) => a - b);
  return { name, rates, p50: all[Math.floor(all.length * 0.5)] ?? 0, p99: all[Math.floor(all.length * 0.99)] ?? 0 };
}

async function main(): Promise<void> {
  const codec = Array.from({ length: ROUNDS + 1 }, codecRound).slice(1);
  const f = spread(codec.map((c) => c.framesPerSec));
  const m = spread(codec.map((c) => c.mbPerSec));
  console.log(`codec encode+decode: ${Math.round(f.median).toLocaleString('en')} frames/s (spread ${JSON.stringify(f)}), ${m.median.toFixed(0)} MB/s`);

  const filter = await startReferenceFilter('minimal');
  const dir = await fs.mkdtemp(path.join(os.tmpdir(), 'dovetail-bench-'));
  const unixFilter = await startReferenceFilter('minimal', {}, path.join(dir, 'milter.sock'));
  try {
    const inProcess = defineMilter({
      name: 'in-process',
      async rcpt() {},
      async eom(ctx) {
        ctx.message.addHeader('X-Bench', 'yes');
      },
    });
    // The same work served by our own milter server, over TCP and over a unix socket.
    const served = await serveMilter(inProcess, { listen: 'inet:127.0.0.1:0' });
    const servedUnix = await serveMilter(inProcess, { listen: `unix:${path.join(dir, 'served.sock')}` });
    const results = [];
    results.push(await target('gateway (no milter)', []));
    results.push(await target('gateway + in-process milter', [inProcess]));
    results.push(await target('gateway + connectMilter → libmilter, inet (loopback TCP)', [connectMilter(filter.spec, { name: 'libmilter' })]));
    results.push(await target('gateway + connectMilter → libmilter, unix socket', [connectMilter(unixFilter.spec, { name: 'libmilter' })]));
    results.push(await target('gateway + connectMilter → serveMilter, inet (loopback TCP)', [connectMilter(served.address, { name: 'served' })]));
    results.push(await target('gateway + connectMilter → serveMilter, unix socket', [connectMilter(servedUnix.address, { name: 'served' })]));
    await served.close();
    await servedUnix.close();
    const base = spread(results[0]!.rates).median;
    console.log(`\n${CONNECTIONS} connections × ${MESSAGES} messages × ${ROUNDS} rounds (node ${process.version})`);
    for (const r of results) {
      const s = spread(r.rates);
      console.log(
        `${r.name.padEnd(56)} ${s.median.toFixed(0).padStart(6)} msg/s  (min ${s.min.toFixed(0)}, max ${s.max.toFixed(0)})  ratio ${(s.median / base).toFixed(2)}  p50 ${r.p50.toFixed(1)} ms  p99 ${r.p99.toFixed(1)} ms`,
      );
    }
  } finally {
    await filter.stop();
    await unixFilter.stop();
    await fs.rm(dir, { recursive: true, force: true });
  }
}

await main();
