import { createHash, type Hash } from 'node:crypto';
import { sha256Of } from '@shoal/oci';
import type { ChunkIndex } from './types.ts';

/** 1 MiB: small enough to spread a layer over many peers, large enough to keep framing cheap. */
export const DEFAULT_CHUNK_SIZE = 1024 * 1024;

export const CHUNK_INDEX_MEDIA_TYPE = 'application/vnd.shoal.chunk-index.v1+json';

/** Hashes a byte stream chunk by chunk as it passes, so no second read is needed. */
export class ChunkHasher {
  readonly chunkSize: number;
  #chunks: string[] = [];
  #current: Hash = createHash('sha256');
  #filled = 0;

  constructor(chunkSize = DEFAULT_CHUNK_SIZE) {
    this.chunkSize = chunkSize;
  }

  update(data: Uint8Array): void {
    let offset = 0;
    while (offset < data.byteLength) {
      const take = Math.min(this.chunkSize - this.#filled, data.byteLength - offset);
      this.#current.update(data.subarray(offset, offset + take));
      this.#filled += take;
      offset += take;
      if (this.#filled === this.chunkSize) {
        this.#chunks.push(this.#current.digest('hex'));
        this.#current = createHash('sha256');
        this.#filled = 0;
      }
    }
  }

  copy(): ChunkHasher {
    const c = new ChunkHasher(this.chunkSize);
    c.#chunks = [...this.#chunks];
    c.#current = this.#current.copy();
    c.#filled = this.#filled;
    return c;
  }

  /** Hashes of the chunks completed so far (the last, partial chunk excluded). */
  completed(): string[] {
    return [...this.#chunks];
  }

  finish(blob: string, size: number): ChunkIndex {
    const chunks = [...this.#chunks];
    if (this.#filled > 0) chunks.push(this.#current.copy().digest('hex'));
    return { blob, size, chunkSize: this.chunkSize, chunks };
  }
}

/** How many chunks a blob of the index's size has. */
export function chunkCount(index: Pick<ChunkIndex, 'size' | 'chunkSize'>): number {
  return Math.ceil(index.size / index.chunkSize);
}

/**
 * Whether the index names every chunk. A provisional index (of a blob still arriving at its
 * holder from an upstream) names only the first chunks, and grows.
 */
export function isCompleteIndex(index: ChunkIndex): boolean {
  return index.chunks.length === chunkCount(index);
}

/**
 * Two indexes of one blob agree when their geometry matches and the chunks both name are the
 * same: a provisional index may name fewer, never other, chunks.
 */
export function indexesAgree(a: ChunkIndex, b: ChunkIndex): boolean {
  if (a.blob !== b.blob || a.size !== b.size || a.chunkSize !== b.chunkSize) return false;
  const common = Math.min(a.chunks.length, b.chunks.length);
  for (let i = 0; i < common; i++) if (a.chunks[i] !== b.chunks[i]) return false;
  return true;
}

/** Canonical bytes of a chunk index: fixed key order, no whitespace, so its digest is stable. */
export function encodeChunkIndex(index: ChunkIndex): Buffer {
  return Buffer.from(
    JSON.stringify({
      mediaType: CHUNK_INDEX_MEDIA_TYPE,
      blob: index.blob,
      size: index.size,
      chunkSize: index.chunkSize,
      chunks: index.chunks,
    }),
  );
}

export function chunkIndexDigest(index: ChunkIndex): string {
  return sha256Of(encodeChunkIndex(index));
}

/** Parses canonical chunk index bytes; a provisional index (a prefix of the chunks) only if allowed. */
export function decodeChunkIndex(bytes: Buffer, opts: { provisional?: boolean } = {}): ChunkIndex {
  const doc = JSON.parse(bytes.toString('utf8')) as Record<string, unknown>;
  const { blob, size, chunkSize, chunks } = doc;
  if (
    doc.mediaType !== CHUNK_INDEX_MEDIA_TYPE ||
    typeof blob !== 'string' ||
    typeof size !== 'number' ||
    typeof chunkSize !== 'number' ||
    chunkSize <= 0 ||
    !Array.isArray(chunks) ||
    (opts.provisional ? chunks.length > Math.ceil(size / chunkSize) : chunks.length !== Math.ceil(size / chunkSize)) ||
    !chunks.every((c) => typeof c === 'string' && /^[0-9a-f]{64}$/.test(c))
  ) {
    throw new Error('malformed chunk index');
  }
  return { blob, size, chunkSize, chunks: chunks as string[] };
}
