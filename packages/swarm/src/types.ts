import type { TypedEventTarget } from '@libp2p/interface';
import type { ChunkBitmap, ChunkIndex } from '@shoal/store';

/** What one device holds of a blob: all of it, or the chunks set in a bitmap. */
export type Availability = 'all' | ChunkBitmap;

/** What a device answers about a blob it holds whole or in part. */
export interface Holding {
  /** The blob's chunk index as the holder computed (or was given) it. */
  index: ChunkIndex;
  have: Availability;
  /** Being pulled through from an upstream by this device: nobody else can have chunks it has not sent. */
  growing?: boolean;
}

/**
 * What the chunk server serves from: committed blobs and the verified chunks of partial ones.
 * Only verified bytes are ever handed out.
 */
export interface ChunkSource {
  /** The chunk index and availability of `blob`, or undefined when this device holds none of it. */
  holding(blob: string): Promise<Holding | undefined>;
  /**
   * The bytes of chunk `index` of `blob`, or undefined when this device does not hold that
   * chunk. Given `into` (at least a chunk long), the bytes are read into it and a view of it is
   * returned, so a server can serve from reused buffers.
   */
  readChunk(blob: string, index: number, into?: Uint8Array): Promise<Uint8Array | undefined>;
}

/**
 * Fetches from one peer (the chunk transport). Peers are peer id strings. A peer that does not
 * hold what is asked answers undefined; a peer sending all the chunks it sends at once rejects
 * with ChunkBusyError; a peer that fails, stalls past `signal` or breaks the protocol rejects.
 */
export interface ChunkTransport {
  /**
   * What `peer` holds of `blob`. `known` (the asker's index of it) lets the peer leave out the
   * entries it already has; the answer's index is whole either way.
   */
  fetchHolding(peer: string, blob: string, signal: AbortSignal, known?: ChunkIndex): Promise<Holding | undefined>;
  /** Chunk `index`; `onStarted` hears when the peer starts sending it (its answer's header is in). */
  fetchChunk(peer: string, blob: string, index: number, signal: AbortSignal, onStarted?: () => void): Promise<Uint8Array | undefined>;
  /**
   * A chunk that `peer` chooses among those set in `want`: the one it has sent least, so that
   * receivers asking one holder at once get different chunks. Undefined when it holds none.
   * `onPicked` hears which chunk it is as soon as the answer names it, before its bytes arrive.
   */
  pickChunk(
    peer: string,
    blob: string,
    want: ChunkBitmap,
    signal: AbortSignal,
    onPicked?: (index: number) => void,
  ): Promise<{ index: number; bytes: Uint8Array } | undefined>;
  /** Hands back a buffer fetchChunk returned, once its bytes are written, for reuse. */
  release?(bytes: Uint8Array): void;
}

/** A peer's availability of a blob changed (gossiped); `have` undefined means it no longer holds it. */
export interface AvailabilityUpdate {
  peer: string;
  blob: string;
  have: Availability | undefined;
}

export interface ProviderDirectoryEvents {
  availability: CustomEvent<AvailabilityUpdate>;
}

/** Who holds what: DHT provider records for whole blobs, gossip for partial ones. */
export interface ProviderDirectory extends TypedEventTarget<ProviderDirectoryEvents> {
  /**
   * Peers believed to hold `blob` whole or in part; may be stale, the transport has the last word.
   * With `likely` (such as the publisher of a signed record naming it), the answer is those and
   * the holders gossip has named, without the costlier search (a DHT query, asking members),
   * unless none of them is usable (down, or this device).
   */
  findHolders(blob: string, signal: AbortSignal, likely?: string[]): Promise<string[]>;
  /** This device now holds `blob` whole. */
  announce(blob: string): Promise<void>;
  /** This device no longer holds `blob`. */
  withdraw(blob: string): Promise<void>;
  /** This device holds part of `blob` (called as chunks land; implementations rate-limit). */
  announcePartial(blob: string, have: ChunkBitmap): void;
}

/** What a holding answer hands a peer so it can fetch chunks over the HTTP data plane. */
export interface DataPlaneTicket {
  port: number;
  /** Bearer token for this peer alone; it expires, and a later holding answer renews it. */
  ticket: string;
}
