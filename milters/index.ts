/**
 * dovetail/milters: the bundled milters. Each lives in its own file in this folder, is a
 * factory taking a typed options object, and has its page in docs/milters/.
 */
export { relayControl, resolveDestination, canonicalDomain } from './relay-control.js';
export type { RelayControlOptions } from './relay-control.js';
export { sizeLimit } from './size-limit.js';
export type { SizeLimitOptions } from './size-limit.js';
export { spamTag } from './spam-tag.js';
export type { SpamTagOptions, RemoteScoreHeader } from './spam-tag.js';
