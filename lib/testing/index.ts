/**
 * dovetail/testing: a test kit for milter authors. Runs a milter — in-process, a chain of
 * them, or a remote filter over the milter protocol — through a scripted SMTP session in
 * process, with no SMTP socket, on the gateway's own chain machinery, and reports each
 * stage's outcome, every milter's verdicts, the edits the chain applied and the resulting
 * message. See docs/writing-a-milter.md, "Testing your milter".
 */
export { runMilter } from './run.js';
export type { TestScript, TestTransaction, TestRun, TransactionResult, TestVerdict } from './run.js';
export { startSession, TestSession } from './session.js';
export type { MilterUnderTest, TestSessionOptions, TestClient, TestServer, TestAddress, StepResult, MessageResult } from './session.js';
export type { EditSummary, AddedHeader, InsertedHeader, ChangedHeader, DeletedHeader, RecordedEdit } from './edits.js';
export type { MilterEvent } from './trace.js';

// The types a test reads, from where they are defined.
export type { StageOutcome } from '../milter/chain.js';
export type { MessageEdit } from '../milter/message.js';
export type { Stage } from '../milter/stages.js';
export type { Verdict, SmtpReply } from '../milter/verdict.js';
export type { EnvelopeAddress, HeaderField, ScoreEntry, TlsInfo, AuthInfo, Milter } from '../milter/types.js';
export { formatReply } from '../milter/verdict.js';
export { connectMilter } from '../milter/protocol/client.js';
