// The fan-out benchmark's figures, from raw trials: the model of ../shared/notes/field.md
// (ideal F/B, efficiency, speed-up over a central registry), a Markdown table and an SVG plot.
// Pure functions, so the arithmetic is unit-tested apart from the network.
import type { MachineDescription } from '../machine.ts';
import { markdownMachine } from '../machine.ts';
import { codeSentence, type CodeState } from '../shared.ts';

/** How the receivers got the image: Shoal seeded by a push, Shoal with the seeder pulling through from an upstream, or a central registry. */
export type SystemName = 'shoal' | 'shoal-cold' | 'registry';

/** One run: N devices, one seeder, N - 1 receivers pulling at the same moment. */
export interface Trial {
  system: SystemName;
  /** N: devices in the run, the seeder included. */
  devices: number;
  /** Chunk size the seeder cut the image into (Shoal only). */
  chunkSize?: number;
  /** Part of the chunk-size sweep: left out of the plot against N and of the speed-ups. */
  chunkSweep?: boolean;
  /** Link rate of every device, each direction, bits per second. */
  rateBitsPerSecond: number;
  /** F: bytes of the image (manifest, config, layers). */
  imageBytes: number;
  /** ms from "go" until each receiver had verified the whole image; a failed receiver is absent. */
  completionsMs: number[];
  /** Receivers that failed, with why. */
  failures: string[];
  /** Bytes the seeder's interface sent during the run (everything: chunks, gossip, TCP). */
  seederTxBytes: number;
  /** Bytes the upstream's interface sent (cold start only). */
  upstreamTxBytes?: number;
  /** Whole-machine CPU busy % during the run. */
  cpuBusyPercent: number;
  /** Bytes each receiver's interface sent from "go" until the last completion (what it passed on, plus requests and gossip). */
  receiverTxBytes?: number[];
  /** Every second: bytes each device (seeder first, then the receivers) had sent since "go" (in the JSON only). */
  sendTimeline?: { ms: number; sent: number[] }[];
  /** Range requests receivers made to resume broken downloads. */
  resumes: number;
}

export interface TrialSummary extends Trial {
  makespanMs: number;
  p50Ms: number;
  p99Ms: number;
  /** F / B: the peer-to-peer lower bound with equal links, independent of N. */
  idealMs: number;
  /** ideal / makespan. */
  efficiency: number;
  /** Seeder egress as a multiple of F. */
  seederEgressRatio: number;
  /** The machine, not the links, was the limit: CPU busy at or above CPU_BOUND_PERCENT. */
  cpuBound: boolean;
  /** Share of the makespan the seeder's uplink, and the receivers' uplinks on average, were sending at the link rate. */
  uplinkUse?: { seeder: number; receivers: number };
}

/** Above this whole-machine busy %, the 2 cores, not the links, set the pace. */
export const CPU_BOUND_PERCENT = 90;

/** Targets at N = 10 (from the issue). */
export const TARGETS = { devices: 10, efficiency: 0.8, speedUp: 7, seederEgressRatio: 1.5, coldStartIdealRatio: 1.3 };

/** Nearest-rank percentile (p in 0..100) of a non-empty list. */
export function percentile(values: number[], p: number): number {
  if (values.length === 0) throw new Error('percentile of no values');
  const sorted = [...values].sort((a, b) => a - b);
  const rank = Math.max(1, Math.ceil((p / 100) * sorted.length));
  return sorted[rank - 1]!;
}

export function idealMs(imageBytes: number, rateBitsPerSecond: number): number {
  return (imageBytes * 8 * 1000) / rateBitsPerSecond;
}

export function summarize(trial: Trial): TrialSummary {
  const complete = trial.failures.length === 0 && trial.completionsMs.length === trial.devices - 1;
  const makespanMs = complete ? Math.max(...trial.completionsMs) : Number.POSITIVE_INFINITY;
  const ideal = idealMs(trial.imageBytes, trial.rateBitsPerSecond);
  return {
    ...trial,
    makespanMs,
    p50Ms: trial.completionsMs.length ? percentile(trial.completionsMs, 50) : Number.POSITIVE_INFINITY,
    p99Ms: trial.completionsMs.length ? percentile(trial.completionsMs, 99) : Number.POSITIVE_INFINITY,
    idealMs: ideal,
    efficiency: complete ? ideal / makespanMs : 0,
    seederEgressRatio: trial.seederTxBytes / trial.imageBytes,
    cpuBound: trial.cpuBusyPercent >= CPU_BOUND_PERCENT,
    uplinkUse: complete && trial.receiverTxBytes?.length ? uplinkUse(trial, makespanMs) : undefined,
  };
}

