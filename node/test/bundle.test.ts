import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { mkdtemp, rm, utimes, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { pathToFileURL } from 'node:url';
import { promisify } from 'node:util';

// node/bin is plain JavaScript (it runs before any TypeScript is loaded), so it is imported by URL.
const bundleModule = new URL('../bin/bundle.js', import.meta.url).href;
const { currentBundle } = (await import(bundleModule)) as { currentBundle: (distDir: URL) => URL | undefined };

describe('node/bin/shoal.js runs the bundle only while it is current', () => {
  let dir: string;
  let dist: URL;
  const input = () => join(dir, 'source.ts');
  const at = (seconds: number) => new Date(1_800_000_000_000 + seconds * 1000);

  before(async () => {
    dir = await mkdtemp(join(tmpdir(), 'shoal-bundle-'));
    dist = pathToFileURL(`${dir}/`);
  });
  after(() => rm(dir, { recursive: true, force: true }));

  /** A bundle written at t = 10 s from one input last changed at `inputChangedAt` seconds. */
  async function layout(inputChangedAt: number): Promise<void> {
    await writeFile(input(), 'export {};');
    await writeFile(join(dir, 'inputs.json'), JSON.stringify([input()]));
    await writeFile(join(dir, 'shoal.mjs'), '');
    await utimes(input(), at(inputChangedAt), at(inputChangedAt));
    await utimes(join(dir, 'shoal.mjs'), at(10), at(10));
  }

  test('a bundle newer than all its inputs is run', async () => {
    await layout(5);
    assert.equal(currentBundle(dist)?.href, new URL('shoal.mjs', dist).href);
  });

  test('an input edited after the build sends the start to the sources', async () => {
    await layout(20);
    assert.equal(currentBundle(dist), undefined);
  });

  test('a missing input, a missing list or a missing bundle sends it to the sources', async () => {
    await layout(5);
    await rm(input());
    assert.equal(currentBundle(dist), undefined);
    await layout(5);
    await rm(join(dir, 'inputs.json'));
    assert.equal(currentBundle(dist), undefined);
    await layout(5);
    await rm(join(dir, 'shoal.mjs'));
    assert.equal(currentBundle(dist), undefined);
  });
});

test('the built bundle runs the CLI on its own', async () => {
  // npm test builds first (see package.json), so node/dist holds the bundle of this tree.
  const bundle = currentBundle(new URL('../dist/', import.meta.url));
  assert.ok(bundle, 'node/dist/shoal.mjs is missing or older than its sources: run npm run build');
  const { stdout } = await promisify(execFile)(process.execPath, [new URL(bundle).pathname, '--version']);
  const { version } = JSON.parse(readFileSync(new URL('../package.json', import.meta.url), 'utf8')) as { version: string };
  assert.equal(stdout.trim(), version);
});
