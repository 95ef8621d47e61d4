import { setTimeout as sleep } from 'node:timers/promises';
import { TopicValidatorResult, type Message } from '@libp2p/gossipsub';
import { TypedEventEmitter, type PeerId } from '@libp2p/interface';
import { silentLog, withoutUndefined, type MeshHost, type MeshLog, type MeshNode } from '@shoal/mesh';
import { isDigest } from '@shoal/oci';
import { ChunkBitmap } from '@shoal/store';
import { CID } from 'multiformats/cid';
import * as raw from 'multiformats/codecs/raw';
import { create as createDigest } from 'multiformats/hashes/digest';
import { encodeBitmap } from './chunk-protocol.ts';
import type { Availability, AvailabilityUpdate, ProviderDirectory, ProviderDirectoryEvents } from './types.ts';

export const AVAILABILITY_TOPIC = '/shoal/availability/2';
/** Most blobs one availability message speaks for. */
const MAX_ENTRIES = 64;
const SHA256_CODE = 0x12;
/** How often a provide waiting for the device to be idle checks again. */
const PROVIDE_POLL_MS = 500;

export interface MeshProviderDirectoryOptions {
  /** Gossipsub topic for availability. Default `/shoal/availability/2`. */
  topic?: string;
  /**
   * Least time between two partial-availability messages of this device; one message carries
   * every blob whose bitmap grew since the last. Each reaches every device, so not more often.
   * Default 1 000 ms.
   */
  partialIntervalMs?: number;
  /** How long findHolders waits for DHT providers. Default 2 000 ms. */
  findTimeoutMs?: number;
  /** Once one holder is known, how much longer findHolders waits for more. Default 100 ms. */
  graceMs?: number;
  /** findHolders stops after this many DHT providers. Default 32. */
  maxProviders?: number;
  /** A gossiped partial holder is forgotten after this long without news. Default 60 000 ms. */
  partialTtlMs?: number;
  /** Largest availability message accepted. Default 16 KiB (a bitmap for a 100 GiB blob). */
  maxMessageBytes?: number;
  /**
   * While this returns true (the device is downloading), DHT provide records wait, up to
   * maxProvideDelayMs; gossip announces a blob at once regardless. Each provide messages every
   * DHT server: ten devices fanning out one image, each providing every blob as it landed, took
   * the CPU the transfers needed just as they started. Default never busy.
   */
  busy?: () => boolean;
  /** Longest a provide record waits for `busy` to end. Default 60 000 ms. */
  maxProvideDelayMs?: number;
  /** Peers this returns false for (devices membership has marked down) are left out. Default all kept. */
  isUsable?: (peer: string) => boolean;
  /**
   * Peers to ask when neither the DHT nor gossip names a holder (e.g. the live members: a DHT
   * record announced before the routing table filled reached nobody). Default none.
   */
  fallbackCandidates?: () => string[];
  log?: MeshLog;
}

/** One availability message: what its signer holds of each blob named. */
interface WireAvailability {
  blobs: {
    blob: string;
    /** 'all', a base64 bitmap, or null for "no longer held". */
    have: string | null;
    chunks?: number;
  }[];
}


/** A holder gossip named: when last heard (performance.now()), and whether of the whole blob. */
interface GossipedHolder {
  at: number;
  whole: boolean;
}

/** The DHT key of a blob: a CIDv1 (raw codec) over its sha256 digest. */
export function blobCid(digest: string): CID {
  if (!digest.startsWith('sha256:')) throw new Error(`only sha256 blobs are announced, not ${digest}`);
  return CID.createV1(raw.code, createDigest(SHA256_CODE, Buffer.from(digest.slice(7), 'hex')));
}

/**
 * Who holds what, over the mesh: a DHT provider record per whole blob (never per chunk: each
 * provide messages every DHT server), and gossiped availability for partial blobs, so a device
 * serves chunks while it is still downloading. Announcements are gossiped too, so transfers
 * under way learn of a new whole holder at once.
 */
