/**
 * The testing-a-milter example runs: importing it registers its node:test tests in this
 * file, so they run (and must pass) with the suite. Also checks that the example in
 * docs/writing-a-milter.md is this file, with the package's own import names.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs/promises';
import path from 'node:path';
import { repoRoot } from '../helpers/libmilter.js';
import '../../examples/testing-a-milter.js';

test('docs/writing-a-milter.md shows examples/testing-a-milter.ts (imports as a user writes them)', async () => {
  const source = await fs.readFile(path.join(repoRoot, 'examples/testing-a-milter.ts'), 'utf8');
  const docs = await fs.readFile(path.join(repoRoot, 'docs/writing-a-milter.md'), 'utf8');
  const body = source.slice(source.indexOf('import { test }')).trimEnd();
  const asUser = body
    .replace("from '../lib/index.js'", "from 'dovetail'")
    .replace("from '../lib/testing/index.js'", "from 'dovetail/testing'")
    .replace("from '../milters/index.js'", "from 'dovetail/milters'");
  assert.ok(docs.includes(asUser), 'the docs example and examples/testing-a-milter.ts differ');
});
