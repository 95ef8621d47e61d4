import type { ChunkBitmap } from '@shoal/store';
import type { Availability, Holding } from './types.ts';

/** Blobs whose send counts are kept; the one served least recently is forgotten first. */
const MAX_BLOBS = 64;

/**
 * How many times this device has sent each chunk of each blob, so that a holder asked to choose
 * (a `pick` request) hands out the chunk it has sent least, and serves first the requests that
 * bring the swarm chunks it has never sent. Only the holder knows at once what it has sent:
 * receivers learn of each other's chunks through gossip, a second or so late, and left to choose
 * for themselves they keep asking a seeder for chunks another receiver got moments before, so
 * the seeder's uplink carries the image several times over (BitTorrent's super-seeding answers
 * the same problem from the seeder's side).
 */
export class UploadLedger {
  /** Sparse: a chunk never sent has no entry. */
  readonly #sent = new Map<string, number[]>();

  /** Counts one send of chunk `index` of `blob`. */
  record(blob: string, index: number): void {
    const counts = this.#counts(blob);
    counts[index] = (counts[index] ?? 0) + 1;
  }

  /** Takes back one counted send of chunk `index` of `blob` that never reached its requester. */
  unrecord(blob: string, index: number): void {
    const counts = this.#sent.get(blob);
    if (counts?.[index]) counts[index]--;
  }

  /**
   * The chunk in `want` that this device holds (`have`) and has sent least, the first of those
   * in blob order, counted as sent; undefined when it holds none of them.
   */
  pick(blob: string, want: ChunkBitmap, have: Availability): number | undefined {
    const counts = this.#counts(blob);
    const { best, fewest } = leastSent(counts, want, have);
    if (best !== undefined) counts[best] = fewest + 1;
    return best;
  }

  /**
   * A pick from what `holding` holds, as pick(); but of a blob this device is pulling through it
   * sends each chunk only once while it pulls (whoever got a chunk passes it on, and this uplink
   * is kept for the chunks only this device has): 'busy' when every wanted chunk it holds has
   * gone out already. At the start of a cold pull every device wanted the first chunk, and a
   * seeder with free upload slots sent it to all of them.
   */
  pickFrom(blob: string, want: ChunkBitmap, holding: Holding): number | 'busy' | undefined {
    if (holding.growing && (this.sends(blob, want, holding.have) ?? 0) > 0) return 'busy';
    return this.pick(blob, want, holding.have);
  }

  /**
   * How many times this device has sent what a request would get: chunk `want`, or the least
   * sent chunk of the set `want` it holds; undefined when it holds none of them.
   */
  sends(blob: string, want: number | ChunkBitmap, have: Availability): number | undefined {
    const counts = this.#counts(blob);
    if (typeof want === 'number') return counts[want] ?? 0;
    const { best, fewest } = leastSent(counts, want, have);
    return best === undefined ? undefined : fewest;
  }

  #counts(blob: string): number[] {
    const counts = this.#sent.get(blob) ?? [];
    this.#sent.delete(blob);
    this.#sent.set(blob, counts);
    if (this.#sent.size > MAX_BLOBS) this.#sent.delete(this.#sent.keys().next().value!);
    return counts;
  }
}

/**
 * The held chunk of `want` sent fewest times, the first of them in blob order, and that number.
 * In order, so that a client streaming the blob gets its next bytes first; devices asking at once
 * still get different chunks, as each pick counts as a send before the next is answered.
 */
function leastSent(counts: number[], want: ChunkBitmap, have: Availability): { best: number | undefined; fewest: number } {
  let best: number | undefined;
  let fewest = Infinity;
  for (let i = 0; i < want.length && fewest > 0; i++) {
    if (!want.has(i) || (have !== 'all' && !have.has(i))) continue;
    const count = counts[i] ?? 0;
    if (count < fewest) [best, fewest] = [i, count];
  }
  return { best, fewest };
}