function uplinkUse(trial: Trial, makespanMs: number): { seeder: number; receivers: number } {
  const capacity = (trial.rateBitsPerSecond / 8) * (makespanMs / 1000);
  const sent = trial.receiverTxBytes!;
  return { seeder: trial.seederTxBytes / capacity, receivers: sent.reduce((a, b) => a + b, 0) / sent.length / capacity };
}

/** Registry makespan over Shoal makespan, for the same N (and the default chunk size) in one run. */
export function speedUp(summaries: TrialSummary[], devices: number, system: SystemName = 'shoal'): number | undefined {
  const shoal = summaries.find((s) => s.system === system && s.devices === devices && !s.chunkSweep);
  const registry = summaries.find((s) => s.system === 'registry' && s.devices === devices);
  if (!shoal || !registry || !Number.isFinite(shoal.makespanMs) || !Number.isFinite(registry.makespanMs)) return undefined;
  return registry.makespanMs / shoal.makespanMs;
}

export interface FanoutReport {
  machine: MachineDescription;
  command: string;
  rate: string;
  /** TCP congestion control every device ran. */
  congestionControl: string;
  layers: number;
  /** The code the run measured. */
  code: CodeState;
  trials: TrialSummary[];
}

const SYSTEM_LABEL: Record<SystemName, string> = {
  shoal: 'Shoal',
  'shoal-cold': 'Shoal, cold start',
  registry: 'central registry',
};

const percent = (share: number) => `${Math.round(100 * share)} %`;
const seconds = (ms: number) => (Number.isFinite(ms) ? (ms / 1000).toFixed(1) : 'failed');
const binary = (bytes: number) => (bytes >= 2 ** 20 ? `${+(bytes / 2 ** 20).toFixed(2)} MiB` : `${+(bytes / 1024).toFixed(2)} KiB`);

export function markdownReport(report: FanoutReport): string {
  const { trials } = report;
  const lines = [
    '# Fan-out: one image from one seeder to N - 1 devices at once',
    '',
    markdownMachine(report.machine),
    `${codeSentence(report.code)} Command: \`${report.command}\`.`,
    '',
    `Every device is a network namespace on one bridge, its link shaped with tc tbf to ${report.rate} in each direction and TCP congestion control ${report.congestionControl}; each runs a real \`shoal node\` ` +
      '(mDNS discovery, default settings). The seeder holds a freshly generated image of random (incompressible) bytes in ' +
      `${report.layers} layer(s); every other device pulls it at the same moment through its own gateway as containerd does (HEAD manifest, GET manifest, ` +
      'GET config and layers three at a time, digests checked, Range resume). **Central registry**: docker-registry 2.8 on the seeder, pulled by all the ' +
      'others at once over the same links. **Cold start**: the seeder has only an upstream docker-registry (on its own device, same link rate) and pulls ' +
      'through it while the others pull. Ideal = F / B (the peer-to-peer bound with equal links); efficiency = ideal / makespan; seeder egress counts every ' +
      'byte its interface sent (TCP/IP headers, gossip), so 1.0x is not reachable and about 0.95 of the ideal is the most TCP over these links can give. ' +
      'Uplinks busy: bytes sent over the makespan against what the link rate allows in that time, for the seeder and on average for the receivers ' +
      '(a peer-to-peer run at the ideal keeps every uplink near 100 %; a central registry keeps only the seeder\'s busy).',
    '',
    '| system | N | chunk | image | makespan s | p50 s | p99 s | ideal s | efficiency | speed-up | seeder egress | uplinks busy: seeder, receivers | CPU busy | resumes |',
    '|---|---|---|---|---|---|---|---|---|---|---|---|---|---|',
  ];
  for (const t of trials) {
    const up = t.system === 'registry' ? '' : speedUp(trials, t.devices, t.system);
    lines.push(
      `| ${SYSTEM_LABEL[t.system]} | ${t.devices} | ${t.chunkSize ? binary(t.chunkSize) : ''} | ${(t.imageBytes / 1e6).toFixed(0)} MB | ` +
        `${seconds(t.makespanMs)} | ${seconds(t.p50Ms)} | ${seconds(t.p99Ms)} | ${seconds(t.idealMs)} | ${t.efficiency.toFixed(2)} | ` +
        `${typeof up === 'number' && !t.chunkSweep ? `${up.toFixed(1)}x` : ''} | ${t.seederEgressRatio.toFixed(2)}x F | ` +
        `${t.uplinkUse ? `${percent(t.uplinkUse.seeder)}, ${percent(t.uplinkUse.receivers)}` : ''} | ` +
        `${t.cpuBusyPercent.toFixed(0)} %${t.cpuBound ? ' (CPU-bound)' : ''} | ${t.resumes} |`,
    );
    for (const failure of t.failures) lines.push(`|  | | | | failed: ${failure.replaceAll('|', '/')} | | | | | | | | | |`);
  }
  lines.push('', ...targetLines(trials), '');
  return lines.join('\n');
}

