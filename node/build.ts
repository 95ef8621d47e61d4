// npm run build: bundles the daemon and CLI (node/src/cli.ts and everything it imports, npm
// packages included) into node/dist/shoal.mjs, which node/bin/shoal.js runs while it is newer
// than every file it was built from (node/dist/inputs.json lists them).
//
// Why a bundle: from ~1400 separate files a node spends ~1.3 CPU s starting (resolving and
// linking each) and keeps every file's full source text in its heap; from one file with comments
// and whitespace stripped it starts in ~0.4 CPU s and idles ~20 MB smaller (bench/results/mesh.md).
// Identifiers are kept, so stack traces still name the functions.
import { build } from 'esbuild';
import { mkdir, rename, writeFile } from 'node:fs/promises';
import { fileURLToPath } from 'node:url';

const root = fileURLToPath(new URL('../', import.meta.url));
const dist = fileURLToPath(new URL('./dist/', import.meta.url));
await mkdir(dist, { recursive: true });

const result = await build({
  absWorkingDir: root,
  entryPoints: ['node/src/cli.ts'],
  bundle: true,
  platform: 'node',
  format: 'esm',
  target: 'node22',
  minifyWhitespace: true,
  minifySyntax: true,
  metafile: true,
  write: false,
  logLevel: 'warning',
  // CommonJS packages inside an ES module bundle still call require().
  banner: { js: "import { createRequire as __shoalCreateRequire } from 'node:module'; const require = __shoalCreateRequire(import.meta.url);" },
});

// Written beside and renamed over, so a node starting meanwhile never loads half a bundle.
const [output] = result.outputFiles;
const inputs = Object.keys(result.metafile.inputs).map((input) => fileURLToPath(new URL(input, `file://${root}`)));
await writeFile(`${dist}shoal.mjs.tmp`, output!.contents);
await writeFile(`${dist}inputs.json.tmp`, JSON.stringify(inputs));
await rename(`${dist}inputs.json.tmp`, `${dist}inputs.json`);
await rename(`${dist}shoal.mjs.tmp`, `${dist}shoal.mjs`);
console.log(`node/dist/shoal.mjs: ${(output!.contents.byteLength / 2 ** 20).toFixed(1)} MiB from ${inputs.length} files`);
