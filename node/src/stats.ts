import type { MemberStatus } from '@shoal/mesh';
import type { GatewayObserver, GatewayResponse } from '@shoal/registry-gateway';
import type { DownloaderStats } from '@shoal/swarm';

/** Bytes by the path they took between devices. */
export interface BytesByPath {
  /** The plain-HTTP chunk data plane. */
  dataPlane: number;
  /** `/shoal/chunks/1.0.0` streams (noise-encrypted). */
  libp2p: number;
}

/**
 * The figures a user watches, read from the node's parts on demand: GET /api/stats serves
 * them and /metrics exposes the same numbers, so the dashboard and Prometheus never disagree.
 * Counters count since the node started.
 */
export interface NodeStats {
  node: {
    name: string;
    version: string;
    peerId: string;
    gatewayUrl: string;
    startedAt: number;
    /** The node's clock (ms since the epoch), so a browser whose clock differs can show ages. */
    now: number;
  };
  gateway: GatewayTrafficStats;
  /** `blobs` and `bytes` come from a walk of the layout, done again at most every 5 s once the store changed. */
  store: { blobs: number; bytes: number; repositories: number; tags: number };
  mesh: {
    /** Other devices in the membership table, by status. */
    peers: Record<MemberStatus, number>;
    connections: number;
    tagRecords: number;
    /** Membership probes of other devices since start, and suspicions published and received. */
    probes: { answered: number; unanswered: number };
    suspicions: { sent: number; received: number };
    heartbeatsRejected: number;
    /** Relay messages (members new to the table, passed on to the mesh) published and received. */
    relays: { sent: number; received: number };
    /** Members' own records the mDNS beacon brought that were new to this node. */
    beaconRecords: number;
  };
  swarm: DownloaderStats & {
    activeTransfers: number;
    /** Chunk bytes received from peers (verified or not). */
    bytesReceived: BytesByPath;
    /** Chunk bytes sent to peers. */
    bytesUploaded: BytesByPath;
    /** Chunk requests from peers answered busy: this device was sending all the chunks it sends at once, or, pulling the blob through, had sent every chunk asked for. */
    uploadsRefused: number;
  };
  /** Bytes pulled through from upstream registries, counted as each pull-through ends. */
  upstream: { bytesReceived: number };
}

export interface GatewayTrafficStats {
  /** Responses by endpoint kind, method and status class (`2xx`, `4xx`, ...). */
  requests: { kind: string; method: string; status: string; count: number }[];
  /** Bytes written to clients by endpoint kind, headers included. */
  bytesSent: Record<string, number>;
}

/** Tallies the gateway's responses (the gateway reports them; counting is the node's business). */
export class GatewayTraffic implements GatewayObserver {
  readonly #requests = new Map<string, GatewayTrafficStats['requests'][number]>();
  readonly #bytesSent: Record<string, number> = {};

  onResponse({ kind, method, status, bytes }: GatewayResponse): void {
    const statusClass = `${Math.floor(status / 100)}xx`;
    const key = `${kind} ${method} ${statusClass}`;
    const row = this.#requests.get(key) ?? { kind, method, status: statusClass, count: 0 };
    row.count++;
    this.#requests.set(key, row);
    this.#bytesSent[kind] = (this.#bytesSent[kind] ?? 0) + bytes;
  }

  stats(): GatewayTrafficStats {
    return { requests: [...this.#requests.values()].map((row) => ({ ...row })), bytesSent: { ...this.#bytesSent } };
  }
}
