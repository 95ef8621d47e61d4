import assert from 'node:assert/strict';
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import type { FanoutReport, TrialSummary } from '../bench/src/fanout/report.ts';
import { run } from './helpers/exec.ts';
import { NETNS_PREREQUISITES } from './helpers/netns.ts';
import { REPO_ROOT } from './helpers/node.ts';
import { prerequisiteGate } from './helpers/prerequisites.ts';
import { Scratch } from './helpers/scratch.ts';

const gate = prerequisiteGate({ commands: [...NETNS_PREREQUISITES.commands, 'tc', 'skopeo', 'docker-registry'], root: true });

// Small enough to run in CI, big enough that every system has to move real chunks over shaped links.
const ARGS = ['--devices', '3', '--rate', '100mbit', '--size', '12MB', '--layers', '2', '--cold', '--chunk-sizes', '256KiB'];

describe('bench:fanout runs real devices, a central registry and a cold start side by side', gate.options, () => {
  let scratch: Scratch;
  let report: FanoutReport;
  const trial = (system: TrialSummary['system'], sweep = false) => {
    const found = report.trials.find((t) => t.system === system && Boolean(t.chunkSweep) === sweep);
    assert.ok(found, `no ${system} trial in ${JSON.stringify(report.trials.map((t) => t.system))}`);
    return found;
  };

  before(async () => {
    scratch = await Scratch.create('shoal-fanout-test-');
    await run(process.execPath, [join(REPO_ROOT, 'bench', 'src', 'fanout.ts'), ...ARGS, '--out', scratch.root, '--name', 'result'], {
      cwd: REPO_ROOT,
      timeoutMs: 10 * 60_000,
    });
    report = JSON.parse(await readFile(join(scratch.root, 'result.json'), 'utf8')) as FanoutReport;
  });

  after(async () => {
    await scratch?.remove();
  });

  it('every receiver of every system got the whole image, verified, and the figures follow from the completions', () => {
    // Shoal, the registry and the cold start, and Shoal and the cold start again with 256 KiB chunks.
    assert.equal(report.trials.length, 5);
    for (const t of report.trials) {
      assert.deepEqual(t.failures, [], `${t.system}: ${t.failures.join('; ')}`);
      assert.equal(t.completionsMs.length, 2, t.system);
      assert.ok(t.imageBytes > 12e6 && t.imageBytes < 12.1e6, `image of ${t.imageBytes} bytes`);
      assert.equal(t.makespanMs, Math.max(...t.completionsMs));
      assert.ok(t.efficiency > 0 && t.efficiency <= 1, `${t.system} efficiency ${t.efficiency}`);
    }
    assert.equal(trial('shoal', true).chunkSize, 256 * 1024);
    assert.equal(trial('shoal-cold', true).chunkSize, 256 * 1024);
  });

  it('the registry sends the image to each receiver, Shoal\'s seeder at least once, and a cold start takes it from upstream once', () => {
    const registry = trial('registry');
    assert.ok(registry.seederTxBytes >= 2 * registry.imageBytes, `registry seeder sent ${registry.seederTxBytes}`);
    const shoal = trial('shoal');
    assert.ok(shoal.seederTxBytes >= shoal.imageBytes, `Shoal seeder sent ${shoal.seederTxBytes}`);
    const cold = trial('shoal-cold');
    // Only the seeder pulls through: the others have no upstream and take the chunks from the mesh.
    assert.ok(cold.upstreamTxBytes! >= cold.imageBytes && cold.upstreamTxBytes! < 1.5 * cold.imageBytes, `upstream sent ${cold.upstreamTxBytes}`);
  });

  it('writes the Markdown table and the SVG plot beside the JSON', async () => {
    const markdown = await readFile(join(scratch.root, 'result.md'), 'utf8');
    assert.match(markdown, /\| central registry \| 3 \|/);
    assert.match(markdown, /\| Shoal, cold start \| 3 \|/);
    const svg = await readFile(join(scratch.root, 'result.svg'), 'utf8');
    assert.match(svg, /^<svg[^>]+xmlns="http:\/\/www.w3.org\/2000\/svg"/);
    assert.equal(svg.match(/<polyline/g)?.length, 4);
  });
});
