// Which code node/bin/shoal.js runs: the bundle `npm run build` writes (node/build.ts) while it
// is newer than every file it was built from, else nothing (the sources run). Plain JavaScript:
// it runs before anything is loaded.
import { readFileSync, statSync } from 'node:fs';

/**
 * The bundle in `distDir` (a URL ending in /) if it exists and no file listed in its
 * inputs.json changed after it was written; undefined otherwise.
 */
export function currentBundle(distDir) {
  const bundle = new URL('shoal.mjs', distDir);
  try {
    const built = statSync(bundle).mtimeMs;
    const inputs = JSON.parse(readFileSync(new URL('inputs.json', distDir), 'utf8'));
    return inputs.every((file) => statSync(file).mtimeMs <= built) ? bundle : undefined;
  } catch {
    return undefined;
  }
}
