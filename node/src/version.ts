import { readFileSync } from 'node:fs';

/** The version in node/package.json, read once. */
export const VERSION: string = JSON.parse(readFileSync(new URL('../package.json', import.meta.url), 'utf8')).version;
