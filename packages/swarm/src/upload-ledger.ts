import type { ChunkBitmap } from '@shoal/store';
import type { Availability } from './types.ts';

/** Blobs whose send counts are kept; the one served least recently is forgotten first. */
const MAX_BLOBS = 64;

/**
 * How many times this device has sent each chunk of each blob, so that a holder asked to choose
 * (a `pick` request) hands out the chunk it has sent least. Only the holder knows at once what it
 * has sent: receivers learn of each other's chunks through gossip, a second or so late, and left
 * to choose for themselves they keep asking a seeder for chunks another receiver got moments
 * before, so the seeder's uplink carries the image several times over (BitTorrent's
 * super-seeding answers the same problem from the seeder's side).
 */
export class UploadLedger {
  /** Sparse: a chunk never sent has no entry. */
  readonly #sent = new Map<string, number[]>();

  /** Counts one send of chunk `index` of `blob`. */
  record(blob: string, index: number): void {
    const counts = this.#counts(blob);
    counts[index] = (counts[index] ?? 0) + 1;
  }

  /**
   * The chunk in `want` that this device holds (`have`) and has sent least, ties broken at
   * random, counted as sent; undefined when it holds none of them.
   */
  pick(blob: string, want: ChunkBitmap, have: Availability): number | undefined {
    const counts = this.#counts(blob);
    let best: number | undefined;
    let bestCount = Infinity;
    let ties = 0;
    for (let i = 0; i < want.length; i++) {
      if (!want.has(i) || (have !== 'all' && !have.has(i))) continue;
      const count = counts[i] ?? 0;
      if (count < bestCount) {
        [best, bestCount, ties] = [i, count, 1];
      } else if (count === bestCount && Math.random() * ++ties < 1) {
        // Reservoir sampling: every tied chunk is equally likely, so receivers asking at once get different ones.
        best = i;
      }
    }
    if (best !== undefined) counts[best] = bestCount + 1;
    return best;
  }

  #counts(blob: string): number[] {
    const counts = this.#sent.get(blob) ?? [];
    this.#sent.delete(blob);
    this.#sent.set(blob, counts);
    if (this.#sent.size > MAX_BLOBS) this.#sent.delete(this.#sent.keys().next().value!);
    return counts;
  }
}
