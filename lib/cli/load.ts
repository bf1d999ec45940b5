/**
 * Finding and loading a config file: TS (through jiti, so TS configs run on Node 20 too), JS
 * and MJS (through jiti as well, so a reload re-reads the file and what it imports), JSON.
 * The export is the default export (or, failing that, a `config` export); a function (sync or
 * async) is called. Then ./schema.ts checks it.
 *
 * `import … from 'dovetail'` and `'dovetail/milters'` inside a config resolve to this very
 * copy of the library (jiti virtual modules), wherever the config file lives.
 *
 * Also the loader of `{ module: './file.ts' }` milters and `dovetail milter serve` files.
 */
import { existsSync } from 'node:fs';
import { readFile } from 'node:fs/promises';
import path from 'node:path';
import { createJiti } from 'jiti';
import { checkConfig, type CheckedConfig, type ConfigProblem } from './schema.js';

export { DEFAULT_CONFIG_FILES, findConfigFile } from './paths.js';

/** A loaded config: the checked object, or the problems; `file` is absolute. */
export interface LoadedConfig {
  readonly file: string;
  /** The directory relative paths in the config are resolved against. */
  readonly dir: string;
  readonly config: CheckedConfig | undefined;
  readonly problems: readonly ConfigProblem[];
}

/** Imports a TS/JS/MJS module afresh (not from a cache: a reload sees the file as it is now). */
export async function importFresh(file: string): Promise<Record<string, unknown>> {
  // Loaded here, not at the top: `dovetail --help` and JSON configs need neither.
  const [library, bundled] = await Promise.all([import('../index.js'), import('../../milters/index.js')]);
  const jiti = createJiti(import.meta.url, {
    moduleCache: false,
    fsCache: false,
    interopDefault: false,
    virtualModules: { dovetail: library, 'dovetail/milters': bundled },
  });
  return (await jiti.import(file)) as Record<string, unknown>;
}

const problem = (file: string, message: string): ConfigProblem => ({ path: path.basename(file), message });

/** Loads and checks a config file; never throws for a bad file (problems say what is wrong). */
export async function loadConfig(file: string): Promise<LoadedConfig> {
  const dir = path.dirname(file);
  const fail = (message: string): LoadedConfig => ({ file, dir, config: undefined, problems: [problem(file, message)] });
  let value: unknown;
  if (/\.json$/i.test(file)) {
    let text: string;
    try {
      text = await readFile(file, 'utf8');
    } catch (err) {
      return fail(`cannot read: ${(err as Error).message}`);
    }
    try {
      value = JSON.parse(text);
    } catch (err) {
      return fail(`not valid JSON: ${(err as Error).message}`);
    }
  } else if (/\.(ts|mts|cts|js|mjs|cjs)$/i.test(file)) {
    if (!existsSync(file)) return fail('no such file');
    let mod: Record<string, unknown>;
    try {
      mod = await importFresh(file);
    } catch (err) {
      return fail(`cannot load: ${(err as Error).message.split('\n')[0]}`);
    }
    value = mod['default'] ?? mod['config'];
    if (value === undefined) return fail('exports no config (export default defineConfig({ … }))');
    if (typeof value === 'function') {
      try {
        value = await (value as () => unknown)();
      } catch (err) {
        return fail(`the exported function threw: ${(err as Error).message}`);
      }
    }
  } else {
    return fail('expected a .ts, .js, .mjs or .json file');
  }
  const { config, problems } = checkConfig(value);
  return { file, dir, config, problems };
}
