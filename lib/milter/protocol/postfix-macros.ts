/**
 * Postfix's default milter macro lists, per stage (postconf(5), Postfix 3.7:
 * milter_connect_macros, milter_helo_macros, milter_mail_macros, milter_rcpt_macros,
 * milter_data_macros, milter_end_of_header_macros, milter_end_of_data_macros,
 * milter_unknown_command_macros), and the mapping between our stage names, the SMFIM_*
 * numbers a filter uses in OPTNEG to ask for its own lists, and the command byte each
 * macro packet is sent for.
 *
 * As in Postfix (milter8.c milter8_header/milter8_body): HEADER packets carry the
 * end-of-header list and BODY packets the end-of-data list.
 *
 * Pure data: no behaviour.
 */
import { SMFIC, SMFIM, type CommandCode } from './constants.js';

/** The stages a macro list belongs to (Postfix's parameter names, shortened). */
export type MacroStageName = 'connect' | 'helo' | 'mail' | 'rcpt' | 'data' | 'eoh' | 'eom' | 'unknown';

/** Postfix 3.7's defaults. */
export const POSTFIX_DEFAULT_MACROS: Readonly<Record<MacroStageName, readonly string[]>> = Object.freeze({
  connect: Object.freeze(['j', '{daemon_name}', '{daemon_addr}', 'v', '_']),
  helo: Object.freeze(['{tls_version}', '{cipher}', '{cipher_bits}', '{cert_subject}', '{cert_issuer}']),
  mail: Object.freeze(['i', '{auth_type}', '{auth_authen}', '{auth_author}', '{mail_addr}', '{mail_host}', '{mail_mailer}']),
  rcpt: Object.freeze(['i', '{rcpt_addr}', '{rcpt_host}', '{rcpt_mailer}']),
  data: Object.freeze(['i']),
  eoh: Object.freeze(['i']),
  eom: Object.freeze(['i']),
  unknown: Object.freeze([]),
});

/** SMFIM_* number → our stage name (for the lists a filter appends to its OPTNEG reply). */
export const MACRO_STAGE_BY_SMFIM: Readonly<Record<number, MacroStageName>> = Object.freeze({
  [SMFIM.CONNECT]: 'connect',
  [SMFIM.HELO]: 'helo',
  [SMFIM.ENVFROM]: 'mail',
  [SMFIM.ENVRCPT]: 'rcpt',
  [SMFIM.DATA]: 'data',
  [SMFIM.EOM]: 'eom',
  [SMFIM.EOH]: 'eoh',
});

/** The command byte whose macro packet carries each list. */
export const MACRO_COMMAND: Readonly<Record<MacroStageName, CommandCode>> = Object.freeze({
  connect: SMFIC.CONNECT,
  helo: SMFIC.HELO,
  mail: SMFIC.MAIL,
  rcpt: SMFIC.RCPT,
  data: SMFIC.DATA,
  eoh: SMFIC.EOH,
  eom: SMFIC.BODYEOB,
  unknown: SMFIC.UNKNOWN,
});
