import assert from 'node:assert/strict';
import { test } from 'node:test';
import { parseRate, parseSize } from '../src/fanout/lab.ts';
import { idealMs, markdownReport, percentile, speedUp, summarize, svgPlot, type FanoutReport, type Trial } from '../src/fanout/report.ts';
import { describeMachine } from '../src/machine.ts';

const MB = 1e6;

function trial(fields: Partial<Trial> & Pick<Trial, 'system' | 'devices' | 'completionsMs'>): Trial {
  return { rateBitsPerSecond: 100e6, imageBytes: 200 * MB, failures: [], seederTxBytes: 220 * MB, cpuBusyPercent: 50, resumes: 0, ...fields };
}

test('percentiles are nearest-rank over the receivers', () => {
  assert.equal(percentile([5], 50), 5);
  assert.equal(percentile([4, 1, 3, 2], 50), 2);
  assert.equal(percentile([4, 1, 3, 2], 99), 4);
  assert.equal(percentile([10, 20, 30, 40, 50, 60, 70, 80, 90, 100], 90), 90);
  assert.throws(() => percentile([], 50));
});

test('the ideal is F / B, and efficiency, egress and CPU-bound follow the field model', () => {
  assert.equal(idealMs(200 * MB, 100e6), 16_000);
  const s = summarize(trial({ system: 'shoal', devices: 4, completionsMs: [18_000, 20_000, 19_000], cpuBusyPercent: 95 }));
  assert.equal(s.makespanMs, 20_000);
  assert.equal(s.p50Ms, 19_000);
  assert.equal(s.idealMs, 16_000);
  assert.equal(s.efficiency, 0.8);
  assert.equal(s.seederEgressRatio, 1.1);
  assert.equal(s.cpuBound, true);
});

test('uplink use is what each uplink sent over the makespan against what its rate allows', () => {
  // 100 Mbit/s for 20 s: 250 MB a link could send.
  const s = summarize(trial({ system: 'shoal', devices: 4, completionsMs: [18_000, 20_000, 19_000], seederTxBytes: 200 * MB, receiverTxBytes: [100 * MB, 150 * MB, 125 * MB] }));
  assert.deepEqual(s.uplinkUse, { seeder: 0.8, receivers: 0.5 });
  assert.match(markdownReport({ machine: describeMachine(), command: 'x', rate: '100mbit', congestionControl: 'cubic', layers: 2, code: { commit: 'abc', modified: [] }, trials: [s] }), /\| 1\.00x F \| 80 %, 50 % \|/);
  assert.equal(summarize(trial({ system: 'shoal', devices: 4, completionsMs: [18_000, 20_000] })).uplinkUse, undefined, 'no makespan, no figure');
});

test('a run with a failed or missing receiver has no makespan and no efficiency', () => {
  const failed = summarize(trial({ system: 'shoal', devices: 4, completionsMs: [18_000, 20_000], failures: ['device-3: HTTP 404'] }));
  assert.equal(failed.makespanMs, Number.POSITIVE_INFINITY);
  assert.equal(failed.efficiency, 0);
  const short = summarize(trial({ system: 'shoal', devices: 4, completionsMs: [18_000, 20_000] }));
  assert.equal(short.efficiency, 0);
});

test('speed-up compares the registry and Shoal at the same N and leaves out the chunk sweep', () => {
  const trials = [
    summarize(trial({ system: 'registry', devices: 10, completionsMs: Array(9).fill(144_000) })),
    summarize(trial({ system: 'shoal', devices: 10, completionsMs: Array(9).fill(18_000) })),
    summarize(trial({ system: 'shoal', devices: 10, completionsMs: Array(9).fill(36_000), chunkSize: 4 * 2 ** 20, chunkSweep: true })),
    summarize(trial({ system: 'shoal', devices: 4, completionsMs: Array(3).fill(17_000) })),
    summarize(trial({ system: 'shoal', devices: 10, completionsMs: Array(9).fill(20_000), chunkSize: 256 * 1024, chunkSweep: true })),
  ];
  assert.equal(speedUp(trials, 10), 8);
  assert.equal(speedUp(trials, 4), undefined);
  const report: FanoutReport = { machine: describeMachine(), command: 'npm run bench:fanout', rate: '100mbit', congestionControl: 'cubic', layers: 2, code: { commit: 'abc1234', modified: [] }, trials };
  const markdown = markdownReport(report);
  assert.match(markdown, /\| Shoal \| 10 \| {2}\| 200 MB \| 18\.0 \| 18\.0 \| 18\.0 \| 16\.0 \| 0\.89 \| 8\.0x \|/);
  assert.match(markdown, /efficiency >= 0\.8: 0\.89, met/);
  assert.match(markdown, /speed-up over the central registry >= 7x: 8\.0x, met/);
  assert.match(markdown, /\| Shoal \| 10 \| 4 MiB \|/);
  assert.match(markdown, /\| Shoal \| 10 \| 256 KiB \|/);
  const svg = svgPlot(trials, 'title');
  // Registry, Shoal makespan, Shoal p50 and the ideal: one line each; the sweep run is not plotted.
  assert.equal(svg.match(/<polyline/g)?.length, 4);
  assert.match(svg, /points="[\d.]+,[\d.]+ [\d.]+,[\d.]+"/);
  assert.doesNotMatch(svg, /NaN|Infinity/);
});

test('the cold start target is judged on the default chunk size; other sizes are listed beside it', () => {
  const trials = [
    summarize(trial({ system: 'shoal-cold', devices: 10, completionsMs: Array(9).fill(21_600) })),
    summarize(trial({ system: 'shoal-cold', devices: 10, completionsMs: Array(9).fill(19_200), chunkSize: 512 * 1024, chunkSweep: true })),
  ];
  const report: FanoutReport = { machine: describeMachine(), command: 'npm run bench:fanout', rate: '100mbit', congestionControl: 'cubic', layers: 2, code: { commit: 'abc1234', modified: [] }, trials };
  const markdown = markdownReport(report);
  assert.match(markdown, /cold start makespan <= 1\.3x ideal: 1\.35x, MISSED/);
  assert.match(markdown, /not the target: 512 KiB chunks\) cold start 1\.20x the ideal/);
  assert.match(markdown, /\| Shoal, cold start \| 10 \| 512 KiB \|/);
});

test('rates and sizes parse as tc and users write them', () => {
  assert.equal(parseRate('100mbit'), 100e6);
  assert.equal(parseRate('1gbit'), 1e9);
  assert.equal(parseRate('512kbit'), 512e3);
  assert.throws(() => parseRate('100mbps'));
  assert.equal(parseSize('200MB'), 200e6);
  assert.equal(parseSize('4MiB'), 4 * 2 ** 20);
  assert.equal(parseSize('1GB'), 1e9);
  assert.throws(() => parseSize('lots'));
});
