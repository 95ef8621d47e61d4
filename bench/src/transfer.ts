// npm run bench:transfer [-- --size 1GiB --runs 3 --cpu-prof /tmp/prof]
//
// --size is binary (256MB = 256 MiB); --cpu-prof DIR adds one unmeasured, profiled transfer and a
// summary of it; --quiet-wait-s bounds the wait for a quiet machine before each transfer.
//
// One large layer between devices over loopback: Shoal (device B pulls through its gateway, the
// bytes cross libp2p TCP + noise + yamux from the holders) versus a plain unencrypted HTTP
// download of the same file in the same run: docker-registry (what a central registry does) and
// busybox httpd (a raw static-file server, sendfile). curl downloads to /dev/null in every case.
// Reports throughput, time to first byte, CPU seconds per GB of every process involved (server or
// sending devices, receiving device, curl), peak RSS of each node during the transfer, and the
// bytes each source sent. Writes bench/results/transfer.{json,md}.
//
// Sizes are binary: --size 256MB is 256 MiB. Throughput is in MB/s (10^6 bytes) and CPU in
// seconds per GB (10^9 bytes), as in bench:gateway.
import { execFile, execFileSync, spawn } from 'node:child_process';
import { createCipheriv, createHash, randomBytes } from 'node:crypto';
import { readdirSync, readFileSync, writeFileSync } from 'node:fs';
import { mkdir, mkdtemp, rm, writeFile } from 'node:fs/promises';
import { createServer, type Server } from 'node:net';
import { cpus, loadavg, tmpdir } from 'node:os';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { parseArgs, promisify } from 'node:util';
import { startDockerRegistry, type DockerRegistry } from '../../test/helpers/docker-registry.ts';
import { startShoalNode, type LogEntry, type RunningShoalNode } from '../../test/helpers/node.ts';
import { cpuSecondsOf, describeMachine, markdownMachine, RssSampler } from './machine.ts';
import { busyPercent, cpuJiffies, median, writeRandomFile } from './shared.ts';

const { values } = parseArgs({
  options: {
    size: { type: 'string', default: '1GiB' },
    runs: { type: 'string', default: '3' },
    'cpu-prof': { type: 'string' },
    'quiet-wait-s': { type: 'string', default: '20' },
    // Re-renders transfer.md (and .json) from a previous run's transfer.json, without measuring.
    render: { type: 'string' },
    out: { type: 'string', default: new URL('../results/', import.meta.url).pathname },
  },
});
const rendered = values.render ? (JSON.parse(readFileSync(values.render, 'utf8')) as SavedRun) : undefined;
const SIZE = rendered?.blobBytes ?? parseSize(values.size!);
const RUNS = rendered?.runs ?? Number(values.runs);
if (!Number.isInteger(RUNS) || RUNS < 1) throw new Error(`--runs must be a positive integer, got ${values.runs}`);
const PROFILE_DIR = values['cpu-prof'];
const REPO = 'bench/transfer';
const MB = 1e6;
const GB = 1e9;
const RSS_SAMPLE_MS = 100;
// Before each transfer, wait (at most --quiet-wait-s) for a 1 s window in which the whole machine
// was less than this busy: other work on a shared machine otherwise skews the comparison.
const QUIET_BUSY_PERCENT = 25;
const QUIET_WAIT_MS = Number(values['quiet-wait-s']) * 1000;
const execFileAsync = promisify(execFile);

// The issue's targets.
const TARGETS = { oneSourceRatio: 0.4, rssBytes: 200 * 2 ** 20 };

type CaseName = 'docker-registry' | 'busybox httpd' | 'Shoal, 1 source' | 'Shoal, 3 sources';
const CASES: CaseName[] = ['docker-registry', 'busybox httpd', 'Shoal, 1 source', 'Shoal, 3 sources'];

interface Sample {
  seconds: number;
  /** Seconds from the request until curl received the first byte. */
  ttfb: number;
  /** CPU seconds (user + system) by process role during the transfer. */
  cpu: Record<string, number>;
  /** Peak RSS by process role during the transfer (VmHWM reset at the start, and VmRSS sampled). */
  rss: Record<string, number>;
  /** CPU seconds of each node by thread kind (main = the JavaScript event loop, v8, libuv) during the transfer. */
  threads: Record<string, Record<string, number>>;
  /** Whole-machine busy CPU seconds during the transfer (all processes, ours and others'). */
  machineBusy: number;
  /** Bytes by source device name, from the receiving node's "blob fetched from the mesh" line. */
  sources?: Record<string, number>;
}

// ---- cleanup, also on SIGINT/SIGTERM -------------------------------------------------------

const cleanups = new Set<() => Promise<unknown>>();
function onCleanup(fn: () => Promise<unknown>): () => Promise<void> {
  cleanups.add(fn);
  return async () => {
    if (!cleanups.delete(fn)) return;
    await fn();
  };
}
async function cleanupAll(): Promise<void> {
  for (const fn of [...cleanups].reverse()) {
    cleanups.delete(fn);
    await fn().catch((err: Error) => console.error(`cleanup: ${err.message}`));
  }
}
for (const signal of ['SIGINT', 'SIGTERM'] as const) {
  process.once(signal, () => {
    console.error(`\n${signal}: stopping every process and removing temp dirs...`);
    void cleanupAll().finally(() => process.exit(130));
  });
}

// ---- process measurements -----------------------------------------------------------------

/** VmHWM (peak RSS) of a process in bytes. */
function peakRssOf(pid: number): number {
  const kb = /VmHWM:\s+(\d+) kB/.exec(readFileSync(`/proc/${pid}/status`, 'utf8'))?.[1];
  return kb ? Number(kb) * 1024 : 0;
}

/** CPU seconds of a process by thread kind: Node's main thread (the event loop), V8 workers (GC, compiler), libuv's pool (fs). */
function threadCpuSecondsOf(pid: number): Record<string, number> {
  const out: Record<string, number> = {};
  for (const tid of readdirSync(`/proc/${pid}/task`)) {
    let stat: string;
    try {
      stat = readFileSync(`/proc/${pid}/task/${tid}/stat`, 'utf8');
    } catch {
      continue; // the thread ended
    }
    const comm = stat.slice(stat.indexOf('(') + 1, stat.lastIndexOf(')'));
    const kind = comm === 'MainThread' ? 'main' : comm === 'V8Worker' ? 'v8' : comm === 'libuv-worker' ? 'libuv' : 'other';
    const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    out[kind] = (out[kind] ?? 0) + (Number(fields[11]) + Number(fields[12])) / 100;
  }
  return out;
}