export class MeshProviderDirectory extends TypedEventEmitter<ProviderDirectoryEvents> implements ProviderDirectory {
  readonly #host: MeshHost;
  readonly #options: Required<Omit<MeshProviderDirectoryOptions, 'isUsable' | 'fallbackCandidates' | 'busy'>> &
    Pick<MeshProviderDirectoryOptions, 'isUsable' | 'fallbackCandidates' | 'busy'>;
  /** blob -> peer -> what gossip last said of it. */
  readonly #gossiped = new Map<string, Map<string, GossipedHolder>>();
  /** Partial blobs whose bitmap grew since this device last said so, with the bitmap. */
  readonly #pendingPartial = new Map<string, ChunkBitmap>();
  /** Blobs announced whose provide record has not gone out yet; a withdrawal takes a blob out. */
  readonly #toProvide = new Set<string>();
  /** Partial blobs this device has said it holds some of (until it announces or withdraws them). */
  readonly #saidPartial = new Set<string>();
  #lastPartialAt = -Infinity;
  #partialTimer: NodeJS.Timeout | undefined;
  #node: MeshNode | undefined;
  #sweptAt = performance.now();
  /** Messages decoded by the validator, so the message handler does not parse them again. */
  readonly #decoded = new WeakMap<Message, AvailabilityUpdate[]>();

