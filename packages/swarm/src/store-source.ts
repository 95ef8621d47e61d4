import { ChunkBitmap, chunkCount, chunkSpan, type ChunkIndex, type ContentStore, type GrowingBlob } from '@shoal/store';
import type { ChunkSource, Holding } from './types.ts';

/** Chunk indexes kept in memory, so serving a chunk does not re-read the index file. */
const INDEX_CACHE = 64;
/**
 * How long a committed blob's presence, once checked, answers holding queries. Checked on every
 * request (three stats per chunk), it cost a seeder ~0.27 CPU s/GB on its event loop, a quarter
 * of all it spent sending; a blob deleted meanwhile is still noticed within this time, and a
 * chunk read finds it gone at once.
 */
const PRESENCE_RECHECK_MS = 1_000;

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
  readonly #indexes = new Map<string, { index: ChunkIndex; checkedAt: number }>();

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
    return { index: provisional, have, growing: true };
  }

  async readChunk(blob: string, i: number, into?: Uint8Array): Promise<Uint8Array | undefined> {
    const partial = await this.#store.openedPartial(blob);
    // Closed by a commit since it was looked up: the committed blob serves it below.
    const fromPartial = await partial?.readChunk(i, into).catch(() => undefined);
    if (fromPartial) return fromPartial;
    // Reading is the check here: a deleted blob fails to open.
    const index = await this.#committedIndex(blob, Infinity);
    if (index) {
      if (i < 0 || i >= index.chunks.length) return undefined;
      const { offset, length } = chunkSpan(index, i);
      const out = target(length, into);
      const read = await this.#store.readBlobAt(blob, out, offset);
      if (read !== undefined) {
        if (read !== length) throw new Error(`blob ${blob} is shorter than its chunk index`);
        return out;
      }
      this.#indexes.delete(blob);
    }
    const growing = this.#growing?.(blob);
    if (!growing) return undefined;
    const provisional = await growing.index().catch(() => undefined);
    if (!provisional || i < 0 || i >= provisional.chunks.length) return undefined;
    const { offset, length } = chunkSpan(provisional, i);
    const out = target(length, into);
    return (await fill(out, offset, (b, p) => growing.read(b, p))) ? out : undefined;
  }

  /**
   * The index of a committed blob (cached), or undefined when the store lacks it. A cached one
   * is taken without asking the store again while its last check is younger than `recheckMs`.
   */
  async #committedIndex(blob: string, recheckMs = PRESENCE_RECHECK_MS): Promise<ChunkIndex | undefined> {
    const cached = this.#indexes.get(blob);
    const now = performance.now();
    if (cached) {
      if (now - cached.checkedAt < recheckMs) return cached.index;
      if (await this.#store.statBlob(blob)) {
        cached.checkedAt = now;
        return cached.index;
      }
      this.#indexes.delete(blob);
      return undefined;
    }
    const index = await this.#store.chunkIndex(blob);
    if (!index) return undefined;
    if (this.#indexes.size >= INDEX_CACHE) this.#indexes.delete(this.#indexes.keys().next().value!);
    this.#indexes.set(blob, { index, checkedAt: now });
    return index;
  }
}

/** `length` bytes: a view of `into` when it is big enough, else a new buffer. */
function target(length: number, into?: Uint8Array): Uint8Array {
  return into && into.byteLength >= length ? into.subarray(0, length) : Buffer.allocUnsafe(length);
}

/** Fills `out` from `read` at `offset`; false when the bytes are not (all) there. */
async function fill(out: Uint8Array, offset: number, read: (buffer: Uint8Array, position: number) => Promise<number>): Promise<boolean> {
  let filled = 0;
  while (filled < out.byteLength) {
    const n = await read(out.subarray(filled), offset + filled).catch(() => 0);
    if (n <= 0) return false;
    filled += n;
  }
  return true;
}
