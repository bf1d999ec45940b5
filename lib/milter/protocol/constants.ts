/**
 * Wire constants of the Sendmail milter protocol (versions 2–6), each named after its
 * libmilter symbol: `SMFIC.HELO` is libmilter's `SMFIC_HELO`, and so on.
 *
 * Sources, checked value by value:
 * - sendmail include/libmilter/mfdef.h (8.14/8.15): SMFIC_*, SMFIR_*, SMFIP_*, SMFIA_*,
 *   MILTER_LEN_BYTES, MILTER_OPTLEN, MILTER_CHUNK_SIZE, MILTER_MAX_DATA_SIZE,
 *   MILTER_MDS_*, SMFI_PROT_VERSION;
 * - sendmail include/libmilter/mfapi.h: SMFIF_*, SMFIM_*;
 * - Postfix src/milter/milter8.c: the same values (Postfix keeps its own copy) and the
 *   per-version event masks (MILTER8_V2_PROTO_MASK …).
 *
 * Pure data: no behaviour, no validation. Easily confused: SMFIR_SHUTDOWN is '4',
 * SMFIR_SETSYMLIST is 'l', SMFIR_CONN_FAIL is 'f' (mfdef.h and milter8.c agree).
 */

/** Commands, MTA → filter (mfdef.h "commands"). */
export const SMFIC = {
  ABORT: 'A', // SMFIC_ABORT    Abort the current message
  BODY: 'B', // SMFIC_BODY     Body chunk
  CONNECT: 'C', // SMFIC_CONNECT  Connection information
  MACRO: 'D', // SMFIC_MACRO    Define macros
  BODYEOB: 'E', // SMFIC_BODYEOB  Final body chunk (end of message)
  HELO: 'H', // SMFIC_HELO     HELO/EHLO
  QUIT_NC: 'K', // SMFIC_QUIT_NC  QUIT, but a new connection follows on this socket
  HEADER: 'L', // SMFIC_HEADER   One header field
  MAIL: 'M', // SMFIC_MAIL     MAIL FROM
  EOH: 'N', // SMFIC_EOH      End of headers
  OPTNEG: 'O', // SMFIC_OPTNEG   Option negotiation
  QUIT: 'Q', // SMFIC_QUIT     QUIT: close the filter connection
  RCPT: 'R', // SMFIC_RCPT     RCPT TO
  DATA: 'T', // SMFIC_DATA     DATA
  UNKNOWN: 'U', // SMFIC_UNKNOWN  Any unknown SMTP command
} as const;
export type CommandCode = (typeof SMFIC)[keyof typeof SMFIC];

/** Replies and modification actions, filter → MTA (mfdef.h "actions (replies)"). */
export const SMFIR = {
  ADDRCPT: '+', // SMFIR_ADDRCPT     Add a recipient
  DELRCPT: '-', // SMFIR_DELRCPT     Remove a recipient
  ADDRCPT_PAR: '2', // SMFIR_ADDRCPT_PAR Add a recipient with ESMTP args
  SHUTDOWN: '4', // SMFIR_SHUTDOWN    421: shutdown (internal to MTA)
  ACCEPT: 'a', // SMFIR_ACCEPT      Accept
  REPLBODY: 'b', // SMFIR_REPLBODY    Replace body (one chunk)
  CONTINUE: 'c', // SMFIR_CONTINUE    Continue
  DISCARD: 'd', // SMFIR_DISCARD     Discard the message
  CHGFROM: 'e', // SMFIR_CHGFROM     Change the envelope sender
  CONN_FAIL: 'f', // SMFIR_CONN_FAIL   Cause a connection failure
  ADDHEADER: 'h', // SMFIR_ADDHEADER   Append a header
  INSHEADER: 'i', // SMFIR_INSHEADER   Insert a header
  SETSYMLIST: 'l', // SMFIR_SETSYMLIST  Set the list of symbols (macros)
  CHGHEADER: 'm', // SMFIR_CHGHEADER   Change or delete a header
  PROGRESS: 'p', // SMFIR_PROGRESS    Still working: reset the MTA's timeout
  QUARANTINE: 'q', // SMFIR_QUARANTINE  Quarantine the message
  REJECT: 'r', // SMFIR_REJECT      Reject
  SKIP: 's', // SMFIR_SKIP        Skip further events of this type
  TEMPFAIL: 't', // SMFIR_TEMPFAIL    Temporary failure
  REPLYCODE: 'y', // SMFIR_REPLYCODE   Reply with a custom SMTP reply
  /** The filter's OPTNEG reply uses the command letter (libmilter engine.c st_optionneg). */
  OPTNEG: 'O', // SMFIC_OPTNEG (as a reply)
} as const;
export type ReplyCode = (typeof SMFIR)[keyof typeof SMFIR];

