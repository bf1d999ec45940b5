/**
 * The OPTNEG payload, the same in both directions (SMFIC_OPTNEG from the MTA, the filter's
 * 'O' reply): uint32 version, uint32 actions (SMFIF_*), uint32 protocol flags (SMFIP_*),
 * then, from the filter only, zero or more macro lists: uint32 stage (SMFIM_*) followed by
 * a NUL-terminated list of macro names, space-separated (libmilter engine.c st_optionneg
 * writing, Postfix milter8.c milter8_negotiate reading).
 *
 * Names are split on spaces, tabs and commas (as Postfix splits macro name lists); empty
 * names are dropped. Stage numbers are kept as sent, even unknown ones: Postfix ignores
 * unknown stages with a warning, and that is a session decision, not a framing one.
 *
 * Does not: negotiate (pick versions, intersect flags) — that is the session's job.
 */
import { MILTER_OPTLEN } from './constants.js';
import { FieldReader, FieldWriter } from './fields.js';
import { MilterProtocolError } from './error.js';

/** The macro names a filter asks for at one stage. */
export interface MacroList {
  /** An SMFIM_* value (0–6); other numbers are passed through. */
  readonly stage: number;
  readonly names: readonly string[];
}

export interface OptNeg {
  readonly type: 'optneg';
  readonly version: number;
  /** SMFIF_* bits. */
  readonly actions: number;
  /** SMFIP_* bits. */
  readonly protocol: number;
  /** Per-stage macro lists (empty when none were appended). */
  readonly macros: readonly MacroList[];
}

const NAME_SEPARATORS = /[ \t,]+/;

export function readOptNeg(r: FieldReader): OptNeg {
  if (r.remaining < MILTER_OPTLEN) {
    throw new MilterProtocolError(`OPTNEG: ${r.remaining} bytes, needs at least ${MILTER_OPTLEN}`);
  }
  const version = r.uint32('version');
  const actions = r.uint32('actions');
  const protocol = r.uint32('protocol');
  const macros: MacroList[] = [];
  while (r.remaining > 0) {
    const stage = r.uint32('macro stage');
    const names = r.cstring('macro names').split(NAME_SEPARATORS).filter((n) => n !== '');
    macros.push({ stage, names });
  }
  r.end();
  return { type: 'optneg', version, actions, protocol, macros };
}

export function writeOptNeg(w: FieldWriter, o: OptNeg): void {
  w.uint32('version', o.version).uint32('actions', o.actions).uint32('protocol', o.protocol);
  for (const m of o.macros) {
    for (const name of m.names) {
      if (name === '' || /[\s,\0]/.test(name)) {
        throw new MilterProtocolError(`cannot encode OPTNEG: macro name ${JSON.stringify(name)} is empty or has a separator`);
      }
    }
    w.uint32('macro stage', m.stage).cstring('macro names', m.names.join(' '));
  }
}
