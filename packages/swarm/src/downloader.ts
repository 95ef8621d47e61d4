import { TypedEventEmitter } from '@libp2p/interface';
import { silentLog, withoutUndefined } from '@shoal/mesh';
import {
  ChunkMismatchError,
  chunkIndexDigest,
  indexesAgree,
  isCompleteIndex,
  type ChunkBitmap,
  type ChunkIndex,
  type ContentStore,
  type PartialBlob,
} from '@shoal/store';
import { ChunkBusyError } from './chunk-protocol.ts';
import { Transfer, type TransferInfo } from './transfer.ts';
import type { ChunkTransport, Holding, ProviderDirectory } from './types.ts';

export interface DownloaderOptions {
  store: ContentStore;
  transport: ChunkTransport;
  directory: ProviderDirectory;
  /**
   * The chunk-index digest a signed tag record vouches for, if any. With it, only holders with
   * that exact index are used; without it, the index most holders agree on is used and the
   * whole-blob digest check is the guard.
   */
  trustedIndexDigest?: (blob: string) => string | undefined;
  /**
   * Chunk requests in flight to one peer. Two keep a LAN link busy; more only queue at a
   * holder many devices ask at once, until its answers pass chunkTimeoutMs. Default 2.
   */
  maxInFlightPerPeer?: number;
  /**
   * Chunks received but not yet verified and written. A request's slot frees as soon as its bytes
   * are in, so the next request crosses the network while the last is hashed and written; with
   * this many waiting, no new request goes out until one is stored. Default 4.
   */
  maxStoringChunks?: number;
  /**
   * A chunk the holder has not started sending within this time is asked of another holder.
   * Once it has started (a pick named its chunk, or the answer's header is in), only a stall of
   * the transport ends the request. Default 10 000 ms.
   */
  chunkTimeoutMs?: number;
  /** Limit for asking one peer what it holds. Default 3 000 ms. */
  holdingTimeoutMs?: number;
  /** A transfer with no usable holder for this long fails (its chunks stay on disk). Default 30 000 ms. */
  stallTimeoutMs?: number;
  /**
   * How often a running transfer looks up holders (DHT, gossip, members) and asks partial holders
   * what they hold now. Availability gossip tells it of new holders and new chunks in between; a
   * DHT query per transfer every few seconds on every device cost more CPU than the chunks.
   * Default 10 000 ms.
   */
  rediscoverMs?: number;
  /**
   * The periodic lookup of holders runs only while a transfer has fewer usable peers than this;
   * with more, availability gossip is how it learns of new holders (a device announces a blob it
   * starts or completes at once). Ten devices fanning out one image made ~3 DHT streams a second
   * each, most of them these lookups. Default 3.
   */
  rediscoverBelowPeers?: number;
  /**
   * While only a provisional index is known (every holder is still pulling the blob from an
   * upstream), how often holders are asked how far they got. Default 250 ms.
   */
  growingRefreshMs?: number;
  /** A peer that sent a chunk that failed verification is not asked again for this long. Default 600 000 ms. */
  banMs?: number;
  /** Consecutive failures (errors, timeouts) after which a peer leaves a transfer. Default 3. */
  maxPeerFailures?: number;
  /** In endgame, how many peers may be asked for the same chunk. Default 2. */
  endgameDuplicates?: number;
  log?: { debug(obj: object, msg: string): void; warn(obj: object, msg: string): void };
}

export interface PeerBanned {
  peer: string;
  blob: string;
  chunk: number;
  until: number;
}

export interface DownloaderEvents {
  /** Holders were found and chunks are being fetched. */
  'transfer:start': CustomEvent<TransferInfo>;
  'transfer:complete': CustomEvent<TransferInfo>;
  'transfer:failed': CustomEvent<TransferInfo & { error: string }>;
  /** A verified chunk landed. */
  chunk: CustomEvent<{ blob: string; peer: string; index: number; bytes: number }>;
  'peer:banned': CustomEvent<PeerBanned>;
}

/** How a transfer that fetch() starts looks for holders; a transfer under way is joined as it is. */
export interface FetchOptions {
  /** The blob's chunk index (a resumed partial blob): holders are not asked for theirs. */
  index?: ChunkIndex;
  /** Ends the search for holders: the transfer then fails with NoHolderError. */
  lookup?: AbortSignal;
  /** Peers likely to hold the blob: asked, with those gossip names, instead of searching the mesh. */
  likely?: string[];
}

/** Running totals since the downloader started, read by the node's metrics. */
export interface DownloaderStats {
  /** Chunks that matched their hash and were written. */
  chunksVerified: number;
  bytesVerified: number;
  /** Chunks that failed verification (each bans its sender). */
  chunksRejected: number;
  /** Chunk requests a holder answered busy (sending all it sends at once): asked again later. */
  requestsBusy: number;
  peersBanned: number;
  transfersCompleted: number;
  /** Failed transfers, including blobs no device in the mesh held. */
  transfersFailed: number;
}