/** Resets VmHWM to the current RSS (clear_refs 5), so the next reading covers only what follows. */
function resetPeakRss(pid: number): boolean {
  try {
    writeFileSync(`/proc/${pid}/clear_refs`, '5');
    return true;
  } catch {
    return false;
  }
}

/** CPU seconds of reaped children (cutime + cstime) in a /proc/<pid>/stat line. */
function childCpuSeconds(statLine: string): number {
  const fields = statLine.split(') ')[1]!.trim().split(' ');
  return (Number(fields[13]) + Number(fields[14])) / 100; // USER_HZ is 100 on Linux
}

/**
 * A shell that runs one command and then prints its own /proc stat line: the shell has reaped the
 * command, so the line's cutime + cstime is the command's CPU, whether it forked or not.
 */
const REPORT_CHILD_CPU = 'read -r s < /proc/$$/stat; printf "\\n%s\\n" "$s"';

interface Download {
  seconds: number;
  ttfb: number;
  curlCpu: number;
}

/** GET `url` with curl to /dev/null; fails unless it is a 200 with exactly SIZE bytes. */
async function download(url: string): Promise<Download> {
  const { stdout } = await execFileAsync(
    'sh',
    ['-c', `curl "$@"; rc=$?; ${REPORT_CHILD_CPU}; exit $rc`, 'sh', '-sS', '-o', '/dev/null', '-w', '%{http_code} %{size_download} %{time_starttransfer} %{time_total}', url],
    { maxBuffer: 1 << 20 },
  );
  const lines = stdout.trim().split('\n');
  const [status, size, ttfb, total] = lines[0]!.split(' ');
  if (status !== '200') throw new Error(`GET ${url} -> ${status}`);
  if (Number(size) !== SIZE) throw new Error(`GET ${url}: ${size} bytes, expected ${SIZE}`);
  return { seconds: Number(total), ttfb: Number(ttfb), curlCpu: childCpuSeconds(lines.at(-1)!) };
}

async function curlStatus(args: string[]): Promise<string> {
  const { stdout } = await execFileAsync('curl', ['-sS', '-o', '/dev/null', ...args], { maxBuffer: 1 << 20 });
  return stdout.trim();
}

/** A monolithic blob upload (POST, then PUT with the whole body), accepted by both registries. */
async function pushBlob(base: string, file: string, digest: string): Promise<void> {
  const [status, location] = (await curlStatus(['-X', 'POST', '-w', '%{http_code} %header{location}', `${base}/v2/${REPO}/blobs/uploads/`])).split(' ');
  if (status !== '202') throw new Error(`${base}: POST upload -> ${status}`);
  const put = new URL(location!, base);
  put.searchParams.set('digest', digest);
  const done = await curlStatus(['-X', 'PUT', '-T', file, '-H', 'content-type: application/octet-stream', '-w', '%{http_code}', put.href]);
  if (done !== '201') throw new Error(`${base}: PUT blob -> ${done}`);
}

interface Measured {
  role: string;
  pid: number;
}

/** Waits for a quiet second on the machine (see QUIET_BUSY_PERCENT); returns the ms waited. */
async function untilQuiet(): Promise<number> {
  const start = performance.now();
  while (performance.now() - start < QUIET_WAIT_MS) {
    const before = cpuJiffies();
    await sleep(1000);
    if (busyPercent(before, cpuJiffies()) < QUIET_BUSY_PERCENT) return performance.now() - start;
  }
  console.log(`  (the machine stayed busy for ${QUIET_WAIT_MS / 1000} s; measuring anyway)`);
  return performance.now() - start;
}

/** Runs `fetch` while measuring CPU and peak RSS of `procs`, and machine busy time. */
async function measure(procs: Measured[], fetch: () => Promise<Download & { serverCpu?: number }>): Promise<Sample> {
  await untilQuiet();
  const cpuBefore = procs.map((p) => cpuSecondsOf(p.pid));
  const threadsBefore = procs.map((p) => threadCpuSecondsOf(p.pid));
  const peakReset = procs.map((p) => resetPeakRss(p.pid));
  const samplers = procs.map((p) => new RssSampler(p.pid, RSS_SAMPLE_MS));
  const machineBefore = cpuJiffies();
  let result: Download & { serverCpu?: number };
  try {
    result = await fetch();
  } finally {
    for (const s of samplers) s.stop();
  }
  const machineAfter = cpuJiffies();
  const cpu: Record<string, number> = {};
  const rss: Record<string, number> = {};
  const threads: Record<string, Record<string, number>> = {};
  procs.forEach((p, i) => {
    cpu[p.role] = cpuSecondsOf(p.pid) - cpuBefore[i]!;
    threads[p.role] = mapValues(threadCpuSecondsOf(p.pid), (v, kind) => round2(v - (threadsBefore[i]![kind] ?? 0)));
    const sampled = samplers[i]!.stop();
    rss[p.role] = peakReset[i] ? Math.max(sampled, peakRssOf(p.pid)) : sampled;
  });
  if (result.serverCpu !== undefined) cpu.server = result.serverCpu;
  cpu.curl = result.curlCpu;
  return { seconds: result.seconds, ttfb: result.ttfb, cpu, rss, threads, machineBusy: (machineAfter[0] - machineBefore[0]) / 100 };
}

// ---- servers ------------------------------------------------------------------------------

interface StaticServer {
  url: string;
  /** The CPU seconds of the next connection's server process, once it has exited. */
  nextConnectionCpu(): Promise<number>;
  stop(): Promise<void>;
}

/**
 * busybox httpd in inetd mode, one process per connection (as its daemon mode forks one), handed
 * the accepted socket. Its daemon mode ignores SIGCHLD, so a forked child's CPU is never accounted
 * anywhere; in inetd mode under a shell it is: the shell reaps it and prints its CPU.
 */
