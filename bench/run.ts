/**
 * `npm run bench`: the gateway benchmark (bench/gateway.ts), or with `--peers` the peers
 * benchmark (bench/peers.ts: dovetail against Haraka, Postfix and friends, each in its own
 * process tree). Every other argument goes to the one chosen.
 */
if (process.argv.includes('--peers')) {
  const { runPeers } = await import('./peers.js');
  try {
    await runPeers();
  } catch (err) {
    process.stderr.write(`bench failed: ${err instanceof Error ? err.message : String(err)}\n`);
    process.exitCode = 1;
  }
} else {
  await import('./gateway.js');
}
