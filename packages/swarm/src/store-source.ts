import { ChunkBitmap, chunkCount, chunkSpan, type ChunkIndex, type ContentStore, type GrowingBlob } from '@shoal/store';
import type { ChunkSource, Holding } from './types.ts';

/** Chunk indexes kept in memory, so serving a chunk does not re-read the index file. */
const INDEX_CACHE = 64;

export interface StoreChunkSourceOptions {
  /** Blobs arriving from an upstream right now (MirroringRegistry.pulling), shared as they land. Default none. */
  growing?: (blob: string) => GrowingBlob | undefined;
}

/**
 * Serves what this device holds: committed blobs whole, the verified chunks of open partial
 * blobs, and the landed chunks of blobs being pulled through from an upstream.
 */
export class StoreChunkSource implements ChunkSource {
  readonly #store: ContentStore;
  readonly #growing: StoreChunkSourceOptions['growing'];
  readonly #indexes = new Map<string, ChunkIndex>();

  constructor(store: ContentStore, options: StoreChunkSourceOptions = {}) {
    this.#store = store;
    this.#growing = options.growing;
  }

  async holding(blob: string): Promise<Holding | undefined> {
    const partial = await this.#store.openedPartial(blob);
    if (partial) return { index: partial.index, have: partial.have.clone() };
    const index = await this.#committedIndex(blob);
    if (index) return { index, have: 'all' };
    const growing = this.#growing?.(blob);
    if (!growing) return undefined;
    const provisional = await growing.index().catch(() => undefined);
    if (!provisional) return undefined;
    const have = new ChunkBitmap(chunkCount(provisional));
    for (let i = 0; i < provisional.chunks.length; i++) have.set(i);
    return { index: provisional, have };
  }

  async readChunk(blob: string, i: number): Promise<Uint8Array | undefined> {
    const partial = await this.#store.openedPartial(blob);
    if (partial) {
      const bytes = await partial.readChunk(i).catch(() => undefined);
      if (bytes) return bytes;
    }
    const index = await this.#committedIndex(blob);
    if (index) return this.#readCommitted(blob, index, i);
    const growing = this.#growing?.(blob);
    if (!growing) return undefined;
    const provisional = await growing.index().catch(() => undefined);
    if (!provisional || i < 0 || i >= provisional.chunks.length) return undefined;
    const { offset, length } = chunkSpan(provisional, i);
    const out = Buffer.allocUnsafe(length);
    let filled = 0;
    while (filled < length) {
      const n = await growing.read(out.subarray(filled), offset + filled).catch(() => 0);
      if (n <= 0) return undefined;
      filled += n;
    }
    return out;
  }

  async #readCommitted(blob: string, index: ChunkIndex, i: number): Promise<Uint8Array | undefined> {
    if (i < 0 || i >= index.chunks.length) return undefined;
    const { offset, length } = chunkSpan(index, i);
    const reader = await this.#store.readBlob(blob, { start: offset, end: offset + length - 1 });
    if (!reader) return undefined;
    const out = Buffer.allocUnsafe(length);
    let filled = 0;
    for await (const piece of reader.stream as AsyncIterable<Buffer>) {
      if (filled + piece.byteLength > length) break;
      piece.copy(out, filled);
      filled += piece.byteLength;
    }
    if (filled !== length) throw new Error(`blob ${blob} is shorter than its chunk index`);
    return out;
  }

  /** The index of a committed blob (cached), or undefined when the store lacks it. */
  async #committedIndex(blob: string): Promise<ChunkIndex | undefined> {
    const cached = this.#indexes.get(blob);
    if (cached) {
      if (await this.#store.statBlob(blob)) return cached;
      this.#indexes.delete(blob);
      return undefined;
    }
    const index = await this.#store.chunkIndex(blob);
    if (!index) return undefined;
    if (this.#indexes.size >= INDEX_CACHE) this.#indexes.delete(this.#indexes.keys().next().value!);
    this.#indexes.set(blob, index);
    return index;
  }
}
