/**
 * What each milter answered, as the chain itself reports it: the kit listens on the
 * chain's own diagnostics channels (`dovetail:milter:verdict`, `dovetail:milter:error`,
 * lib/diagnostics.ts) and routes each event to the test session whose sessionId it
 * carries. So a verdict in a test result is the one the chain acted on (after its checks
 * and default actions), not what the handler happened to return.
 *
 * Does not: subscribe when no test session is open (the channels then have no subscriber
 * from the kit), or keep events of sessions it does not know.
 */
import diagnostics_channel from 'node:diagnostics_channel';
import { Channels } from '../diagnostics.js';
import type { Stage } from '../milter/stages.js';
import type { Verdict } from '../milter/verdict.js';
import type { DefaultAction } from '../milter/types.js';

/**
 * One milter's answer at one stage, in the order the chain got them. Continue verdicts are
 * not listed (the chain does not report them); a failure is listed with the default action
 * the chain took instead.
 */
export type MilterEvent =
  | {
      /** The milter's name. */
      readonly milter: string;
      readonly stage: Stage;
      /** The verdict the chain acted on (never `continue`). */
      readonly verdict: Verdict;
    }
  | {
      readonly milter: string;
      readonly stage: Stage;
      /** The handler threw, timed out, or answered a verdict its stage does not allow. */
      readonly error: Error;
      /** What the chain did instead: the milter's defaultAction (`none` at abort and close). */
      readonly action: DefaultAction | 'none';
    };

interface VerdictMessage {
  readonly sessionId: string;
  readonly milter: string;
  readonly stage: Stage;
  readonly verdict: Verdict;
}
interface ErrorMessage {
  readonly sessionId: string;
  readonly milter: string;
  readonly stage: Stage;
  readonly error: Error;
  readonly action: DefaultAction | 'none';
}

const sinks = new Map<string, (e: MilterEvent) => void>();

const onVerdict = (m: unknown): void => {
  const v = m as VerdictMessage;
  sinks.get(v.sessionId)?.({ milter: v.milter, stage: v.stage, verdict: v.verdict });
};
const onError = (m: unknown): void => {
  const v = m as ErrorMessage;
  sinks.get(v.sessionId)?.({ milter: v.milter, stage: v.stage, error: v.error, action: v.action });
};

/** True while a test session with this id is being traced. */
export function tracing(sessionId: string): boolean {
  return sinks.has(sessionId);
}

/** Starts routing the chain's events for `sessionId` to `sink`; returns the function that stops it. */
export function traceSession(sessionId: string, sink: (e: MilterEvent) => void): () => void {
  if (sinks.size === 0) {
    diagnostics_channel.subscribe(Channels.verdict, onVerdict);
    diagnostics_channel.subscribe(Channels.milterError, onError);
  }
  sinks.set(sessionId, sink);
  return () => {
    if (!sinks.delete(sessionId)) return;
    if (sinks.size === 0) {
      diagnostics_channel.unsubscribe(Channels.verdict, onVerdict);
      diagnostics_channel.unsubscribe(Channels.milterError, onError);
    }
  };
}
