// The fan-out benchmark's LAN: device namespaces on one bridge, every link shaped with tbf in
// both directions, and the three kinds of trial (central registry, Shoal seeded by a push, Shoal
// with the seeder pulling through from an upstream) run on the first N devices.
import { spawn, type ChildProcess } from 'node:child_process';
import { mkdir, mkdtemp, rm, writeFile } from 'node:fs/promises';
import { basename, join } from 'node:path';
import { createInterface } from 'node:readline';
import { fileURLToPath } from 'node:url';
import { startDockerRegistry, type DockerRegistry } from '../../../test/helpers/docker-registry.ts';
import { eventually } from '../../../test/helpers/devices.ts';
import { TestNetwork, type TestDevice } from '../../../test/helpers/netns.ts';
import { MAX_LOG_LINES, startShoalNode, type RunningShoalNode, type ShoalNodeOptions } from '../../../test/helpers/node.ts';
import { busyPercent, cpuJiffies } from '../shared.ts';
import type { BenchImage } from './image.ts';
import type { PullerResult } from './puller.ts';
import { idealMs, type Trial } from './report.ts';

const PULLER = fileURLToPath(new URL('./puller.ts', import.meta.url));
/** What every receiver pulls; Shoal files it under the default namespace, docker.io. */
export const REPOSITORY = 'bench/fanout';
const TAG = '1';
const GATEWAY_PORT = 5000;
const API_PORT = 7070;
const MESH_PORT = 4001;
const CONVERGE_MS = 60_000;
/**
 * A receiver that has not finished after this long has failed: 15 minutes, or twice what a
 * central registry needs to send every receiver the image over the seeder's link, whichever is
 * longer (at 12 Mbit/s ten devices take the registry ~20 minutes for 200 MB).
 */
const PULL_TIMEOUT_MIN_MS = 15 * 60_000;
/** How often the bridge ports are read for the send timeline. */
const TIMELINE_STEP_MS = 1_000;

export interface LabOptions {
  /** Devices to create: the largest N of the run. */
  devices: number;
  /** tc rate of every link, each direction, e.g. `100mbit`. */
  rate: string;
  /** TCP congestion control of every device, e.g. `cubic`. */
  congestionControl: string;
  /** Also create an upstream device (its own namespace and shaped link) for cold starts. */
  upstream: boolean;
  /** Where node data directories go (removed after each trial). */
  scratchDir: string;
  log: (message: string) => void;
  /** Write a V8 CPU profile of every node into this directory (when it stops). */
  cpuProfileDir?: string;
  /** Write every node's log into this directory after each trial. */
  logDir?: string;
}

/** When a receiver finished (ms after "go") and how many Range resumes it needed. */
interface Completion {
  ms: number;
  resumes: number;
}

/** One receiver's puller process inside its namespace. */
class Puller {
  readonly ready: Promise<void>;
  /** Resolves with ms from `go` to the last verified byte as this process saw it, or rejects. */
  readonly result: Promise<PullerResult>;
  readonly #child: ChildProcess;
  #stderr = '';

  constructor(device: TestDevice, registryUrl: string) {
    this.#child = spawn('ip', ['netns', 'exec', device.netns, process.execPath, PULLER, '--registry', registryUrl, '--image', `${REPOSITORY}:${TAG}`], {
      stdio: ['pipe', 'pipe', 'pipe'],
    });
    this.#child.stderr!.on('data', (d) => (this.#stderr = (this.#stderr + d).slice(-2000)));
    const ready = Promise.withResolvers<void>();
    const result = Promise.withResolvers<PullerResult>();
    this.ready = ready.promise;
    this.result = result.promise;
    this.ready.catch(() => {});
    this.result.catch(() => {});
    createInterface({ input: this.#child.stdout! }).on('line', (line) => {
      let message: { event?: string; error?: string };
      try {
        message = JSON.parse(line) as typeof message;
      } catch {
        return;
      }
      if (message.event === 'ready') ready.resolve();
      else if (message.event === 'done') result.resolve(message as PullerResult);
      else if (message.event === 'failed') result.reject(new Error(message.error));
    });
    this.#child.on('exit', (code, signal) => {
      const why = new Error(`puller on ${device.netns} exited (code ${code}, signal ${signal}) ${this.#stderr.trim()}`);
      ready.reject(why);
      result.reject(why);
    });
  }

  go(): void {
    this.#child.stdin!.write('go\n');
  }

  kill(): void {
    if (this.#child.exitCode === null) this.#child.kill('SIGKILL');
  }
}