/** Actions the filter may take, negotiated in OPTNEG (mfapi.h "What the filter might do"). */
export const SMFIF = {
  NONE: 0x0000_0000, // SMFIF_NONE
  ADDHDRS: 0x0000_0001, // SMFIF_ADDHDRS     filter may add headers
  CHGBODY: 0x0000_0002, // SMFIF_CHGBODY     filter may replace the body (SMFIF_MODBODY)
  ADDRCPT: 0x0000_0004, // SMFIF_ADDRCPT     filter may add recipients
  DELRCPT: 0x0000_0008, // SMFIF_DELRCPT     filter may delete recipients
  CHGHDRS: 0x0000_0010, // SMFIF_CHGHDRS     filter may change/delete headers
  QUARANTINE: 0x0000_0020, // SMFIF_QUARANTINE  filter may quarantine
  CHGFROM: 0x0000_0040, // SMFIF_CHGFROM     filter may change the envelope sender
  ADDRCPT_PAR: 0x0000_0080, // SMFIF_ADDRCPT_PAR filter may add recipients with args
  SETSYMLIST: 0x0000_0100, // SMFIF_SETSYMLIST  filter may send the macro lists it wants
} as const;
/** Every SMFIF_* bit (libmilter's SMFI_CURR_ACTS in 8.14+). */
export const SMFIF_ALL = 0x0000_01ff;

/** Protocol flags negotiated in OPTNEG (mfdef.h "What the MTA can send/filter wants"). */
export const SMFIP = {
  NOCONNECT: 0x0000_0001, // SMFIP_NOCONNECT   MTA should not send connect info
  NOHELO: 0x0000_0002, // SMFIP_NOHELO      MTA should not send HELO info
  NOMAIL: 0x0000_0004, // SMFIP_NOMAIL      MTA should not send MAIL info
  NORCPT: 0x0000_0008, // SMFIP_NORCPT      MTA should not send RCPT info
  NOBODY: 0x0000_0010, // SMFIP_NOBODY      MTA should not send the body
  NOHDRS: 0x0000_0020, // SMFIP_NOHDRS      MTA should not send headers
  NOEOH: 0x0000_0040, // SMFIP_NOEOH       MTA should not send EOH
  NR_HDR: 0x0000_0080, // SMFIP_NR_HDR      no reply for headers (alias SMFIP_NOHREPL)
  NOUNKNOWN: 0x0000_0100, // SMFIP_NOUNKNOWN   MTA should not send unknown commands
  NODATA: 0x0000_0200, // SMFIP_NODATA      MTA should not send DATA
  SKIP: 0x0000_0400, // SMFIP_SKIP        MTA understands SMFIS_SKIP
  RCPT_REJ: 0x0000_0800, // SMFIP_RCPT_REJ    MTA should also send rejected RCPTs
  NR_CONN: 0x0000_1000, // SMFIP_NR_CONN     no reply for connect
  NR_HELO: 0x0000_2000, // SMFIP_NR_HELO     no reply for HELO
  NR_MAIL: 0x0000_4000, // SMFIP_NR_MAIL     no reply for MAIL
  NR_RCPT: 0x0000_8000, // SMFIP_NR_RCPT     no reply for RCPT
  NR_DATA: 0x0001_0000, // SMFIP_NR_DATA     no reply for DATA
  NR_UNKN: 0x0002_0000, // SMFIP_NR_UNKN     no reply for UNKNOWN
  NR_EOH: 0x0004_0000, // SMFIP_NR_EOH      no reply for EOH
  NR_BODY: 0x0008_0000, // SMFIP_NR_BODY     no reply for body chunks
  HDR_LEADSPC: 0x0010_0000, // SMFIP_HDR_LEADSPC header values keep their leading space
  MDS_256K: 0x1000_0000, // SMFIP_MDS_256K    MILTER_MAX_DATA_SIZE = 256K - 1
  MDS_1M: 0x2000_0000, // SMFIP_MDS_1M      MILTER_MAX_DATA_SIZE = 1M - 1
} as const;
/** Every SMFIP_* bit below the MDS bits (libmilter's SMFI_CURR_PROT). */
export const SMFIP_CURR_PROT = 0x001f_ffff;
/** The "no send" flags (Postfix's SMFIP_NOSEND_MASK). */
export const SMFIP_NOSEND_MASK =
  SMFIP.NOCONNECT | SMFIP.NOHELO | SMFIP.NOMAIL | SMFIP.NORCPT | SMFIP.NOBODY | SMFIP.NOHDRS | SMFIP.NOEOH | SMFIP.NOUNKNOWN | SMFIP.NODATA;
