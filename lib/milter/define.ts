/**
 * defineMilter() and the checks a milter passes when it is registered (fastify-style: a
 * malformed milter fails at start-up, not on the first message that reaches it).
 */
import { DovetailError, ErrorCodes } from '../errors.js';
import { STAGES } from './stages.js';
import type { Milter } from './types.js';

const KNOWN_KEYS = new Set<string>(['name', 'defaultAction', 'timeouts', 'limits', 'needs', ...STAGES]);
const DEFAULT_ACTIONS = new Set(['tempfail', 'accept', 'reject', 'quarantine']);

/**
 * Checks a milter when it is registered: a non-empty name, handlers that are functions,
 * no function-valued key that is not a stage (a misspelt handler would never run), a
 * known default action, positive timeouts, and `needs` with boolean `headers` / `body`.
 */
export function validateMilter(milter: unknown): asserts milter is Milter {
  const bad = (why: string): never => {
    throw new DovetailError(ErrorCodes.INVALID_MILTER, why);
  };
  if (typeof milter !== 'object' || milter === null) bad('a milter must be an object');
  const m = milter as Record<string, unknown>;
  if (typeof m['name'] !== 'string' || !m['name']) bad('a milter needs a non-empty name');
  const name = m['name'] as string;
  for (const stage of STAGES) {
    if (m[stage] !== undefined && typeof m[stage] !== 'function') bad(`milter ${name}: ${stage} must be a function`);
  }
  for (const key of Object.keys(m)) {
    if (!KNOWN_KEYS.has(key) && typeof m[key] === 'function') {
      bad(`milter ${name}: "${key}" is not a stage (stages: ${STAGES.join(', ')})`);
    }
  }
  if (m['defaultAction'] !== undefined && !DEFAULT_ACTIONS.has(m['defaultAction'] as string)) {
    bad(`milter ${name}: defaultAction must be one of ${[...DEFAULT_ACTIONS].join(', ')}`);
  }
  const limit = (m['limits'] as Record<string, unknown> | undefined)?.['maxMessageBytes'];
  if (limit !== undefined && !(typeof limit === 'number' && Number.isSafeInteger(limit) && limit > 0)) {
    bad(`milter ${name}: limits.maxMessageBytes must be a positive integer`);
  }
  const needs = m['needs'];
  if (needs !== undefined) {
    if (typeof needs !== 'object' || needs === null) bad(`milter ${name}: needs must be an object ({ headers?: boolean, body?: boolean })`);
    for (const [k, v] of Object.entries(needs as Record<string, unknown>)) {
      if (k !== 'headers' && k !== 'body') bad(`milter ${name}: needs.${k} is not known (headers, body)`);
      if (v !== undefined && typeof v !== 'boolean') bad(`milter ${name}: needs.${k} must be a boolean`);
    }
  }
  const t = m['timeouts'] as Record<string, unknown> | undefined;
  if (t !== undefined) {
    for (const k of ['command', 'content']) {
      const v = t[k];
      if (v !== undefined && !(typeof v === 'number' && v > 0 && Number.isFinite(v))) {
        bad(`milter ${name}: timeouts.${k} must be a positive number of milliseconds`);
      }
    }
  }
}


/**
 * Declares a milter with full type inference: handler parameters are typed from the
 * stage, and a verdict not allowed at a stage is a compile error. Checks the object at
 * run time too (see {@link validateMilter}).
 */
export function defineMilter<const M extends Milter>(milter: M): M {
  validateMilter(milter);
  return milter;
}
