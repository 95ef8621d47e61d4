import { TypedEventEmitter } from '@libp2p/interface';
import type { ChunkBitmap } from '@shoal/store';
import { ChunkBusyError } from './chunk-protocol.ts';
import type { AvailabilityUpdate, ChunkSource, ChunkTransport, Holding, ProviderDirectory, ProviderDirectoryEvents } from './types.ts';
import { UploadLedger } from './upload-ledger.ts';

/** What a memory peer does when asked for a chunk: serve it, or misbehave (`busy`: answer every chunk request busy). */
export type Fault = 'none' | 'corrupt' | 'fail' | 'stall' | 'busy';

interface MemoryPeer {
  source: ChunkSource;
  fault: Fault;
  /** Delay before each answer, to let requests overlap. */
  delayMs: number;
  /** How long a chunk's bytes take once the peer has started sending it (named it). */
  sendMs: number;
  online: boolean;
  ledger: UploadLedger;
  /** Chunk requests it serves at once; more are answered busy, as ChunkDataPlane does. */
  maxUploads: number;
  uploads: number;
}

/**
 * An in-memory mesh for tests of the downloader: devices are ChunkSources addressed by name,
 * the transport calls them directly, and the directory is one shared table with availability
 * events delivered to every device.
 */
export class MemoryNetwork {
  readonly #peers = new Map<string, MemoryPeer>();
  readonly #providers = new Map<string, Set<string>>();
  readonly #partial = new Map<string, Set<string>>();
  readonly #directories = new Map<string, MemoryDirectory>();
  /** The chunks each peer served, in the order it chose them (for assertions on where bytes came from). */
  readonly served = new Map<string, number[]>();
  /** Chunk requests each peer received, served or not (a duplicate cancelled on its way too). */
  readonly requests = new Map<string, number>();
  /** Holding queries each peer received. */
  readonly holdingQueries = new Map<string, number>();
  readonly #gossipDelayMs: number;

  /** `gossipDelayMs`: availability reaches the other devices this late, as gossip does. Default 0 (at once). */
  constructor(options: { gossipDelayMs?: number } = {}) {
    this.#gossipDelayMs = options.gossipDelayMs ?? 0;
  }