/** The targets at N = 10, as met or missed, for every trial that can show them. */
function targetLines(trials: TrialSummary[]): string[] {
  const n = TARGETS.devices;
  const shoal = trials.find((t) => t.system === 'shoal' && t.devices === n && !t.chunkSweep);
  const cold = trials.find((t) => t.system === 'shoal-cold' && t.devices === n && !t.chunkSweep);
  if (!shoal && !cold) return [`No run at N = ${n}: the targets are stated for N = ${n}.`];
  const mark = (ok: boolean) => (ok ? 'met' : 'MISSED');
  const out = [`Targets at N = ${n}:`, ''];
  if (shoal) {
    const up = speedUp(trials, n);
    out.push(`- efficiency >= ${TARGETS.efficiency}: ${shoal.efficiency.toFixed(2)}, ${mark(shoal.efficiency >= TARGETS.efficiency)}`);
    out.push(`- speed-up over the central registry >= ${TARGETS.speedUp}x: ${up === undefined ? 'no registry run' : `${up.toFixed(1)}x, ${mark(up >= TARGETS.speedUp)}`}`);
    out.push(`- seeder egress <= ${TARGETS.seederEgressRatio}x F: ${shoal.seederEgressRatio.toFixed(2)}x, ${mark(shoal.seederEgressRatio <= TARGETS.seederEgressRatio)}`);
    if (shoal.cpuBound) out.push(`- the machine was CPU-bound in this run (${shoal.cpuBusyPercent.toFixed(0)} % busy): the 2 cores, not the links, were the limit`);
  }
  if (cold) {
    const ratio = cold.makespanMs / cold.idealMs;
    out.push(`- cold start makespan <= ${TARGETS.coldStartIdealRatio}x ideal: ${Number.isFinite(ratio) ? `${ratio.toFixed(2)}x` : 'failed'}, ${mark(ratio <= TARGETS.coldStartIdealRatio)}`);
  }
  // Other chunk sizes are settings a user may choose; the targets hold the default to account.
  for (const t of trials.filter((t) => t.system === 'shoal-cold' && t.devices === n && t.chunkSweep)) {
    const ratio = t.makespanMs / t.idealMs;
    out.push(`- (not the target: ${binary(t.chunkSize ?? 0)} chunks) cold start ${Number.isFinite(ratio) ? `${ratio.toFixed(2)}x` : 'failed'} the ideal`);
  }
  return out;
}

