import { createHash } from 'node:crypto';
import { setTimeout as sleep } from 'node:timers/promises';
import { noise } from '@chainsafe/libp2p-noise';
import { yamux } from '@chainsafe/libp2p-yamux';
import { gossipsub, type GossipSub } from '@libp2p/gossipsub';
import { generateKeyPair } from '@libp2p/crypto/keys';
import { identify, type Identify } from '@libp2p/identify';
import { KEEP_ALIVE, type Libp2p, type PeerDiscovery, type PeerId, type PeerInfo, type PrivateKey } from '@libp2p/interface';
import { kadDHT, removePublicAddressesMapper, type KadDHT } from '@libp2p/kad-dht';
import { mdns } from '@libp2p/mdns';
import { peerIdFromString } from '@libp2p/peer-id';
import { ping, type Ping } from '@libp2p/ping';
import { preSharedKey } from '@libp2p/pnet';
import { tcp } from '@libp2p/tcp';
import { isLoopback, Queue } from '@libp2p/utils';
import { multiaddr, type Multiaddr } from '@multiformats/multiaddr';
import { createLibp2p, type ServiceFactoryMap } from 'libp2p';
import { raceSignal } from 'race-signal';
import { silentLog, withoutUndefined } from './options.ts';
import { RecordBeacon } from './record-beacon.ts';

export const DEFAULT_LISTEN = ['/ip4/0.0.0.0/tcp/4001'];
export const DEFAULT_MDNS_SERVICE_TAG = '_shoal._udp.local';
/** The LAN DHT's own protocol, so Shoal nodes never join the public IPFS DHT. */
export const LAN_DHT_PROTOCOL = '/shoal/lan/kad/1.0.0';

/** The pino-compatible subset of a logger the host writes to. */
export interface MeshLog {
  debug(obj: object, msg: string): void;
  warn(obj: object, msg: string): void;
}

export interface MeshHostOptions {
  /** Multiaddrs to listen on. Default `['/ip4/0.0.0.0/tcp/4001']`. */
  listen?: string[];
  /**
   * Peers to dial at start and keep connected (tagged KEEP_ALIVE and redialled every
   * `bootstrapRedialMs` while disconnected). Each must end in `/p2p/<peer id>`. Default none.
   */
  bootstrap?: string[];
  /** How often disconnected bootstrap peers are dialled again. Default 10 000 ms. */
  bootstrapRedialMs?: number;
  /**
   * Find peers on the LAN by multicast DNS, and carry each device's signed membership record
   * there too (see RecordBeacon). Default true.
   */
  mdns?: boolean;
  /**
   * mDNS query interval. A starting device queries at once and every device answers, so this
   * only paces finding devices again after a partition; each answer reaches every device and
   * costs each a peer-store write: N devices cost N x N answers per interval. Default 30 000 ms.
   */
  mdnsIntervalMs?: number;
  /** mDNS service name; Shoal's own so other libp2p nodes on the LAN stay out. Default `_shoal._udp.local`. */
  mdnsServiceTag?: string;
  /**
   * swarm.key bytes (see loadSwarmKey): only nodes holding the same key can connect.
   * Default none, which means an open network.
   */
  swarmKey?: Uint8Array;
  /** The node identity (see loadOrCreatePeerKey). Default a fresh Ed25519 key, so a new peer id. */
  privateKey?: PrivateKey;
  /**
   * Inbound connections accepted per second from one host. libp2p's default of 5 is too low
   * when many nodes share an IP (tests, containers, NAT). Default 100.
   */
  inboundConnectionThreshold?: number;
  /**
   * Inbound connections still in their handshake at once; more are refused. libp2p's default of 10
   * is below a LAN's size: when the devices of a site start together each is dialled by all the
   * others at once, handshakes on busy devices take seconds, and a refused dialler only tries
   * again seconds later. Default 64.
   */
  maxIncomingPendingConnections?: number;
  /** Default silent. */
  log?: MeshLog;
}

export type MeshServices = {
  identify: Identify;
  ping: Ping;
  dht: KadDHT;
  pubsub: GossipSub;
  mdns?: PeerDiscovery;
};

export type MeshNode = Libp2p<MeshServices>;

// yamux grows a stream's receive window to 16 MiB by default but resets a stream whose unread
// buffer passes maxReadBufferLength (4 MiB), so a paused fast stream would be killed.
const STREAM_BUFFER_BYTES = 4 * 1024 * 1024;

