import assert from 'node:assert/strict';
import { access, readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { after, afterEach, before, describe, it, type TestContext } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { ChunkBitmap } from '@shoal/store';
import type { TransferInfo } from '@shoal/swarm';
import { PrivateContainerd } from './helpers/daemons.ts';
import { Devices, eventually, meshPeerId, waitForTagRecord } from './helpers/devices.ts';
import { explainFailure } from './helpers/diagnostics.ts';
import { startDockerRegistry, type DockerRegistry } from './helpers/docker-registry.ts';
import { CommandError } from './helpers/exec.ts';
import { writeHostsToml } from './helpers/hosts-toml.ts';
import { BUSYBOX_PATH, buildTestImage, layoutEntries, type Descriptor, type TestImage } from './helpers/image.ts';
import { NETNS_PREREQUISITES, TestNetwork } from './helpers/netns.ts';
import { SHOAL_BIN, type PeerRecord, type RunningShoalNode, type ShoalNodeOptions } from './helpers/node.ts';
import { prerequisiteGate } from './helpers/prerequisites.ts';
import { Scratch } from './helpers/scratch.ts';

const gate = prerequisiteGate({
  commands: [...NETNS_PREREQUISITES.commands, 'tc', 'skopeo', 'containerd', 'ctr', 'docker-registry'],
  files: [BUSYBOX_PATH],
  root: true,
});

/** The store's chunk size: /api/transfers counts chunks of this many bytes. */
const CHUNK = 1024 * 1024;
/** The random layer: big enough to catch mid-transfer, small enough to stay quick. */
const LAYER_MIB = 32;
// Every device's uplink is shaped, so transfers take seconds, not milliseconds, and the link
// between B and C (the pair pulling together) is much slower: B and C take from A the chunks
// only A has and trade the rest slowly, so their transfers overlap for seconds and neither
// finishes the moment the other does.
const FAST = '96mbit';
const BETWEEN_B_AND_C = '12mbit';
/** A's uplink in the scenario that kills it: see there. */
const A_WHILE_KILLED = '40mbit';
const CONVERGE_WITHIN_MS = 30_000;
const PULL_TIMEOUT_MS = 120_000;

// Device roles, by index in the TestNetwork.
const A = 0; // origin of scenarios 1 and 2; killed in 2
const B = 1; // pulls with containerd in 1, `shoal pull` in 2
const C = 2; // pulls with skopeo in 1, `shoal pull` in 2
const HONEST = 3; // holder for scenarios 3 and 4
const CORRUPT = 4; // pulls image 3 honestly, then serves it corrupted
const PULLER = 5; // pulls with a corrupt holder around (3); E of scenario 5
const RESUMER = 6; // killed mid-download and restarted (4)
const UPSTREAM_DEVICE = 7; // D of scenario 5: the only device with an upstream
const STARTED_UP_FRONT = [A, B, C, HONEST, CORRUPT, PULLER, RESUMER];

interface MeshFetch {
  blob: string;
  size: number;
  sources: Record<string, number>;
}

/** The node's "blob fetched from the mesh" lines for `blob`. */
function meshFetches(node: RunningShoalNode, blob: string): MeshFetch[] {
  return node.logs().filter((e) => e.msg === 'blob fetched from the mesh' && e.blob === blob) as unknown as MeshFetch[];
}

/** Peers that sent any bytes, in a transfer's `sources`. */
function sourcePeers(fetch: MeshFetch): string[] {
  return Object.entries(fetch.sources)
    .filter(([, bytes]) => bytes > 0)
    .map(([peer]) => peer);
}

function totalBytes(fetch: MeshFetch): number {
  return Object.values(fetch.sources).reduce((sum, bytes) => sum + bytes, 0);
}

/** Reports how long each step of a test took, so a slow run shows where the time went. */
function stopwatch(t: TestContext): (step: string) => void {
  let last = performance.now();
  return (step) => {
    const now = performance.now();
    t.diagnostic(`${step}: ${Math.round(now - last)} ms`);
    last = now;
  };
}

describe('the swarm: devices fetch images chunk by chunk from each other (network namespaces)', gate.options, () => {
  let scratch: Scratch;
  let network: TestNetwork;
  let devices: Devices;
  let containerd: PrivateContainerd | undefined;
  let registry: DockerRegistry | undefined;
  const peerIds = new Map<number, string>();

  const node = (index: number): RunningShoalNode => {
    const running = devices.nodes[index];
    assert.ok(running, `device-${index} is not running`);
    return running;
  };

  /** Runs `command args` inside device `index`'s namespace. */
  const onDevice = (index: number, command: string, args: string[], timeoutMs = PULL_TIMEOUT_MS) =>
    network.exec(network.devices[index]!.netns, command, args, { timeoutMs });

  /** skopeo push of `image` into device `index`'s gateway, from inside its namespace. */
  async function push(index: number, image: TestImage, repository: string): Promise<void> {
    await onDevice(index, 'skopeo', ['copy', '--dest-tls-verify=false', image.ociReference, `docker://${node(index).gatewayHost}/${repository}:1`]);
  }

  /**
   * skopeo copy of `repository:1` from device `index`'s own gateway into a fresh OCI layout:
   * skopeo checks each blob against its digest; this checks the manifest digest and that every
   * blob arrived.
   */
  async function skopeoPull(index: number, repository: string, image: TestImage): Promise<void> {
    const dir = await scratch.dir(`${repository.replaceAll('/', '-')}-on-${index}`);
    await onDevice(index, 'skopeo', ['copy', '--src-tls-verify=false', '--preserve-digests', `docker://${node(index).gatewayHost}/${repository}:1`, `oci:${dir}:1`]);
    const [entry] = await layoutEntries(dir, '1');
    assert.equal(entry?.digest, image.manifest.digest, `device-${index} pulled another manifest`);
    for (const blob of [image.config, ...image.layers]) await access(join(dir, 'blobs', ...blob.digest.split(':')));
  }

  /**
   * `shoal pull repository:1` against device `index`'s control API, from inside its namespace:
   * the node prefetches the config first, then each layer in order. A failed attempt is retried,
   * up to `attempts` in all; resolves with the attempts it took.
   */
  async function shoalPull(index: number, repository: string, attempts = 1): Promise<number> {
    for (let attempt = 1; ; attempt++) {
      try {
        await onDevice(index, process.execPath, [SHOAL_BIN, 'pull', `${repository}:1`, '--api', node(index).apiUrl]);
        return attempt;
      } catch (error) {
        if (attempt >= attempts || !(error instanceof CommandError)) throw error;
        await sleep(1_000);
      }
    }
  }

  /** GETs each of `blobs` (the manifest among them, by digest) through device `index`'s gateway, as a client would, discarding it. */
  async function prefetch(index: number, repository: string, blobs: Descriptor[]): Promise<void> {
    for (const blob of blobs) {
      const kind = blob.mediaType.endsWith('manifest.v1+json') ? 'manifests' : 'blobs';
      await onDevice(index, 'curl', ['-sSf', '-o', '/dev/null', '-H', `Accept: ${blob.mediaType}`, `${node(index).gatewayUrl}/v2/${repository}/${kind}/${blob.digest}`]);
    }
  }

  /** Waits until device `index` knows the mesh-wide tag record of `repository:1`. */
  async function waitForTag(index: number, repository: string, image: TestImage): Promise<void> {
    const record = { repository: `docker.io/${repository}`, tag: '1', digest: image.manifest.digest };
    await waitForTagRecord(node(index), `device-${index}`, record, CONVERGE_WITHIN_MS);
  }

  /** Waits until every one of `indexes` sees every other one alive. */
  async function waitForMesh(indexes: number[]): Promise<void> {
    await eventually(`devices ${indexes.join(', ')} all alive in each other's tables`, CONVERGE_WITHIN_MS, async () => {
      for (const i of indexes) {
        const table = await node(i).peers();
        const alive = new Set(table.filter((p: PeerRecord) => p.status === 'alive').map((p) => p.peerId));
        const missing = indexes.filter((j) => !alive.has(peerIds.get(j)!));
        if (missing.length > 0) return `device-${i} does not see ${missing.map((j) => `device-${j}`).join(', ')} alive`;
      }
      return undefined;
    });
  }

  /** Device `index`'s live mesh transfer of `blob`, if any. */
  async function transferOf(index: number, blob: string): Promise<TransferInfo | undefined> {
    return (await node(index).apiJson<TransferInfo[]>('/api/transfers')).find((t) => t.blob === blob);
  }

  /**
   * The chunks device `index` holds of a blob it is downloading, read from the bitmap its store
   * keeps beside the partial blob (`<data dir>/partial/sha256-<hex>.bitmap`); undefined while there is none.
   */
  async function bitmapOnDisk(index: number, blob: string, chunks: number): Promise<ChunkBitmap | undefined> {
    const path = join(await devices.dataDir(index), 'partial', `${blob.replace(':', '-')}.bitmap`);
    const bytes = await readFile(path).catch(() => undefined);
    if (!bytes || bytes.byteLength !== Math.ceil(chunks / 8)) return undefined;
    return new ChunkBitmap(chunks, bytes);
  }

  async function startDevice(index: number, options: ShoalNodeOptions = {}): Promise<RunningShoalNode> {
    const started = await devices.start(index, { mdns: true, ...options });
    peerIds.set(index, meshPeerId(started));
    return started;
  }

  async function image(name: string): Promise<TestImage> {
    return buildTestImage({ dir: await scratch.dir(`image-${name}`), randomLayerMiB: LAYER_MIB });
  }

  before(async () => {
    gate.check();
    scratch = await Scratch.create('shoal-swarm-');
    network = await TestNetwork.create({ devices: UPSTREAM_DEVICE + 1 });
    devices = new Devices(network, scratch);
    const { devices: all } = network;
    for (const [i, device] of all.entries()) {
      if (i === B || i === C) await network.limitRate(device, BETWEEN_B_AND_C, all[i === B ? C : B]);
      else await network.limitRate(device, FAST);
    }
    await Promise.all(STARTED_UP_FRONT.map((i) => startDevice(i)));
    await waitForMesh(STARTED_UP_FRONT);
  });

  after(async () => {
    await containerd?.stop();
    await registry?.stop();
    await devices?.killAll();
    network?.destroy();
    await scratch?.remove();
  });

  afterEach((t) =>
    explainFailure(t, () => ({
      ...devices?.logs(60),
      'containerd log': containerd?.logText(30),
    })),
  );

  it('a push to A pulls on B (containerd, hosts.toml mirror) and C (skopeo) at once, B and C sharing chunks', { timeout: 120_000 }, async (t) => {
    const lap = stopwatch(t);
    const pushed = await image('s1');
    lap('build the image');
    const repository = 'library/swarm-one';
    await push(A, pushed, repository);
    lap('push to A');
    await Promise.all([waitForTag(B, repository, pushed), waitForTag(C, repository, pushed)]);
    lap('B and C know the tag');

    // containerd and its ctr run inside B's namespace, so they reach B's gateway as a device would.
    containerd = await PrivateContainerd.start(await scratch.dir('containerd'), { netns: network.devices[B]!.netns });
    const hostsDir = await scratch.dir('hosts');
    // The mirror is B's gateway; the "upstream" is a closed port on B's own loopback.
    await writeHostsToml(hostsDir, 'docker.io', 'http://127.0.0.1:9', node(B).gatewayUrl);

    lap('start containerd in B');
    await Promise.all([
      containerd.ctr(['images', 'pull', '--hosts-dir', hostsDir, `docker.io/${repository}:1`], { timeoutMs: PULL_TIMEOUT_MS }),
      skopeoPull(C, repository, pushed),
    ]);
    lap('ctr pull on B and skopeo on C, at once');

    const { stdout } = await containerd.ctr(['images', 'ls']);
    const row = stdout.split('\n').find((line) => line.startsWith(`docker.io/${repository}:1 `));
    assert.ok(row, `containerd does not list the image:\n${stdout}`);
    assert.equal(row.split(/\s+/)[2], pushed.manifest.digest);
    const held = new Set((await containerd.ctr(['content', 'ls', '-q'])).stdout.split('\n'));
    for (const blob of [pushed.config, ...pushed.layers]) assert.ok(held.has(blob.digest), `containerd lacks ${blob.digest}`);
    assert.ok(
      node(B).requests().some((r) => r.url.includes('ns=docker.io') && r.url.includes(`/blobs/${pushed.layers[1]!.digest}`)),
      'containerd did not fetch the layer through B\'s gateway',
    );

    // The manifest rode in A's tag record: neither device fetched it from a holder.
    for (const i of [B, C]) assert.deepEqual(meshFetches(node(i), pushed.manifest.digest), [], `device-${i} fetched the manifest from the mesh`);
    const big = pushed.layers[1]!.digest;
    const fetches = [B, C].map((i) => ({ device: i, fetch: meshFetches(node(i), big).at(-1) }));
    for (const { device, fetch } of fetches) assert.ok(fetch, `device-${device} logged no mesh fetch of the big layer`);
    t.diagnostic(`sources of the big layer: ${JSON.stringify(fetches)}`);
    assert.ok(
      fetches.some(({ fetch }) => sourcePeers(fetch!).length > 1),
      `neither B nor C fetched the big layer from more than one peer: ${JSON.stringify(fetches)}`,
    );
  });

  it('with A killed -9 mid-transfer, B and C finish from each other', { timeout: 120_000 }, async (t) => {
    const lap = stopwatch(t);
    const pushed = await image('s2');
    lap('build the image');
    const repository = 'library/swarm-two';
    const big = pushed.layers[1]!;
    await push(A, pushed, repository);
    lap('push to A');
    await Promise.all([waitForTag(B, repository, pushed), waitForTag(C, repository, pushed)]);
    lap('B and C know the tag');

    // A is to die in the middle of the big layer, so B and C first fetch the manifest, config and
    // small layer, as a client would. Each of those costs a few seconds of discovery, unevenly:
    // fetched by the pulls, one device would start on the big layer seconds after the other.
    for (const i of [B, C]) await prefetch(i, repository, [pushed.manifest, pushed.config, pushed.layers[0]!]);
    lap('B and C prefetch the manifest, config and small layer');
    // B and C learn of each other's chunks by availability gossip, at most a second old; on a
    // fast uplink from A one of them could take nearly all of it within a few such seconds,
    // before their chunks cover the layer between them. A slower A (it dies next anyway) keeps
    // the moment this scenario needs from being a matter of luck.
    await network.limitRate(network.devices[A]!, A_WHILE_KILLED);
    const pulls = [B, C].map((i) => shoalPull(i, repository, 3));
    pulls.forEach((p) => p.catch(() => {})); // awaited below; not unhandled while A is killed

    // A dies once B is mid-transfer and B and C hold every chunk between them while at least one
    // of them still lacks some: what that one lacks can then only come from the other. (Both
    // lacking some is the usual case; but B and C trade while they fetch from A, so one may get
    // the last chunk it needs the moment their chunks first cover the layer.) That moment can be
    // short, so after B's transfer shows up in /api/transfers the test watches the bitmaps B's
    // and C's stores keep on disk, which costs no request.
    await eventually(
      'B mid-transfer',
      60_000,
      async () => {
        const transfer = await transferOf(B, big.digest);
        return transfer && transfer.chunksHeld > 0 && transfer.chunksHeld < transfer.chunks ? undefined : JSON.stringify(transfer);
      },
      20,
    );
    const chunks = Math.ceil(big.size / CHUNK);
    // Committed: the bitmap is gone and the node logged the fetch.
    const committed = (i: number) => meshFetches(node(i), big.digest).length > 0;
    let seen = 'nothing yet';
    let incomplete: number[] = [];
    await eventually(
      'B and C together holding every chunk of the big layer, not both all',
      60_000,
      async () => {
        const [b, c] = await Promise.all([B, C].map((i) => bitmapOnDisk(i, big.digest, chunks)));
        const holdsAll = [b, c].map((bitmap, k) => committed([B, C][k]!) || Boolean(bitmap?.complete));
        seen = `B ${holdsAll[0] ? 'all' : b?.count}/${chunks}, C ${holdsAll[1] ? 'all' : c?.count}/${chunks}`;
        incomplete = [B, C].filter((_, k) => !holdsAll[k]);
        if (incomplete.length === 0) return undefined;
        const holds = (bitmap: ChunkBitmap | undefined, all: boolean, i: number) => all || Boolean(bitmap?.has(i));
        for (let i = 0; i < chunks; i++) if (!holds(b, holdsAll[0]!, i) && !holds(c, holdsAll[1]!, i)) return `${seen}; chunk ${i} held by neither`;
        return undefined;
      },
      5,
    );
    assert.ok(incomplete.length > 0, `B and C both got every chunk before A could be killed mid-transfer; shape the links slower (${seen})`);
    await node(A).kill9();
    lap(`pull until A is killed at ${seen}`);

    const attempts = await Promise.all(pulls);
    lap('B and C finish without A');
    t.diagnostic(`shoal pull attempts on B and C: ${attempts.join(', ')}`);
    // Every blob is now in B's and C's stores: skopeo checks each one's digest.
    await Promise.all([B, C].map((i) => skopeoPull(i, repository, pushed)));
    const aId = peerIds.get(A)!;
    for (const i of [B, C]) {
      const fetch = meshFetches(node(i), big.digest).at(-1);
      assert.ok(fetch, `device-${i} logged no mesh fetch of the big layer`);
      const other = peerIds.get(i === B ? C : B)!;
      t.diagnostic(`device-${i}: ${fetch.sources[aId] ?? 0} bytes from A, ${fetch.sources[other] ?? 0} from its peer`);
      // What a device lacked when A died came from its peer.
      if (incomplete.includes(i)) assert.ok((fetch.sources[other] ?? 0) > 0, `device-${i} got nothing from its peer: ${JSON.stringify(fetch.sources)}`);
    }
  });

  it('a device serving corrupt chunks is banned and the image still arrives intact', { timeout: 120_000 }, async (t) => {
    const lap = stopwatch(t);
    const pushed = await image('s3');
    lap('build the image');
    const repository = 'library/swarm-three';
    await push(HONEST, pushed, repository);
    lap('push to the honest device');
    await waitForTag(CORRUPT, repository, pushed);
    await skopeoPull(CORRUPT, repository, pushed);
    lap('pull on the device to corrupt');

    // The same device, same store and peer id, restarted with the fault switch on.
    assert.equal(await node(CORRUPT).stop(), 0);
    const corrupt = await startDevice(CORRUPT, { env: { SHOAL_FAULT_CORRUPT_CHUNKS: '1' } });
    assert.ok(corrupt.logs().some((e) => e.msg?.includes('corrupts every chunk')), 'the fault switch is not on');
    lap('restart it corrupting');
    await waitForMesh([HONEST, CORRUPT, PULLER]);
    await waitForTag(PULLER, repository, pushed);
    lap('mesh converged again');

    await skopeoPull(PULLER, repository, pushed);
    lap('pull on the third device');
    const bans = node(PULLER).logs().filter((e) => e.msg === 'peer banned for a corrupt chunk');
    assert.ok(
      bans.some((e) => e.peer === peerIds.get(CORRUPT)),
      `no ban of the corrupt device ${peerIds.get(CORRUPT)}: ${JSON.stringify(bans)}`,
    );
    assert.ok(!bans.some((e) => e.peer === peerIds.get(HONEST)), `the honest holder was banned: ${JSON.stringify(bans)}`);
  });

  it('killed -9 mid-download and restarted, a device resumes and fetches only what it lacked', { timeout: 120_000 }, async (t) => {
    const lap = stopwatch(t);
    const pushed = await image('s4');
    lap('build the image');
    const repository = 'library/swarm-four';
    const big = pushed.layers[1]!;
    await push(HONEST, pushed, repository);
    lap('push to the holder');
    await waitForTag(RESUMER, repository, pushed);
    lap('the resumer knows the tag');

    // It fails when the node dies under it.
    const pulling = shoalPull(RESUMER, repository).catch(() => {});
    let held = 0;
    let chunks = 0;
    let finished = false;
    await eventually(
      'the resumer holding 20-80 % of the big layer',
      60_000,
      async () => {
        const transfer = await transferOf(RESUMER, big.digest);
        finished = meshFetches(node(RESUMER), big.digest).length > 0;
        if (finished) return undefined;
        if (!transfer || transfer.chunks === 0) return `transfer: ${JSON.stringify(transfer)}`;
        ({ chunksHeld: held, chunks } = transfer);
        return held >= 0.2 * chunks ? undefined : `${held}/${chunks}`;
      },
      20,
    );
    assert.ok(!finished && held <= 0.8 * chunks, `the transfer got past 80 % between two polls (${held}/${chunks}); shape the link slower`);
    await node(RESUMER).kill9();
    await pulling;
    lap(`pull until killed holding ${held}/${chunks} chunks`);

    const restarted = await startDevice(RESUMER);
    lap('restart');
    await eventually('the restarted device logs the resume', 30_000, async () =>
      restarted.logs().some((e) => e.msg === 'resuming an interrupted download' && e.blob === big.digest) ? undefined : 'not yet',
    );
    await eventually('the resumed transfer completes', 60_000, async () =>
      meshFetches(restarted, big.digest).length > 0 ? undefined : JSON.stringify(await transferOf(RESUMER, big.digest)),
    );
    lap('resume to completion');
    const [fetch] = meshFetches(restarted, big.digest);
    const lacked = big.size - held * CHUNK;
    t.diagnostic(`after the restart: ${totalBytes(fetch!)} bytes fetched; lacked ${lacked}`);
    assert.ok(
      totalBytes(fetch!) <= lacked + 8 * CHUNK,
      `fetched ${totalBytes(fetch!)} bytes after the restart, but lacked only ${lacked} (${held}/${chunks} chunks held): ${JSON.stringify(fetch)}`,
    );
    await skopeoPull(RESUMER, repository, pushed);
    lap('skopeo copy from the resumer');
  });

  it('an image only an upstream has pulls through the device with the upstream, then from it over the mesh', { timeout: 120_000 }, async (t) => {
    const lap = stopwatch(t);
    const pushed = await image('s5');
    lap('build the image');
    const repository = 'library/swarm-five';
    const d = network.devices[UPSTREAM_DEVICE]!;
    // The registry listens on D's loopback: only D can reach it.
    registry = await startDockerRegistry({ netns: d.netns });
    await onDevice(UPSTREAM_DEVICE, 'skopeo', ['copy', '--dest-tls-verify=false', pushed.ociReference, `docker://${registry.host}/${repository}:1`]);
    lap('start the registry in D and push to it');
    await startDevice(UPSTREAM_DEVICE, { upstreams: { 'docker.io': registry.url } });
    await waitForMesh([UPSTREAM_DEVICE, PULLER]);
    lap('start D and see it in the mesh');

    await skopeoPull(UPSTREAM_DEVICE, repository, pushed);
    lap('pull through D from the upstream');
    const big = pushed.layers[1]!.digest;
    assert.deepEqual(meshFetches(node(UPSTREAM_DEVICE), big), [], 'D got the layer from the mesh, not its upstream');

    await waitForTag(PULLER, repository, pushed);
    await registry.stop();
    registry = undefined;
    lap('E knows the tag; the upstream stopped');
    await skopeoPull(PULLER, repository, pushed);
    lap('pull on E');
    const fetch = meshFetches(node(PULLER), big).at(-1);
    assert.ok(fetch, 'E logged no mesh fetch of the big layer');
    assert.ok(sourcePeers(fetch).includes(peerIds.get(UPSTREAM_DEVICE)!), `D is not among E's sources: ${JSON.stringify(fetch.sources)}`);
  });
});