/** Completion time against N on a log scale: Shoal's makespan and p50, the central registry's makespan, the ideal. */
export function svgPlot(trials: TrialSummary[], title: string): string {
  const [width, height, left, right, top, bottom] = [720, 440, 70, 170, 40, 50];
  const series = [
    { label: 'central registry', color: '#c0392b', dash: '', points: pointsOf(trials, 'registry', (t) => t.makespanMs) },
    { label: 'Shoal makespan', color: '#1f6feb', dash: '', points: pointsOf(trials, 'shoal', (t) => t.makespanMs) },
    { label: 'Shoal p50', color: '#1f6feb', dash: '6 4', points: pointsOf(trials, 'shoal', (t) => t.p50Ms) },
    { label: 'ideal F/B', color: '#555', dash: '2 4', points: pointsOf(trials, 'shoal', (t) => t.idealMs).concat(pointsOf(trials, 'registry', (t) => t.idealMs)) },
  ].map((s) => ({ ...s, points: dedupe(s.points) }));
  const all = series.flatMap((s) => s.points);
  if (all.length === 0) return `<svg xmlns="http://www.w3.org/2000/svg" width="${width}" height="80"><text x="10" y="40">no finished runs</text></svg>\n`;
  const ns = all.map((p) => p.n);
  const [nMin, nMax] = [Math.min(...ns), Math.max(...ns)];
  const ys = all.map((p) => p.s);
  const [logMin, logMax] = [Math.floor(Math.log10(Math.min(...ys))), Math.ceil(Math.log10(Math.max(...ys)))];
  const x = (n: number) => left + ((n - nMin) / Math.max(1, nMax - nMin)) * (width - left - right);
  const y = (s: number) => top + (1 - (Math.log10(s) - logMin) / Math.max(1, logMax - logMin)) * (height - top - bottom);
  const out = [
    `<svg xmlns="http://www.w3.org/2000/svg" width="${width}" height="${height}" font-family="sans-serif" font-size="12">`,
    `<rect width="${width}" height="${height}" fill="white"/>`,
    `<text x="${left}" y="24" font-size="14">${escapeXml(title)}</text>`,
  ];
  for (let decade = logMin; decade <= logMax; decade++) {
    for (const m of [1, 2, 5]) {
      const s = m * 10 ** decade;
      if (Math.log10(s) > logMax) continue;
      out.push(`<line x1="${left}" x2="${width - right}" y1="${y(s).toFixed(1)}" y2="${y(s).toFixed(1)}" stroke="#ddd"/>`);
      out.push(`<text x="${left - 8}" y="${(y(s) + 4).toFixed(1)}" text-anchor="end">${s}</text>`);
    }
  }
  for (const n of [...new Set(ns)].sort((a, b) => a - b)) {
    out.push(`<line x1="${x(n).toFixed(1)}" x2="${x(n).toFixed(1)}" y1="${top}" y2="${height - bottom}" stroke="#eee"/>`);
    out.push(`<text x="${x(n).toFixed(1)}" y="${height - bottom + 18}" text-anchor="middle">${n}</text>`);
  }
  out.push(`<text x="${(left + width - right) / 2}" y="${height - 10}" text-anchor="middle">N (devices, seeder included)</text>`);
  out.push(`<text transform="translate(18 ${(top + height - bottom) / 2}) rotate(-90)" text-anchor="middle">completion time, s (log scale)</text>`);
  series.forEach((s, i) => {
    if (s.points.length === 0) return;
    const path = s.points.map((p) => `${x(p.n).toFixed(1)},${y(p.s).toFixed(1)}`).join(' ');
    const dash = s.dash ? ` stroke-dasharray="${s.dash}"` : '';
    out.push(`<polyline fill="none" stroke="${s.color}" stroke-width="2"${dash} points="${path}"/>`);
    for (const p of s.points) out.push(`<circle cx="${x(p.n).toFixed(1)}" cy="${y(p.s).toFixed(1)}" r="3" fill="${s.color}"/>`);
    const ly = top + 10 + i * 20;
    out.push(`<line x1="${width - right + 15}" x2="${width - right + 45}" y1="${ly}" y2="${ly}" stroke="${s.color}" stroke-width="2"${dash}/>`);
    out.push(`<text x="${width - right + 52}" y="${ly + 4}">${escapeXml(s.label)}</text>`);
  });
  out.push('</svg>', '');
  return out.join('\n');
}

interface Point {
  n: number;
  s: number;
}

function pointsOf(trials: TrialSummary[], system: SystemName, value: (t: TrialSummary) => number): Point[] {
  return trials
    .filter((t) => t.system === system && !t.chunkSweep && Number.isFinite(value(t)))
    .map((t) => ({ n: t.devices, s: value(t) / 1000 }));
}

function dedupe(points: Point[]): Point[] {
  const byN = new Map(points.map((p) => [p.n, p]));
  return [...byN.values()].sort((a, b) => a.n - b.n);
}

function escapeXml(text: string): string {
  return text.replaceAll('&', '&amp;').replaceAll('<', '&lt;').replaceAll('>', '&gt;');
}