const MDNS_DIAL_RETRIES = 3;
/** How long the device with the smaller peer id waits for the other to dial (see #onDiscovered). */
const MDNS_YIELD_MS = 2_000;
/**
 * mDNS dials running at once. A device that starts among many finds them all within a second.
 * Dialled all at once, on devices all busy starting, each handshake waited on dozens of others
 * (a median of ~3.5 s at 16 devices on 2 cores), and tens per start ran past libp2p's 10 s dial
 * timeout, their work wasted at both ends. One connection is enough for a device's table and
 * record to spread; the others follow a few at a time.
 */
const MDNS_DIAL_CONCURRENCY = 4;
/**
 * Gossipsub's defaults suit a public network of thousands; on a LAN of tens of devices nearly
 * every peer ends up in every mesh and flood publishing sends each message to all of them, so
 * one heartbeat turned into ~N x 6 encrypted sends. A smaller mesh still reaches everyone in a
 * few hops (milliseconds here) at about a third of the sends, and message ids go to two peers
 * outside the mesh per gossip round rather than six. Degree 3 saved another quarter of the sends
 * but slowed chunk availability between the devices of one transfer enough to show in the swarm
 * tests.
 */
const LAN_GOSSIP = { floodPublish: false, D: 4, Dlo: 3, Dhi: 8, Dlazy: 2 };

/**
 * Gossipsub checks a message's signature before it looks for it among those already seen, and
 * on a mesh of degree D each message arrives about D times: without this fingerprint most of a
 * node's CPU went to verifying copies. It covers every field, signature included, so a forged
 * copy cannot pass for (and suppress) the real message: it is verified and rejected instead.
 */
function fingerprint(message: { from?: Uint8Array; seqno?: Uint8Array; topic: string; data?: Uint8Array; signature?: Uint8Array; key?: Uint8Array }): string {
  const hash = createHash('sha256');
  for (const field of [message.from, message.seqno, Buffer.from(message.topic), message.data, message.signature, message.key]) {
    // Length-prefixed, so no two different messages hash the same bytes.
    const length = Buffer.alloc(4);
    length.writeUInt32BE(field?.byteLength ?? 0);
    hash.update(length);
    if (field) hash.update(field);
  }
  return hash.digest('base64');
}

/**
 * The device's libp2p host: TCP + noise + yamux, optionally inside a private network (pnet),
 * with identify, ping, mDNS discovery, a LAN kad-dht and gossipsub.
 */
export class MeshHost {
  readonly #options: Required<Omit<MeshHostOptions, 'swarmKey' | 'privateKey'>> &
    Pick<MeshHostOptions, 'swarmKey' | 'privateKey'>;
  readonly #bootstrap: { peerId: PeerId; addr: Multiaddr }[];
  #node: MeshNode | undefined;
  #redialTimer: NodeJS.Timeout | undefined;
  /** Peers found by mDNS that a dial (or a wait before one) is under way to. */
  readonly #dialing = new Set<string>();
  readonly #mdnsDials = new Queue<unknown>({ concurrency: MDNS_DIAL_CONCURRENCY });
  #beacon: RecordBeacon | undefined;

