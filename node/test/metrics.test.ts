import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { sha256Of } from '@shoal/oci';
import { pushImage } from '../../test/helpers/push.ts';
import { resolveConfig } from '../src/config.ts';
import { ShoalNode } from '../src/daemon.ts';
import { createLogger } from '../src/logger.ts';
import type { NodeStats } from '../src/stats.ts';

/** One sample of the Prometheus text exposition. */
interface Sample {
  name: string;
  labels: Record<string, string>;
  value: number;
}

const SAMPLE = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$/;
const LABEL = /([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"(?:,|$)/gy;

/**
 * Parses Prometheus text exposition strictly enough to catch a malformed line: every sample
 * belongs to a family declared by a TYPE line, every label pair is well-formed.
 */
function parseExposition(text: string): Sample[] {
  const types = new Map<string, string>();
  const samples: Sample[] = [];
  for (const line of text.split('\n')) {
    if (line === '') continue;
    const type = /^# TYPE (\S+) (counter|gauge|histogram|summary|untyped)$/.exec(line);
    if (type) {
      types.set(type[1]!, type[2]!);
      continue;
    }
    if (line.startsWith('# HELP ')) continue;
    const match = SAMPLE.exec(line);
    assert.ok(match, `not an exposition line: ${line}`);
    const [, name, labelText = '', value] = match;
    const family = [...types.keys()].find((f) => name!.startsWith(f) && /^(_bucket|_sum|_count|_total|_created)?$/.test(name!.slice(f.length)));
    assert.ok(family, `sample ${name} has no TYPE line`);
    const labels: Record<string, string> = {};
    LABEL.lastIndex = 0;
    while (LABEL.lastIndex < labelText.length) {
      const pair = LABEL.exec(labelText);
      assert.ok(pair, `malformed labels in: ${line}`);
      labels[pair[1]!] = pair[2]!;
    }
    // Prometheus parses values as Go floats: NaN and Inf in any case (prom-client writes Nan).
    const number = /^nan$/i.test(value!) ? NaN : Number(value!.replace(/^([+-]?)inf$/i, '$1Infinity'));
    assert.ok(!Number.isNaN(number) || /^nan$/i.test(value!), `bad value in: ${line}`);
    samples.push({ name: name!, labels, value: number });
  }
  return samples;
}

/** The value of the one sample named `name` whose labels include `labels`, else undefined. */
function valueOf(samples: Sample[], name: string, labels: Record<string, string> = {}): number | undefined {
  const found = samples.filter((s) => s.name === name && Object.entries(labels).every(([k, v]) => s.labels[k] === v));
  assert.ok(found.length <= 1, `${found.length} samples of ${name} match ${JSON.stringify(labels)}`);
  return found[0]?.value;
}

async function scrape(node: ShoalNode): Promise<Sample[]> {
  const res = await fetch(`${node.apiUrl}/metrics`);
  assert.equal(res.status, 200);
  assert.match(res.headers.get('content-type') ?? '', /^text\/plain; version=0\.0\.4/);
  return parseExposition(await res.text());
}

async function until(what: string, check: () => Promise<boolean>, timeoutMs = 20_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!(await check())) {
    if (Date.now() > deadline) throw new Error(`timed out waiting until ${what}`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

describe('/metrics and /api/stats of two nodes in one process', () => {
  let dir: string;
  const nodes: ShoalNode[] = [];
  let a: ShoalNode;
  let b: ShoalNode;

  const start = async (name: string, bootstrap: string[] = []): Promise<ShoalNode> => {
    const config = resolveConfig({
      name,
      dataDir: join(dir, name),
      gateway: '127.0.0.1:0',
      api: '127.0.0.1:0',
      listen: ['/ip4/127.0.0.1/tcp/0'],
      mdns: false,
      dataPlane: '127.0.0.1:0',
      bootstrap,
    });
    const node = new ShoalNode(config, createLogger('silent', name));
    nodes.push(node);
    await node.start();
    return node;
  };

  before(async () => {
    dir = await mkdtemp(join(tmpdir(), 'shoal-metrics-'));
    a = await start('metrics-a');
    const self = (await (await fetch(`${a.apiUrl}/api/peers`)).json()) as { addresses: string[] }[];
    b = await start('metrics-b', [self[0]!.addresses[0]!]);
  });

  after(async () => {
    for (const node of nodes.reverse()) await node.stop();
    if (dir) await rm(dir, { recursive: true, force: true });
  });

  it('serves Prometheus text from a registry of its own, with process metrics and the node info', async () => {
    const samples = await scrape(a);
    assert.ok(valueOf(samples, 'shoal_process_resident_memory_bytes')! > 0);
    assert.ok(valueOf(samples, 'shoal_process_cpu_seconds_total')! > 0);
    assert.ok(samples.some((s) => s.name === 'shoal_nodejs_eventloop_lag_seconds'));
    const stats = (await (await fetch(`${a.apiUrl}/api/stats`)).json()) as NodeStats;
    assert.equal(valueOf(samples, 'shoal_node_info', { name: 'metrics-a', peer_id: stats.node.peerId }), 1);
    // Each node has its own registry: b reports its own name.
    assert.equal(valueOf(await scrape(b), 'shoal_node_info', { name: 'metrics-b' }), 1);
  });

  it('counts gateway requests and the bytes sent to clients', async () => {
    const before = await scrape(a);
    const layer = randomBytes(3 * 1024 * 1024 + 5);
    await pushImage(a.gatewayUrl, 'lib/app', '1', layer);
    const blob = await fetch(`${a.gatewayUrl}/v2/lib/app/blobs/${sha256Of(layer)}`);
    assert.equal((await blob.arrayBuffer()).byteLength, layer.length);
    const miss = await fetch(`${a.gatewayUrl}/v2/lib/app/manifests/nope`);
    await miss.arrayBuffer();

    // The counts land when each response's connection is done with it.
    let after: Awaited<ReturnType<typeof scrape>> = [];
    const blobGets = (samples: Sample[]) => valueOf(samples, 'shoal_gateway_requests_total', { kind: 'blob', method: 'GET', status: '2xx' }) ?? 0;
    await until('the blob GET is counted', async () => blobGets((after = await scrape(a))) === blobGets(before) + 1);
    assert.equal(valueOf(after, 'shoal_gateway_requests_total', { kind: 'upload', method: 'POST', status: '2xx' }), 2);
    assert.equal(valueOf(after, 'shoal_gateway_requests_total', { kind: 'manifest', method: 'PUT', status: '2xx' }), 1);
    assert.equal(valueOf(after, 'shoal_gateway_requests_total', { kind: 'manifest', method: 'GET', status: '4xx' }), 1);
    const sent = (valueOf(after, 'shoal_gateway_sent_bytes_total', { kind: 'blob' }) ?? 0) - (valueOf(before, 'shoal_gateway_sent_bytes_total', { kind: 'blob' }) ?? 0);
    assert.ok(sent > layer.length && sent < layer.length + 1024, `blob bytes sent grew by ${sent}`);
    assert.equal(valueOf(after, 'shoal_store_repositories'), 1);
    assert.equal(valueOf(after, 'shoal_store_tags'), 1);
    assert.equal(valueOf(after, 'shoal_mesh_tag_records'), 1);
    // Config, layer and manifest, once the store's usage is walked again after the push.
    await until('the store counts the pushed blobs', async () => valueOf((after = await scrape(a)), 'shoal_store_blobs') === 3);
    assert.ok(valueOf(after, 'shoal_store_bytes')! > layer.length);
  });

  it('counts what the mesh moved: bytes received and verified on one side, uploaded on the other', async () => {
    await until('a and b see each other alive', async () => {
      const [sa, sb] = await Promise.all([scrape(a), scrape(b)]);
      return valueOf(sa, 'shoal_mesh_peers', { status: 'alive' }) === 1 && valueOf(sb, 'shoal_mesh_peers', { status: 'alive' }) === 1;
    });
    assert.ok(valueOf(await scrape(b), 'shoal_mesh_connections')! >= 1);
    const layer = randomBytes(2 * 1024 * 1024 + 7);
    await pushImage(a.gatewayUrl, 'lib/mesh', '1', layer);
    const blob = await fetch(`${b.gatewayUrl}/v2/lib/mesh/blobs/${sha256Of(layer)}`);
    assert.equal(blob.status, 200);
    assert.ok(Buffer.from(await blob.arrayBuffer()).equals(layer));

    const [sa, sb] = await Promise.all([scrape(a), scrape(b)]);
    const received = (valueOf(sb, 'shoal_swarm_received_bytes_total', { path: 'data_plane' }) ?? 0) + (valueOf(sb, 'shoal_swarm_received_bytes_total', { path: 'libp2p' }) ?? 0);
    assert.ok(received >= layer.length, `b received ${received} bytes`);
    assert.ok(valueOf(sb, 'shoal_swarm_verified_bytes_total')! >= layer.length);
    assert.ok(valueOf(sb, 'shoal_swarm_chunks_verified_total')! >= 3, 'three 1 MiB chunks at least');
    assert.equal(valueOf(sb, 'shoal_swarm_chunks_rejected_total'), 0);
    assert.equal(valueOf(sb, 'shoal_swarm_peers_banned_total'), 0);
    // One device asking for one layer stays within a holder's upload slots.
    assert.equal(valueOf(sb, 'shoal_swarm_busy_answers_total', { direction: 'received' }), 0);
    assert.equal(valueOf(sa, 'shoal_swarm_busy_answers_total', { direction: 'sent' }), 0);
    assert.ok(valueOf(sb, 'shoal_swarm_transfers_total', { result: 'complete' })! >= 1);
    const uploaded = (valueOf(sa, 'shoal_swarm_uploaded_bytes_total', { path: 'data_plane' }) ?? 0) + (valueOf(sa, 'shoal_swarm_uploaded_bytes_total', { path: 'libp2p' }) ?? 0);
    assert.ok(uploaded >= layer.length, `a uploaded ${uploaded} bytes`);
    assert.equal(valueOf(sa, 'shoal_swarm_received_bytes_total', { path: 'data_plane' }), 0, 'a fetched nothing');

    // /api/stats carries the same figures.
    const stats = (await (await fetch(`${b.apiUrl}/api/stats`)).json()) as NodeStats;
    assert.equal(stats.swarm.chunksVerified, valueOf(sb, 'shoal_swarm_chunks_verified_total'));
    assert.equal(stats.swarm.bytesReceived.dataPlane, valueOf(sb, 'shoal_swarm_received_bytes_total', { path: 'data_plane' }));
    assert.equal(stats.mesh.peers.alive, 1);

    // Each probes the other about once a second.
    await until('b has probed a', async () => (valueOf(await scrape(b), 'shoal_mesh_probes_total', { result: 'answered' }) ?? 0) >= 1);
    const probed = await scrape(b);
    const { mesh } = (await (await fetch(`${b.apiUrl}/api/stats`)).json()) as NodeStats;
    assert.ok(mesh.probes.answered >= valueOf(probed, 'shoal_mesh_probes_total', { result: 'answered' })!);
    assert.equal(typeof valueOf(probed, 'shoal_mesh_suspicions_total', { direction: 'sent' }), 'number');
    assert.equal(valueOf(probed, 'shoal_mesh_heartbeats_rejected_total'), 0);
    assert.ok(mesh.relays.received >= valueOf(probed, 'shoal_mesh_relays_total', { direction: 'received' })!);
    // These nodes run without mDNS, so no beacon.
    assert.equal(valueOf(probed, 'shoal_mesh_beacon_records_total'), 0);
    assert.equal(mesh.beaconRecords, 0);
  });
});
