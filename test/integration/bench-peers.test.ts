/**
 * The peers benchmark (bench/peers.ts) in its tiniest mode, so that it cannot rot: `--smoke`
 * starts every real peer (Postfix five times, Dovecot LMTP twice, Haraka twice, the
 * python3-milter filter, smtp-sink per system, the Node systems as child processes), sends each a handful of
 * messages in one round, and writes its JSON. The test checks that every target is in it
 * with numbers (throughput, latency, CPU per message, peak RSS; bytes read by the filter for
 * the milter targets) and that every ratio is there. It needs root and the Debian peers
 * (scripts/install-peers.sh); Haraka is installed into bench/haraka/node_modules by the
 * harness itself when missing (npm, the registry). It fails, never skips, without them.
 *
 * It does not judge the numbers: a handful of messages says nothing about speed.
 */
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { describe, it } from 'node:test';
import { fileURLToPath } from 'node:url';
import { markdown, svg, TARGET_NAMES } from '../../bench/peers.js';

const PEERS = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../bench/peers.js');

interface SpreadJson {
  median: number;
  min: number;
  max: number;
}
interface TargetJson {
  name: string;
  group: string;
  messagesPerRound: number;
  acceptedPerSec: SpreadJson;
  deliveredPerSec: SpreadJson;
  p50Ms: number;
  p99Ms: number;
  cpuMsPerMsg: SpreadJson;
  peakRssMiB: number;
  filterBytesPerMsg?: SpreadJson;
  rounds: unknown[];
}

function run(args: string[], timeoutMs: number): Promise<{ code: number | null; out: string }> {
  return new Promise((resolve) => {
    const child = spawn(process.execPath, [PEERS, ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    child.stdout.on('data', (d: Buffer) => (out += d.toString()));
    child.stderr.on('data', (d: Buffer) => (out += d.toString()));
    // A hang guard, not a threshold: SIGTERM lets the harness stop what it started.
    const t = setTimeout(() => child.kill('SIGTERM'), timeoutMs);
    child.on('exit', (code) => {
      clearTimeout(t);
      resolve({ code, out });
    });
  });
}

describe('bench/peers --smoke', () => {
  it('runs every target against its real peer and reports numbers for each', { timeout: 600_000 }, async () => {
    const dir = await fs.mkdtemp(path.join(os.tmpdir(), 'dovetail-bench-peers-test-'));
    try {
      const file = path.join(dir, 'peers.json');
      const r = await run(['--smoke', '--out', file], 540_000);
      assert.equal(r.code, 0, `bench/peers --smoke failed:\n${r.out.slice(-6000)}`);
      const json = JSON.parse(await fs.readFile(file, 'utf8')) as {
        profile: string;
        machine: Record<string, unknown>;
        targets: TargetJson[];
        ratios: { a: string; b: string; acceptedPerSec: SpreadJson; cpuMsPerMsg: SpreadJson }[];
      };
      assert.equal(json.profile, 'smoke');
      for (const k of ['cpus', 'cpuModel', 'memoryGiB', 'node', 'postfix', 'haraka']) assert.ok(json.machine[k], `machine.${k}`);
      assert.match(String(json.machine['haraka']), /^3\.3\.4$/);
      assert.deepEqual(json.targets.map((t) => t.name).sort(), [...TARGET_NAMES].sort());
      for (const t of json.targets) {
        const what = `${t.name}: ${JSON.stringify(t).slice(0, 400)}`;
        assert.equal(t.rounds.length, 1, what);
        assert.ok(t.messagesPerRound >= 2, what);
        for (const v of [t.acceptedPerSec.median, t.deliveredPerSec.median, t.p50Ms, t.p99Ms, t.peakRssMiB]) assert.ok(Number.isFinite(v) && v > 0, what);
        assert.ok(Number.isFinite(t.cpuMsPerMsg.median) && t.cpuMsPerMsg.median >= 0, what);
        if (t.group === 'milter') assert.ok(t.filterBytesPerMsg && t.filterBytesPerMsg.median > 0, `${what}: bytes read by the filter`);
      }
      assert.ok(json.ratios.length >= 10, `ratios: ${json.ratios.map((x) => `${x.a}/${x.b}`).join(', ')}`);
      for (const x of json.ratios) assert.ok(Number.isFinite(x.acceptedPerSec.median) && x.acceptedPerSec.median > 0, `${x.a} ÷ ${x.b}`);
      // The report writers take the same JSON.
      const md = markdown(json as unknown as Parameters<typeof markdown>[0]);
      for (const name of TARGET_NAMES) assert.ok(md.includes(`\`${name}\``), `markdown has ${name}`);
      const chart = svg(json as unknown as Parameters<typeof svg>[0]);
      assert.match(chart, /^<svg [^>]*xmlns="http:\/\/www\.w3\.org\/2000\/svg"/);
      assert.match(chart, /<\/svg>\n$/);
      assert.equal((chart.match(/<rect /g) ?? []).length, 1 + 2 * json.targets.filter((t) => t.group !== 'large').length);
    } finally {
      await fs.rm(dir, { recursive: true, force: true });
    }
  });
});
