/**
 * The milter stages, in protocol order, as data. Each maps onto one Sendmail milter command
 * (SMFIC_*) and one libmilter callback (xxfi_*).
 */

export const STAGES = [
  'connect', // SMFIC_CONNECT  xxfi_connect
  'helo', // SMFIC_HELO     xxfi_helo
  'mail', // SMFIC_MAIL     xxfi_envfrom
  'rcpt', // SMFIC_RCPT     xxfi_envrcpt
  'data', // SMFIC_DATA     xxfi_data
  'header', // SMFIC_HEADER   xxfi_header
  'eoh', // SMFIC_EOH      xxfi_eoh
  'body', // SMFIC_BODY     xxfi_body
  'eom', // SMFIC_BODYEOB  xxfi_eom
  'abort', // SMFIC_ABORT    xxfi_abort
  'close', // SMFIC_QUIT     xxfi_close
  'unknown', // SMFIC_UNKNOWN  xxfi_unknown
] as const;

export type Stage = (typeof STAGES)[number];

/** Stages timed by the content timeout (Postfix: milter_content_timeout); the rest use the command timeout. */
export const CONTENT_STAGES: ReadonlySet<Stage> = new Set<Stage>(['header', 'eoh', 'body', 'eom']);
