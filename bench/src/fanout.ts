// npm run bench:fanout [-- --devices 10 --rate 100mbit --size 200MB --layers 2]
//                      [--chunk-sizes 256KiB,4MiB] [--cold] [--systems shoal,registry] [--sweep]
//
// One image from one seeder to N - 1 devices at once (the model and targets: ../shared/notes/field.md
// and issue 5). Each device is a network namespace on one bridge with its link shaped by tc tbf in
// both directions, running a real `shoal node`; receivers pull through their own gateway the way
// containerd does (bench/src/fanout/puller.ts). In the same run, a docker-registry on the seeder is
// pulled by all receivers at once over the same links: the central registry to beat.
//
// --devices takes a list (2,4,8,12,16) to sweep N; --chunk-sizes adds Shoal runs at other chunk
// sizes at N = 10 (or the largest N), warm and, with --cold, cold; --systems names the warm trials
// (shoal, registry; none for a cold start alone); --cold adds a cold start at that N (the seeder
// pulls through from an upstream registry on its own device while the others pull from the mesh);
// --sweep is all of it: N in 2,4,8,10,12,16, chunks 256KiB and 4MiB, and the cold starts. --congestion-control
// sets every device's TCP congestion control (default cubic, Linux's own default, whatever this
// host runs: on bbr, many flows sharing a shaped downlink starve some of them). --cpu-prof DIR
// writes a V8 CPU profile of every node there, --logs DIR every node's log.
// Writes bench/results/fanout.{json,md,svg}. A benchmark: it reports, it never asserts on time.
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { describeMachine } from './machine.ts';
import { codeAtEnd, describeCode, writeResults } from './shared.ts';
import { generateImage } from './fanout/image.ts';
import { FanoutLab, parseSize } from './fanout/lab.ts';
import { markdownReport, summarize, svgPlot, TARGETS, type FanoutReport, type TrialSummary } from './fanout/report.ts';

const { values } = parseArgs({
  options: {
    devices: { type: 'string', default: '10' },
    rate: { type: 'string', default: '100mbit' },
    'congestion-control': { type: 'string', default: 'cubic' },
    size: { type: 'string', default: '200MB' },
    layers: { type: 'string', default: '2' },
    'chunk-sizes': { type: 'string', default: '' },
    cold: { type: 'boolean', default: false },
    systems: { type: 'string', default: 'shoal,registry' },
    sweep: { type: 'boolean', default: false },
    out: { type: 'string', default: new URL('../results/', import.meta.url).pathname },
    name: { type: 'string', default: 'fanout' },
    'cpu-prof': { type: 'string' },
    logs: { type: 'string' },
  },
});

const deviceCounts = (values.sweep ? '2,4,8,10,12,16' : values.devices!).split(',').map(Number);
if (deviceCounts.some((n) => !Number.isInteger(n) || n < 2)) throw new Error('--devices: N must be whole numbers >= 2');
const chunkSizes = (values.sweep ? '256KiB,4MiB' : values['chunk-sizes']!).split(',').filter(Boolean);
const cold = values.sweep || values.cold!;
const systems = new Set(values.systems!.split(','));
const layers = Number(values.layers);
const imageSize = parseSize(values.size!);
/** Chunk sweep and cold start run at the targets' N when the run has it, else at the largest N. */
const focusN = deviceCounts.includes(TARGETS.devices) ? TARGETS.devices : Math.max(...deviceCounts);

function log(message: string): void {
  process.stderr.write(`${message}\n`);
}

function describe(t: TrialSummary): string {
  const s = (ms: number) => (Number.isFinite(ms) ? `${(ms / 1000).toFixed(1)} s` : 'failed');
  const failures = t.failures.length ? `; ${t.failures.length} failed: ${t.failures[0]}` : '';
  return `makespan ${s(t.makespanMs)}, p50 ${s(t.p50Ms)}, ideal ${s(t.idealMs)}, efficiency ${t.efficiency.toFixed(2)}, seeder egress ${t.seederEgressRatio.toFixed(2)}x F, CPU ${t.cpuBusyPercent.toFixed(0)} %${failures}`;
}

async function main(): Promise<void> {
  const code = describeCode();
  const scratch = await mkdtemp(join(tmpdir(), 'shoal-fanout-'));
  const maxN = Math.max(...deviceCounts);
  log(`generating a ${values.size} image in ${layers} layer(s)...`);
  const image = await generateImage(join(scratch, 'image'), imageSize, layers);
  log(`building ${maxN} device namespaces${cold ? ' and an upstream' : ''}, links shaped to ${values.rate} each way...`);
  const lab = await FanoutLab.create({ devices: maxN, rate: values.rate!, congestionControl: values['congestion-control']!, upstream: cold, scratchDir: scratch, log, cpuProfileDir: values['cpu-prof'], logDir: values.logs });
  const trials: TrialSummary[] = [];
  const record = (label: string, summary: TrialSummary) => {
    trials.push(summary);
    log(`  ${label}: ${describe(summary)}`);
  };
  try {
    for (const n of deviceCounts) {
      if (systems.has('shoal')) {
        log(`N=${n} Shoal...`);
        record(`N=${n} Shoal`, summarize(await lab.shoalTrial(n, image)));
      }
      if (systems.has('registry')) {
        log(`N=${n} central registry...`);
        record(`N=${n} registry`, summarize(await lab.registryTrial(n, image)));
      }
    }
    if (systems.has('shoal')) {
      for (const size of chunkSizes) {
        log(`N=${focusN} Shoal, ${size} chunks...`);
        record(`N=${focusN} Shoal ${size}`, summarize(await lab.shoalTrial(focusN, image, { size, sweep: true })));
      }
    }
    if (cold) {
      log(`N=${focusN} Shoal cold start through the seeder...`);
      record(`N=${focusN} cold start`, summarize(await lab.coldTrial(focusN, image)));
      for (const size of chunkSizes) {
        log(`N=${focusN} Shoal cold start, ${size} chunks...`);
        record(`N=${focusN} cold start ${size}`, summarize(await lab.coldTrial(focusN, image, { size, sweep: true })));
      }
    }
  } finally {
    lab.destroy();
    await rm(scratch, { recursive: true, force: true });
  }

  const report: FanoutReport = {
    machine: describeMachine(),
    command: `npm run bench:fanout -- ${process.argv.slice(2).join(' ')}`.trim(),
    rate: values.rate!,
    congestionControl: values['congestion-control']!,
    layers,
    code: codeAtEnd(code),
    trials,
  };
  const name = values.name!;
  await writeResults(values.out!, {
    [`${name}.json`]: `${JSON.stringify(report, (_k, v: unknown) => (v === Number.POSITIVE_INFINITY ? null : v), 2)}\n`,
    [`${name}.md`]: `${markdownReport(report)}\n![completion time against N](${name}.svg)\n`,
    [`${name}.svg`]: svgPlot(trials, `${values.size} in ${layers} layer(s) to N - 1 devices, ${values.rate} links`),
  });
  log(`wrote ${join(values.out!, name)}.{json,md,svg}`);
}

await main();
