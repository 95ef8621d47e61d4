import { once } from 'node:events';
import type { AddressInfo } from 'node:net';
import type { Server } from 'node:http';
import { serve } from '@hono/node-server';
import type { FastifyInstance } from 'fastify';
import { ChunkBitmap, chunkCount, FsContentStore } from '@shoal/store';
import { createGateway, LocalRegistry, MirroringRegistry, UpstreamClient, type Registry } from '@shoal/registry-gateway';
import { loadavg } from 'node:os';
import { join } from 'node:path';
import type { PrivateKey } from '@libp2p/interface';
import { loadOrCreatePeerKey, loadSwarmKey, MeshHost, Membership, TagDirectory } from '@shoal/mesh';
import {
  ChunkDataPlane,
  ChunkServer,
  Downloader,
  Libp2pChunkTransport,
  MeshProviderDirectory,
  MeshPublisher,
  StoreChunkSource,
  SwarmRegistry,
  UploadLedger,
} from '@shoal/swarm';
import { createControlApi } from './control-api.ts';
import { Puller } from './puller.ts';
import { isLoopback, type HostPort, type NodeConfig } from './config.ts';
import type { Logger } from './logger.ts';
import { GatewayTraffic, type NodeStats } from './stats.ts';
import { VERSION } from './version.ts';

/** Store usage is a directory walk: done again only once the store changed, and at most this often. */
const USAGE_REFRESH_MS = 5_000;

/** One Shoal node: the content store, the mesh, the registry gateway and the control API, wired. */
export class ShoalNode {
  readonly config: NodeConfig;
  readonly log: Logger;
  #store?: FsContentStore;
  #mirror?: MirroringRegistry;
  #gateway?: FastifyInstance;
  #api?: Server;
  #mesh?: MeshHost;
  #membership?: Membership;
  #tags?: TagDirectory;
  #directory?: MeshProviderDirectory;
  #chunkServer?: ChunkServer;
  #dataPlane?: ChunkDataPlane;
  #transport?: Libp2pChunkTransport;
  #downloader?: Downloader;
  #publisher?: MeshPublisher;
  #usage = { blobs: 0, bytes: 0, at: -Infinity, stale: true };
  readonly #traffic = new GatewayTraffic();
  #upstreamBytes = 0;
  #startedAt = 0;
  gatewayUrl = '';
  apiUrl = '';

  constructor(config: NodeConfig, log: Logger) {
    this.config = config;
    this.log = log;
  }