  constructor(host: MeshHost, options: MeshProviderDirectoryOptions = {}) {
    super();
    this.#host = host;
    this.#options = {
      topic: AVAILABILITY_TOPIC,
      partialIntervalMs: 1_000,
      findTimeoutMs: 2_000,
      graceMs: 100,
      maxProviders: 32,
      partialTtlMs: 60_000,
      maxMessageBytes: 16 * 1024,
      maxProvideDelayMs: 60_000,
      log: silentLog,
      ...withoutUndefined(options),
    };
  }

  start(): void {
    if (this.#node) return;
    const node = (this.#node = this.#host.node);
    node.services.pubsub.topicValidators.set(this.#options.topic, this.#validate);
    node.services.pubsub.addEventListener('message', this.#onMessage);
    node.services.pubsub.subscribe(this.#options.topic);
  }

  stop(): void {
    const node = this.#node;
    if (!node) return;
    this.#node = undefined;
    clearTimeout(this.#partialTimer);
    this.#partialTimer = undefined;
    this.#pendingPartial.clear();
    this.#saidPartial.clear();
    this.#toProvide.clear();
    node.services.pubsub.removeEventListener('message', this.#onMessage);
    node.services.pubsub.unsubscribe(this.#options.topic);
    node.services.pubsub.topicValidators.delete(this.#options.topic);
  }

  async findHolders(blob: string, signal: AbortSignal, likely?: string[]): Promise<string[]> {
    const node = this.#node;
    if (!node) return [];
    const self = node.peerId.toString();
    const usable = (peer: string) => peer !== self && (this.#options.isUsable?.(peer) ?? true);
    const found = new Set<string>();
    const cutoff = performance.now() - this.#options.partialTtlMs;
    let wholeKnown = false;
    for (const [peer, { at, whole }] of this.#gossiped.get(blob) ?? []) {
      if (at < cutoff) continue;
      found.add(peer);
      wholeKnown ||= whole && usable(peer);
    }
    if (likely) {
      const answer = [...new Set([...found, ...likely])].filter(usable);
      // None usable (the publisher went down): the search below is all there is to go on.
      if (answer.length > 0) return answer;
    }
    // A live device said it holds the whole blob: a source, and the DHT query would only add
    // others. Each query opens a stream to every DHT server and every device looks up every blob:
    // ten devices fanning out an image kept ~80 % of the machine busy at 20 Mbit/s with it, ~65 %
    // without.
    if (!wholeKnown) await this.#queryProviders(node, blob, found, signal);
    if (found.size === 0) for (const peer of this.#options.fallbackCandidates?.() ?? []) found.add(peer);
    return [...found].filter(usable);
  }

  /** Adds the DHT's providers of `blob` to `found`; once one holder is known, waits graceMs more at most. */
  async #queryProviders(node: MeshNode, blob: string, found: Set<string>, signal: AbortSignal): Promise<void> {
    // The query only ends when every DHT server has answered: once a holder is known, give the
    // rest a short grace instead of the whole timeout, so a small blob is not held up by it.
    const enough = new AbortController();
    let grace: NodeJS.Timeout | undefined;
    const someoneKnown = () => {
      grace ??= setTimeout(() => enough.abort(), this.#options.graceMs);
    };
    if (found.size > 0) someoneKnown();
    try {
      let providers = 0;
      const query = AbortSignal.any([signal, enough.signal, AbortSignal.timeout(this.#options.findTimeoutMs)]);
      for await (const provider of node.contentRouting.findProviders(blobCid(blob), { signal: query })) {
        found.add(provider.id.toString());
        someoneKnown();
        if (++providers >= this.#options.maxProviders) break;
      }
    } catch (err) {
      if (signal.aborted) throw err;
      // A timed-out query still yields what it found.
      this.#options.log.debug({ blob, err }, 'provider query ended early');
    } finally {
      clearTimeout(grace);
    }
  }

  /** Gossips that this device holds `blob`, then provides its DHT record once not busy; resolves when that is out. */
  async announce(blob: string): Promise<void> {
    this.#pendingPartial.delete(blob);
    this.#saidPartial.delete(blob);
    this.#toProvide.add(blob);
    await this.#publish([{ blob, have: 'all' }]);
    const { busy, maxProvideDelayMs } = this.#options;
    const until = performance.now() + maxProvideDelayMs;
    while (busy?.() && this.#node && performance.now() < until) await sleep(PROVIDE_POLL_MS, undefined, { ref: false });
    const node = this.#node;
    if (!node || !this.#toProvide.delete(blob)) return;
    await node.contentRouting.provide(blobCid(blob), { signal: AbortSignal.timeout(30_000) });
  }

  async withdraw(blob: string): Promise<void> {
    this.#pendingPartial.delete(blob);
    this.#saidPartial.delete(blob);
    this.#toProvide.delete(blob);
    await this.#publish([{ blob, have: null }]);
    await this.#node?.contentRouting.cancelReprovide(blobCid(blob)).catch(() => {});
  }

  /**
   * Says (at most once a partialIntervalMs, for every blob whose bitmap grew meanwhile) which
   * chunks of `blob` this device holds: a device fetching several layers at once sends one
   * message, not one per layer. The first word on a blob goes at once (with whatever else
   * waits): a new source matters to the others' transfers more than a grown bitmap does.
   */
  announcePartial(blob: string, have: ChunkBitmap): void {
    if (!this.#node) return;
    this.#pendingPartial.set(blob, have);
    if (!this.#saidPartial.has(blob)) {
      this.#saidPartial.add(blob);
      clearTimeout(this.#partialTimer);
      this.#sendPartial();
      return;
    }
    if (this.#partialTimer) return;
    const wait = this.#lastPartialAt + this.#options.partialIntervalMs - performance.now();
    if (wait <= 0) this.#sendPartial();
    else this.#partialTimer = setTimeout(() => this.#sendPartial(), wait);
  }

  #sendPartial(): void {
    this.#partialTimer = undefined;
    this.#lastPartialAt = performance.now();
    const entries = [...this.#pendingPartial].map(([blob, bitmap]) => ({
      blob,
      have: encodeBitmap(bitmap),
      chunks: bitmap.length,
    }));
    this.#pendingPartial.clear();
    // Split so that no message exceeds what receivers accept (a few huge blobs' bitmaps).
    let batch: WireAvailability['blobs'] = [];
    let bytes = 0;
    for (const entry of entries) {
      const size = entry.blob.length + entry.have.length + 64;
      if (batch.length > 0 && (batch.length >= MAX_ENTRIES || bytes + size > this.#options.maxMessageBytes)) {
        void this.#publish(batch);
        batch = [];
        bytes = 0;
      }
      batch.push(entry);
      bytes += size;
    }
    if (batch.length > 0) void this.#publish(batch);
  }

  async #publish(blobs: WireAvailability['blobs']): Promise<void> {
    const node = this.#node;
    if (!node) return;
    try {
      await node.services.pubsub.publish(this.#options.topic, Buffer.from(JSON.stringify({ blobs } satisfies WireAvailability)));
    } catch (err) {
      // No subscribers yet: the DHT record and holding queries still find this device.
      this.#options.log.debug({ blobs: blobs.map((entry) => entry.blob), err }, 'availability not gossiped');
    }
  }

  #validate = (_from: PeerId, message: Message): TopicValidatorResult => {
    const updates = this.#decode(message);
    if (!updates) return TopicValidatorResult.Reject;
    this.#decoded.set(message, updates);
    return TopicValidatorResult.Accept;
  };

  #onMessage = (evt: CustomEvent<Message>): void => {
    if (evt.detail.topic !== this.#options.topic) return;
    const updates = this.#decoded.get(evt.detail) ?? this.#decode(evt.detail);
    if (!updates || updates[0]?.peer === this.#node?.peerId.toString()) return;
    this.#forgetStale();
    for (const update of updates) {
      const peers = this.#gossiped.get(update.blob) ?? new Map<string, GossipedHolder>();
      if (update.have) peers.set(update.peer, { at: performance.now(), whole: update.have === 'all' });
      else peers.delete(update.peer);
      if (peers.size > 0) this.#gossiped.set(update.blob, peers);
      else this.#gossiped.delete(update.blob);
      this.dispatchEvent(new CustomEvent('availability', { detail: update }));
    }
  };

  /** Drops gossiped holders past their TTL (at most once a TTL), so the table stays bounded. */
  #forgetStale(): void {
    const now = performance.now();
    if (now - this.#sweptAt < this.#options.partialTtlMs) return;
    this.#sweptAt = now;
    const cutoff = now - this.#options.partialTtlMs;
    for (const [blob, peers] of this.#gossiped) {
      for (const [peer, { at }] of peers) if (at < cutoff) peers.delete(peer);
      if (peers.size === 0) this.#gossiped.delete(blob);
    }
  }

  /** The updates in a signed, well-formed message; undefined for anything else (one bad entry spoils it). */
  #decode(message: Message): AvailabilityUpdate[] | undefined {
    if (message.type !== 'signed' || message.topic !== this.#options.topic) return undefined;
    if (message.data.byteLength > this.#options.maxMessageBytes) return undefined;
    const peer = message.from.toString();
    try {
      const { blobs } = JSON.parse(Buffer.from(message.data).toString('utf8')) as WireAvailability;
      if (!Array.isArray(blobs) || blobs.length === 0 || blobs.length > MAX_ENTRIES) return undefined;
      const updates: AvailabilityUpdate[] = [];
      for (const wire of blobs) {
        if (typeof wire?.blob !== 'string' || !isDigest(wire.blob) || !wire.blob.startsWith('sha256:')) return undefined;
        let have: Availability | undefined;
        if (wire.have === null) have = undefined;
        else if (wire.have === 'all') have = 'all';
        else if (typeof wire.have === 'string' && Number.isInteger(wire.chunks) && wire.chunks! >= 0) {
          have = new ChunkBitmap(wire.chunks!, Buffer.from(wire.have, 'base64'));
        } else return undefined;
        updates.push({ peer, blob: wire.blob, have });
      }
      return updates;
    } catch {
      return undefined;
    }
  }
}