async function startBusyboxHttpd(dir: string): Promise<StaticServer> {
  let waiting: PromiseWithResolvers<number> | undefined;
  const children = new Set<ReturnType<typeof spawn>>();
  const server: Server = createServer({ pauseOnConnect: true }, (socket) => {
    const pending = waiting;
    waiting = undefined;
    const child = spawn('sh', ['-c', `busybox httpd -i -h "$1"; ${REPORT_CHILD_CPU} >&3`, 'sh', dir], {
      stdio: [socket, socket, 'ignore', 'pipe'],
    });
    children.add(child);
    // The child has its own copy of the socket; ours must not read or linger.
    socket.destroy();
    let out = '';
    child.stdio[3]!.on('data', (d: Buffer) => (out += d));
    child.on('error', (err) => pending?.reject(err));
    child.on('close', () => {
      children.delete(child);
      const line = out.trim().split('\n').at(-1);
      if (line) pending?.resolve(childCpuSeconds(line));
      else pending?.reject(new Error('busybox httpd reported no CPU time'));
    });
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const { port } = server.address() as { port: number };
  return {
    url: `http://127.0.0.1:${port}`,
    nextConnectionCpu() {
      waiting = Promise.withResolvers<number>();
      return waiting.promise;
    },
    async stop() {
      for (const child of children) child.kill('SIGKILL');
      await new Promise<void>((resolve) => server.close(() => resolve()));
    },
  };
}

interface Device {
  name: string;
  node: RunningShoalNode;
  peerId: string;
  /** A loopback multiaddr ending in /p2p/<id>, for --bootstrap. */
  address: string;
  stop(): Promise<void>;
}

async function startDevice(name: string, dataDir: string, bootstrap: Device[] = [], nodeOptions?: string): Promise<Device> {
  await mkdir(dataDir, { recursive: true });
  // test/helpers/node.ts spawns with process.env, synchronously within the call: set NODE_OPTIONS
  // for this one child only (e.g. --cpu-prof), and put ours back at once.
  const saved = process.env.NODE_OPTIONS;
  if (nodeOptions) process.env.NODE_OPTIONS = nodeOptions;
  const started = startShoalNode({ name, dataDir, bootstrap: bootstrap.map((d) => d.address) });
  if (nodeOptions) {
    if (saved === undefined) delete process.env.NODE_OPTIONS;
    else process.env.NODE_OPTIONS = saved;
  }
  const node = await started;
  const stop = onCleanup(() => node.stop().catch(() => node.kill9()));
  const line = node.logs().find((entry) => entry.msg === 'mesh listening');
  const peerId = line?.peerId;
  const addresses = (line?.addresses ?? []) as string[];
  const loopback = addresses.find((a) => a.startsWith('/ip4/127.0.0.1/tcp/'));
  if (typeof peerId !== 'string' || !loopback) throw new Error(`${name}: no loopback address in "mesh listening":\n${node.logText(20)}`);
  const address = loopback.includes('/p2p/') ? loopback : `${loopback}/p2p/${peerId}`;
  return { name, node, peerId, address, stop };
}

/** Waits until `device` sees every one of `others` alive in its membership table. */
async function untilSeesAlive(device: Device, others: Device[], timeoutMs = 30_000): Promise<void> {
  const deadline = performance.now() + timeoutMs;
  let seen = '';
  while (performance.now() < deadline) {
    const peers = await device.node.peers().catch((err: Error) => {
      seen = `an error: ${err.message}`;
      return undefined;
    });
    if (!peers) {
      await sleep(100);
      continue;
    }
    seen = peers.map((p) => `${p.name}=${p.status}`).join(', ');
    if (others.every((o) => peers.some((p) => p.peerId === o.peerId && p.status === 'alive'))) return;
    await sleep(100);
  }
  throw new Error(`${device.name} does not see ${others.map((o) => o.name).join(', ')} alive within ${timeoutMs} ms; last seen: ${seen}\n${device.node.logText(30)}`);
}

/** The receiving node's "blob fetched from the mesh" line for `digest`. */
async function fetchedLine(device: Device, digest: string, timeoutMs = 15_000): Promise<LogEntry> {
  const deadline = performance.now() + timeoutMs;
  while (performance.now() < deadline) {
    const line = device.node.logs().find((e) => e.msg === 'blob fetched from the mesh' && e.blob === digest);
    if (line) return line;
    await sleep(50);
  }
  throw new Error(`${device.name} never logged "blob fetched from the mesh" for ${digest}:\n${device.node.logText(30)}`);
}

// ---- the benchmark --------------------------------------------------------------------------

interface Context {
  work: string;
  file: string;
  digest: string;
  registry: DockerRegistry;
  httpd: StaticServer;
  /** The one source, and the first of three. */
  a1: Device;
  a2?: Device;
  a3?: Device;
  fresh: number;
}

async function runCase(ctx: Context, name: CaseName, nodeOptions?: string): Promise<Sample> {
  switch (name) {
    case 'docker-registry':
      return measure([{ role: 'server', pid: ctx.registry.pid }], () => download(`${ctx.registry.url}/v2/${REPO}/blobs/${ctx.digest}`));
    case 'busybox httpd':
      return measure([], async () => {
        const serverCpu = ctx.httpd.nextConnectionCpu();
        const result = await download(`${ctx.httpd.url}/blob.bin`);
        return { ...result, serverCpu: await serverCpu };
      });
    case 'Shoal, 1 source':
      return shoalCase(ctx, [ctx.a1], nodeOptions);
    case 'Shoal, 3 sources':
      return shoalCase(ctx, [ctx.a1, ctx.a2!, ctx.a3!], nodeOptions);
  }
}

/** A fresh device B (new data dir) bootstrapped to `sources` pulls the blob through its gateway. */
async function shoalCase(ctx: Context, sources: Device[], nodeOptions?: string): Promise<Sample> {
  const dataDir = join(ctx.work, `b-${ctx.fresh++}`);
  const removeDir = onCleanup(() => rm(dataDir, { recursive: true, force: true, maxRetries: 5, retryDelay: 200 }));
  const b = await startDevice('B', dataDir, sources, nodeOptions);
  try {
    await untilSeesAlive(b, sources);
    const roles = sources.length === 1 ? ['A'] : sources.map((s) => s.name);
    const sample = await measure(
      [...sources.map((s, i) => ({ role: roles[i]!, pid: s.node.pid })), { role: 'B', pid: b.node.pid }],
      () => download(`${b.node.gatewayUrl}/v2/${REPO}/blobs/${ctx.digest}`),
    );
    const line = await fetchedLine(b, ctx.digest);
    const byPeer = (line.sources ?? {}) as Record<string, number>;
    sample.sources = Object.fromEntries(
      Object.entries(byPeer).map(([peer, bytes]) => [sources.find((s) => s.peerId === peer)?.name ?? peer, bytes]),
    );
    return sample;
  } finally {
    await b.stop();
    await removeDir();
  }
}

/** Starts A2 and A3 and has each pull the blob through its own gateway, so three devices hold it. */
async function seedThreeSources(ctx: Context): Promise<void> {
  for (const name of ['A2', 'A3'] as const) {
    const device = await startDevice(name, join(ctx.work, name.toLowerCase()), [ctx.a1, ...(ctx.a2 ? [ctx.a2] : [])]);
    if (name === 'A2') ctx.a2 = device;
    else ctx.a3 = device;
    await untilSeesAlive(device, [ctx.a1]);
    const got = await download(`${device.node.gatewayUrl}/v2/${REPO}/blobs/${ctx.digest}`);
    await fetchedLine(device, ctx.digest);
    console.log(`  ${name} now holds the blob (pulled at ${(SIZE / MB / got.seconds).toFixed(0)} MB/s)`);
  }
  await untilSeesAlive(ctx.a1, [ctx.a2!, ctx.a3!]);
}

function describeSample(name: CaseName, s: Sample): string {
  const cpu = Object.entries(s.cpu)
    .map(([role, seconds]) => `${role} ${seconds.toFixed(2)}`)
    .join(', ');
  const rss = Object.entries(s.rss)
    .filter(([role]) => role !== 'server')
    .map(([role, bytes]) => `${role} ${(bytes / 2 ** 20).toFixed(0)}`)
    .join(', ');
  const main = s.sources
    ? `; main thread busy ${Object.entries(s.threads)
        .map(([role, t]) => `${role} ${Math.round((100 * (t.main ?? 0)) / s.seconds)} %`)
        .join(', ')}; B threads ${JSON.stringify(s.threads.B)}`
    : '';
  const sources = s.sources ? `; sources ${Object.entries(s.sources).map(([n, b]) => `${n} ${(b / 2 ** 20).toFixed(0)} MiB`).join(', ')}` : '';
  return `${name}: ${(SIZE / MB / s.seconds).toFixed(0)} MB/s in ${s.seconds.toFixed(2)} s (first byte ${(s.ttfb * 1000).toFixed(0)} ms); CPU s ${cpu}${rss ? `; peak RSS MiB ${rss}` : ''}${main}${sources}; machine busy ${Math.round((100 * s.machineBusy) / (s.seconds * cpus().length))} %`;
}

/** The commit measured, and the product files that differed from it (others may edit the tree). */
function describeCode(): { commit: string; modified: string[] } {
  // Not trimmed: a porcelain line starts with a space when only the work tree differs.
  const git = (...args: string[]) => execFileSync('git', args, { cwd: new URL('../../', import.meta.url), encoding: 'utf8' });
  const modified = git('status', '--porcelain', '--', 'packages', 'node', 'registry-gateway')
    .split('\n')
    .filter(Boolean)
    .map((line) => line.slice(3));
  return { commit: git('rev-parse', '--short', 'HEAD').trim(), modified };
}

async function main(): Promise<void> {
  const code = describeCode();
  const loadBefore = loadavg();
  const machine = describeMachine();
  const work = await mkdtemp(join(tmpdir(), 'shoal-bench-transfer-'));
  onCleanup(() => rm(work, { recursive: true, force: true, maxRetries: 5, retryDelay: 200 }));
  const file = join(work, 'static', 'blob.bin');
  await mkdir(join(work, 'static'));
  process.stdout.write(`load average before the run: ${loadBefore.map((l) => l.toFixed(2)).join(' ')}\n`);
  process.stdout.write(`generating ${SIZE / 2 ** 20} MiB of random data... `);
  const digest = await writeRandomFile(file, SIZE);
  process.stdout.write(`${digest}\n`);
  const floors = await costFloors();

  const registry = await startDockerRegistry();
  onCleanup(() => registry.stop());
  const httpd = await startBusyboxHttpd(join(work, 'static'));
  onCleanup(() => httpd.stop());
  const a1 = await startDevice('A1', join(work, 'a1'));
  const ctx: Context = { work, file, digest, registry, httpd, a1, fresh: 0 };

  console.log('pushing the blob to docker-registry and to device A...');
  await pushBlob(registry.url, file, digest);
  await pushBlob(a1.node.gatewayUrl, file, digest);

  const samples = new Map<CaseName, Sample[]>(CASES.map((c) => [c, []]));
  const record = (name: CaseName, s: Sample) => {
    samples.get(name)!.push(s);
    console.log(`  ${describeSample(name, s)}`);
  };
  // Every Shoal run is bracketed by the two plain HTTP downloads, in alternating order, so the
  // baselines see the same machine (and the same background load) as Shoal.
  const phase = async (shoal: CaseName) => {
    for (let run = 0; run < RUNS; run++) {
      console.log(`run ${run + 1}/${RUNS} (${shoal})`);
      const order: CaseName[] = ['docker-registry', 'busybox httpd', shoal];
      for (const name of run % 2 === 0 ? order : order.reverse()) record(name, await runCase(ctx, name));
    }
  };
  await phase('Shoal, 1 source');
  console.log('seeding A2 and A3 from A1...');
  await seedThreeSources(ctx);
  await phase('Shoal, 3 sources');

  let profile: ProfileSummary[] | undefined;
  if (PROFILE_DIR) profile = await profiledRun(ctx, PROFILE_DIR);

  await cleanupAll();
  await report(samples, { machine, code, loadBefore, loadAfter: loadavg(), floors, profile });
}

// ---- CPU profile of the receiving node (and the sender) -----------------------------------

interface ProfileSummary {
  device: string;
  file: string;
  totalMs: number;
  top: { fn: string; ms: number; percent: number }[];
  byArea: { area: string; ms: number; percent: number }[];
}

/**
 * One extra, unmeasured one-source transfer with --cpu-prof on both devices: A2 and A3 stop, A1
 * restarts with the profiler (same data dir, so it still holds the blob), and a fresh B pulls.
 */
async function profiledRun(ctx: Context, dir: string): Promise<ProfileSummary[]> {
  console.log(`profiled run (--cpu-prof into ${dir})...`);
  await ctx.a2?.stop();
  await ctx.a3?.stop();
  await ctx.a1.stop();
  const aDir = join(dir, 'sender-A');
  const bDir = join(dir, 'receiver-B');
  await mkdir(aDir, { recursive: true });
  await mkdir(bDir, { recursive: true });
  ctx.a1 = await startDevice('A1', join(ctx.work, 'a1'), [], `--cpu-prof --cpu-prof-dir=${aDir}`);
  const sample = await shoalCase(ctx, [ctx.a1], `--cpu-prof --cpu-prof-dir=${bDir}`);
  console.log(`  (profiled, not counted) ${describeSample('Shoal, 1 source', sample)}`);
  await ctx.a1.stop();
  return [summarizeProfile('receiver B', newest(bDir)), summarizeProfile('sender A', newest(aDir))];
}

function newest(dir: string): string {
  const files = readdirSync(dir).filter((f) => f.endsWith('.cpuprofile')).sort();
  if (files.length === 0) throw new Error(`no .cpuprofile in ${dir}`);
  return join(dir, files.at(-1)!);
}

interface CpuProfile {
  nodes: { id: number; callFrame: { functionName: string; url: string; lineNumber: number } }[];
  samples: number[];
  timeDeltas: number[];
}

/** Self time by function and by area (package or subsystem), idle excluded. */
function summarizeProfile(device: string, file: string): ProfileSummary {
  const profile = JSON.parse(readFileSync(file, 'utf8')) as CpuProfile;
  const byId = new Map(profile.nodes.map((n) => [n.id, n.callFrame]));
  const byFn = new Map<string, number>();
  const byArea = new Map<string, number>();
  let total = 0;
  profile.samples.forEach((id, i) => {
    const frame = byId.get(id)!;
    const us = profile.timeDeltas[i] ?? 0;
    if (frame.functionName === '(idle)') return;
    total += us;
    const where = frame.url ? `${frame.url.replace(/^.*\/node_modules\//, '').replace(/^file:\/\/.*?\/(packages|node|registry-gateway)\//, '$1/')}:${frame.lineNumber + 1}` : '';
    const fn = `${frame.functionName || '(anonymous)'}${where ? ` ${where}` : ''}`;
    byFn.set(fn, (byFn.get(fn) ?? 0) + us);
    const area = areaOf(frame.url, frame.functionName);
    byArea.set(area, (byArea.get(area) ?? 0) + us);
  });
  const rank = (m: Map<string, number>, n: number) =>
    [...m]
      .sort((a, b) => b[1] - a[1])
      .slice(0, n)
      .map(([k, us]) => ({ key: k, ms: Math.round(us / 1000), percent: Number(((100 * us) / total).toFixed(1)) }));
  return {
    device,
    file,
    totalMs: Math.round(total / 1000),
    top: rank(byFn, 15).map(({ key, ms, percent }) => ({ fn: key, ms, percent })),
    byArea: rank(byArea, 12).map(({ key, ms, percent }) => ({ area: key, ms, percent })),
  };
}

function areaOf(url: string, fn: string): string {
  if (!url) return fn.startsWith('(') ? fn : 'native bindings (socket, fs)';
  const pkg = /node_modules\/((?:@[^/]+\/)?[^/]+)/.exec(url)?.[1];
  if (pkg) return pkg;
  const internal = /^node:(internal\/)?([^/]+(?:\/[^/]+)?)/.exec(url);
  if (internal) return `node:${internal[2]}`;
  const own = /\/(packages\/[^/]+|registry-gateway|node)\/src\//.exec(url)?.[1];
  return own ? `shoal ${own}` : url;
}

// ---- cost floors: what the crypto alone costs on this machine ------------------------------

interface Floors {
  sha256SecondsPerGB: number;
  /** chacha20-poly1305 as libp2p-noise uses it: a new cipher per 65 519-byte message, output concatenated. */
  noiseChachaSecondsPerGB: number;
  /** chacha20-poly1305 with one cipher over 1 MiB updates: the cipher alone. */
  rawChachaSecondsPerGB: number;
}

/** CPU s/GB of the crypto every byte goes through, measured in this process (after a quiet second). */
async function costFloors(): Promise<Floors> {
  await untilQuiet();
  const bytes = 256 * 2 ** 20;
  const buf = randomBytes(2 ** 20);
  const perGB = (run: () => void) => {
    const before = process.cpuUsage();
    run();
    const used = process.cpuUsage(before);
    return round2(((used.user + used.system) / 1e6) * (GB / bytes));
  };
  const key = randomBytes(32);
  const nonce = Buffer.alloc(12);
  const msg = buf.subarray(0, 65_519);
  return {
    sha256SecondsPerGB: perGB(() => {
      const hash = createHash('sha256');
      for (let done = 0; done < bytes; done += buf.length) hash.update(buf);
      hash.digest();
    }),
    noiseChachaSecondsPerGB: perGB(() => {
      for (let done = 0, n = 0; done < bytes; done += msg.length, n++) {
        nonce.writeUInt32LE(n, 4);
        const c = createCipheriv('chacha20-poly1305', key, nonce, { authTagLength: 16 });
        c.setAAD(Buffer.alloc(0), { plaintextLength: msg.length });
        Buffer.concat([c.update(msg), c.final(), c.getAuthTag()]);
      }
    }),
    rawChachaSecondsPerGB: perGB(() => {
      const c = createCipheriv('chacha20-poly1305', key, nonce, { authTagLength: 16 });
      for (let done = 0; done < bytes; done += buf.length) c.update(buf);
      c.final();
    }),
  };
}

// ---- report ---------------------------------------------------------------------------------

interface Row {
  case: CaseName;
  runs: number;
  seconds: number;
  mbps: number;
  ttfbMs: number;
  /** Median CPU s/GB by process role, and the median of their total. */
  cpuPerGB: Record<string, number>;
  cpuPerGBTotal: number;
  /** Median CPU s/GB of each node by thread kind (main, v8, libuv). */
  threadsPerGB: Record<string, Record<string, number>>;
  /** Largest peak RSS over the runs, by node (and docker-registry), MiB. */
  peakRssMiB: Record<string, number>;
  /** Medians: whole-machine busy %, cores used by the measured processes and by everything else. */
  machineBusyPercent: number;
  oursCores: number;
  othersCores: number;
  sourcesMiB?: Record<string, number>[];
}

function summarize(name: CaseName, samples: Sample[], cores: number): Row {
  const perGB = (seconds: number) => round2(seconds / (SIZE / GB));
  const roles = Object.keys(samples[0]!.cpu);
  const totals = samples.map((s) => Object.values(s.cpu).reduce((a, b) => a + b, 0));
  const nodes = Object.keys(samples[0]!.threads);
  const seconds = median(samples.map((s) => s.seconds));
  return {
    case: name,
    runs: samples.length,
    seconds: round2(seconds),
    mbps: Math.round(SIZE / MB / seconds),
    ttfbMs: Math.round(median(samples.map((s) => s.ttfb)) * 1000),
    cpuPerGB: Object.fromEntries(roles.map((r) => [r, perGB(median(samples.map((s) => s.cpu[r]!)))])),
    cpuPerGBTotal: perGB(median(totals)),
    threadsPerGB: name.startsWith('Shoal')
      ? Object.fromEntries(
          nodes.map((n) => [n, Object.fromEntries(['main', 'v8', 'libuv'].map((k) => [k, perGB(median(samples.map((s) => s.threads[n]?.[k] ?? 0)))]))]),
        )
      : {},
    peakRssMiB: Object.fromEntries(Object.keys(samples[0]!.rss).map((r) => [r, Math.round(Math.max(...samples.map((s) => s.rss[r]!)) / 2 ** 20)])),
    machineBusyPercent: Math.min(100, Math.round(median(samples.map((s) => (100 * s.machineBusy) / (s.seconds * cores))))),
    oursCores: round2(median(samples.map((s, i) => totals[i]! / s.seconds))),
    othersCores: round2(median(samples.map((s, i) => Math.max(0, s.machineBusy - totals[i]!) / s.seconds))),
    ...(samples[0]!.sources ? { sourcesMiB: samples.map((s) => mapValues(s.sources!, (b) => Math.round(b / 2 ** 20))) } : {}),
  };
}

function round2(x: number): number {
  return Number(x.toFixed(2));
}

function mapValues<T, U>(o: Record<string, T>, f: (v: T, k: string) => U): Record<string, U> {
  return Object.fromEntries(Object.entries(o).map(([k, v]) => [k, f(v, k)]));
}

/** What transfer.json holds, as --render reads it back. */
interface SavedRun {
  blobBytes: number;
  runs: number;
  machine: ReturnType<typeof describeMachine>;
  code: ReturnType<typeof describeCode>;
  loadBefore: number[];
  loadAfter: number[];
  floors: Floors;
  samples: Record<CaseName, Sample[]>;
  profile?: ProfileSummary[];
}

interface RunInfo {
  machine: ReturnType<typeof describeMachine>;
  code: ReturnType<typeof describeCode>;
  loadBefore: number[];
  loadAfter: number[];
  floors: Floors;
  profile?: ProfileSummary[];
}

async function report(samples: Map<CaseName, Sample[]>, info: RunInfo): Promise<void> {
  const { machine, code, loadBefore, loadAfter, floors, profile } = info;
  const cores = cpus().length;
  const rows = CASES.map((c) => summarize(c, samples.get(c)!, cores));
  const row = (c: CaseName) => rows.find((r) => r.case === c)!;
  const registry = row('docker-registry');
  const httpd = row('busybox httpd');
  const one = row('Shoal, 1 source');
  const three = row('Shoal, 3 sources');
  const ratio = (r: Row, base: Row) => round2(r.mbps / base.mbps);
  const maxNodeRss = Math.max(...[one, three].flatMap((r) => Object.values(r.peakRssMiB)));
  const verdicts = {
    oneSource: ratio(one, registry) >= TARGETS.oneSourceRatio,
    threeSources: three.mbps > one.mbps,
    rss: maxNodeRss * 2 ** 20 <= TARGETS.rssBytes,
  };
  const met = (ok: boolean) => (ok ? 'met' : 'MISSED');
  const list = (o: Record<string, number>, unit = '') =>
    Object.entries(o)
      .map(([k, v]) => `${k} ${v}${unit}`)
      .join(', ');
  // What the CPU cost alone allows: every process of a transfer shares this machine's cores.
  const cap = (r: Row) => Math.round((cores / r.cpuPerGBTotal) * 1000);
  const b1 = one.threadsPerGB.B!;
  const b3 = three.threadsPerGB.B!;
  const cryptoB = round2(2 * floors.sha256SecondsPerGB + floors.noiseChachaSecondsPerGB);
  const senders = Object.entries(three.cpuPerGB)
    .filter(([role]) => role.startsWith('A'))
    .map(([role, v]) => `${role} ${v}`)
    .join(', ');
  const busiest = [one, three].reduce((a, b) => (a.othersCores >= b.othersCores ? a : b));

  const shows = [
    `**Throughput.** With one source Shoal moved the layer at ${one.mbps} MB/s: ${ratio(one, registry)}x docker-registry (${registry.mbps} MB/s) and ${ratio(one, httpd)}x busybox httpd (${httpd.mbps} MB/s). ` +
      `The >= ${TARGETS.oneSourceRatio}x target is ${met(verdicts.oneSource)}` +
      (verdicts.oneSource ? '.' : ` by a factor of ${round2((TARGETS.oneSourceRatio * registry.mbps) / one.mbps)}.`) +
      ` With three sources it moved ${three.mbps} MB/s (${ratio(three, registry)}x docker-registry, ${round2(three.mbps / one.mbps)}x one source): ` +
      (verdicts.threeSources ? 'more than with one source, as targeted.' : 'not more than with one source, so that target is MISSED too.') +
      ` Time to first byte was ${one.ttfbMs} ms (1 source) and ${three.ttfbMs} ms (3 sources) against ${registry.ttfbMs} ms from docker-registry: B first looks for holders (DHT provider query) and asks each for its chunk index.`,
    `**CPU is the limit.** A plain HTTP download costs ${registry.cpuPerGBTotal} CPU s/GB through docker-registry and ${httpd.cpuPerGBTotal} through busybox httpd (server + curl). ` +
      `Shoal costs ${one.cpuPerGBTotal} CPU s/GB with one source (sender ${one.cpuPerGB.A}, receiver B ${one.cpuPerGB.B}, curl ${one.cpuPerGB.curl}), ${round2(one.cpuPerGBTotal / registry.cpuPerGBTotal)}x docker-registry, ` +
      `and ${three.cpuPerGBTotal} with three sources (B ${three.cpuPerGB.B}). All processes of a transfer share this machine's ${cores} cores, so the CPU cost alone caps Shoal at about ${cap(one)} MB/s here ` +
      `(${cores} cores / ${one.cpuPerGBTotal} s/GB) even with the machine to itself, against about ${cap(registry)} MB/s for docker-registry. ` +
      `During the Shoal transfers our processes used ${one.oursCores} cores (1 source) and ${three.oursCores} (3 sources); other processes on the machine used ${one.othersCores} and ${three.othersCores} cores (machine ${one.machineBusyPercent} % and ${three.machineBusyPercent} % busy)` +
      (Math.max(one.machineBusyPercent, three.machineBusyPercent) >= 90 ? ': the transfers were CPU bound on this 2-core machine.' : '.') +
      ` More sources spread the sending (each sender's CPU per GB falls: ${senders} against ${one.cpuPerGB.A} for the one source) but every byte still goes through B's single event loop, ` +
      (three.cpuPerGB.B! > 1.15 * one.cpuPerGB.B!
        ? `and B itself cost more per GB with three sources (${three.cpuPerGB.B} against ${one.cpuPerGB.B} s/GB; its V8 worker threads, mostly GC, ${b3.v8} against ${b1.v8}), so on one shared machine three sources were ${three.mbps < one.mbps ? 'slower' : 'not much faster'}. `
        : 'so on one machine they cannot add much. ') +
      `On separate boards each sender brings its own CPU, and B's cost per GB is what bounds a small receiver.`,
    `**Where B's CPU goes.** By thread, per GB (1 source): main thread (the event loop) ${b1.main} s, V8 worker threads (concurrent GC marking and compilation) ${b1.v8} s, libuv pool (file I/O) ${b1.libuv} s; with 3 sources ${b3.main}, ${b3.v8}, ${b3.libuv}. ` +
      `Crypto is a fixed part of it: on this machine sha256 costs ${floors.sha256SecondsPerGB} s/GB and chacha20-poly1305 ${floors.noiseChachaSecondsPerGB} s/GB as noise uses it (a new cipher per 64 KiB message; ${floors.rawChachaSecondsPerGB} s/GB for the cipher alone). ` +
      `B hashes every byte twice (per-chunk verify, then the whole-blob digest as chunks land) and decrypts it once, about ${cryptoB} s/GB; the sender encrypts it once, about ${floors.noiseChachaSecondsPerGB} s/GB. ` +
      `The rest is JavaScript moving bytes: yamux framing and window updates, noise framing, Uint8ArrayList copies, stream events, a new yamux stream per 1 MiB chunk, the copy of each chunk into its buffer, the file write and the read back for the gateway, and the GC that all these short-lived buffers cause.`,
    `**Memory.** Peak RSS during the transfer was at most ${maxNodeRss} MiB per node (VmHWM reset at the start of each transfer, and VmRSS sampled every ${RSS_SAMPLE_MS} ms): the <= 200 MB target is ${met(verdicts.rss)}. docker-registry peaked at ${registry.peakRssMiB.server} MiB.`,
    busiest.othersCores >= 0.2
      ? `**Caveat: a shared machine.** Other work ran during this benchmark (load average ${loadBefore[0]!.toFixed(2)} before, ${loadAfter[0]!.toFixed(2)} after; up to ${busiest.othersCores} cores used by other processes during the Shoal transfers, median). Each transfer waited for a quiet second before starting (at most ${QUIET_WAIT_MS / 1000} s), but the throughput figures are lower than the machine alone would give; the CPU s/GB figures are per process and much less affected.`
      : `The machine was otherwise quiet during the transfers (other processes used at most ${busiest.othersCores} cores).`,
  ];

  const md = [
    '# Transfer: one layer between two devices over loopback, Shoal vs plain HTTP (same file, same run)',
    '',
    markdownMachine(machine),
    `Code: commit ${code.commit}${code.modified.length ? ` with uncommitted changes to ${code.modified.join(', ')}` : ', product code unmodified'}.`,
    `Load average before the run: ${loadBefore.map((l) => l.toFixed(2)).join(', ')}; after: ${loadAfter.map((l) => l.toFixed(2)).join(', ')}.`,
    '',
    `Layer: ${SIZE / 2 ** 20} MiB of random bytes; median of ${RUNS} runs per Shoal case and ${2 * RUNS} per plain HTTP case (run next to each Shoal run, in alternating order). curl downloads to /dev/null in every case, all on 127.0.0.1. ` +
      `**docker-registry**: the reference registry 2.8 serving the pushed blob. **busybox httpd**: a raw static-file server (inetd mode, one process per connection, sendfile). ` +
      `**Shoal, 1 source**: device A holds the blob (pushed to its gateway); a fresh device B (new data dir, bootstrapped to A) pulls it through its gateway, so the bytes cross libp2p TCP + noise + yamux from A to B, are verified and stored by B, and go from B's gateway to curl. ` +
      `**Shoal, 3 sources**: A1, A2, A3 hold it (pushed to A1, pulled by A2 and A3 through their gateways); a fresh B bootstrapped to all three pulls. ` +
      `CPU: user + system seconds per GB (10^9 bytes) from /proc of every process involved (busybox httpd and curl via their parent shell's cutime). MB/s: 10^6 bytes per second over curl's total time.`,
    '',
    '| transfer | MB/s | vs docker-registry | vs busybox httpd | first byte | CPU s/GB, all processes | CPU s/GB by process | peak RSS during transfer |',
    '|---|---:|---:|---:|---:|---:|---|---|',
    ...rows.map(
      (r) =>
        `| ${r.case} | ${r.mbps} | ${ratio(r, registry)} | ${ratio(r, httpd)} | ${r.ttfbMs} ms | ${r.cpuPerGBTotal} | ${list(r.cpuPerGB)} | ${Object.keys(r.peakRssMiB).length ? list(r.peakRssMiB, ' MiB') : 'n/a (one process per connection)'} |`,
    ),
    '',
    `Targets: Shoal >= ${TARGETS.oneSourceRatio}x plain HTTP (docker-registry) with one source: ${ratio(one, registry)}x, ${met(verdicts.oneSource)}. ` +
      `More with three sources: ${three.mbps} vs ${one.mbps} MB/s, ${met(verdicts.threeSources)}. ` +
      `RSS of each node <= 200 MB (read as 200 MiB, as in the other benchmarks): at most ${maxNodeRss} MiB, ${met(verdicts.rss)}.`,
    '',
    '| Shoal transfer | node | CPU s/GB: main thread | V8 workers (GC) | libuv pool (fs) |',
    '|---|---|---:|---:|---:|',
    ...[one, three].flatMap((r) => Object.entries(r.threadsPerGB).map(([n, t]) => `| ${r.case} | ${n} | ${t.main} | ${t.v8} | ${t.libuv} |`)),
    '',
    '| transfer | machine busy | our processes (cores) | other processes (cores) |',
    '|---|---:|---:|---:|',
    ...rows.map((r) => `| ${r.case} | ${r.machineBusyPercent} % | ${r.oursCores} | ${r.othersCores} |`),
    '',
    `Bytes per source with three sources (MiB, from B's "blob fetched from the mesh" line), per run: ${three.sourcesMiB!.map((x) => list(x)).join('; ')}.`,
    '',
    '## What this shows',
    '',
    ...shows.flatMap((p) => [p, '']),
    ...(profile ? profileMarkdown(profile) : []),
  ].join('\n');
  const result = {
    benchmark: 'transfer',
    blobBytes: SIZE,
    runs: RUNS,
    machine,
    code,
    loadBefore,
    loadAfter,
    targets: TARGETS,
    verdicts,
    floors,
    rows,
    samples: Object.fromEntries(samples),
    profile,
  };
  await writeFile(join(values.out!, 'transfer.json'), `${JSON.stringify(result, null, 2)}\n`);
  await writeFile(join(values.out!, 'transfer.md'), md);
  console.log(`\n${md}`);
}

/** The shares that answer "where does it go": noise's cipher, sha256, socket and file calls, GC. */
function profileGist(p: ProfileSummary): string {
  // Only the top areas are kept: one not among them is below the smallest listed.
  const below = `< ${p.byArea.at(-1)?.percent ?? 0}`;
  const share = (...areas: string[]) => {
    const found = p.byArea.filter((a) => areas.includes(a.area));
    return found.length ? round2(found.reduce((sum, a) => sum + a.percent, 0)) : below;
  };
  return (
    `chacha20-poly1305 ${share('node:crypto/cipher', 'node:crypto/keys')} % (of which ${share('node:crypto/keys')} % is importing the key again for every 64 KiB noise message), ` +
    `sha256 ${share('node:crypto/hash')} %, socket and file calls ${share('native bindings (socket, fs)')} %, garbage collector ${share('(garbage collector)')} %, Shoal's own code ${share('shoal packages/swarm', 'shoal packages/store', 'shoal registry-gateway', 'shoal node')} %.`
  );
}

function profileMarkdown(profiles: ProfileSummary[]): string[] {
  return [
    '## CPU profile (one extra, unmeasured one-source transfer with --cpu-prof on both devices)',
    '',
    "V8's sampling profiler sees the main thread only (not GC or libuv threads), and a sample taken while the thread waits for a CPU counts toward the function it was in, so on a busy machine system calls that wake another process (socket writes) look heavier than their CPU cost. Areas: npm packages, Node internals (node:...), Shoal's own code, and native bindings (socket and file system calls).",
    '',
    ...profiles.flatMap((p) => [
      `**${p.device}**: ${p.totalMs} ms of non-idle samples over the node's whole life (start, transfer, stop). ${profileGist(p)}`,
      '',
      '| area | self ms | % |',
      '|---|---:|---:|',
      ...p.byArea.map((a) => `| ${a.area} | ${a.ms} | ${a.percent} |`),
      '',
      '| function (self time) | self ms | % |',
      '|---|---:|---:|',
      ...p.top.map((t) => `| \`${t.fn}\` | ${t.ms} | ${t.percent} |`),
      '',
    ]),
  ];
}

function parseSize(text: string): number {
  const m = /^(\d+(?:\.\d+)?)\s*(|b|k|kb|kib|m|mb|mib|g|gb|gib)$/i.exec(text.trim());
  if (!m) throw new Error(`--size: cannot parse ${JSON.stringify(text)} (e.g. 256MB, 1GiB)`);
  const unit = m[2]!.toLowerCase()[0];
  const scale = unit === 'k' ? 2 ** 10 : unit === 'm' ? 2 ** 20 : unit === 'g' ? 2 ** 30 : 1;
  const bytes = Math.round(Number(m[1]) * scale);
  if (bytes < 2 * 2 ** 20) throw new Error('--size must be at least 2 MiB');
  return bytes;
}

if (rendered) {
  await report(new Map(CASES.map((c) => [c, rendered.samples[c]])), rendered);
} else {
  try {
    await main();
  } finally {
    await cleanupAll();
  }
}