  async start(): Promise<void> {
    const { config, log } = this;
    this.#startedAt = Date.now();
    this.#store = await FsContentStore.open({ dir: config.dataDir, chunkSize: config.chunkSize });
    const usageChanged = () => (this.#usage.stale = true);
    this.#store.on('blob:committed', usageChanged).on('blob:deleted', usageChanged);
    const privateKey = await loadOrCreatePeerKey(config.dataDir);
    this.#mesh = new MeshHost({
      listen: config.listen,
      bootstrap: config.bootstrap,
      mdns: config.mdns,
      privateKey,
      ...(config.swarmKey ? { swarmKey: await loadSwarmKey(config.swarmKey) } : {}),
      log: log.child({ component: 'mesh' }),
    });
    await this.#mesh.start();
    log.info(
      { peerId: this.#mesh.peerId.toString(), addresses: this.#mesh.multiaddrs.map(String), private: Boolean(config.swarmKey) },
      'mesh listening',
    );

    const registry = await this.#startSwarm(privateKey);

    if (!config.pushToken && !isLoopback(config.gateway.host)) {
      log.warn(
        { gateway: config.gateway.host },
        'gateway listens beyond loopback and pushes need no token: anyone on the network can push and delete (set --push-token)',
      );
    }
    this.#gateway = await createGateway({
      registry,
      defaultNamespace: config.defaultNamespace,
      ...(config.pushToken ? { pushToken: config.pushToken } : {}),
      observer: this.#traffic,
      loggerInstance: log.child({ component: 'gateway' }),
    });
    await this.#gateway.listen({ host: config.gateway.host, port: config.gateway.port });
    this.gatewayUrl = urlOf(this.#gateway.server.address() as AddressInfo);
    log.info({ url: this.gatewayUrl, dataDir: config.dataDir }, 'gateway listening');

    const puller = new Puller({ registry, downloader: this.#downloader!, defaultNamespace: config.defaultNamespace });
    const app = createControlApi({
      store: this.#store,
      transfers: () => this.#downloader?.list() ?? [],
      tags: () => this.#tags?.list() ?? [],
      pull: (image) => puller.pull(image),
      membership: () => this.#membership,
      stats: () => this.stats(),
      node: { name: config.name, version: VERSION },
    });
    this.#api = serve({ fetch: app.fetch, hostname: config.api.host, port: config.api.port }) as Server;
    await listening(this.#api, config.api);
    this.apiUrl = urlOf(this.#api.address() as AddressInfo);
    log.info({ url: this.apiUrl }, 'control API listening');

    // Last, so peers only hear of this device once its gateway and API answer.
    this.#membership = new Membership(this.#mesh, {
      name: config.name,
      gatewayUrl: this.gatewayUrl,
      apiUrl: this.apiUrl,
      labels: config.labels,
      version: VERSION,
      stats: async () => ({ usageBytes: (await this.#storeUsage()).bytes, load: loadavg()[0]! }),
      log: log.child({ component: 'membership' }),
    });
    for (const event of ['peer:alive', 'peer:suspect', 'peer:down'] as const) {
      this.#membership.addEventListener(event, ({ detail }) =>
        log.info({ peer: detail.name, peerId: detail.peerId, status: detail.status }, `peer ${detail.status}`),
      );
    }
    await this.#membership.start();
    for (const service of config.services) this.#membership.registerService(service);
    void this.#announceAndResume();
  }

  /** The figures GET /api/stats and /metrics report; valid once start() has resolved. */
  async stats(): Promise<NodeStats> {
    const store = this.#store!;
    const downloader = this.#downloader!;
    const peers = { alive: 0, suspect: 0, down: 0 };
    const membership = this.#membership!.counters;
    for (const member of this.#membership?.list() ?? []) if (!member.self) peers[member.status]++;
    const repositories = await store.repositories();
    let tags = 0;
    for (const repository of repositories) tags += (await store.tags(repository))?.length ?? 0;
    const { blobs, bytes } = await this.#storeUsage();
    return {
      node: {
        name: this.config.name,
        version: VERSION,
        peerId: this.#mesh!.peerId.toString(),
        gatewayUrl: this.gatewayUrl,
        startedAt: this.#startedAt,
        now: Date.now(),
      },
      gateway: this.#traffic.stats(),
      store: { blobs, bytes, repositories: repositories.length, tags },
      mesh: {
        peers,
        connections: this.#mesh!.node.getConnections().length,
        tagRecords: this.#tags!.list().length,
        probes: { answered: membership.probesAnswered, unanswered: membership.probesUnanswered },
        suspicions: { sent: membership.suspicionsSent, received: membership.suspicionsReceived },
        heartbeatsRejected: membership.heartbeatsRejected,
        relays: { sent: membership.relaysSent, received: membership.relaysReceived },
        beaconRecords: membership.beaconRecords,
      },
      swarm: {
        ...downloader.stats,
        activeTransfers: downloader.list().length,
        bytesReceived: this.#transport!.bytesReceived,
        bytesUploaded: { dataPlane: this.#dataPlane?.bytesServed ?? 0, libp2p: this.#chunkServer!.bytesServed },
        uploadsRefused: this.#dataPlane?.uploadsRefused ?? 0,
      },
      upstream: { bytesReceived: this.#upstreamBytes },
    };
  }

  /** Tags, who-holds-what, the chunk server and the downloader, behind the gateway's registry. */
  async #startSwarm(privateKey: PrivateKey): Promise<Registry> {
    const { config, log } = this;
    const mesh = this.#mesh!;
    const store = this.#store!;
    const swarmLog = log.child({ component: 'swarm' });
    const tags = (this.#tags = new TagDirectory(mesh, { privateKey, file: join(config.dataDir, 'tags.json'), log: log.child({ component: 'tags' }) }));
    await tags.start();
    tags.addEventListener('tag', ({ detail: { repository, tag, digest, publisher } }) => log.info({ repository, tag, digest, publisher }, 'tag updated'));
    this.#directory = new MeshProviderDirectory(mesh, {
      // A device membership has marked down is not worth a dial.
      isUsable: (peer) => this.#membership?.list().find((m) => m.peerId === peer)?.status !== 'down',
      fallbackCandidates: () => (this.#membership?.list() ?? []).filter((m) => !m.self && m.status === 'alive').map((m) => m.peerId),
      busy: () => (this.#downloader?.list().length ?? 0) > 0,
      log: swarmLog,
    });
    this.#directory.start();
    // Before the chunk server, which shares pull-throughs while they land.
    const fallback = this.#registry(store);
    const source = new StoreChunkSource(store, { growing: (blob) => this.#mirror?.pulling(blob) });
    const corrupt = config.faultCorruptChunks ? () => true : undefined;
    if (corrupt) log.warn('test fault switch on: this node corrupts every chunk it serves');
    // Both serving paths count into one ledger, so a pick knows every chunk this device has sent.
    const ledger = new UploadLedger();
    if (config.dataPlane) {
      this.#dataPlane = new ChunkDataPlane(source, { ...config.dataPlane, corrupt, ledger, log: swarmLog });
      await this.#dataPlane.start();
      log.info({ address: `${config.dataPlane.host}:${this.#dataPlane.port}` }, 'chunk data plane listening');
    }
    this.#chunkServer = new ChunkServer(mesh, source, { log: swarmLog, corrupt, ledger, dataPlane: this.#dataPlane });
    await this.#chunkServer.start();
    this.#downloader = new Downloader({
      store,
      transport: (this.#transport = new Libp2pChunkTransport(mesh, { log: swarmLog })),
      directory: this.#directory,
      trustedIndexDigest: (blob) => tags.chunkIndexDigest(blob),
      log: swarmLog,
    });
    this.#logTransfers(this.#downloader, swarmLog);
    this.#publisher = new MeshPublisher({ store, directory: this.#directory, tags, log: swarmLog });
    this.#publisher.start();
    return new SwarmRegistry({ fallback, downloader: this.#downloader, tags });
  }

  /**
   * Provider records live in memory: announce the inventory again after a start, then resume
   * the downloads a restart interrupted (their verified chunks are on disk).
   */
  async #announceAndResume(): Promise<void> {
    const store = this.#store!;
    const announced = await this.#publisher!.announceInventory();
    this.log.debug({ announced }, 'inventory announced');
    for (const index of await store.partialBlobs()) {
      if (await store.statBlob(index.blob)) {
        await (await store.openPartial(index)).abort();
        continue;
      }
      this.log.info({ blob: index.blob }, 'resuming an interrupted download');
      this.#downloader!.fetch(index.blob, { index }).catch((err) =>
        this.log.warn({ blob: index.blob, err: (err as Error).message }, 'resuming a download failed; it resumes on the next request'),
      );
    }
  }

  #logTransfers(downloader: Downloader, log: Logger): void {
    downloader.addEventListener('transfer:start', ({ detail }) =>
      log.info({ blob: detail.blob, size: detail.size, peers: detail.peers, resumedChunks: detail.chunksHeld }, 'fetching a blob from the mesh'),
    );
    downloader.addEventListener('transfer:complete', ({ detail }) =>
      log.info({ blob: detail.blob, size: detail.size, sources: detail.sources, rate: detail.rate }, 'blob fetched from the mesh'),
    );
    downloader.addEventListener('transfer:failed', ({ detail }) => log.warn({ blob: detail.blob, error: detail.error }, 'mesh transfer failed'));
    downloader.addEventListener('peer:banned', ({ detail }) => log.warn({ ...detail }, 'peer banned for a corrupt chunk'));
  }

  async #storeUsage(): Promise<{ blobs: number; bytes: number }> {
    const usage = this.#usage;
    if (usage.stale && performance.now() - usage.at > USAGE_REFRESH_MS) {
      // Cleared before the walk, so a blob committed during it makes the next call walk again.
      usage.stale = false;
      usage.at = performance.now();
      try {
        Object.assign(usage, await this.#store!.usage());
      } catch (err) {
        usage.stale = true;
        throw err;
      }
    }
    return usage;
  }

  #registry(store: FsContentStore): Registry {
    const upstreams = Object.entries(this.config.upstreams);
    if (upstreams.length === 0) return new LocalRegistry(store);
    const registry = (this.#mirror = new MirroringRegistry({
      store,
      upstreams: new Map(upstreams.map(([ns, url]) => [ns, new UpstreamClient({ url })])),
    }));
    this.log.info({ upstreams: upstreams.map(([ns, url]) => `${ns}=${redact(url)}`) }, 'pull-through enabled');
    // Tell the mesh at once, so devices asking for the same blob fetch its chunks from here as they land.
    registry.on('pull-through:blob', ({ digest, size, chunkSize }) => {
      if (size === undefined || !digest.startsWith('sha256:')) return;
      this.#directory?.announcePartial(digest, new ChunkBitmap(chunkCount({ size, chunkSize })));
    });
    registry.on('pull-through:complete', ({ bytes }) => (this.#upstreamBytes += bytes));
    registry.on('pull-through:error', ({ bytes }) => (this.#upstreamBytes += bytes));
    return registry;
  }

  async stop(): Promise<void> {
    await this.#membership?.stop();
    this.#publisher?.stop();
    await this.#downloader?.stop();
    await this.#chunkServer?.stop();
    await this.#dataPlane?.stop();
    await this.#transport?.close();
    this.#directory?.stop();
    await this.#tags?.stop();
    await this.#mesh?.stop();
    await this.#gateway?.close();
    if (this.#api) {
      this.#api.closeAllConnections();
      await new Promise<void>((res) => this.#api!.close(() => res()));
    }
    // Downloads in flight end (their temp files removed) before the store closes.
    await this.#mirror?.close();
    await this.#store?.close();
    this.log.info('stopped');
  }
}

async function listening(server: Server, at: HostPort): Promise<void> {
  if (server.listening) return;
  const [err] = await Promise.race([once(server, 'listening').then(() => [undefined]), once(server, 'error')]);
  if (err) throw new Error(`control API cannot listen on ${at.host}:${at.port}: ${(err as Error).message}`);
}

function urlOf(addr: AddressInfo): string {
  const host = addr.family === 'IPv6' ? `[${addr.address}]` : addr.address;
  return `http://${host}:${addr.port}`;
}

/** Hides credentials in an upstream URL before logging it. */
function redact(url: string): string {
  const u = new URL(url);
  if (u.password) u.password = '***';
  return u.toString();
}