  /**
   * `maxUploads`: chunk requests served at once, more are answered busy. Default no limit.
   * `sendMs`: how long a chunk's bytes take after the peer starts sending it. Default 0.
   */
  add(peer: string, source: ChunkSource, opts: { fault?: Fault; delayMs?: number; sendMs?: number; maxUploads?: number } = {}): void {
    this.#peers.set(peer, {
      source,
      fault: opts.fault ?? 'none',
      delayMs: opts.delayMs ?? 0,
      sendMs: opts.sendMs ?? 0,
      online: true,
      ledger: new UploadLedger(),
      maxUploads: opts.maxUploads ?? Infinity,
      uploads: 0,
    });
  }

  setFault(peer: string, fault: Fault): void {
    this.#peers.get(peer)!.fault = fault;
  }

  /** Takes a peer off the network: its requests fail and its records stay (stale, as in a real DHT). */
  kill(peer: string): void {
    this.#peers.get(peer)!.online = false;
  }

  directory(self: string): ProviderDirectory {
    let directory = this.#directories.get(self);
    if (!directory) {
      directory = new MemoryDirectory(self, this.#providers, this.#partial, (update) => {
        const deliver = (): void => {
          for (const [name, d] of this.#directories) if (name !== self) d.dispatchEvent(new CustomEvent('availability', { detail: update }));
        };
        if (this.#gossipDelayMs > 0) setTimeout(deliver, this.#gossipDelayMs);
        else deliver();
      });
      this.#directories.set(self, directory);
    }
    return directory;
  }

  transport(): ChunkTransport {
    const countRequest = (name: string): void => void this.requests.set(name, (this.requests.get(name) ?? 0) + 1);
    const call = async <T>(name: string, signal: AbortSignal, fn: (p: MemoryPeer) => Promise<T>): Promise<T> => {
      const peer = this.#peers.get(name);
      if (!peer || !peer.online) throw new Error(`${name} is unreachable`);
      if (peer.fault === 'fail') throw new Error(`${name} failed`);
      if (peer.fault === 'stall') await aborted(signal);
      if (peer.delayMs > 0) await delay(peer.delayMs, signal);
      signal.throwIfAborted();
      return fn(peer);
    };
    /** A chunk request: holds one of the peer's upload slots, or is answered busy. */
    const upload = async <T>(name: string, signal: AbortSignal, fn: (p: MemoryPeer) => Promise<T>): Promise<T> => {
      countRequest(name);
      const peer = this.#peers.get(name);
      if (!peer) return call(name, signal, fn);
      if (peer.online && (peer.fault === 'busy' || peer.uploads >= peer.maxUploads)) throw new ChunkBusyError(`${name} is sending all it sends at once`);
      peer.uploads++;
      try {
        return await call(name, signal, fn);
      } finally {
        peer.uploads--;
      }
    };
    const serve = async (name: string, p: MemoryPeer, blob: string, index: number): Promise<Uint8Array | undefined> => {
      // Logged when the peer commits to the chunk (as its ledger counts it), not when the read
      // completes: reads finish out of order.
      const log = this.served.get(name) ?? [];
      this.served.set(name, log);
      log.push(index);
      const bytes = await p.source.readChunk(blob, index);
      if (!bytes) {
        log.splice(log.lastIndexOf(index), 1);
        return undefined;
      }
      if (p.fault !== 'corrupt') return bytes;
      const bad = Uint8Array.from(bytes);
      bad[0] = bad[0]! ^ 0xff;
      return bad;
    };
    /** The bytes of a chunk the peer has started sending, once they are all there. */
    const sending = async (p: MemoryPeer, bytes: Uint8Array, signal: AbortSignal): Promise<Uint8Array> => {
      if (p.sendMs > 0) await delay(p.sendMs, signal);
      return bytes;
    };
    return {
      fetchHolding: (name, blob, signal) => {
        this.holdingQueries.set(name, (this.holdingQueries.get(name) ?? 0) + 1);
        return call<Holding | undefined>(name, signal, (p) => p.source.holding(blob));
      },
      fetchChunk: (name, blob, index, signal, onStarted) =>
        upload(name, signal, async (p) => {
          p.ledger.record(blob, index);
          const bytes = await serve(name, p, blob, index);
          if (!bytes) return undefined;
          onStarted?.();
          return sending(p, bytes, signal);
        }),
      pickChunk: (name, blob, want, signal, onPicked) =>
        upload(name, signal, async (p) => {
          const holding = await p.source.holding(blob);
          const index = holding && p.ledger.pickFrom(blob, want, holding);
          if (index === 'busy') throw new ChunkBusyError(`${name} has sent every chunk it holds of what it pulls through`);
          if (index === undefined) return undefined;
          onPicked?.(index);
          const bytes = await serve(name, p, blob, index);
          return bytes && { index, bytes: await sending(p, bytes, signal) };
        }),
    };
  }
}

class MemoryDirectory extends TypedEventEmitter<ProviderDirectoryEvents> implements ProviderDirectory {
  readonly #self: string;
  readonly #providers: Map<string, Set<string>>;
  readonly #gossip: (update: AvailabilityUpdate) => void;
  readonly #partial: Map<string, Set<string>>;

  constructor(
    self: string,
    providers: Map<string, Set<string>>,
    partial: Map<string, Set<string>>,
    gossip: (update: AvailabilityUpdate) => void,
  ) {
    super();
    this.#self = self;
    this.#providers = providers;
    this.#partial = partial;
    this.#gossip = gossip;
  }

  async findHolders(blob: string, _signal?: AbortSignal, likely: string[] = []): Promise<string[]> {
    const all = new Set([...(this.#providers.get(blob) ?? []), ...(this.#partial.get(blob) ?? []), ...likely]);
    all.delete(this.#self);
    return [...all];
  }

  async announce(blob: string): Promise<void> {
    const set = this.#providers.get(blob) ?? new Set();
    set.add(this.#self);
    this.#providers.set(blob, set);
    this.#gossip({ peer: this.#self, blob, have: 'all' });
  }

  async withdraw(blob: string): Promise<void> {
    this.#providers.get(blob)?.delete(this.#self);
    this.#partial.get(blob)?.delete(this.#self);
    this.#gossip({ peer: this.#self, blob, have: undefined });
  }

  announcePartial(blob: string, have: ChunkBitmap): void {
    const set = this.#partial.get(blob) ?? new Set();
    set.add(this.#self);
    this.#partial.set(blob, set);
    this.#gossip({ peer: this.#self, blob, have: have.clone() });
  }
}

function delay(ms: number, signal: AbortSignal): Promise<void> {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(resolve, ms);
    signal.addEventListener('abort', () => (clearTimeout(timer), reject(signal.reason)), { once: true });
  });
}

function aborted(signal: AbortSignal): Promise<never> {
  return new Promise((_, reject) => signal.addEventListener('abort', () => reject(signal.reason), { once: true }));
}
