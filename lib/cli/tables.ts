/**
 * Postfix-style lookup table files (the text `postmap` reads, postmap(1) "INPUT FILE
 * FORMAT"): one `key value` per line, separated by whitespace or a colon-free gap; `#`
 * starts a comment line; a line that starts with whitespace continues the previous one;
 * blank lines are ignored. For the map options of virtual, senderLogin and relocated in a
 * config file (`"file": "/etc/dovetail/virtual"`).
 *
 * Does not: read the binary .db/.lmdb forms, or /etc/aliases syntax (aliases() reads that).
 */
import { readFile, stat } from 'node:fs/promises';

/** The largest table file read (a config must not make us hold an unbounded file). */
export const MAX_TABLE_BYTES = 64 * 1024 * 1024;

/**
 * Parses table text. With `multi`, a value is a list (split at commas and whitespace, as
 * Postfix's virtual(5) results); otherwise the rest of the line, trimmed.
 *
 * @throws Error naming the line of a key without a value, or of a key given twice.
 */
export function parseTable(text: string, name: string, multi: boolean): Record<string, string | string[]> {
  const logical: { line: number; text: string }[] = [];
  text.split(/\r?\n/).forEach((raw, i) => {
    if (/^\s*#/.test(raw) || raw.trim() === '') return;
    const last = logical[logical.length - 1];
    if (/^\s/.test(raw) && last) last.text += ' ' + raw.trim();
    else logical.push({ line: i + 1, text: raw.trim() });
  });
  const out: Record<string, string | string[]> = Object.create(null) as Record<string, string | string[]>;
  for (const { line, text: t } of logical) {
    const m = /^(\S+)\s+(.+)$/.exec(t);
    if (!m) throw new Error(`${name}, line ${line}: expected "key value"`);
    const key = m[1]!;
    if (Object.hasOwn(out, key)) throw new Error(`${name}, line ${line}: ${key} is given twice`);
    out[key] = multi ? m[2]!.split(/[\s,]+/).filter(Boolean) : m[2]!.trim();
  }
  return { ...out };
}

/** Reads and parses a table file. */
export async function readTable(file: string, multi: boolean): Promise<Record<string, string | string[]>> {
  if ((await stat(file)).size > MAX_TABLE_BYTES) throw new Error(`${file} is larger than ${MAX_TABLE_BYTES} bytes`);
  return parseTable(await readFile(file, 'utf8'), file, multi);
}
