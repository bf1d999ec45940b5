#!/usr/bin/env node
/**
 * The `dovetail` command (package.json "bin"): a thin shim over lib/cli/main.ts. See
 * docs/cli.md.
 */
import { main } from '../lib/cli/main.js';

// Exit with the code once the command is done, whatever timers a library left behind
// (stdout and stderr are synchronous for files and pipes on Linux and macOS).
process.exit(await main(process.argv.slice(2)));
