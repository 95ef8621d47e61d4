// npm run bench:gateway [-- --size-mb 1024 --runs 3 --range-mb 64]
//
// Serves the same blob from Shoal and from the reference registry (docker-registry) in one run,
// with the same client (curl for the bulk bytes), and reports both throughputs and their ratio: push (POST + streamed
// PATCH + PUT, as docker push does), GET of the whole blob, and GET in Range requests. Also the
// peak RSS and CPU seconds per GB of each server. Writes bench/results/gateway.{json,md}.
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { execFile } from 'node:child_process';
import { parseArgs, promisify } from 'node:util';
import { request } from 'undici';
import { startDockerRegistry } from '../../test/helpers/docker-registry.ts';
import { startShoalNode } from '../../test/helpers/node.ts';
import { cpuSecondsOf, describeMachine, markdownMachine, RssSampler } from './machine.ts';
import { median, writeRandomFile, writeResults } from './shared.ts';

const { values } = parseArgs({
  options: {
    'size-mb': { type: 'string', default: '1024' },
    runs: { type: 'string', default: '3' },
    'range-mb': { type: 'string', default: '64' },
    out: { type: 'string', default: new URL('../results/', import.meta.url).pathname },
  },
});
const SIZE = Number(values['size-mb']) * 2 ** 20;
const RUNS = Number(values.runs);
const RANGE = Number(values['range-mb']) * 2 ** 20;
const REPO = 'bench/blob';
const MB = 1e6;
const execFileAsync = promisify(execFile);

interface Target {
  name: string;
  url: string;
  pid: number;
}

type Operation = 'push' | 'get' | 'range';
const OPERATIONS: Operation[] = ['push', 'get', 'range'];

interface Sample {
  seconds: number;
  peakRss: number;
  cpuSeconds: number;
}

async function main(): Promise<void> {
  const work = await mkdtemp(join(tmpdir(), 'shoal-bench-gateway-'));
  const file = join(work, 'blob.bin');
  process.stdout.write(`generating ${SIZE / 2 ** 20} MiB of random data... `);
  const digest = await writeRandomFile(file, SIZE);
  process.stdout.write(`${digest}\n`);

  const shoal = await startShoalNode({ dataDir: join(work, 'shoal') });
  const reference = await startDockerRegistry();
  const targets: Target[] = [
    { name: 'shoal', url: shoal.gatewayUrl, pid: shoal.pid },
    { name: 'docker-registry', url: reference.url, pid: reference.pid },
  ];
  const samples = new Map<string, Sample[]>();
  try {
    for (let run = 0; run < RUNS; run++) {
      // Alternate the order so neither server always runs on a warmer page cache.
      const order = run % 2 === 0 ? targets : [...targets].reverse();
      for (const target of order) {
        for (const op of OPERATIONS) {
          const sample = await measure(target, () => OPS[op](target.url, file, digest));
          const key = `${target.name}/${op}`;
          samples.set(key, [...(samples.get(key) ?? []), sample]);
          console.log(`run ${run + 1} ${key}: ${(SIZE / MB / sample.seconds).toFixed(0)} MB/s, peak RSS ${(sample.peakRss / 2 ** 20).toFixed(0)} MiB`);
        }
      }
    }
  } finally {
    await shoal.stop();
    await reference.stop();
    await rm(work, { recursive: true, force: true });
  }
  await report(samples);
}

const OPS: Record<Operation, (base: string, file: string, digest: string) => Promise<void>> = {
  async push(base, file, digest) {
    const post = await request(`${base}/v2/${REPO}/blobs/uploads/`, { method: 'POST' });
    await post.body.dump();
    if (post.statusCode !== 202) throw new Error(`${base}: POST upload -> ${post.statusCode}`);
    const patchUrl = new URL(String(post.headers.location), base);
    const [status, location] = (
      await curl(['-X', 'PATCH', '-T', file, '-H', 'content-type: application/octet-stream', '-w', '%{http_code} %header{location}', patchUrl.href])
    ).split(' ');
    if (status !== '202') throw new Error(`${base}: PATCH -> ${status}`);
    const put = new URL(location!, base);
    put.searchParams.set('digest', digest);
    const done = await request(put, { method: 'PUT' });
    await done.body.dump();
    if (done.statusCode !== 201) throw new Error(`${base}: PUT -> ${done.statusCode}`);
  },
  async get(base, _file, digest) {
    await download(`${base}/v2/${REPO}/blobs/${digest}`, SIZE);
  },
  async range(base, _file, digest) {
    for (let start = 0; start < SIZE; start += RANGE) {
      const end = Math.min(start + RANGE, SIZE) - 1;
      await download(`${base}/v2/${REPO}/blobs/${digest}`, end - start + 1, `${start}-${end}`);
    }
  },
};

