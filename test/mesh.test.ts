import assert from 'node:assert/strict';
import { writeFile } from 'node:fs/promises';
import { after, afterEach, before, describe, it } from 'node:test';
import { explainFailure } from './helpers/diagnostics.ts';
import { run } from './helpers/exec.ts';
import { Devices, eventually, MESH_PORT, meshPeerId } from './helpers/devices.ts';
import { NETNS_PREREQUISITES, TestNetwork } from './helpers/netns.ts';
import { SHOAL_BIN, type PeerRecord, type RunningShoalNode } from './helpers/node.ts';
import { prerequisiteGate } from './helpers/prerequisites.ts';
import { Scratch } from './helpers/scratch.ts';

const gate = prerequisiteGate(NETNS_PREREQUISITES);

// The contract: a killed device is marked down within 10 s. Polling through curl adds
// latency on a busy machine, so the test allows more before it fails, never less.
const DOWN_WITHIN_MS = 15_000;
const CONVERGE_WITHIN_MS = 20_000;

/** `shoal keygen` into a file. */
async function keygen(path: string): Promise<string> {
  const { stdout } = await run(process.execPath, [SHOAL_BIN, 'keygen']);
  await writeFile(path, stdout, { mode: 0o600 });
  return path;
}

function describeTable(peers: PeerRecord[]): string {
  return JSON.stringify(peers.map((peer) => `${peer.name}=${peer.status}`));
}

/** Undefined when every node's table holds exactly `expected` (peer id -> status), else what differs. */
async function tablesDiffer(nodes: RunningShoalNode[], expected: Map<string, PeerRecord['status']>): Promise<string | undefined> {
  const tables = await Promise.all(nodes.map((node) => node.peers()));
  for (const [i, peers] of tables.entries()) {
    const seen = new Map(peers.map((peer) => [peer.peerId, peer.status]));
    const same = seen.size === expected.size && [...expected].every(([peerId, status]) => seen.get(peerId) === status);
    if (!same) return `node ${i} sees ${describeTable(peers)}`;
  }
  return undefined;
}

