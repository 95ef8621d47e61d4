import { collectDefaultMetrics, Counter, Gauge, Registry } from 'prom-client';
import type { BytesByPath, NodeStats } from './stats.ts';

type Labels = Record<string, string>;
type Samples = (stats: NodeStats) => [Labels, number][];

/**
 * A node's Prometheus metrics. The registry is the node's own, not prom-client's global one,
 * since tests run several nodes in one process. Each scrape takes one NodeStats snapshot and
 * every metric reads from it, so /metrics and /api/stats report the same numbers.
 */
export class NodeMetrics {
  readonly #registry = new Registry();
  readonly #stats: () => Promise<NodeStats>;
  #snapshot: NodeStats | undefined;

  constructor(stats: () => Promise<NodeStats>) {
    this.#stats = stats;
    // Process CPU, RSS, heap, event-loop lag, as shoal_process_* and shoal_nodejs_*.
    collectDefaultMetrics({ register: this.#registry, prefix: 'shoal_' });

    this.#metric('gauge', 'shoal_node_info', 'This node: always 1, the facts are in the labels.', ['name', 'version', 'peer_id'], ({ node }) => [
      [{ name: node.name, version: node.version, peer_id: node.peerId }, 1],
    ]);

    this.#metric('counter', 'shoal_gateway_requests_total', 'Registry gateway responses by endpoint kind, method and status class.', ['kind', 'method', 'status'], (s) =>
      s.gateway.requests.map(({ kind, method, status, count }) => [{ kind, method, status }, count]),
    );
    this.#metric('counter', 'shoal_gateway_sent_bytes_total', 'Bytes the registry gateway wrote to clients, headers included, by endpoint kind.', ['kind'], (s) =>
      Object.entries(s.gateway.bytesSent).map(([kind, bytes]) => [{ kind }, bytes]),
    );

    this.#metric('gauge', 'shoal_store_blobs', 'Committed blobs in the content store (up to 5 s behind).', [], (s) => [[{}, s.store.blobs]]);
    this.#metric('gauge', 'shoal_store_bytes', 'Bytes of committed blobs in the content store (up to 5 s behind).', [], (s) => [[{}, s.store.bytes]]);
    this.#metric('gauge', 'shoal_store_repositories', 'Repositories in the content store.', [], (s) => [[{}, s.store.repositories]]);
    this.#metric('gauge', 'shoal_store_tags', 'Tags in the content store (the images it lists).', [], (s) => [[{}, s.store.tags]]);

    this.#metric('gauge', 'shoal_mesh_peers', 'Other devices in the membership table, by status.', ['status'], (s) =>
      Object.entries(s.mesh.peers).map(([status, count]) => [{ status }, count]),
    );
    this.#metric('gauge', 'shoal_mesh_connections', 'Open libp2p connections.', [], (s) => [[{}, s.mesh.connections]]);
    this.#metric('gauge', 'shoal_mesh_tag_records', 'Records in the mesh-wide tag table.', [], (s) => [[{}, s.mesh.tagRecords]]);
    this.#metric('counter', 'shoal_mesh_probes_total', 'Membership probes of other devices, by result.', ['result'], (s) => [
      [{ result: 'answered' }, s.mesh.probes.answered],
      [{ result: 'unanswered' }, s.mesh.probes.unanswered],
    ]);
    this.#metric('counter', 'shoal_mesh_suspicions_total', 'Suspicions (an unanswered probe) this node published or received.', ['direction'], (s) => [
      [{ direction: 'sent' }, s.mesh.suspicions.sent],
      [{ direction: 'received' }, s.mesh.suspicions.received],
    ]);
    this.#metric('counter', 'shoal_mesh_heartbeats_rejected_total', 'Membership messages that failed validation.', [], (s) => [[{}, s.mesh.heartbeatsRejected]]);
    this.#metric('counter', 'shoal_mesh_relays_total', 'Relay messages (members new to the table, passed on) this node published or received.', ['direction'], (s) => [
      [{ direction: 'sent' }, s.mesh.relays.sent],
      [{ direction: 'received' }, s.mesh.relays.received],
    ]);
    this.#metric('counter', 'shoal_mesh_beacon_records_total', "Members' own records from the mDNS beacon that were new to this node.", [], (s) => [[{}, s.mesh.beaconRecords]]);

    this.#metric('gauge', 'shoal_swarm_transfers_active', 'Blobs being fetched from the mesh now.', [], (s) => [[{}, s.swarm.activeTransfers]]);
    this.#metric('counter', 'shoal_swarm_transfers_total', 'Mesh transfers that ended, by result (failed includes blobs no device held).', ['result'], (s) => [
      [{ result: 'complete' }, s.swarm.transfersCompleted],
      [{ result: 'failed' }, s.swarm.transfersFailed],
    ]);
    this.#metric('counter', 'shoal_swarm_received_bytes_total', 'Chunk bytes received from peers, before verification, by path.', ['path'], (s) =>
      byPath(s.swarm.bytesReceived),
    );
    this.#metric('counter', 'shoal_swarm_verified_bytes_total', 'Chunk bytes from peers that matched their hash.', [], (s) => [[{}, s.swarm.bytesVerified]]);
    this.#metric('counter', 'shoal_swarm_chunks_verified_total', 'Chunks from peers that matched their hash.', [], (s) => [[{}, s.swarm.chunksVerified]]);
    this.#metric('counter', 'shoal_swarm_chunks_rejected_total', 'Chunks from peers that failed verification.', [], (s) => [[{}, s.swarm.chunksRejected]]);
    this.#metric('counter', 'shoal_swarm_peers_banned_total', 'Peers banned for sending a chunk that failed verification.', [], (s) => [[{}, s.swarm.peersBanned]]);
    this.#metric('counter', 'shoal_swarm_uploaded_bytes_total', 'Chunk bytes sent to peers, by path.', ['path'], (s) => byPath(s.swarm.bytesUploaded));
    this.#metric('counter', 'shoal_swarm_busy_answers_total', 'Chunk requests answered busy (the holder was sending all it sends at once, or pulling the blob through had sent every chunk asked for), by direction.', ['direction'], (s) => [
      [{ direction: 'received' }, s.swarm.requestsBusy],
      [{ direction: 'sent' }, s.swarm.uploadsRefused],
    ]);

    this.#metric('counter', 'shoal_upstream_received_bytes_total', 'Bytes pulled through from upstream registries, counted as each pull-through ends.', [], (s) => [
      [{}, s.upstream.bytesReceived],
    ]);
  }

  get contentType(): string {
    return this.#registry.contentType;
  }

  /** The Prometheus text exposition of a fresh snapshot. */
  async text(): Promise<string> {
    this.#snapshot = await this.#stats();
    return this.#registry.metrics();
  }

  /** A metric whose values are set afresh from the scrape's snapshot each time it is collected. */
  #metric(kind: 'counter' | 'gauge', name: string, help: string, labelNames: string[], samples: Samples): void {
    const read = () => samples(this.#snapshot!);
    const config = { name, help, labelNames, registers: [this.#registry] };
    if (kind === 'counter') {
      new Counter({
        ...config,
        collect() {
          this.reset();
          for (const [labels, value] of read()) this.inc(labels, value);
        },
      });
    } else {
      new Gauge({
        ...config,
        collect() {
          this.reset();
          for (const [labels, value] of read()) this.set(labels, value);
        },
      });
    }
  }
}

function byPath(bytes: BytesByPath): [Labels, number][] {
  return [
    [{ path: 'data_plane' }, bytes.dataPlane],
    [{ path: 'libp2p' }, bytes.libp2p],
  ];
}
