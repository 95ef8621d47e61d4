import { TopicValidatorResult, type Message } from '@libp2p/gossipsub';
import { TypedEventEmitter, type PeerId } from '@libp2p/interface';
import type { MeshHost, MeshLog, MeshNode } from '@shoal/mesh';
import { isDigest } from '@shoal/oci';
import { ChunkBitmap } from '@shoal/store';
import { CID } from 'multiformats/cid';
import * as raw from 'multiformats/codecs/raw';
import { create as createDigest } from 'multiformats/hashes/digest';
import type { Availability, AvailabilityUpdate, ProviderDirectory, ProviderDirectoryEvents } from './types.ts';

export const AVAILABILITY_TOPIC = '/shoal/availability/1';
const SHA256_CODE = 0x12;

export interface MeshProviderDirectoryOptions {
  /** Gossipsub topic for availability. Default `/shoal/availability/1`. */
  topic?: string;
  /** Least time between two partial-availability messages for one blob; each reaches every device, so not more often. Default 1 000 ms. */
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
  /** Peers this returns false for (devices membership has marked down) are left out. Default all kept. */
  isUsable?: (peer: string) => boolean;
  /**
   * Peers to ask when neither the DHT nor gossip names a holder (e.g. the live members: a DHT
   * record announced before the routing table filled reached nobody). Default none.
   */
  fallbackCandidates?: () => string[];
  log?: MeshLog;
}

interface WireAvailability {
  blob: string;
  /** 'all', a base64 bitmap, or null for "no longer held". */
  have: string | null;
  chunks?: number;
}

const silentLog: MeshLog = { debug() {}, warn() {} };

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
  readonly #options: Required<Omit<MeshProviderDirectoryOptions, 'isUsable' | 'fallbackCandidates'>> &
    Pick<MeshProviderDirectoryOptions, 'isUsable' | 'fallbackCandidates'>;
  /** blob -> peer -> when last heard (performance.now()). */
  readonly #gossiped = new Map<string, Map<string, number>>();
  readonly #lastPartial = new Map<string, { at: number; timer?: NodeJS.Timeout; have?: ChunkBitmap }>();
  #node: MeshNode | undefined;
  #sweptAt = performance.now();

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
      log: silentLog,
      ...Object.fromEntries(Object.entries(options).filter(([, v]) => v !== undefined)),
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
    for (const state of this.#lastPartial.values()) clearTimeout(state.timer);
    node.services.pubsub.removeEventListener('message', this.#onMessage);
    node.services.pubsub.unsubscribe(this.#options.topic);
    node.services.pubsub.topicValidators.delete(this.#options.topic);
  }

  async findHolders(blob: string, signal: AbortSignal): Promise<string[]> {
    const node = this.#node;
    if (!node) return [];
    const self = node.peerId.toString();
    const found = new Set<string>();
    const cutoff = performance.now() - this.#options.partialTtlMs;
    for (const [peer, at] of this.#gossiped.get(blob) ?? []) if (at >= cutoff) found.add(peer);
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
    if (found.size === 0) for (const peer of this.#options.fallbackCandidates?.() ?? []) found.add(peer);
    found.delete(self);
    const usable = this.#options.isUsable;
    return [...found].filter((peer) => !usable || usable(peer));
  }

  async announce(blob: string): Promise<void> {
    this.#forgetPartial(blob);
    await this.#publish({ blob, have: 'all' });
    await this.#node?.contentRouting.provide(blobCid(blob), { signal: AbortSignal.timeout(30_000) });
  }

  async withdraw(blob: string): Promise<void> {
    this.#forgetPartial(blob);
    await this.#publish({ blob, have: null });
    await this.#node?.contentRouting.cancelReprovide(blobCid(blob)).catch(() => {});
  }

  announcePartial(blob: string, have: ChunkBitmap): void {
    const state = this.#lastPartial.get(blob) ?? { at: -Infinity };
    this.#lastPartial.set(blob, state);
    state.have = have;
    if (state.timer) return;
    const wait = state.at + this.#options.partialIntervalMs - performance.now();
    const send = () => {
      state.timer = undefined;
      state.at = performance.now();
      const bitmap = state.have;
      if (!bitmap || this.#lastPartial.get(blob) !== state) return;
      void this.#publish({ blob, have: Buffer.from(bitmap.toBytes()).toString('base64'), chunks: bitmap.length });
    };
    if (wait <= 0) send();
    else state.timer = setTimeout(send, wait);
  }

  #forgetPartial(blob: string): void {
    clearTimeout(this.#lastPartial.get(blob)?.timer);
    this.#lastPartial.delete(blob);
  }

  async #publish(message: WireAvailability): Promise<void> {
    const node = this.#node;
    if (!node) return;
    try {
      await node.services.pubsub.publish(this.#options.topic, Buffer.from(JSON.stringify(message)));
    } catch (err) {
      // No subscribers yet: the DHT record and holding queries still find this device.
      this.#options.log.debug({ blob: message.blob, err }, 'availability not gossiped');
    }
  }

  #validate = (_from: PeerId, message: Message): TopicValidatorResult =>
    this.#decode(message) ? TopicValidatorResult.Accept : TopicValidatorResult.Reject;

  #onMessage = (evt: CustomEvent<Message>): void => {
    if (evt.detail.topic !== this.#options.topic) return;
    const update = this.#decode(evt.detail);
    if (!update || update.peer === this.#node?.peerId.toString()) return;
    this.#forgetStale();
    const peers = this.#gossiped.get(update.blob) ?? new Map<string, number>();
    if (update.have) peers.set(update.peer, performance.now());
    else peers.delete(update.peer);
    if (peers.size > 0) this.#gossiped.set(update.blob, peers);
    else this.#gossiped.delete(update.blob);
    this.dispatchEvent(new CustomEvent('availability', { detail: update }));
  };

  /** Drops gossiped holders past their TTL (at most once a TTL), so the table stays bounded. */
  #forgetStale(): void {
    const now = performance.now();
    if (now - this.#sweptAt < this.#options.partialTtlMs) return;
    this.#sweptAt = now;
    const cutoff = now - this.#options.partialTtlMs;
    for (const [blob, peers] of this.#gossiped) {
      for (const [peer, at] of peers) if (at < cutoff) peers.delete(peer);
      if (peers.size === 0) this.#gossiped.delete(blob);
    }
  }

  /** The update in a signed, well-formed message; undefined for anything else. */
  #decode(message: Message): AvailabilityUpdate | undefined {
    if (message.type !== 'signed' || message.topic !== this.#options.topic) return undefined;
    if (message.data.byteLength > this.#options.maxMessageBytes) return undefined;
    try {
      const wire = JSON.parse(Buffer.from(message.data).toString('utf8')) as WireAvailability;
      if (typeof wire.blob !== 'string' || !isDigest(wire.blob) || !wire.blob.startsWith('sha256:')) return undefined;
      let have: Availability | undefined;
      if (wire.have === null) have = undefined;
      else if (wire.have === 'all') have = 'all';
      else if (typeof wire.have === 'string' && Number.isInteger(wire.chunks) && wire.chunks! >= 0) {
        have = new ChunkBitmap(wire.chunks!, Buffer.from(wire.have, 'base64'));
      } else return undefined;
      return { peer: message.from.toString(), blob: wire.blob, have };
    } catch {
      return undefined;
    }
  }
}
