/**
 * The paths a config implies (queue directory, control socket, quarantine), resolved against
 * the config file's directory. Kept apart from ./build.ts so `dovetail queue` can find the
 * control socket without loading the milters.
 */
import { existsSync } from 'node:fs';
import path from 'node:path';
import type { CheckedConfig } from './schema.js';

/** The file names `dovetail start` looks for when `-c` is not given, in order. */
export const DEFAULT_CONFIG_FILES = ['dovetail.config.ts', 'dovetail.config.js', 'dovetail.config.mjs', 'dovetail.config.json'] as const;

/** The config file to use: `given` (resolved against cwd), else the first default that exists. */
export function findConfigFile(given: string | undefined, cwd: string = process.cwd()): string | undefined {
  if (given !== undefined) return path.resolve(cwd, given);
  for (const name of DEFAULT_CONFIG_FILES) {
    const f = path.join(cwd, name);
    if (existsSync(f)) return f;
  }
  return undefined;
}


/** Paths that follow from the config (absolute). */
export function pathsOf(config: CheckedConfig, dir: string): { queueDir: string; controlSocket: string; quarantine: string } {
  const queueDir = path.resolve(dir, config.queue?.dir ?? 'var/queue');
  const q = config.quarantine;
  return {
    queueDir,
    controlSocket: path.resolve(dir, config.control?.socket ?? path.join(queueDir, 'control.sock')),
    quarantine: path.resolve(dir, q === undefined ? 'var/quarantine' : typeof q === 'string' ? q : q.maildir),
  };
}
