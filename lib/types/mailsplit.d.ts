/**
 * Types for the part of mailsplit (CommonJS, no published types) that dovetail uses: the
 * `Headers` class of `mailsplit/lib/headers.js`. Only what we call is declared.
 */
declare module 'mailsplit/lib/headers.js' {
  /** One header field: `key` is the lower-cased name, `line` the whole field, folding kept, as a binary (latin1) string. */
  export interface HeaderLine {
    key: string;
    line: string;
  }

  /** Parses a header block (a Buffer or binary string, ending with the empty line or not). */
  export default class Headers {
    constructor(headers: Buffer | string | HeaderLine[], config?: { Iconv?: unknown });
    /** The fields in order; the first line is taken as an mbox `From ` or HTTP `POST ` line when it looks like one. */
    getList(): HeaderLine[];
    get(key: string): string[];
    getFirst(key: string): string;
    hasHeader(key: string): boolean;
    build(lineEnd?: string): Buffer;
  }
}
