/**
 * Option checks shared by the transports (lmtp(), smtp(), routes()): each error names the
 * factory and the field, so a typo fails at start-up with a clear message.
 */

/** Throws through `bad` unless `v` is undefined or an integer in [min, max]. */
export function checkInteger(bad: (why: string) => never, name: string, v: unknown, min: number, max = Number.MAX_SAFE_INTEGER): void {
  if (v !== undefined && !(typeof v === 'number' && Number.isSafeInteger(v) && v >= min && v <= max)) {
    bad(max === Number.MAX_SAFE_INTEGER ? `${name} must be an integer >= ${min}` : `${name} must be an integer from ${min} to ${max}`);
  }
}

/** Checks a partial timeouts object against the known names (each a positive integer, ms). */
export function checkTimeouts(bad: (why: string) => never, given: object | undefined, known: object): void {
  for (const [k, v] of Object.entries(given ?? {})) {
    if (!(k in known)) bad(`unknown timeout ${k}`);
    checkInteger(bad, `timeouts.${k}`, v, 1);
  }
}
