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
export { dnsbl, parseSite, compileFilter } from './dnsbl.js';
export type { DnsblOptions, DnsblZone, RhsblZone, DnsblCacheOptions } from './dnsbl.js';
export { mailAuth, publicKeyCache, MAIL_AUTH_DEFAULT_SCORES } from './mail-auth.js';
export type { MailAuthOptions, MailAuthRule, PublicKeyCache, PublicKeyCacheStats } from './mail-auth.js';
export { defaultResolver, reverseName } from './dns.js';
export type { DnsResolver, AddressWithTtl, DefaultResolverOptions } from './dns.js';
export { senderLogin } from './sender-login.js';
export type { SenderLoginOptions, SenderOwners } from './sender-login.js';
export { dkimSign, dkimDnsRecord, DKIM_SIGN_DEFAULT_HEADERS, type DkimSignOptions, type DkimSignKey, type DkimCanonicalization } from './dkim-sign.js';
export { aliases, parseAliases, AliasSyntaxError } from './aliases.js';
export type { AliasesOptions, AliasesCommonOptions, AliasesMilter, AliasTable, AliasTarget } from './aliases.js';
export { virtual } from './virtual.js';
export type { VirtualOptions, VirtualMilter } from './virtual.js';
export { relocated } from './relocated.js';
export type { RelocatedOptions, RelocatedMilter } from './relocated.js';
export { masquerade } from './masquerade.js';
export type { MasqueradeOptions, MasqueradeMilter } from './masquerade.js';
export { verifyWithMaps, expandAddress, splitExtension, ExpansionError } from './address-maps.js';
export type { AddressMapMilter, ExpansionLimits, Extension, Lookup, Target } from './address-maps.js';
export { postmaster, isRoleAddress, isRoleRecipient, ROLE_NAMES } from './postmaster.js';
export type { PostmasterOptions, PostmasterMilter } from './postmaster.js';
export { rateLimit } from './rate-limit.js';
export type { RateLimitOptions, RateRule } from './rate-limit.js';
export { greylist } from './greylist.js';
export type { GreylistOptions, GreylistDecision } from './greylist.js';
