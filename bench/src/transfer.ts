// npm run bench:transfer [-- --size 1GiB --runs 3 --libp2p-runs 3 --cpu-prof /tmp/prof]
//
// --size is binary (256MB = 256 MiB); --libp2p-runs sets the runs of the libp2p-only case
// (default --runs); --cpu-prof DIR adds one unmeasured, profiled one-source transfer over the data
// plane and a summary of it; --quiet-wait-s bounds the wait for a quiet machine before each
// transfer.
//
// One large layer between devices over loopback: Shoal (device B pulls through its gateway) versus
// a plain unencrypted HTTP download of the same file in the same run: docker-registry (what a
// central registry does) and busybox httpd (a raw static-file server, sendfile). Shoal runs three
// ways: one source and three sources with the chunk data plane (the default: B gets a ticket over
// libp2p and fetches the chunks over plain HTTP), and one source with every node's data plane off
// (`dataPlane: false`, what --no-data-plane sets), so the chunks cross libp2p TCP + noise + yamux.
// curl downloads to /dev/null in every case but one: docker-registry's download is also run saved
// to a file, since B stores what it pulls. Reports throughput, time to first byte, CPU seconds
// per GB of every process involved (server or sending devices, receiving device, curl), peak RSS
// of each node during the transfer, the bytes each source sent, and the bytes B received over HTTP
// and over libp2p (from ss). Writes bench/results/transfer.{json,md}.
//
// Sizes are binary: --size 256MB is 256 MiB. Throughput is in MB/s (10^6 bytes) and CPU in
// seconds per GB (10^9 bytes), as in bench:gateway.
import { execFile, execFileSync, spawn } from 'node:child_process';
import { createCipheriv, createHash, randomBytes } from 'node:crypto';
import { closeSync, openSync, readdirSync, readFileSync, unlinkSync, writeFileSync, writeSync } from 'node:fs';
import { mkdir, mkdtemp, rm, writeFile } from 'node:fs/promises';
import { createServer, type Server } from 'node:net';
import { cpus, loadavg, tmpdir } from 'node:os';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { parseArgs, promisify } from 'node:util';
import { startDockerRegistry, type DockerRegistry } from '../../test/helpers/docker-registry.ts';
import { startShoalNode, type LogEntry, type RunningShoalNode } from '../../test/helpers/node.ts';
import { cpuSecondsOf, describeMachine, markdownMachine, RssSampler } from './machine.ts';
import { busyPercent, codeAtEnd, codeSentence, cpuJiffies, describeCode, median, writeRandomFile, writeResults, type CodeState } from './shared.ts';

