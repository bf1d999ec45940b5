/**
 * dovetail/milters: the bundled milters (relayControl, dnsbl, mailAuth, spamTag, sizeLimit).
 * Each lives in its own file in this folder and is re-exported here as it lands.
 */
export {};