/** The "no reply" flags (Postfix's SMFIP_NOREPLY_MASK). */
export const SMFIP_NOREPLY_MASK =
  SMFIP.NR_CONN | SMFIP.NR_HELO | SMFIP.NR_MAIL | SMFIP.NR_RCPT | SMFIP.NR_DATA | SMFIP.NR_UNKN | SMFIP.NR_HDR | SMFIP.NR_EOH | SMFIP.NR_BODY;

/** Address families in the CONNECT command (mfdef.h "address families"). */
export const SMFIA = {
  UNKNOWN: 'U', // SMFIA_UNKNOWN  unknown: nothing follows the family byte
  UNIX: 'L', // SMFIA_UNIX     unix/local: port (Postfix sends 0) + socket path
  INET: '4', // SMFIA_INET     IPv4: port + address
  INET6: '6', // SMFIA_INET6    IPv6: port + address
} as const;
export type FamilyCode = (typeof SMFIA)[keyof typeof SMFIA];

/** Macro stages of the per-stage macro lists a filter appends to OPTNEG (mfapi.h "Macro places"). */
export const SMFIM = {
  CONNECT: 0, // SMFIM_CONNECT  connect
  HELO: 1, // SMFIM_HELO     HELO/EHLO
  ENVFROM: 2, // SMFIM_ENVFROM  MAIL FROM
  ENVRCPT: 3, // SMFIM_ENVRCPT  RCPT TO
  DATA: 4, // SMFIM_DATA     DATA
  EOM: 5, // SMFIM_EOM      end of message (final dot)
  EOH: 6, // SMFIM_EOH      end of header (note: after EOM in numbering)
} as const;
export type MacroStage = (typeof SMFIM)[keyof typeof SMFIM];

/** Protocol versions (mfdef.h SMFI_PROT_VERSION is 6; Postfix speaks 2, 3, 4 and 6). */
export const SMFI_PROT_VERSION = 6; // SMFI_PROT_VERSION
export const SMFI_PROT_VERSION_MIN = 2;
export const MILTER_VERSIONS = [2, 3, 4, 5, 6] as const;

/**
 * The NO* events each version knows (Postfix milter8.c MILTER8_V2/V3/V4/V6_PROTO_MASK).
 * Version 5 was never released; Postfix treats it as the next lower known version, 4.
 */
export const SMFIP_VERSION_MASK = {
  2: SMFIP.NOCONNECT | SMFIP.NOHELO | SMFIP.NOMAIL | SMFIP.NORCPT | SMFIP.NOBODY | SMFIP.NOHDRS | SMFIP.NOEOH,
  3: SMFIP.NOCONNECT | SMFIP.NOHELO | SMFIP.NOMAIL | SMFIP.NORCPT | SMFIP.NOBODY | SMFIP.NOHDRS | SMFIP.NOEOH | SMFIP.NOUNKNOWN,
  4: SMFIP.NOCONNECT | SMFIP.NOHELO | SMFIP.NOMAIL | SMFIP.NORCPT | SMFIP.NOBODY | SMFIP.NOHDRS | SMFIP.NOEOH | SMFIP.NOUNKNOWN | SMFIP.NODATA,
  5: SMFIP.NOCONNECT | SMFIP.NOHELO | SMFIP.NOMAIL | SMFIP.NORCPT | SMFIP.NOBODY | SMFIP.NOHDRS | SMFIP.NOEOH | SMFIP.NOUNKNOWN | SMFIP.NODATA,
  6: SMFIP_NOSEND_MASK | SMFIP.SKIP | SMFIP.RCPT_REJ | SMFIP_NOREPLY_MASK | SMFIP.HDR_LEADSPC,
} as const;

/** Framing sizes (mfdef.h "Shared protocol constants"). */
export const MILTER_LEN_BYTES = 4; // MILTER_LEN_BYTES: the uint32 length prefix
export const MILTER_OPTLEN = 12; // MILTER_OPTLEN: version + actions + protocol
export const MILTER_CHUNK_SIZE = 65535; // MILTER_CHUNK_SIZE: largest body chunk sent
export const MILTER_MAX_DATA_SIZE = 65535; // MILTER_MAX_DATA_SIZE: default data limit per frame
export const MILTER_MDS_256K = 256 * 1024 - 1; // MILTER_MDS_256K: data limit with SMFIP_MDS_256K
export const MILTER_MDS_1M = 1024 * 1024 - 1; // MILTER_MDS_1M: data limit with SMFIP_MDS_1M