export class FanoutLab {
  readonly #options: LabOptions;
  readonly #network: TestNetwork;
  readonly #rateBits: number;
  readonly upstream?: TestDevice;
  readonly #devices: TestDevice[];

  private constructor(options: LabOptions, network: TestNetwork, devices: TestDevice[], upstream?: TestDevice) {
    this.#options = options;
    this.#network = network;
    this.#devices = devices;
    this.upstream = upstream;
    this.#rateBits = parseRate(options.rate);
  }

  static async create(options: LabOptions): Promise<FanoutLab> {
    const network = await TestNetwork.create();
    try {
      const devices: TestDevice[] = [];
      for (let i = 0; i < options.devices; i++) devices.push(await network.addDevice());
      const upstream = options.upstream ? await network.addDevice() : undefined;
      for (const device of network.devices) {
        await network.shapeLink(device, options.rate);
        await network.setCongestionControl(device, options.congestionControl);
      }
      return new FanoutLab(options, network, devices, upstream);
    } catch (error) {
      network.destroy();
      throw error;
    }
  }

  destroy(): void {
    this.#network.destroy();
  }

  /** docker-registry on the seeder (device 0), pulled by devices 1..n-1 at once. */
  async registryTrial(n: number, image: BenchImage): Promise<Trial> {
    const seeder = this.#devices[0]!;
    const registry = await startDockerRegistry({ netns: seeder.netns, host: seeder.address });
    try {
      await this.#push(seeder, image, registry.host);
      const receivers = this.#devices.slice(1, n);
      return await this.#race('registry', n, image, seeder, receivers.map((d) => [d, registry.url]));
    } finally {
      await registry.stop();
    }
  }