const { values } = parseArgs({
  options: {
    size: { type: 'string', default: '1GiB' },
    runs: { type: 'string', default: '3' },
    'libp2p-runs': { type: 'string' },
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
const LIBP2P_RUNS = rendered?.libp2pRuns ?? Number(values['libp2p-runs'] ?? RUNS);
if (!Number.isInteger(LIBP2P_RUNS) || LIBP2P_RUNS < 1) throw new Error(`--libp2p-runs must be a positive integer, got ${values['libp2p-runs']}`);
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

// The issue's targets. "More with three sources" counts only beyond run-to-run noise: by more
// than this fraction of the one-source median (runs of one case spread by about that much).
const TARGETS = { oneSourceRatio: 0.4, threeSourcesMargin: 0.1, rssBytes: 200 * 2 ** 20 };

type CaseName = 'docker-registry' | 'docker-registry, saved' | 'busybox httpd' | 'Shoal, 1 source' | 'Shoal, 3 sources' | 'Shoal, 1 source, libp2p only';
const CASES: CaseName[] = ['docker-registry', 'docker-registry, saved', 'busybox httpd', 'Shoal, 1 source', 'Shoal, 3 sources', 'Shoal, 1 source, libp2p only'];
// The plain HTTP downloads next to each Shoal run.
const BASELINES: CaseName[] = ['docker-registry', 'docker-registry, saved', 'busybox httpd'];
const LIBP2P_ONLY: CaseName = 'Shoal, 1 source, libp2p only';

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
  /**
   * Bytes B received from each source device over its data plane (HTTP) and over libp2p, summed
   * over B's TCP connections to that device (ss, read after the transfer while they are open).
   */
  paths?: Record<string, { http: number; libp2p: number }>;
  /** B's data plane (HTTP) connections that closed during the transfer. */
  closedHttpConnections?: number;
  /** Seconds B's downloader took from the transfer's start to its last chunk (size / its logged rate). */
  meshSeconds?: number;
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

/** GET `url` with curl to `output` (/dev/null unless given); fails unless it is a 200 with exactly SIZE bytes. */
async function download(url: string, output = '/dev/null'): Promise<Download> {
  const { stdout } = await execFileAsync(
    'sh',
    ['-c', `curl "$@"; rc=$?; ${REPORT_CHILD_CPU}; exit $rc`, 'sh', '-sS', '-o', output, '-w', '%{http_code} %{size_download} %{time_starttransfer} %{time_total}', url],
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
  /** The port of its chunk data plane; undefined when it runs with the data plane off. */
  dataPlanePort?: number;
  stop(): Promise<void>;
}

interface DeviceOptions {
  /** Default true. Off: a config file with `dataPlane: false` (what --no-data-plane sets). */
  dataPlane?: boolean;
  /** NODE_OPTIONS for this node only (e.g. --cpu-prof). */
  nodeOptions?: string;
}

/** A config file that turns the data plane off; startShoalNode passes no other flags through. */
const NO_DATA_PLANE_YAML = 'dataPlane: false\n';

async function startDevice(name: string, dataDir: string, bootstrap: Device[] = [], options: DeviceOptions = {}): Promise<Device> {
  const { dataPlane = true, nodeOptions } = options;
  await mkdir(dataDir, { recursive: true });
  let configFile: string | undefined;
  if (!dataPlane) {
    configFile = join(dataDir, '..', `${name.toLowerCase()}-no-data-plane.yaml`);
    await writeFile(configFile, NO_DATA_PLANE_YAML);
  }
  // test/helpers/node.ts spawns with process.env, synchronously within the call: set NODE_OPTIONS
  // for this one child only (e.g. --cpu-prof), and put ours back at once.
  const saved = process.env.NODE_OPTIONS;
  if (nodeOptions) process.env.NODE_OPTIONS = nodeOptions;
  const started = startShoalNode({ name, dataDir, bootstrap: bootstrap.map((d) => d.address), configFile });
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
  // The swarm starts before the gateway listens, so the line is there if the data plane is on.
  const planeLine = node.logs().find((entry) => entry.msg === 'chunk data plane listening');
  const dataPlanePort = typeof planeLine?.address === 'string' ? Number(planeLine.address.split(':').at(-1)) : undefined;
  if (dataPlane !== (dataPlanePort !== undefined)) {
    await stop();
    throw new Error(`${name}: expected the data plane ${dataPlane ? 'on' : 'off'}, but it is ${dataPlanePort ? `on (port ${dataPlanePort})` : 'off'}:\n${node.logText(20)}`);
  }
  return { name, node, peerId, address, dataPlanePort, stop };
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

/** One established TCP socket as ss sees it: its two ends, owner and bytes received so far. */
interface TcpSocket {
  local: string;
  peer: string;
  pid?: number;
  received: number;
}

function tcpSockets(): TcpSocket[] {
  // -H: no header; each socket is a line with its ends and owner, then an indented info line.
  return parseSs(execFileSync('ss', ['-tnpiH', 'state', 'established'], { encoding: 'utf8', maxBuffer: 16 << 20 }), 2);
}

/** ss output: a line per socket (`skip` columns, then local and peer address, then the owner), each followed by an indented info line. */
function parseSs(out: string, skip: number): TcpSocket[] {
  const sockets: TcpSocket[] = [];
  for (const line of out.split('\n')) {
    if (!line.trim()) continue;
    if (/^\s/.test(line)) {
      const last = sockets.at(-1);
      const received = /bytes_received:(\d+)/.exec(line)?.[1];
      if (last && received) last.received = Number(received);
      continue;
    }
    const columns = line.trim().split(/\s+/);
    const [local, peer, ...rest] = columns.slice(skip);
    const pid = /pid=(\d+)/.exec(rest.join(' '))?.[1];
    sockets.push({ local: local!, peer: peer!, pid: pid ? Number(pid) : undefined, received: 0 });
  }
  return sockets;
}

/**
 * TCP sockets destroyed from now until stop(), with their final byte counts (`ss -E`). An HTTP
 * connection closes whenever a request on it is aborted (an endgame duplicate cancelled), so the
 * bytes it carried are only seen here.
 */
function watchClosedSockets(): { stop(): Promise<TcpSocket[]> } {
  // Connections open before the transfer are not B's data plane connections (B has just started
  // and fetched nothing): e.g. A2's keep-alive connections from its seeding, closing late.
  const before = new Set(tcpSockets().map((s) => `${s.local} ${s.peer}`));
  // Line-buffered, so nothing is lost in ss's stdout buffer when it is stopped.
  const child = spawn('stdbuf', ['-oL', 'ss', '-tinHE'], { stdio: ['ignore', 'pipe', 'ignore'] });
  let out = '';
  child.stdout.on('data', (d: Buffer) => (out += d));
  child.on('error', (err) => console.error(`ss -E: ${err.message} (closed connections are not counted)`));
  const exited = new Promise<void>((resolve) => child.once('close', () => resolve()));
  const stopChild = onCleanup(async () => {
    child.kill('SIGTERM');
    await exited;
  });
  return {
    async stop() {
      // The kernel reports a socket's destruction at once; give ss a moment to print the last ones.
      await sleep(200);
      await stopChild();
      return parseSs(out, 3).filter((s) => !before.has(`${s.local} ${s.peer}`));
    },
  };
}

/**
 * Bytes `b` received from each of `sources`, by path: over a connection to the source's data plane
 * port (HTTP) or over any other connection to the source's process (libp2p). Open sockets: the
 * other end of each of B's is found by address, so it does not matter who dialed whom. Closed
 * ones (`closed`, from watchClosedSockets) carry no owner: those opened during the transfer whose
 * peer is a source's data plane port are B's HTTP connections (no other device fetches during a
 * measured transfer); libp2p connections that closed are not counted.
 */
function bytesByPath(b: Device, sources: Device[], closed: TcpSocket[]): { paths: Record<string, { http: number; libp2p: number }>; closedHttp: number } {
  const sockets = tcpSockets();
  const byLocal = new Map(sockets.map((s) => [s.local, s]));
  const out: Record<string, { http: number; libp2p: number }> = Object.fromEntries(sources.map((s) => [s.name, { http: 0, libp2p: 0 }]));
  const counted = new Set<string>();
  for (const socket of sockets) {
    if (socket.pid !== b.node.pid) continue;
    const other = byLocal.get(socket.peer);
    const source = sources.find((s) => s.node.pid === other?.pid);
    if (!source || !other) continue;
    const http = source.dataPlanePort !== undefined && other.local.endsWith(`:${source.dataPlanePort}`);
    out[source.name]![http ? 'http' : 'libp2p'] += socket.received;
    counted.add(`${socket.local} ${socket.peer}`);
  }
  const port = (address: string) => Number(address.slice(address.lastIndexOf(':') + 1));
  const planes = new Set(sources.map((s) => s.dataPlanePort).filter((p) => p !== undefined));
  let closedHttp = 0;
  for (const socket of closed) {
    const source = sources.find((s) => s.dataPlanePort !== undefined && port(socket.peer) === s.dataPlanePort);
    if (!source || planes.has(port(socket.local)) || counted.has(`${socket.local} ${socket.peer}`)) continue;
    out[source.name]!.http += socket.received;
    counted.add(`${socket.local} ${socket.peer}`);
    closedHttp++;
  }
  return { paths: out, closedHttp };
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

async function runCase(ctx: Context, name: CaseName): Promise<Sample> {
  switch (name) {
    case 'docker-registry':
      return measure([{ role: 'server', pid: ctx.registry.pid }], () => download(`${ctx.registry.url}/v2/${REPO}/blobs/${ctx.digest}`));
    case 'docker-registry, saved': {
      // Stored as B stores it: a new file on the disk that holds the devices' data dirs.
      const saved = join(ctx.work, 'saved.bin');
      try {
        return await measure([{ role: 'server', pid: ctx.registry.pid }], () => download(`${ctx.registry.url}/v2/${REPO}/blobs/${ctx.digest}`, saved));
      } finally {
        await rm(saved, { force: true });
      }
    }
    case 'busybox httpd':
      return measure([], async () => {
        const serverCpu = ctx.httpd.nextConnectionCpu();
        const result = await download(`${ctx.httpd.url}/blob.bin`);
        return { ...result, serverCpu: await serverCpu };
      });
    case 'Shoal, 1 source':
      return shoalCase(ctx, [ctx.a1]);
    case 'Shoal, 3 sources':
      return shoalCase(ctx, [ctx.a1, ctx.a2!, ctx.a3!]);
    case 'Shoal, 1 source, libp2p only':
      if (ctx.a1.dataPlanePort !== undefined) throw new Error('the libp2p-only case needs A1 with its data plane off');
      return shoalCase(ctx, [ctx.a1], { dataPlane: false });
  }
}

/**
 * A fresh device B (new data dir) bootstrapped to `sources` pulls the blob through its gateway.
 * B's data plane is set like the sources' (`options.dataPlane`).
 */
async function shoalCase(ctx: Context, sources: Device[], options: DeviceOptions = {}): Promise<Sample> {
  const dataDir = join(ctx.work, `b-${ctx.fresh++}`);
  const removeDir = onCleanup(() => rm(dataDir, { recursive: true, force: true, maxRetries: 5, retryDelay: 200 }));
  const b = await startDevice('B', dataDir, sources, options);
  try {
    await untilSeesAlive(b, sources);
    const roles = sources.length === 1 ? ['A'] : sources.map((s) => s.name);
    const closing = watchClosedSockets();
    const sample = await measure(
      [...sources.map((s, i) => ({ role: roles[i]!, pid: s.node.pid })), { role: 'B', pid: b.node.pid }],
      () => download(`${b.node.gatewayUrl}/v2/${REPO}/blobs/${ctx.digest}`),
    );
    // Before B stops: its connections (and their byte counts) are still open.
    const { paths, closedHttp } = bytesByPath(b, sources, await closing.stop());
    sample.paths = paths;
    sample.closedHttpConnections = closedHttp;
    const line = await fetchedLine(b, ctx.digest);
    const byPeer = (line.sources ?? {}) as Record<string, number>;
    sample.sources = Object.fromEntries(
      Object.entries(byPeer).map(([peer, bytes]) => [sources.find((s) => s.peerId === peer)?.name ?? peer, bytes]),
    );
    // The downloader's own rate: bytes fetched per second from the transfer's start to its end.
    if (typeof line.rate === 'number' && line.rate > 0) sample.meshSeconds = SIZE / line.rate;
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
  const paths = s.paths
    ? `; B received ${Object.entries(s.paths)
        .map(([n, p]) => `from ${n} ${(p.http / 2 ** 20).toFixed(0)} MiB over HTTP, ${(p.libp2p / 2 ** 20).toFixed(0)} MiB over libp2p`)
        .join(', ')}${s.closedHttpConnections ? ` (${s.closedHttpConnections} HTTP connections closed during the transfer)` : ''}`
    : '';
  return `${name}: ${(SIZE / MB / s.seconds).toFixed(0)} MB/s in ${s.seconds.toFixed(2)} s (first byte ${(s.ttfb * 1000).toFixed(0)} ms); CPU s ${cpu}${rss ? `; peak RSS MiB ${rss}` : ''}${main}${sources}${paths}; machine busy ${Math.round((100 * s.machineBusy) / (s.seconds * cpus().length))} %`;
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
  const floors = await costFloors(work);

  const registry = await startDockerRegistry();
  onCleanup(() => registry.stop());
  const httpd = await startBusyboxHttpd(join(work, 'static'));
  onCleanup(() => httpd.stop());
  const a1 = await startDevice('A1', join(work, 'a1'));
  const ctx: Context = { work, file, digest, registry, httpd, a1, fresh: 0 };
  console.log(`A1 serves chunks on its data plane, port ${a1.dataPlanePort}`);

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
  const phase = async (shoal: CaseName, runs = RUNS) => {
    // The setup just wrote gigabytes (the random file, the pushes, the seeding): flush them now,
    // or the kernel's writeback of them lands in the first transfers as other processes' CPU.
    execFileSync('sync');
    for (let run = 0; run < runs; run++) {
      console.log(`run ${run + 1}/${runs} (${shoal})`);
      const order: CaseName[] = [...BASELINES, shoal];
      for (const name of run % 2 === 0 ? order : order.reverse()) record(name, await runCase(ctx, name));
    }
  };
  await phase('Shoal, 1 source');
  // A1 keeps its data dir (so the blob) across restarts; only A1 exists until A2 and A3 are seeded.
  console.log('restarting A1 with its data plane off...');
  await restartA1(ctx, { dataPlane: false });
  await phase(LIBP2P_ONLY, LIBP2P_RUNS);
  console.log('restarting A1 with its data plane on...');
  await restartA1(ctx, {});
  console.log('seeding A2 and A3 from A1...');
  await seedThreeSources(ctx);
  await phase('Shoal, 3 sources');

  let profile: ProfileSummary[] | undefined;
  if (PROFILE_DIR) profile = await profiledRun(ctx, PROFILE_DIR);

  await cleanupAll();
  await report(samples, { machine, code: codeAtEnd(code), loadBefore, loadAfter: loadavg(), floors, profile });
}

// ---- CPU profile of the receiving node (and the sender) -----------------------------------

interface ProfileSummary {
  device: string;
  file: string;
  totalMs: number;
  top: { fn: string; ms: number; percent: number }[];
  byArea: { area: string; ms: number; percent: number }[];
  /** Shares (%) of all non-idle samples by kind of work, over every area (not only the top ones). */
  shares: Record<ShareKind, number>;
}

type ShareKind = 'chacha' | 'chachaKeys' | 'sha256' | 'webcrypto' | 'http' | 'libp2p' | 'native' | 'gc' | 'shoal';

/** Which kind of work an area is, for the one-line gist of a profile. */
function shareKindsOf(area: string): ShareKind[] {
  if (area === 'node:crypto/keys') return ['chacha', 'chachaKeys'];
  if (area === 'node:crypto/cipher') return ['chacha'];
  if (area === 'node:crypto/hash') return ['sha256'];
  // jobPromise and friends: starting a WebCrypto job (the per-chunk digest) on the main thread.
  if (area === 'node:crypto/util' || area === 'node:crypto/webcrypto') return ['webcrypto'];
  if (area === 'undici' || /^node:_?http/.test(area)) return ['http'];
  if (/libp2p|@chainsafe|it-|uint8arraylist|multiformats/.test(area)) return ['libp2p'];
  if (area === 'native bindings (socket, fs)') return ['native'];
  if (area === '(garbage collector)') return ['gc'];
  if (area.startsWith('shoal ')) return ['shoal'];
  return [];
}

/** Stops A1 and starts it again on the same data dir (so it still holds the blob). */
async function restartA1(ctx: Context, options: DeviceOptions): Promise<void> {
  await ctx.a1.stop();
  ctx.a1 = await startDevice('A1', join(ctx.work, 'a1'), [], options);
}

/**
 * One extra, unmeasured one-source transfer over the data plane with --cpu-prof on both devices:
 * A2 and A3 stop, A1 restarts with the profiler (same data dir, so it still holds the blob), and a
 * fresh B pulls.
 */
async function profiledRun(ctx: Context, dir: string): Promise<ProfileSummary[]> {
  console.log(`profiled run (--cpu-prof into ${dir})...`);
  await ctx.a2?.stop();
  await ctx.a3?.stop();
  const aDir = join(dir, 'sender-A');
  const bDir = join(dir, 'receiver-B');
  await mkdir(aDir, { recursive: true });
  await mkdir(bDir, { recursive: true });
  await restartA1(ctx, { nodeOptions: `--cpu-prof --cpu-prof-dir=${aDir}` });
  const sample = await shoalCase(ctx, [ctx.a1], { nodeOptions: `--cpu-prof --cpu-prof-dir=${bDir}` });
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
  const shares = { chacha: 0, chachaKeys: 0, sha256: 0, webcrypto: 0, http: 0, libp2p: 0, native: 0, gc: 0, shoal: 0 };
  for (const [area, us] of byArea) for (const kind of shareKindsOf(area)) shares[kind] += us;
  return {
    device,
    file,
    totalMs: Math.round(total / 1000),
    top: rank(byFn, 15).map(({ key, ms, percent }) => ({ fn: key, ms, percent })),
    byArea: rank(byArea, 12).map(({ key, ms, percent }) => ({ area: key, ms, percent })),
    shares: mapValues(shares, (us) => Number(((100 * us) / total).toFixed(1))),
  };
}

function areaOf(url: string, fn: string): string {
  if (!url) return fn.startsWith('(') ? fn : 'native bindings (socket, fs)';
  if (url.startsWith('wasm://')) return 'wasm';
  const pkg = /node_modules\/((?:@[^/]+\/)?[^/]+)/.exec(url)?.[1];
  if (pkg) return pkg;
  const internal = /^node:(internal\/)?([^/]+(?:\/[^/]+)?)/.exec(url);
  if (internal) return `node:${internal[2]}`;
  const own = /\/(packages\/[^/]+|registry-gateway|node)\/src\//.exec(url)?.[1];
  return own ? `shoal ${own}` : url;
}

// ---- cost floors: what the crypto and the disk writes alone cost on this machine ------------

interface Floors {
  sha256SecondsPerGB: number;
  /** chacha20-poly1305 as libp2p-noise uses it: a new cipher per 65 519-byte message, output concatenated. */
  noiseChachaSecondsPerGB: number;
  /** chacha20-poly1305 with one cipher over 1 MiB updates: the cipher alone. */
  rawChachaSecondsPerGB: number;
  /** Writing a new file 1 MiB at a time (into the page cache, no fsync), as B stores a layer. */
  newFileWriteSecondsPerGB: number;
}

/** CPU s/GB of the crypto and the file writes every byte goes through, measured in this process (after a quiet second). */
async function costFloors(work: string): Promise<Floors> {
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
    newFileWriteSecondsPerGB: perGB(() => {
      const path = join(work, 'write-floor.bin');
      const fd = openSync(path, 'w');
      try {
        for (let done = 0; done < bytes; done += buf.length) writeSync(fd, buf, 0, buf.length, done);
      } finally {
        closeSync(fd);
        unlinkSync(path);
      }
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
  /** Median % of the transfer time each node's main thread (its event loop) was on a CPU. */
  mainBusyPercent: Record<string, number>;
  /** Medians: whole-machine busy %, cores used by the measured processes and by everything else. */
  machineBusyPercent: number;
  oursCores: number;
  othersCores: number;
  sourcesMiB?: Record<string, number>[];
  /** Per run: MiB B received from each source over HTTP (the data plane) and over libp2p. */
  pathsMiB?: Record<string, { http: number; libp2p: number }>[];
  /** Median over the runs of the MiB B received over each path, all sources together. */
  receivedMiB?: { http: number; libp2p: number };
  /** Median number of B's HTTP connections to the data planes that closed during a transfer. */
  closedHttpConnections?: number;
  /** Slowest and fastest run, MB/s. */
  mbpsRange: [number, number];
  /** Median rate of B's downloader (transfer start to last chunk), MB/s. */
  meshMbps?: number;
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
    mbpsRange: [Math.round(SIZE / MB / Math.max(...samples.map((s) => s.seconds))), Math.round(SIZE / MB / Math.min(...samples.map((s) => s.seconds)))],
    ...(samples.every((s) => s.meshSeconds) ? { meshMbps: Math.round(SIZE / MB / median(samples.map((s) => s.meshSeconds!))) } : {}),
    ttfbMs: Math.round(median(samples.map((s) => s.ttfb)) * 1000),
    cpuPerGB: Object.fromEntries(roles.map((r) => [r, perGB(median(samples.map((s) => s.cpu[r]!)))])),
    cpuPerGBTotal: perGB(median(totals)),
    threadsPerGB: name.startsWith('Shoal')
      ? Object.fromEntries(
          nodes.map((n) => [n, Object.fromEntries(['main', 'v8', 'libuv'].map((k) => [k, perGB(median(samples.map((s) => s.threads[n]?.[k] ?? 0)))]))]),
        )
      : {},
    mainBusyPercent: Object.fromEntries(nodes.map((n) => [n, Math.round(median(samples.map((s) => (100 * (s.threads[n]?.main ?? 0)) / s.seconds)))])),
    peakRssMiB: Object.fromEntries(Object.keys(samples[0]!.rss).map((r) => [r, Math.round(Math.max(...samples.map((s) => s.rss[r]!)) / 2 ** 20)])),
    machineBusyPercent: Math.min(100, Math.round(median(samples.map((s) => (100 * s.machineBusy) / (s.seconds * cores))))),
    oursCores: round2(median(samples.map((s, i) => totals[i]! / s.seconds))),
    othersCores: round2(median(samples.map((s, i) => Math.max(0, s.machineBusy - totals[i]!) / s.seconds))),
    ...(samples[0]!.sources ? { sourcesMiB: samples.map((s) => mapValues(s.sources!, (b) => Math.round(b / 2 ** 20))) } : {}),
    ...(samples[0]!.paths
      ? {
          pathsMiB: samples.map((s) => mapValues(s.paths!, (p) => ({ http: Math.round(p.http / 2 ** 20), libp2p: Math.round(p.libp2p / 2 ** 20) }))),
          receivedMiB: {
            http: Math.round(median(samples.map((s) => Object.values(s.paths!).reduce((sum, p) => sum + p.http, 0))) / 2 ** 20),
            libp2p: Math.round(median(samples.map((s) => Object.values(s.paths!).reduce((sum, p) => sum + p.libp2p, 0))) / 2 ** 20),
          },
          closedHttpConnections: median(samples.map((s) => s.closedHttpConnections ?? 0)),
        }
      : {}),
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
  libp2pRuns?: number;
  machine: ReturnType<typeof describeMachine>;
  code: CodeState;
  loadBefore: number[];
  loadAfter: number[];
  floors: Floors;
  samples: Record<CaseName, Sample[]>;
  profile?: ProfileSummary[];
}

interface RunInfo {
  machine: ReturnType<typeof describeMachine>;
  code: CodeState;
  loadBefore: number[];
  loadAfter: number[];
  floors: Floors;
  profile?: ProfileSummary[];
}

async function report(samples: Map<CaseName, Sample[]>, info: RunInfo): Promise<void> {
  const { machine, code, loadBefore, loadAfter, floors, profile } = info;
  const cores = cpus().length;
  const missing = CASES.filter((c) => !samples.get(c)?.length);
  if (missing.length) throw new Error(`no samples for ${missing.join(', ')} (is this a transfer.json from before the libp2p-only case?)`);
  const rows = CASES.map((c) => summarize(c, samples.get(c)!, cores));
  const row = (c: CaseName) => rows.find((r) => r.case === c)!;
  const registry = row('docker-registry');
  const saved = row('docker-registry, saved');
  const httpd = row('busybox httpd');
  const one = row('Shoal, 1 source');
  const three = row('Shoal, 3 sources');
  const lib = row(LIBP2P_ONLY);
  const shoal = [one, three, lib];
  const ratio = (r: Row, base: Row) => round2(r.mbps / base.mbps);
  const nodeRss = (r: Row) => Math.max(...Object.values(r.peakRssMiB));
  const maxNodeRss = Math.max(...shoal.map(nodeRss));
  const verdicts = {
    oneSource: ratio(one, registry) >= TARGETS.oneSourceRatio,
    threeSources: three.mbps > (1 + TARGETS.threeSourcesMargin) * one.mbps,
    rss: maxNodeRss * 2 ** 20 <= TARGETS.rssBytes,
  };
  const met = (ok: boolean) => (ok ? 'met' : 'MISSED');
  const list = (o: Record<string, number>, unit = '') =>
    Object.entries(o)
      .map(([k, v]) => `${k} ${v}${unit}`)
      .join(', ');
  // What the CPU cost alone allows: every process of a transfer shares this machine's cores.
  const cap = (r: Row) => Math.round((cores / r.cpuPerGBTotal) * 1000);
  const ofCap = (r: Row) => Math.round((100 * r.mbps) / cap(r));
  const b1 = one.threadsPerGB.B!;
  const b3 = three.threadsPerGB.B!;
  const bl = lib.threadsPerGB.B!;
  const threads = (t: Record<string, number>) => `${t.main} s main thread, ${t.v8} s V8 workers, ${t.libuv} s libuv pool`;
  const threadsKey = 'main thread (the event loop), V8 worker threads (concurrent GC marking and compilation), libuv pool (file I/O, and the per-chunk sha256, which runs there through WebCrypto)';
  const hashB = round2(2 * floors.sha256SecondsPerGB);
  const cryptoLibB = round2(hashB + floors.noiseChachaSecondsPerGB);
  const senderRoles = Object.keys(three.cpuPerGB).filter((role) => role.startsWith('A'));
  const senders = senderRoles.map((role) => `${role} ${three.cpuPerGB[role]}`).join(', ');
  const sendersTotal = round2(senderRoles.reduce((sum, role) => sum + three.cpuPerGB[role]!, 0));
  const busiest = shoal.reduce((a, b) => (a.othersCores >= b.othersCores ? a : b));
  const layerMiB = SIZE / 2 ** 20;
  const perRun = (r: Row) => samples.get(r.case)!.map((x) => Math.round(SIZE / MB / x.seconds)).join(', ');
  const received = (r: Row) => `${r.receivedMiB!.http} MiB over HTTP and ${r.receivedMiB!.libp2p} MiB over libp2p`;
  const httpShare = Math.min(one.receivedMiB!.http, three.receivedMiB!.http) / layerMiB;
  const libp2pOnPlane = Math.max(one.receivedMiB!.libp2p, three.receivedMiB!.libp2p);
  const duplicated = three.receivedMiB!.http - layerMiB;
  const overRss = shoal.flatMap((r) =>
    Object.entries(r.peakRssMiB)
      .filter(([, v]) => v * 2 ** 20 > TARGETS.rssBytes)
      .map(([n, v]) => `${n} ${v} MiB in "${r.case}"`),
  );

  const shows = [
    `**Throughput.** With the data plane (the default) and one source, Shoal moved the layer at ${one.mbps} MB/s: ${ratio(one, registry)}x docker-registry (${registry.mbps} MB/s) and ${ratio(one, httpd)}x busybox httpd (${httpd.mbps} MB/s). ` +
      `The >= ${TARGETS.oneSourceRatio}x target is ${met(verdicts.oneSource)}` +
      (verdicts.oneSource ? '.' : ` by a factor of ${round2((TARGETS.oneSourceRatio * registry.mbps) / one.mbps)}.`) +
      (registry.mbpsRange[1] > 1.3 * registry.mbpsRange[0]
        ? ` (docker-registry itself varied from ${registry.mbpsRange[0]} to ${registry.mbpsRange[1]} MB/s over its ${registry.runs} runs; against its fastest run one source is ${round2(one.mbps / registry.mbpsRange[1])}x.)`
        : '') +
      ` B stores the layer as it goes; a download that stores it too (docker-registry, saved: curl writes a new file on the disk that holds the devices' data dirs) ran at ${saved.mbps} MB/s, ${ratio(saved, registry)}x the download to /dev/null, at ${saved.cpuPerGBTotal} CPU s/GB against ${registry.cpuPerGBTotal}: against it, one source is ${ratio(one, saved)}x.` +
      ` With three sources it moved ${three.mbps} MB/s (${ratio(three, registry)}x docker-registry, ${round2(three.mbps / one.mbps)}x one source): ` +
      (verdicts.threeSources
        ? `more than ${Math.round(100 * TARGETS.threeSourcesMargin)} % above one source, as targeted.`
        : `not more than ${Math.round(100 * TARGETS.threeSourcesMargin)} % above one source (the runs' own spread), so that target is MISSED.`) +
      ` With the data plane off on every node, so that the chunks cross libp2p (noise + yamux), one source moved ${lib.mbps} MB/s (${ratio(lib, registry)}x docker-registry): ` +
      `the data plane made the one-source transfer ${round2(one.mbps / lib.mbps)}x faster. ` +
      `Time to first byte was ${one.ttfbMs} ms (1 source), ${three.ttfbMs} ms (3 sources) and ${lib.ttfbMs} ms (libp2p only) against ${registry.ttfbMs} ms from docker-registry: B first looks for holders (DHT provider query) and asks each for its chunk index.`,
    `**Which path the bytes took.** Summed over B's TCP connections to the sources (ss: the open ones after each transfer, HTTP ones that closed during it from ss's destroy events; medians), for a ${layerMiB} MiB layer: with the data plane and one source B received ${received(one)}; with three sources ${received(three)}; with the data plane off ${received(lib)}. ` +
      (httpShare >= 0.99 && libp2pOnPlane < 0.01 * layerMiB
        ? 'So with the data plane on, the chunks crossed plain HTTP, and libp2p carried only control traffic (membership, DHT, holding queries with their tickets, availability gossip).'
        : libp2pOnPlane >= 0.01 * layerMiB
          ? `With the data plane on, up to ${libp2pOnPlane} MiB went over libp2p: some chunks took the libp2p stream (the fallback when the data plane refuses or fails).`
          : `With the data plane on, ss saw as little as ${Math.round(100 * httpShare)} % of the layer on B's connections and next to nothing on libp2p: the bytes of some connections were missed.`) +
      (three.closedHttpConnections
        ? ` With three sources a median of ${three.closedHttpConnections} of B's HTTP connections closed during a transfer (${one.closedHttpConnections ?? 0} with one source); their bytes are counted from ss's destroy events.`
        : '') +
      (duplicated > 0.01 * layerMiB
        ? ` With three sources B received ${duplicated} MiB more over HTTP than the layer holds (${Math.round((100 * duplicated) / layerMiB)} %): chunk bytes it fetched twice, since the data plane carries nothing else.`
        : ''),
    `**CPU.** A plain HTTP download costs ${registry.cpuPerGBTotal} CPU s/GB through docker-registry and ${httpd.cpuPerGBTotal} through busybox httpd (server + curl). ` +
      `With the data plane Shoal costs ${one.cpuPerGBTotal} CPU s/GB with one source (sender A ${one.cpuPerGB.A}, receiver B ${one.cpuPerGB.B}, curl ${one.cpuPerGB.curl}), ${round2(one.cpuPerGBTotal / registry.cpuPerGBTotal)}x docker-registry, ` +
      `and ${three.cpuPerGBTotal} with three sources (${senders}, B ${three.cpuPerGB.B}). ` +
      `Over libp2p only it costs ${lib.cpuPerGBTotal} (A ${lib.cpuPerGB.A}, B ${lib.cpuPerGB.B}): the data plane cuts the sender's CPU per GB ${round2(lib.cpuPerGB.A! / one.cpuPerGB.A!)}x and the receiver's ${round2(lib.cpuPerGB.B! / one.cpuPerGB.B!)}x. ` +
      `All processes of a transfer share this machine's ${cores} cores, so the CPU cost alone caps Shoal at about ${cap(one)} MB/s with the data plane and one source, ${cap(three)} MB/s with three and ${cap(lib)} MB/s over libp2p (${cores} cores / total CPU s/GB), against about ${cap(registry)} MB/s for docker-registry; ` +
      `the measured ${one.mbps}, ${three.mbps} and ${lib.mbps} MB/s are ${ofCap(one)} %, ${ofCap(three)} % and ${ofCap(lib)} % of those caps. ` +
      `B's main thread (its event loop, through which every byte passes) was busy ${one.mainBusyPercent.B} % of the transfer time with one source, ${three.mainBusyPercent.B} % with three and ${lib.mainBusyPercent.B} % over libp2p. ` +
      `During the Shoal transfers our processes used ${one.oursCores}, ${three.oursCores} and ${lib.oursCores} cores, other processes on the machine ${one.othersCores}, ${three.othersCores} and ${lib.othersCores} cores (machine ${one.machineBusyPercent} %, ${three.machineBusyPercent} % and ${lib.machineBusyPercent} % busy)` +
      (Math.min(...shoal.map((r) => r.machineBusyPercent)) >= 90
        ? `: the transfers were CPU bound on this ${cores}-core machine.`
        : Math.max(...shoal.map((r) => r.machineBusyPercent)) < 90
          ? ': no Shoal transfer saturated the machine, so none was bound by total CPU alone.'
          : '.'),
    `**Three sources.** More sources spread the sending (each sender's CPU per GB: ${senders} against ${one.cpuPerGB.A} for the one source; ${sendersTotal} s/GB for the three together), but every byte still goes through B. ` +
      (three.cpuPerGB.B! > 1.15 * one.cpuPerGB.B!
        ? `B itself cost more per GB with three sources (${three.cpuPerGB.B} against ${one.cpuPerGB.B} s/GB: ${threads(b3)} against ${threads(b1)})`
        : `B cost about the same per GB with three sources (${three.cpuPerGB.B} against ${one.cpuPerGB.B} s/GB)`) +
      `, and the whole transfer cost ${three.cpuPerGBTotal} against ${one.cpuPerGBTotal} CPU s/GB on the same ${cores} cores. ` +
      (three.mbps > 1.1 * one.mbps
        ? `Three sources were ${round2(three.mbps / one.mbps)}x faster.`
        : `Three sources were ${three.mbps < 0.9 * one.mbps ? 'slower' : 'about as fast'} (${three.mbps} against ${one.mbps} MB/s; per run ${perRun(three)} against ${perRun(one)}). ` +
          (three.machineBusyPercent >= 90
            ? `The machine was saturated (${three.machineBusyPercent} % busy), so the extra CPU three sources cost came out of B's share.`
            : `The senders were nearly idle (main threads ${senderRoles.map((r) => `${r} ${three.mainBusyPercent[r]} %`).join(', ')} busy), the machine was not saturated (${three.machineBusyPercent} % busy) and B's main thread was busy ${three.mainBusyPercent.B} % (B as a whole used ${round2((three.cpuPerGB.B! * three.mbps) / 1000)} cores): ` +
              'the limit is in B, and it is not B\'s CPU time alone, so more sources cannot raise it.')) +
      (one.meshMbps && three.meshMbps
        ? ` B's downloader itself logged ${one.meshMbps} MB/s with one source and ${three.meshMbps} MB/s with three (transfer start to last verified chunk), ` +
          (Math.max(one.meshMbps / one.mbps, three.meshMbps / three.mbps) < 1.15
            ? 'about what curl saw, so the fetching and storing of chunks, not the gateway\'s streaming to curl, set the pace.'
            : 'faster than curl saw, so the gateway\'s streaming to curl is slower than the download.')
        : '') +
      ` On separate devices each sender would bring its own CPU, and B's cost per GB is what bounds a small receiver.`,
    `**Where B's CPU goes.** By thread (${threadsKey}), per GB: ${threads(b1)} with the data plane and one source; ${threads(b3)} with three sources; ${threads(bl)} over libp2p. ` +
      `On this machine sha256 costs ${floors.sha256SecondsPerGB} s/GB, chacha20-poly1305 ${floors.noiseChachaSecondsPerGB} s/GB as noise uses it (a new cipher per 64 KiB message; ${floors.rawChachaSecondsPerGB} s/GB for the cipher alone), and writing a new file ${floors.newFileWriteSecondsPerGB} s/GB ` +
      '(into the page cache, no fsync; on this virtual machine it varies from run to run: memory the kernel has handed back to the hypervisor costs a fault per page the first time it is written again, which copy_folio_from_iter_atomic showed as most of B\'s file-write CPU under perf). ' +
      `With the data plane B hashes every byte twice (the per-chunk verify on the libuv pool, then the whole-blob digest on the main thread as chunks land), about ${hashB} of its ${one.cpuPerGB.B} s/GB, and decrypts nothing; the sender does no crypto on the chunks (it reads each from its file and writes it to the socket). ` +
      `The other ${round2(Math.max(0, one.cpuPerGB.B! - hashB))} s/GB of B is moving bytes: the write into the partial blob file (about ${floors.newFileWriteSecondsPerGB} s/GB, as measured above), the HTTP receive (a request per chunk; the kernel reads each body straight into a pooled chunk buffer), WebCrypto's copy of each chunk to hash it off the main thread, reading the bytes back for the gateway and writing them to curl's socket, and the GC all this causes. ` +
      `Over libp2p B also decrypts every byte (with the two hashes about ${cryptoLibB} of its ${lib.cpuPerGB.B} s/GB) and the sender encrypts it (about ${floors.noiseChachaSecondsPerGB} of its ${lib.cpuPerGB.A} s/GB); ` +
      `the other ${round2(Math.max(0, lib.cpuPerGB.B! - cryptoLibB))} s/GB of B adds noise framing, yamux framing and window updates, Uint8ArrayList copies, stream events, and a new yamux stream per 1 MiB chunk to the same file and gateway work.`,
    `**Memory.** Peak RSS during the transfer was at most ${nodeRss(one)} MiB per node with the data plane and one source, ${nodeRss(three)} MiB with three sources and ${nodeRss(lib)} MiB over libp2p (VmHWM reset at the start of each transfer, and VmRSS sampled every ${RSS_SAMPLE_MS} ms): ` +
      `the <= 200 MB target is ${met(verdicts.rss)}${overRss.length ? `; over it: ${overRss.join(', ')}` : ''}. docker-registry peaked at ${registry.peakRssMiB.server} MiB.`,
    busiest.othersCores >= 0.2
      ? `**Caveat: a shared machine.** Other work ran during this benchmark (load average ${loadBefore[0]!.toFixed(2)} before, ${loadAfter[0]!.toFixed(2)} after; up to ${busiest.othersCores} cores used by other processes during the Shoal transfers, median). Each transfer waited for a quiet second before starting (at most ${QUIET_WAIT_MS / 1000} s), but the throughput figures are lower than the machine alone would give; the CPU s/GB figures are per process and much less affected.`
      : `The machine was otherwise quiet during the transfers (other processes used at most ${busiest.othersCores} cores).`,
  ];

  const md = [
    '# Transfer: one layer between two devices over loopback, Shoal vs plain HTTP (same file, same run)',
    '',
    markdownMachine(machine),
    codeSentence(code),
    `Load average before the run: ${loadBefore.map((l) => l.toFixed(2)).join(', ')}; after: ${loadAfter.map((l) => l.toFixed(2)).join(', ')}.`,
    '',
    `Layer: ${layerMiB} MiB of random bytes; median of ${one.runs} runs per Shoal case with the data plane, ${lib.runs} of the libp2p-only case and ${registry.runs} per plain HTTP case (one next to each Shoal run, in alternating order). curl downloads to /dev/null in every case but one, all on 127.0.0.1. ` +
      `**docker-registry**: the reference registry 2.8 serving the pushed blob. **docker-registry, saved**: the same download written to a new file (curl -o) on the disk that holds the devices' data dirs, deleted after each run, as B stores the layer. **busybox httpd**: a raw static-file server (inetd mode, one process per connection, sendfile). ` +
      `**Shoal, 1 source**: device A holds the blob (pushed to its gateway); a fresh device B (new data dir, bootstrapped to A) pulls it through its gateway. Both run the chunk data plane (the default): B asks A over libp2p (\`/shoal/chunks/1.0.0\`) what it holds and gets a ticket in the answer, fetches the chunks from A's data plane over plain HTTP, verifies and stores them, and its gateway streams them to curl. ` +
      `**Shoal, 3 sources**: the same with A1, A2, A3 holding the blob (pushed to A1, pulled by A2 and A3 through their gateways); a fresh B bootstrapped to all three pulls. ` +
      `**Shoal, 1 source, libp2p only**: as with one source, but A and B run with the data plane off (\`dataPlane: false\` in a config file, what \`--no-data-plane\` sets), so the chunks cross libp2p TCP + noise + yamux from A to B. ` +
      `CPU: user + system seconds per GB (10^9 bytes) from /proc of every process involved (busybox httpd and curl via their parent shell's cutime). MB/s: 10^6 bytes per second over curl's total time.`,
    '',
    '| transfer | MB/s | slowest - fastest run | vs docker-registry | vs docker-registry, saved | vs busybox httpd | first byte | CPU s/GB, all processes | CPU s/GB by process | peak RSS during transfer |',
    '|---|---:|---:|---:|---:|---:|---:|---:|---|---|',
    ...rows.map(
      (r) =>
        `| ${r.case} | ${r.mbps} | ${r.mbpsRange[0]} - ${r.mbpsRange[1]} | ${ratio(r, registry)} | ${ratio(r, saved)} | ${ratio(r, httpd)} | ${r.ttfbMs} ms | ${r.cpuPerGBTotal} | ${list(r.cpuPerGB)} | ${Object.keys(r.peakRssMiB).length ? list(r.peakRssMiB, ' MiB') : 'n/a (one process per connection)'} |`,
    ),
    '',
    `Targets (with the data plane, the default): Shoal >= ${TARGETS.oneSourceRatio}x plain HTTP (docker-registry, to /dev/null) with one source: ${ratio(one, registry)}x, ${met(verdicts.oneSource)} (against the download that stores the layer as B does: ${ratio(one, saved)}x). ` +
      `More with three sources (by more than ${Math.round(100 * TARGETS.threeSourcesMargin)} %, beyond run-to-run noise): ${three.mbps} vs ${one.mbps} MB/s, ${met(verdicts.threeSources)}. ` +
      `RSS of each node <= 200 MB (read as 200 MiB, as in the other benchmarks), in every Shoal case: at most ${maxNodeRss} MiB, ${met(verdicts.rss)}. ` +
      `Over libp2p only (data plane off): ${lib.mbps} MB/s, ${ratio(lib, registry)}x docker-registry.`,
    '',
    '| Shoal transfer | node | CPU s/GB: main thread | V8 workers (GC) | libuv pool (fs, WebCrypto) | main thread busy |',
    '|---|---|---:|---:|---:|---:|',
    ...shoal.flatMap((r) =>
      Object.entries(r.threadsPerGB).map(([n, t]) => `| ${r.case} | ${n} | ${t.main} | ${t.v8} | ${t.libuv} | ${r.mainBusyPercent[n]} % |`),
    ),
    '',
    '| transfer | machine busy | our processes (cores) | other processes (cores) |',
    '|---|---:|---:|---:|',
    ...rows.map((r) => `| ${r.case} | ${r.machineBusyPercent} % | ${r.oursCores} | ${r.othersCores} |`),
    '',
    `What B received from each source, per run, in MiB: over HTTP (the data plane) / over libp2p, summed over B's TCP connections to that device (ss after the transfer for open connections; \`ss -E\` destroy events for HTTP connections that closed during it; libp2p connections that closed are not counted).`,
    '',
    '| Shoal transfer | run | HTTP / libp2p, by source |',
    '|---|---:|---|',
    ...shoal.flatMap((r) =>
      r.pathsMiB!.map((p, i) => `| ${r.case} | ${i + 1} | ${Object.entries(p).map(([n, v]) => `${n} ${v.http} / ${v.libp2p}`).join(', ')} |`),
    ),
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
    libp2pRuns: LIBP2P_RUNS,
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
  await writeResults(values.out!, { 'transfer.json': `${JSON.stringify(result, null, 2)}\n`, 'transfer.md': md });
  console.log(`\n${md}`);
}

/** The shares that answer "where does it go": sha256, HTTP, socket and file calls, GC, libp2p, noise's cipher. */
function profileGist(p: ProfileSummary): string {
  const s = p.shares;
  return (
    `sha256 on the main thread ${s.sha256} %, starting WebCrypto jobs (node:crypto/util, webcrypto) ${s.webcrypto ?? 0} %, HTTP (undici, node:http) ${s.http} %, socket and file calls ${s.native} %, garbage collector ${s.gc} %, ` +
    `libp2p and its dependencies ${s.libp2p} %, chacha20-poly1305 (noise) ${s.chacha} %` +
    (s.chacha >= 1 ? ` (of which ${s.chachaKeys} % is importing the key again for every 64 KiB noise message)` : '') +
    `, Shoal's own code ${s.shoal} %.`
  );
}

function profileMarkdown(profiles: ProfileSummary[]): string[] {
  return [
    '## CPU profile (one extra, unmeasured one-source transfer with the data plane, --cpu-prof on both devices)',
    '',
    "V8's sampling profiler sees the main thread only (not GC or libuv threads), and a sample taken while the thread waits for a CPU counts toward the function it was in, so on a busy machine system calls that wake another process (socket writes) look heavier than their CPU cost. Areas: npm packages, Node internals (node:...), Shoal's own code, native bindings (socket and file system calls), and wasm. The shares in each summary line are over all areas, not only the ones listed.",
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