/** What became of one chunk request; `index` is the chunk that arrived (a pick's choice). */
export type ChunkOutcome = { outcome: 'ok' | 'bad'; index: number } | { outcome: 'missing' | 'busy' | 'failed' | 'aborted' };

/** Nobody in the mesh holds the blob (or nobody answered). */
export class NoHolderError extends Error {
  override name = 'NoHolderError';
  constructor(blob: string, detail = 'no device in the mesh holds it') {
    super(`cannot fetch ${blob}: ${detail}`);
  }
}

type Resolved = Required<Omit<DownloaderOptions, 'trustedIndexDigest' | 'log'>> & Pick<DownloaderOptions, 'trustedIndexDigest'> & {
  log: NonNullable<DownloaderOptions['log']>;
};


/**
 * Fetches blobs chunk by chunk from every holder at once: rarest chunk first (random among
 * equals, so devices pulling together spread out), a bounded number of requests per peer,
 * endgame duplicates for the last chunks, re-requests when a peer fails or stalls, and a ban
 * for a peer whose chunk fails verification. One transfer per blob, shared by all callers.
 */
export class Downloader extends TypedEventEmitter<DownloaderEvents> {
  readonly options: Resolved;
  readonly #transfers = new Map<string, Transfer>();
  readonly #banned = new Map<string, number>();
  readonly #stats: DownloaderStats = {
    chunksVerified: 0,
    bytesVerified: 0,
    chunksRejected: 0,
    requestsBusy: 0,
    peersBanned: 0,
    transfersCompleted: 0,
    transfersFailed: 0,
  };
  #stopped = false;

  constructor(options: DownloaderOptions) {
    super();
    const given = withoutUndefined(options);
    this.options = {
      maxInFlightPerPeer: 2,
      maxStoringChunks: 4,
      chunkTimeoutMs: 10_000,
      holdingTimeoutMs: 3_000,
      stallTimeoutMs: 30_000,
      rediscoverMs: 10_000,
      rediscoverBelowPeers: 3,
      growingRefreshMs: 250,
      banMs: 600_000,
      maxPeerFailures: 3,
      endgameDuplicates: 2,
      ...given,
      log: given.log ?? silentLog,
    };
  }

  /**
   * The transfer of `blob`, joined if under way, else started (see FetchOptions). It rejects
   * with NoHolderError when no device holds the blob.
   */
  async fetch(blob: string, options: FetchOptions = {}): Promise<Transfer> {
    if (this.#stopped) throw new Error('downloader is stopped');
    const running = this.#transfers.get(blob);
    if (running) return running;
    const transfer = new Transfer(blob, this);
    this.#transfers.set(blob, transfer);
    transfer.done.then(
      () => this.#ended(transfer),
      (err: Error) => this.#ended(transfer, err),
    );
    await transfer.begin(options);
    this.dispatchEvent(new CustomEvent('transfer:start', { detail: transfer.info() }));
    return transfer;
  }

  get stats(): Readonly<DownloaderStats> {
    return { ...this.#stats };
  }

  /** The transfer of `blob` if one is running. */
  get(blob: string): Transfer | undefined {
    return this.#transfers.get(blob);
  }

  list(): TransferInfo[] {
    return [...this.#transfers.values()].map((t) => t.info());
  }

  /** Stops every transfer; their verified chunks stay on disk to resume. */
  async stop(): Promise<void> {
    this.#stopped = true;
    const running = [...this.#transfers.values()];
    for (const t of running) t.cancel(new Error('downloader is stopping'));
    await Promise.allSettled(running.map((t) => t.done));
  }

  isBanned(peer: string): boolean {
    const until = this.#banned.get(peer);
    if (until === undefined) return false;
    if (until > Date.now()) return true;
    this.#banned.delete(peer);
    return false;
  }

  /** Called by a transfer when `peer` sent a chunk that failed verification. */
  ban(peer: string, blob: string, chunk: number): void {
    if (this.isBanned(peer)) return;
    const until = Date.now() + this.options.banMs;
    this.#banned.set(peer, until);
    this.#stats.peersBanned++;
    this.options.log.warn({ peer, blob, chunk }, 'peer sent a chunk that failed verification: banned');
    this.dispatchEvent(new CustomEvent('peer:banned', { detail: { peer, blob, chunk, until } }));
  }

  /**
   * Picks the index to work from: the vouched-for one, else the complete one most holders
   * report, else (every holder is still pulling it from an upstream) the longest provisional
   * one, which grows as the transfer asks again.
   */
  chooseIndex(blob: string, holdings: Map<string, Holding>): ChunkIndex | undefined {
    const trusted = this.options.trustedIndexDigest?.(blob);
    const votes = new Map<string, { index: ChunkIndex; count: number }>();
    let provisional: ChunkIndex | undefined;
    for (const { index } of holdings.values()) {
      if (!isCompleteIndex(index)) {
        if (!provisional || index.chunks.length > provisional.chunks.length) provisional = index;
        continue;
      }
      const digest = chunkIndexDigest(index);
      if (trusted !== undefined && digest !== trusted) continue;
      const vote = votes.get(digest) ?? { index, count: 0 };
      vote.count++;
      votes.set(digest, vote);
    }
    return [...votes.values()].sort((a, b) => b.count - a.count)[0]?.index ?? provisional;
  }

  /** Whether a holder's index may serve a transfer working from `ours`. */
  accepts(blob: string, ours: ChunkIndex, theirs: ChunkIndex): boolean {
    // While ours is provisional, a complete index may only replace it if it is the vouched-for one.
    if (!isCompleteIndex(ours) && isCompleteIndex(theirs)) {
      const trusted = this.options.trustedIndexDigest?.(blob);
      if (trusted !== undefined && chunkIndexDigest(theirs) !== trusted) return false;
    }
    return indexesAgree(ours, theirs);
  }

  /** Asks `peers` concurrently what they hold of `blob` (telling them the index `known` so far); failures and non-holders are left out. */
  async holdings(blob: string, peers: Iterable<string>, signal: AbortSignal, known?: ChunkIndex): Promise<Map<string, Holding>> {
    const out = new Map<string, Holding>();
    await Promise.all(
      [...peers].map(async (peer) => {
        if (this.isBanned(peer)) return;
        try {
          const holding = await this.options.transport.fetchHolding(
            peer,
            blob,
            AbortSignal.any([signal, AbortSignal.timeout(this.options.holdingTimeoutMs)]),
            known,
          );
          if (holding && holding.index.blob === blob) out.set(peer, holding);
        } catch (err) {
          this.options.log.debug({ peer, blob, err }, 'holding query failed');
        }
      }),
    );
    return out;
  }

  /**
   * Fetches one chunk from `peer` (chunk `ask`, or the peer's pick among the chunks set in `ask`,
   * which `onPicked` hears of as soon as the peer names it) and writes it; what happened, and to
   * which chunk, for the transfer to act on. `onReceived` hears when the bytes are in and only
   * verifying and writing them remain.
   */
  async fetchChunk(
    partial: PartialBlob,
    peer: string,
    ask: number | ChunkBitmap,
    signal: AbortSignal,
    onPicked?: (index: number) => void,
    onReceived?: () => void,
  ): Promise<ChunkOutcome> {
    const { transport, chunkTimeoutMs } = this.options;
    const deadline = new AbortController();
    const timer = setTimeout(() => deadline.abort(new DOMException(`no answer within ${chunkTimeoutMs} ms`, 'TimeoutError')), chunkTimeoutMs);
    const limited = AbortSignal.any([signal, deadline.signal]);
    // Once the holder starts sending, only a stall (the transport's limit) ends the request: a
    // busy seeder's chunks, sent a share of its uplink at a time, were dropped half sent at the
    // limit, which wasted the uplink every device waits on; at 10 Mbit/s the chunks receivers
    // trade by index, sharing a downlink eight ways, were too (up to 36 MB of a 50 MB image
    // received and thrown away by one device). A chunk that is merely slow is asked of a second
    // holder in the endgame.
    const started = (): void => clearTimeout(timer);
    const named = (index: number): void => {
      started();
      onPicked?.(index);
    };
    let fetched: { index: number; bytes: Uint8Array } | undefined;
    try {
      fetched =
        typeof ask === 'number'
          ? await transport.fetchChunk(peer, partial.digest, ask, limited, started).then((bytes) => bytes && { index: ask, bytes })
          : await transport.pickChunk(peer, partial.digest, ask, limited, named);
    } catch (err) {
      if (signal.aborted) return { outcome: 'aborted' };
      if (err instanceof ChunkBusyError) {
        this.#stats.requestsBusy++;
        return { outcome: 'busy' };
      }
      this.options.log.debug({ peer, blob: partial.digest, chunk: ask, err }, 'chunk request failed');
      return { outcome: 'failed' };
    } finally {
      clearTimeout(timer);
    }
    if (!fetched) return { outcome: 'missing' };
    onReceived?.();
    const { index, bytes } = fetched;
    const length = bytes.byteLength;
    try {
      if (partial.have.has(index)) return { outcome: 'ok', index };
      await partial.writeChunk(index, bytes);
    } catch (err) {
      if (!(err instanceof ChunkMismatchError)) throw err;
      this.#stats.chunksRejected++;
      return { outcome: 'bad', index };
    } finally {
      transport.release?.(bytes);
    }
    this.#stats.chunksVerified++;
    this.#stats.bytesVerified += length;
    this.dispatchEvent(new CustomEvent('chunk', { detail: { blob: partial.digest, peer, index, bytes: length } }));
    return { outcome: 'ok', index };
  }

  #ended(transfer: Transfer, err?: Error): void {
    if (this.#transfers.get(transfer.blob) === transfer) this.#transfers.delete(transfer.blob);
    if (err) {
      this.#stats.transfersFailed++;
      this.dispatchEvent(new CustomEvent('transfer:failed', { detail: { ...transfer.info(), error: err.message } }));
    } else {
      this.#stats.transfersCompleted++;
      this.dispatchEvent(new CustomEvent('transfer:complete', { detail: transfer.info() }));
    }
  }
}

