/**
 * Test helper: a bounded poll. Tests wait for something to happen (a message to arrive, a
 * queue to empty) by asking again every 25 ms up to a deadline, never with a fixed sleep
 * whose length is the assertion.
 */

/** Resolves with the first truthy value of `check()`; rejects naming `what` after `ms`. */
export async function waitFor<T>(what: string, check: () => Promise<T | undefined | false> | T | undefined | false, ms = 20_000, detail?: () => Promise<string> | string): Promise<T> {
  const deadline = Date.now() + ms;
  for (;;) {
    const v = await check();
    if (v) return v;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}${detail ? `\n${await detail()}` : ''}`);
    await new Promise((r) => setTimeout(r, 25));
  }
}