  /** Shoal on devices 0..n-1: the image pushed to device 0, then pulled by 1..n-1 through their own gateways at once. */
  async shoalTrial(n: number, image: BenchImage, chunk: { size?: string; sweep?: boolean } = {}): Promise<Trial> {
    return this.#withNodes(n, { chunkSize: chunk.size }, {}, async (nodes) => {
      const seeder = this.#devices[0]!;
      await this.#push(seeder, image, nodes[0]!.gatewayHost);
      await Promise.all(nodes.slice(1).map((node) => knowsTag(node, image)));
      const receivers = this.#devices.slice(1, n).map((d, i) => [d, nodes[i + 1]!.gatewayUrl] as const);
      const trial = await this.#race('shoal', n, image, seeder, receivers);
      if (chunk.size) trial.chunkSize = parseSize(chunk.size);
      if (chunk.sweep) trial.chunkSweep = true;
      return trial;
    });
  }

  /**
   * A cold start: only an upstream docker-registry (on its own device) has the image. The seeder
   * (device 0) has it as its upstream and pulls through it at "go"; devices 1..n-1 have no
   * upstream, so all they get comes from the mesh. Each starts pulling as soon as the seeder's
   * tag record reaches it (the record is published once the seeder has the manifest).
   */
  async coldTrial(n: number, image: BenchImage, chunk: { size?: string; sweep?: boolean } = {}): Promise<Trial> {
    const upstreamDevice = this.upstream;
    if (!upstreamDevice) throw new Error('the lab was created without an upstream device');
    const registry = await startDockerRegistry({ netns: upstreamDevice.netns, host: upstreamDevice.address });
    try {
      await this.#push(upstreamDevice, image, registry.host);
      const cold = await this.#withNodes(n, { chunkSize: chunk.size }, { upstreams: { 'docker.io': registry.url } }, async (nodes) => {
        const seeder = this.#devices[0]!;
        const upstreamBefore = (await this.#network.interfaceBytes(upstreamDevice)).sent;
        const seederPull = new Puller(seeder, nodes[0]!.gatewayUrl);
        const receivers = this.#devices.slice(1, n).map((d, i) => ({ device: d, node: nodes[i + 1]!, puller: new Puller(d, nodes[i + 1]!.gatewayUrl) }));
        try {
          await Promise.all([seederPull.ready, ...receivers.map((r) => r.puller.ready)]);
          const measure = this.#startMeasuring(seeder, receivers.map((r) => r.device));
          const start = await measure.start();
          seederPull.go();
          const done = receivers.map(async ({ node, puller }) => {
            await knowsTag(node, image);
            puller.go();
            const { resumes } = await puller.result;
            return { ms: performance.now() - start, resumes };
          });
          const trial = await measure.finish('shoal-cold', n, image, done);
          await seederPull.result.catch((error: Error) => trial.failures.push(`the seeder's own pull: ${error.message}`));
          trial.upstreamTxBytes = (await this.#network.interfaceBytes(upstreamDevice)).sent - upstreamBefore;
          return trial;
        } finally {
          for (const p of [seederPull, ...receivers.map((r) => r.puller)]) p.kill();
        }
      });
      if (chunk.size) cold.chunkSize = parseSize(chunk.size);
      if (chunk.sweep) cold.chunkSweep = true;
      return cold;
    } finally {
      await registry.stop();
    }
  }

  /** Starts Shoal on devices 0..n-1 with fresh stores, waits for a full mesh, runs `body`, stops them. */
  async #withNodes<T>(
    n: number,
    all: Pick<ShoalNodeOptions, 'chunkSize'>,
    seederOnly: Pick<ShoalNodeOptions, 'upstreams'>,
    body: (nodes: RunningShoalNode[]) => Promise<T>,
  ): Promise<T> {
    const dir = await mkdtemp(join(this.#options.scratchDir, `n${n}-`));
    const nodes: RunningShoalNode[] = [];
    try {
      const started = await Promise.allSettled(
        this.#devices.slice(0, n).map((device, i) =>
          startShoalNode({
            netns: device.netns,
            name: `device-${i}`,
            dataDir: join(dir, `device-${i}`),
            gateway: `${device.address}:${GATEWAY_PORT}`,
            api: `${device.address}:${API_PORT}`,
            listen: [`/ip4/0.0.0.0/tcp/${MESH_PORT}`],
            mdns: true,
            startTimeoutMs: 120_000,
            runtimeFlags: this.#options.cpuProfileDir ? ['--cpu-prof', `--cpu-prof-dir=${this.#options.cpuProfileDir}`, `--cpu-prof-name=n${n}-device-${i}.cpuprofile`] : [],
            ...all,
            ...(i === 0 ? seederOnly : {}),
          }),
        ),
      );
      for (const s of started) if (s.status === 'fulfilled') nodes.push(s.value);
      const failed = started.find((s) => s.status === 'rejected');
      if (failed) throw failed.reason;
      await eventually(`all ${n} devices alive in every table`, CONVERGE_MS, async () => {
        for (const [i, node] of nodes.entries()) {
          const alive = (await node.peers()).filter((p) => p.status === 'alive').length;
          if (alive < n) return `device-${i} sees ${alive} of ${n} alive`;
        }
        return undefined;
      });
      return await body(nodes);
    } finally {
      await Promise.allSettled(nodes.map((node) => node.stop()));
      const { logDir } = this.#options;
      if (logDir) {
        await mkdir(logDir, { recursive: true });
        await Promise.all(nodes.map((node, i) => writeFile(join(logDir, `${basename(dir)}-device-${i}.log`), node.logText(MAX_LOG_LINES))));
      }
      await rm(dir, { recursive: true, force: true, maxRetries: 5 });
    }
  }

  /** skopeo copy of the image into the registry at `host`, from inside `device`'s namespace (over its loopback, not its shaped link). */
  async #push(device: TestDevice, image: BenchImage, host: string): Promise<void> {
    const started = performance.now();
    await this.#network.exec(device.netns, 'skopeo', ['copy', '--insecure-policy', '--preserve-digests', '--dest-tls-verify=false', image.ociReference, `docker://${host}/${REPOSITORY}:${TAG}`], {
      timeoutMs: 10 * 60_000,
    });
    this.#options.log(`  pushed to ${device.netns} in ${((performance.now() - started) / 1000).toFixed(1)} s`);
  }

  /** Starts a puller per receiver, and once all are ready sends "go" to all at once. */
  async #race(system: Trial['system'], n: number, image: BenchImage, seeder: TestDevice, receivers: (readonly [TestDevice, string])[]): Promise<Trial> {
    const pullers = receivers.map(([device, url]) => new Puller(device, url));
    try {
      await Promise.all(pullers.map((p) => p.ready));
      const measure = this.#startMeasuring(seeder, receivers.map(([device]) => device));
      const start = await measure.start();
      for (const p of pullers) p.go();
      return await measure.finish(system, n, image, pullers.map((p) => p.result.then(({ resumes }) => ({ ms: performance.now() - start, resumes }))));
    } finally {
      for (const p of pullers) p.kill();
    }
  }

  /** Seeder egress, what each receiver sent, and machine CPU from start() until every completion has settled. */
  #startMeasuring(seeder: TestDevice, receivers: TestDevice[]) {
    let txBefore = 0;
    let portsBefore: { sent: number; received: number }[] = [];
    let cpuBefore: [number, number] = [0, 0];
    const devices = [seeder, ...receivers].map((device) => this.#devices.indexOf(device));
    const timeline: NonNullable<Trial['sendTimeline']> = [];
    let sampler: NodeJS.Timeout | undefined;
    let startedAt = 0;
    return {
      start: async (): Promise<number> => {
        portsBefore = await this.#network.portBytes();
        sampler = setInterval(() => {
          const ms = Math.round(performance.now() - startedAt);
          void this.#network.portBytes().then(
            (ports) => timeline.push({ ms, sent: devices.map((i) => ports[i]!.sent - portsBefore[i]!.sent) }),
            () => {},
          );
        }, TIMELINE_STEP_MS);
        txBefore = (await this.#network.interfaceBytes(seeder)).sent;
        cpuBefore = cpuJiffies();
        startedAt = performance.now();
        return startedAt;
      },
      finish: async (system: Trial['system'], n: number, image: BenchImage, completions: Promise<Completion>[]): Promise<Trial> => {
        const limitMs = Math.max(PULL_TIMEOUT_MIN_MS, 2 * (n - 1) * idealMs(image.bytes, this.#rateBits));
        const timeout = new Promise<never>((_, reject) => setTimeout(() => reject(new Error('timed out')), limitMs).unref());
        const settled = await Promise.allSettled(completions.map((c) => Promise.race([c, timeout])));
        clearInterval(sampler);
        const cpu = busyPercent(cpuBefore, cpuJiffies());
        const portsAfter = await this.#network.portBytes();
        const receiverTxBytes = receivers.map((device) => {
          const i = this.#devices.indexOf(device);
          return portsAfter[i]!.sent - portsBefore[i]!.sent;
        });
        const seederTxBytes = (await this.#network.interfaceBytes(seeder)).sent - txBefore;
        const finished = settled.flatMap((s) => (s.status === 'fulfilled' ? [s.value] : []));
        return {
          system,
          devices: n,
          rateBitsPerSecond: this.#rateBits,
          imageBytes: image.bytes,
          completionsMs: finished.map((c) => Math.round(c.ms)),
          failures: settled.flatMap((s, i) => (s.status === 'rejected' ? [`device-${i + 1}: ${(s.reason as Error).message}`] : [])),
          seederTxBytes,
          cpuBusyPercent: cpu,
          receiverTxBytes,
          sendTimeline: timeline.sort((a, b) => a.ms - b.ms),
          resumes: finished.reduce((sum, c) => sum + c.resumes, 0),
        };
      },
    };
  }
}

/** Waits until `node` has the mesh-wide tag record of the benchmark image (it logs each one that becomes current). */
async function knowsTag(node: RunningShoalNode, image: BenchImage): Promise<void> {
  const repository = `docker.io/${REPOSITORY}`;
  await node.logged((e) => e.msg === 'tag updated' && e.repository === repository && e.tag === TAG && e.digest === image.manifestDigest, CONVERGE_MS);
}

/** tc rate (`100mbit`, `1gbit`, `500kbit`) in bits per second. */
export function parseRate(rate: string): number {
  const m = /^(\d+(?:\.\d+)?)(kbit|mbit|gbit)$/i.exec(rate.trim());
  if (!m) throw new Error(`rate: expected e.g. 100mbit, got "${rate}"`);
  return Number(m[1]) * { kbit: 1e3, mbit: 1e6, gbit: 1e9 }[m[2]!.toLowerCase() as 'kbit' | 'mbit' | 'gbit'];
}

/** `200MB` (10^6), `256MiB` (2^20), `1GB`, `64KiB`, or plain bytes. */
export function parseSize(size: string): number {
  const m = /^(\d+(?:\.\d+)?)\s*(B|KB|MB|GB|KiB|MiB|GiB)?$/.exec(size.trim());
  if (!m) throw new Error(`size: expected e.g. 200MB or 4MiB, got "${size}"`);
  const unit = { B: 1, KB: 1e3, MB: 1e6, GB: 1e9, KiB: 2 ** 10, MiB: 2 ** 20, GiB: 2 ** 30 }[(m[2] ?? 'B') as 'B'];
  return Math.round(Number(m[1]) * unit);
}