describe('devices on one LAN find each other by mDNS (network namespaces)', gate.options, () => {
  let scratch: Scratch;
  let network: TestNetwork;
  let devices: Devices;
  let outsider: RunningShoalNode;
  const peerIds: string[] = [];

  before(async () => {
    gate.check();
    scratch = await Scratch.create('shoal-mesh-');
    network = await TestNetwork.create({ devices: 5 });
    devices = new Devices(network, scratch);
    const swarmKey = await keygen(scratch.path('swarm.key'));
    const otherKey = await keygen(scratch.path('other.key'));
    const started = await Promise.all([0, 1, 2, 3].map((i) => devices.start(i, { swarmKey, mdns: true })));
    peerIds.push(...started.map(meshPeerId));
    // Device 4 is on the same bridge but holds another swarm key; it runs through every test.
    // At debug level it logs the mDNS finds it fails to connect to.
    outsider = await devices.start(4, { swarmKey: otherKey, mdns: true, logLevel: 'debug' });
  });

  after(async () => {
    await devices?.killAll();
    network?.destroy();
    await scratch?.remove();
  });

  afterEach((t) => explainFailure(t, () => devices.logs()));

  /** Fails if the outsider appears in any running node's table, or anyone appears in the outsider's. */
  async function assertOutsiderIsolated(): Promise<void> {
    const outsiderId = meshPeerId(outsider);
    const insiders = devices.running().filter((node) => node !== outsider);
    for (const [i, peers] of (await Promise.all(insiders.map((node) => node.peers()))).entries()) {
      assert.ok(!peers.some((peer) => peer.peerId === outsiderId), `the outsider appears in a table: ${describeTable(peers)} (node ${i})`);
    }
    const own = await outsider.peers();
    assert.deepEqual(own.map((peer) => peer.peerId), [outsiderId], `the outsider sees others: ${describeTable(own)}`);
  }

  it('four devices with the same swarm key see each other alive, with names and labels', async () => {
    const nodes = devices.nodes.slice(0, 4) as RunningShoalNode[];
    const allAlive = new Map(peerIds.map((peerId) => [peerId, 'alive' as const]));
    await eventually('all four devices alive in every table', CONVERGE_WITHIN_MS, () => tablesDiffer(nodes, allAlive));

    const table = await nodes[0]!.peers();
    for (const [i, peerId] of peerIds.entries()) {
      const peer = table.find((row) => row.peerId === peerId);
      assert.equal(peer?.name, `device-${i}`);
      assert.equal(peer?.labels.device, String(i));
      assert.ok(peer?.addresses.some((address) => address.includes(`/ip4/${network.devices[i]!.address}/tcp/${MESH_PORT}`)), `addresses of device-${i}: ${peer?.addresses}`);
      // Each device's loopback is its own: announced, it led peers to dial themselves.
      assert.ok(!peer?.addresses.some((address) => address.startsWith('/ip4/127.')), `addresses of device-${i}: ${peer?.addresses}`);
    }
    // Started together, the devices had records from the mDNS beacon ahead of their libp2p
    // connections (which of them depends on who was up first); the outsider took none (its
    // beacons are sealed under another key, and it turns away ours).
    const beaconRecords = async (node: RunningShoalNode) => (await node.apiJson<{ mesh: { beaconRecords: number } }>('/api/stats')).mesh.beaconRecords;
    const counts = await Promise.all(nodes.map(beaconRecords));
    assert.ok(counts.some((count) => count >= 1), `beacon records per device: ${counts}`);
    assert.equal(await beaconRecords(outsider), 0);
    await assertOutsiderIsolated();
  });

  it('a device killed with -9 is marked down by the others', async () => {
    await devices.nodes[3]!.kill9();
    const survivors = devices.nodes.slice(0, 3) as RunningShoalNode[];
    const expected = new Map(peerIds.map((peerId, i) => [peerId, i === 3 ? ('down' as const) : ('alive' as const)]));
    await eventually('device-3 down and the others alive in every surviving table', DOWN_WITHIN_MS, () => tablesDiffer(survivors, expected));
  });

  it('restarted with the same data dir, the device is alive again under the same peer id', async () => {
    const restarted = await devices.start(3, { swarmKey: scratch.path('swarm.key'), mdns: true });
    assert.equal(meshPeerId(restarted), peerIds[3]);
    const nodes = devices.nodes.slice(0, 4) as RunningShoalNode[];
    const allAlive = new Map(peerIds.map((peerId) => [peerId, 'alive' as const]));
    await eventually('all four devices alive again in every table', CONVERGE_WITHIN_MS, () => tablesDiffer(nodes, allAlive));
  });

  it('a device whose cable is cut (no FIN, no RST) is marked down by the others, and alive again once it is back', async () => {
    const nodes = devices.nodes.slice(0, 4) as RunningShoalNode[];
    const cut = network.devices[2]!;
    await network.setLink(cut, false);
    try {
      const survivors = [nodes[0]!, nodes[1]!, nodes[3]!];
      const expected = new Map(peerIds.map((peerId, i) => [peerId, i === 2 ? ('down' as const) : ('alive' as const)]));
      await eventually('device-2 down and the others alive in every other table', DOWN_WITHIN_MS, () => tablesDiffer(survivors, expected));
    } finally {
      await network.setLink(cut, true);
    }
    const allAlive = new Map(peerIds.map((peerId) => [peerId, 'alive' as const]));
    await eventually('all four devices alive again in every table', CONVERGE_WITHIN_MS, () => tablesDiffer(nodes, allAlive));
  });

  it('a device with another swarm key never appears in any table', async () => {
    // It has been on the bridge since before the first test. It did hear the others by mDNS,
    // so only the swarm key kept it out.
    const refused = outsider.logs().filter((entry) => entry.msg === 'mDNS peer unreachable').map((entry) => entry.peer);
    assert.ok(peerIds.some((peerId) => refused.includes(peerId)), `the outsider never found a device by mDNS:\n${outsider.logText(40)}`);
    await assertOutsiderIsolated();
  });
});

describe('devices without mDNS find each other through one bootstrap device (network namespaces)', gate.options, () => {
  let scratch: Scratch;
  let network: TestNetwork;
  let devices: Devices;

  before(async () => {
    gate.check();
    scratch = await Scratch.create('shoal-mesh-');
    network = await TestNetwork.create({ devices: 5 });
    devices = new Devices(network, scratch);
  });

  after(async () => {
    await devices?.killAll();
    network?.destroy();
    await scratch?.remove();
  });

  afterEach((t) => explainFailure(t, () => devices.logs()));

  it('with --no-mdns and --bootstrap to device 0, all four see all four alive', async () => {
    const swarmKey = await keygen(scratch.path('swarm.key'));
    const first = await devices.start(0, { swarmKey, mdns: false });
    const bootstrap = `/ip4/${network.devices[0]!.address}/tcp/${MESH_PORT}/p2p/${meshPeerId(first)}`;
    // Device 4 has the key but no bootstrap: with mDNS really off, nobody can find it.
    const [loner, ...others] = await Promise.all([
      devices.start(4, { swarmKey, mdns: false }),
      ...[1, 2, 3].map((i) => devices.start(i, { swarmKey, mdns: false, bootstrap: [bootstrap] })),
    ]);
    const nodes = [first, ...others];
    const allAlive = new Map(nodes.map((node) => [meshPeerId(node), 'alive' as const]));
    await eventually('all four devices alive in every table', CONVERGE_WITHIN_MS, () => tablesDiffer(nodes, allAlive));

    const lonerId = meshPeerId(loner!);
    assert.deepEqual((await loner!.peers()).map((peer) => peer.peerId), [lonerId]);
    for (const node of nodes) assert.ok(!(await node.peers()).some((peer) => peer.peerId === lonerId));
  });
});