  constructor(options: MeshHostOptions = {}) {
    this.#options = {
      listen: DEFAULT_LISTEN,
      bootstrap: [],
      bootstrapRedialMs: 10_000,
      mdns: true,
      mdnsIntervalMs: 30_000,
      mdnsServiceTag: DEFAULT_MDNS_SERVICE_TAG,
      inboundConnectionThreshold: 100,
      maxIncomingPendingConnections: 64,
      log: silentLog,
      ...withoutUndefined(options),
    };
    this.#bootstrap = this.#options.bootstrap.map(parseBootstrapAddr);
  }

  /** The running libp2p node; throws before start() and after stop(). */
  get node(): MeshNode {
    if (!this.#node) throw new Error('MeshHost is not started');
    return this.#node;
  }

  get peerId(): PeerId {
    return this.node.peerId;
  }

  /** The mDNS record beacon while the host runs with mDNS; undefined otherwise. */
  get beacon(): RecordBeacon | undefined {
    return this.#beacon;
  }

  /** The addresses the host listens on, each ending in /p2p/<peer id>. */
  get multiaddrs(): Multiaddr[] {
    return this.node.getMultiaddrs();
  }

  /**
   * Starts libp2p and tries each bootstrap peer once before resolving (a dead one costs at most
   * libp2p's 5 s dial timeout; it is logged and retried in the background, not thrown).
   */
  async start(): Promise<void> {
    if (this.#node) return;
    const { listen, swarmKey, inboundConnectionThreshold, maxIncomingPendingConnections } = this.#options;
    // The beacon signs with the node's key, so the host holds it rather than leaving it to libp2p.
    const privateKey = this.#options.privateKey ?? (await generateKeyPair('Ed25519'));
    const services: ServiceFactoryMap<MeshServices> = {
      identify: identify(),
      // kad-dht pings new contacts through this service; one outbound stream (the default)
      // makes a concurrent liveness ping fail with TooManyOutboundProtocolStreamsError.
      ping: ping({ maxOutboundStreams: 8 }),
      dht: kadDHT({
        protocol: LAN_DHT_PROTOCOL,
        // Without a public address a node would otherwise stay a DHT client and provide() hangs.
        clientMode: false,
        // The default mapper drops private addresses, which are the only ones on a LAN.
        peerInfoMapper: removePublicAddressesMapper,
      }),
      pubsub: gossipsub({ fastMsgIdFn: fingerprint, ...LAN_GOSSIP }),
    };
    if (this.#options.mdns) {
      services.mdns = mdns({ interval: this.#options.mdnsIntervalMs, serviceTag: this.#options.mdnsServiceTag });
    }
    const node = await createLibp2p<MeshServices>({
      start: false,
      privateKey,
      addresses: { listen, announceFilter: withoutLoopback },
      transports: [tcp()],
      connectionEncrypters: [noise()],
      streamMuxers: [
        // Membership probes each member about once a second in all (probe() below), so neither
        // yamux's keep-alive ping nor libp2p's connection monitor (a new negotiated ping stream,
        // ~30 packets, per connection from both ends) needs to run: at 16 devices they cost each
        // more than the 2 KB/s all of membership may.
        yamux({
          enableKeepAlive: false,
          streamOptions: { maxStreamWindowSize: STREAM_BUFFER_BYTES, maxReadBufferLength: STREAM_BUFFER_BYTES },
        }),
      ],
      connectionProtector: swarmKey ? preSharedKey({ psk: swarmKey }) : undefined,
      connectionManager: { inboundConnectionThreshold, maxIncomingPendingConnections },
      connectionMonitor: { enabled: false },
      services,
    });
    // libp2p 3 only reports mDNS finds; dialling them is ours. 'peer' fires on every answer,
    // so it also reconnects a peer that was lost.
    node.services.mdns?.addEventListener('peer', (evt) => this.#onDiscovered(evt.detail));
    await node.start();
    this.#node = node;
    if (this.#options.mdns) {
      this.#beacon = new RecordBeacon({ privateKey, swarmKey, log: this.#options.log });
      this.#beacon.start();
    }
    await this.#dialBootstrap();
    this.#redialTimer = setInterval(() => void this.#dialBootstrap(), this.#options.bootstrapRedialMs);
    this.#redialTimer.unref();
  }

  /**
   * Whether `peer`'s node answers now. Over an open connection that is one yamux ping frame
   * each way (no stream, no protocol negotiation; libp2p's ping protocol costs a new stream and
   * ~30 packets); without one, a dial, which answers by succeeding. False on any failure or when
   * `signal` aborts first.
   */
  async probe(peer: PeerId, signal: AbortSignal): Promise<boolean> {
    const node = this.node;
    try {
      const connection = node.getConnections(peer).find((candidate) => candidate.status === 'open');
      if (!connection) {
        await node.dial(peer, { signal });
        return true;
      }
      // The muxer is not part of libp2p's Connection interface; yamux's has ping(). Any other
      // muxer falls back to the ping protocol.
      const { muxer } = connection as { muxer?: { ping?: () => Promise<number> } };
      if (typeof muxer?.ping !== 'function') {
        await node.services.ping.ping(peer, { signal });
        return true;
      }
      // Never abandon a yamux ping: a pong that arrives after its ping was given up is a
      // protocol error to yamux, which then tears the whole connection down. The ping stays out
      // (a later probe of this peer waits on the same one) and only this wait ends.
      const pong = muxer.ping();
      pong.catch(() => {});
      await raceSignal(pong, signal);
      return true;
    } catch {
      return false;
    }
  }

  async stop(): Promise<void> {
    clearInterval(this.#redialTimer);
    this.#redialTimer = undefined;
    const node = this.#node;
    this.#node = undefined;
    this.#mdnsDials.abort();
    this.#beacon?.stop();
    this.#beacon = undefined;
    await node?.stop();
  }

  /** Tags every bootstrap peer KEEP_ALIVE and dials those without a connection; failures are logged, not thrown. */
  async #dialBootstrap(): Promise<void> {
    const node = this.#node;
    if (!node) return;
    await Promise.all(
      this.#bootstrap.map(async ({ peerId, addr }) => {
        if (node.getConnections(peerId).length > 0) return;
        try {
          // libp2p's reconnect queue drops the tag after a few failed redials; set it again.
          await node.peerStore.merge(peerId, { multiaddrs: [addr], tags: { [KEEP_ALIVE]: { value: 1 } } });
          await node.dial(peerId);
          this.#options.log.debug({ peer: peerId.toString() }, 'connected to bootstrap peer');
        } catch (err) {
          this.#options.log.warn({ peer: peerId.toString(), addr: addr.toString(), err }, 'bootstrap peer unreachable');
        }
      }),
    );
  }

  /**
   * Dials a device mDNS found. Every answer to anyone's query reaches every device, so a device
   * starting among many hears each peer many times: one dial (or wait) per peer at a time. Both
   * devices of a pair hear each other at once, and two dials crossing cost twice the handshakes
   * on machines busy starting up; so the one with the smaller peer id gives the other a moment to
   * dial first. At most MDNS_DIAL_CONCURRENCY dials run at once (see there). Devices that start
   * together are all busy at once and dials time out, while the next answer may be a whole mDNS
   * interval away, so a failed dial is tried again a few times, 1 s, 2 s and 4 s later.
   */
  #onDiscovered(peer: PeerInfo, attempt = 0): void {
    const node = this.#node;
    const key = peer.id.toString();
    if (!node || peer.id.equals(node.peerId) || node.getConnections(peer.id).length > 0 || this.#dialing.has(key)) return;
    this.#dialing.add(key);
    const yieldMs = attempt === 0 && key > node.peerId.toString() ? MDNS_YIELD_MS : 0;
    node.peerStore
      .merge(peer.id, { multiaddrs: peer.multiaddrs, tags: { [KEEP_ALIVE]: { value: 1 } } })
      .then(() => sleep(yieldMs, undefined, { ref: false }))
      // The peer may have dialled in while this dial waited, for its yield or for a turn.
      .then(() => this.#mdnsDials.add(async () => (node.getConnections(peer.id).length > 0 ? undefined : node.dial(peer.id))))
      .then(
        () => {
          this.#dialing.delete(key);
          this.#options.log.debug({ peer: key }, 'connected to mDNS peer');
        },
        (err) => {
          this.#dialing.delete(key);
          this.#options.log.debug({ peer: key, err, attempt }, 'mDNS peer unreachable');
          if (attempt < MDNS_DIAL_RETRIES) setTimeout(() => this.#onDiscovered(peer, attempt + 1), 1_000 * 2 ** attempt).unref();
        },
      );
  }
}

/** Convenience: construct and start a MeshHost. */
export async function createMeshHost(options: MeshHostOptions = {}): Promise<MeshHost> {
  const host = new MeshHost(options);
  await host.start();
  return host;
}

/**
 * The addresses announced (identify, mDNS answers, the membership record): loopback ones only
 * when there is nothing else, as when every node runs on one host. Announced beside a LAN
 * address, a peer whose LAN dial failed tried the loopback one next and reached its own node
 * (its own handshake, wasted at both ends).
 */
function withoutLoopback(addrs: Multiaddr[]): Multiaddr[] {
  const reachable = addrs.filter((addr) => !isLoopback(addr));
  return reachable.length > 0 ? reachable : addrs;
}

function parseBootstrapAddr(text: string): { peerId: PeerId; addr: Multiaddr } {
  let addr: Multiaddr;
  try {
    addr = multiaddr(text);
  } catch (err) {
    throw new Error(`bootstrap address ${JSON.stringify(text)} is not a multiaddr: ${(err as Error).message}`);
  }
  const id = addr.getComponents().findLast((component) => component.name === 'p2p')?.value;
  if (!id) throw new Error(`bootstrap address ${JSON.stringify(text)} lacks /p2p/<peer id>`);
  return { peerId: peerIdFromString(id), addr };
}