/**
 * The bulk transfers go through curl: a C client whose own cost is small and the same for both
 * servers (a Node client on the same 2 cores was itself the bottleneck, flattening the ratio).
 */
async function curl(args: string[]): Promise<string> {
  const { stdout } = await execFileAsync('curl', ['-sS', '-o', '/dev/null', ...args], { maxBuffer: 1 << 20 });
  return stdout.trim();
}

async function download(url: string, expected: number, range?: string): Promise<void> {
  const [status, size] = (await curl([...(range ? ['-r', range] : []), '-w', '%{http_code} %{size_download}', url])).split(' ');
  if (status !== (range ? '206' : '200')) throw new Error(`GET ${url} ${range ?? ''} -> ${status}`);
  if (Number(size) !== expected) throw new Error(`GET ${url}: ${size} bytes, expected ${expected}`);
}

async function measure(target: Target, op: () => Promise<void>): Promise<Sample> {
  const rss = new RssSampler(target.pid);
  const cpuBefore = cpuSecondsOf(target.pid);
  const start = performance.now();
  await op();
  const seconds = (performance.now() - start) / 1000;
  return { seconds, peakRss: rss.stop(), cpuSeconds: cpuSecondsOf(target.pid) - cpuBefore };
}

const TARGET_RATIO: Record<Operation, number> = { push: 0.8, get: 1.0, range: 1.0 };
const RSS_LIMIT = 150 * 2 ** 20;

async function report(samples: Map<string, Sample[]>): Promise<void> {
  const rows = OPERATIONS.map((op) => {
    const of = (name: string) => samples.get(`${name}/${op}`)!;
    const mbps = (name: string) => SIZE / MB / median(of(name).map((s) => s.seconds));
    const cpuPerGB = (name: string) => median(of(name).map((s) => s.cpuSeconds)) / (SIZE / 1e9);
    const shoal = mbps('shoal');
    const reference = mbps('docker-registry');
    return {
      operation: op,
      shoalMBps: Math.round(shoal),
      dockerRegistryMBps: Math.round(reference),
      ratio: Number((shoal / reference).toFixed(2)),
      target: TARGET_RATIO[op],
      shoalPeakRssMiB: Math.round(Math.max(...of('shoal').map((s) => s.peakRss)) / 2 ** 20),
      dockerRegistryPeakRssMiB: Math.round(Math.max(...of('docker-registry').map((s) => s.peakRss)) / 2 ** 20),
      shoalCpuSecondsPerGB: Number(cpuPerGB('shoal').toFixed(2)),
      dockerRegistryCpuSecondsPerGB: Number(cpuPerGB('docker-registry').toFixed(2)),
    };
  });
  const machine = describeMachine();
  const result = { benchmark: 'gateway', blobBytes: SIZE, runs: RUNS, rangeBytes: RANGE, machine, rows };
  const md = [
    `# Gateway throughput: Shoal vs docker-registry (same blob, same client, same run)`,
    '',
    markdownMachine(machine),
    `Blob: ${SIZE / 2 ** 20} MiB of random bytes; median of ${RUNS} runs; Range reads in ${RANGE / 2 ** 20} MiB requests; client (curl) and servers share the machine's cores.`,
    '',
    '| operation | Shoal MB/s | docker-registry MB/s | ratio | target | Shoal peak RSS | docker-registry peak RSS | Shoal CPU s/GB | docker-registry CPU s/GB |',
    '|---|---:|---:|---:|---:|---:|---:|---:|---:|',
    ...rows.map(
      (r) =>
        `| ${r.operation} | ${r.shoalMBps} | ${r.dockerRegistryMBps} | ${r.ratio} ${r.ratio >= r.target ? '(met)' : '(MISSED)'} | >= ${r.target} | ${r.shoalPeakRssMiB} MiB ${r.shoalPeakRssMiB * 2 ** 20 <= RSS_LIMIT ? '' : '(over 150)'} | ${r.dockerRegistryPeakRssMiB} MiB | ${r.shoalCpuSecondsPerGB} | ${r.dockerRegistryCpuSecondsPerGB} |`,
    ),
    '',
  ].join('\n');
  await writeResults(values.out!, { 'gateway.json': `${JSON.stringify(result, null, 2)}\n`, 'gateway.md': md });
  console.log(`\n${md}`);
}

await main();
