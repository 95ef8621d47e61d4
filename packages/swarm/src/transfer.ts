import { Readable } from 'node:stream';
import { shuffle } from '@shoal/mesh';
import { ChunkBitmap, chunkSpan, isCompleteIndex, sendRange, type BlobInfo, type BlobReader, type ChunkIndex, type PartialBlob } from '@shoal/store';
import { NoHolderError, type ChunkOutcome, type Downloader, type FetchOptions } from './downloader.ts';
import type { Availability, AvailabilityUpdate, Holding } from './types.ts';

export type TransferState = 'finding' | 'downloading' | 'verifying' | 'complete' | 'failed';

/** A transfer as /api/transfers and the CLI show it. */
export interface TransferInfo {
  blob: string;
  state: TransferState;
  size: number;
  chunks: number;
  /** Chunks held, including those held before this transfer started (a resume). */
  chunksHeld: number;
  /** Bytes fetched by this transfer, by peer. */
  sources: Record<string, number>;
  /** Peers currently usable as sources. */
  peers: number;
  inFlight: number;
  startedAt: number;
  /** Bytes per second fetched since the start. */
  rate: number;
}

interface PeerState {
  have: Availability;
  /** Pulling the blob through from an upstream when it last answered: its index grows. */
  growing: boolean;
  /** Requests by chunk; a pick (the chunk not known yet) under a negative key of its own. */
  inFlight: Map<number, AbortController>;
  failures: number;
  /** Answered busy: not asked again before this (performance.now()), and the pause after the next busy answer. */
  busyUntil: number;
  busyPauseMs: number;
  /** Running average of its request-to-chunk time, ms; undefined until it sent one. */
  chunkMs: number | undefined;
}

/** Bytes a reader copies from the partial file per step. */
const READ_STEP = 256 * 1024;
/**
 * Endgame duplicates a request only once it is late: older than twice the transfer's typical
 * chunk time, and at least this. Duplicating every outstanding request the moment slots freed up
 * made a device with nine sources fetch the last ~18 chunks of each layer twice.
 */
const ENDGAME_MIN_WAIT_MS = 250;
/** Pauses before a busy holder is asked again: doubled per busy answer in a row, jittered. */
const BUSY_PAUSE_MIN_MS = 100;
const BUSY_PAUSE_MAX_MS = 2_000;
/**
 * How far ahead of a reader a whole holder may pick: a holder that served the blob unevenly
 * before hands out its least-sent chunks first, and the reader should not wait long for its next.
 */
const IN_ORDER_WINDOW = 16;
/** Weight of the newest chunk time in the transfer's running average. */
const CHUNK_TIME_WEIGHT = 0.2;

/** What the picks of one pump read (see Transfer.#pickView). */
interface PickView {
  /** Peers in the transfer holding each chunk. */
  holders: Uint16Array;
  /** Peers holding the whole blob, in the order their shares are numbered. */
  wholeHolders: string[];
}

/** The peers asked for one chunk right now, and since when it has been asked. */
interface AskedChunk {
  peers: Set<string>;
  since: number;
  /** Its bytes are in and being stored: never late. */
  received?: boolean;
}

/** One blob being fetched from the mesh; created by Downloader.fetch. */
export class Transfer {
  readonly blob: string;
  readonly done: Promise<BlobInfo>;
  readonly #downloader: Downloader;
  readonly #settle: PromiseWithResolvers<BlobInfo>;
  readonly #abort = new AbortController();
  readonly #peers = new Map<string, PeerState>();
  /** Chunks asked for right now, oldest first. */
  readonly #asked = new Map<number, AskedChunk>();
  readonly #sources: Record<string, number> = {};
  /** Chunk positions readers are waiting at. */
  readonly #readers = new Map<symbol, number>();
  readonly #checking = new Set<string>();
  readonly #startedAt = Date.now();
  #partial: PartialBlob | undefined;
  #state: TransferState = 'finding';
  #fetched = 0;
  #lastUsable = performance.now();
  #timer: NodeJS.Timeout | undefined;
  #growTimer: NodeJS.Timeout | undefined;
  #refreshing = false;
  #progress = Promise.withResolvers<void>();
  #finishing = false;
  /** Keys of pending picks in PeerState.inFlight: -1, -2, ... */
  #picks = 0;
  /** The chunks each pick not yet named may bring, by its key: not asked of anyone else meanwhile. */
  readonly #unnamedPicks = new Map<number, ChunkBitmap>();
  /** Chunks received and being verified and written. */
  #storing = 0;
  /** Running average of request-to-chunk time, ms; undefined until a chunk arrived. */
  #chunkMs: number | undefined;
  #wakeTimer: NodeJS.Timeout | undefined;
  #wakeDue = 0;

  constructor(blob: string, downloader: Downloader) {
    this.blob = blob;
    this.#downloader = downloader;
    this.#settle = Promise.withResolvers<BlobInfo>();
    this.done = this.#settle.promise;
    // Callers that only stream may never await `done`.
    this.done.catch(() => {});
  }

  get size(): number | undefined {
    return this.#partial?.index.size;
  }

  /** Finds holders and starts fetching; rejects (and fails the transfer) when nobody holds the blob. */
  async begin({ index, lookup, likely }: FetchOptions = {}): Promise<void> {
    const { directory } = this.#downloader.options;
    const signal = lookup ? AbortSignal.any([this.#abort.signal, lookup]) : this.#abort.signal;
    try {
      let holdings: Map<string, Holding>;
      try {
        holdings = await this.#downloader.holdings(this.blob, await directory.findHolders(this.blob, signal, likely), signal);
      } catch (err) {
        // The caller's limit ended the lookup: as far as it can tell, nobody holds the blob.
        throw lookup?.aborted ? new NoHolderError(this.blob, 'none found within the lookup limit') : err;
      }
      const chosen = index ?? this.#downloader.chooseIndex(this.blob, holdings);
      if (!chosen) throw new NoHolderError(this.blob);
      this.#partial = await this.#downloader.options.store.openPartial(chosen);
      await this.#addHolders(holdings);
    } catch (err) {
      this.#fail(err as Error);
      throw err;
    }
    this.#state = 'downloading';
    directory.addEventListener('availability', this.#onAvailability);
    this.#timer = setInterval(() => this.#tick(), this.#downloader.options.rediscoverMs);
    this.#timer.unref();
    this.#growTimer = setInterval(() => this.#refreshGrowing(), this.#downloader.options.growingRefreshMs);
    this.#growTimer.unref();
    this.#pump();
  }

  info(): TransferInfo {
    const elapsed = Math.max(1, Date.now() - this.#startedAt);
    let inFlight = 0;
    for (const p of this.#peers.values()) inFlight += p.inFlight.size;
    return {
      blob: this.blob,
      state: this.#state,
      size: this.size ?? 0,
      chunks: this.#partial?.have.length ?? 0,
      chunksHeld: this.#partial?.have.count ?? 0,
      sources: { ...this.#sources },
      peers: this.#peers.size,
      inFlight,
      startedAt: this.#startedAt,
      rate: Math.round((this.#fetched * 1000) / elapsed),
    };
  }

  /** Ends the transfer with `reason`; verified chunks stay on disk to resume. */
  cancel(reason: Error): void {
    this.#fail(reason);
  }

  /**
   * Bytes [start, end] of the blob as they land, in order: a stream, and a `sendTo` that
   * writes through a few reused buffers (what the gateway uses). Chunks a reader waits for are
   * fetched first. The blob's last byte waits for the whole-blob check, so a client never sees
   * a clean end of bad content.
   */
  read(start: number, end: number): BlobReader {
    const size = this.size!;
    const reader = Symbol('reader');
    const read = (buffer: Buffer, position: number) => this.#readAt(buffer, position, reader);
    const forget = () => this.#readers.delete(reader);
    return {
      info: { digest: this.blob, size },
      get stream() {
        return Readable.from(
          (async function* () {
            try {
              for (let position = start; position <= end; ) {
                const buffer = Buffer.allocUnsafe(Math.min(READ_STEP, end - position + 1));
                const n = await read(buffer, position);
                position += n;
                yield buffer.subarray(0, n);
              }
            } finally {
              forget();
            }
          })(),
          { objectMode: false, highWaterMark: READ_STEP },
        );
      },
      sendTo: (out) => sendRange(read, start, end, out).finally(forget),
    };
  }

  /** Reads landed bytes at `position` into `buffer`, waiting (and asking for them first) until some are there. */
  async #readAt(buffer: Buffer, position: number, reader: symbol): Promise<number> {
    for (;;) {
      if (this.#state === 'complete') {
        const n = await this.#downloader.options.store.readBlobAt(this.blob, buffer, position);
        if (!n) throw new Error(`blob ${this.blob} vanished or ended early after its download`);
        return n;
      }
      if (this.#state === 'failed') await this.done;
      const partial = this.#partial!;
      const chunk = Math.floor(position / partial.index.chunkSize);
      const { offset, length } = chunkSpan(partial.index, chunk);
      const last = Math.min(position + buffer.byteLength - 1, offset + length - 1, partial.index.size - 2);
      const progressed = this.#progress.promise;
      if (partial.have.has(chunk) && last >= position) {
        let n: number;
        try {
          n = await partial.read(buffer.subarray(0, last - position + 1), position);
        } catch (err) {
          // Being committed (so closed) since the check: the store has it once `done` settles.
          if (this.#state === 'downloading') throw err;
          await this.done;
          continue;
        }
        if (n <= 0) throw new Error(`partial blob ${this.blob} is shorter than its chunks`);
        return n;
      }
      this.#readers.set(reader, chunk);
      this.#pump();
      await Promise.race([progressed, this.done.then(() => undefined)]);
    }
  }

  readonly #onAvailability = (evt: CustomEvent<AvailabilityUpdate>): void => {
    const { peer, blob, have } = evt.detail;
    if (blob !== this.blob) return;
    const state = this.#peers.get(peer);
    if (!have) {
      this.#peers.delete(peer);
      return;
    }
    if (state) {
      state.have = have;
      this.#pump();
    } else {
      void this.#check([peer]);
    }
  };

  /** Asks peers not yet in the transfer what they hold, and adds those with our index. */
  async #check(peers: string[]): Promise<void> {
    const fresh = peers.filter((p) => !this.#peers.has(p) && !this.#checking.has(p) && !this.#downloader.isBanned(p));
    if (fresh.length === 0) return;
    for (const p of fresh) this.#checking.add(p);
    try {
      await this.#refresh(fresh);
    } finally {
      for (const p of fresh) this.#checking.delete(p);
    }
  }

  /** Asks `peers` what they hold now, takes in the answers and fills the freed request slots. */
  async #refresh(peers: Iterable<string>): Promise<void> {
    try {
      await this.#addHolders(await this.#downloader.holdings(this.blob, peers, this.#abort.signal, this.#partial?.index));
    } catch (err) {
      this.#fail(err as Error);
      return;
    }
    this.#pump();
  }

  /** Takes holders whose index agrees with ours; a longer index teaches ours the chunks it names. */
  async #addHolders(holdings: Map<string, Holding>): Promise<void> {
    const partial = this.#partial!;
    for (const [peer, holding] of holdings) {
      if (this.#finished || this.#downloader.isBanned(peer)) continue;
      if (!this.#downloader.accepts(this.blob, partial.index, holding.index)) continue;
      if (holding.index.chunks.length > partial.index.chunks.length && !(await partial.learn(holding.index))) continue;
      const growing = holding.growing === true;
      const state = this.#peers.get(peer);
      if (state) Object.assign(state, { have: holding.have, growing });
      else this.#peers.set(peer, { have: holding.have, growing, inFlight: new Map(), failures: 0, busyUntil: 0, busyPauseMs: BUSY_PAUSE_MIN_MS, chunkMs: undefined });
    }
  }

  /**
   * While our index is provisional, asks the holders pulling the blob from an upstream how far
   * they got: only they can name new chunks, and gossip tells of the others' new chunks. With
   * none of them among our holders, every holder is asked.
   */
  #refreshGrowing(): void {
    const partial = this.#partial;
    if (!partial || this.#finished || this.#refreshing || isCompleteIndex(partial.index)) return;
    const growing = [...this.#peers].filter(([, s]) => s.growing).map(([p]) => p);
    this.#refreshing = true;
    void this.#refresh(growing.length > 0 ? growing : [...this.#peers.keys()]).finally(() => (this.#refreshing = false));
  }

  #tick(): void {
    if (this.#finished) return;
    if (this.#peers.size > 0) this.#lastUsable = performance.now();
    else if (performance.now() - this.#lastUsable > this.#downloader.options.stallTimeoutMs) {
      this.#fail(new NoHolderError(this.blob, 'every holder left or failed'));
      return;
    }
    const { directory, rediscoverBelowPeers } = this.#downloader.options;
    if (this.#peers.size < rediscoverBelowPeers) {
      void directory.findHolders(this.blob, this.#abort.signal).then(
        (peers) => this.#check(peers),
        () => {},
      );
    }
    // Partial holders' bitmaps grow; gossip is rate-limited, so ask them again now and then.
    const partialHolders = [...this.#peers].filter(([, s]) => s.have !== 'all').map(([p]) => p);
    if (partialHolders.length > 0) void this.#refresh(partialHolders);
  }

  get #finished(): boolean {
    return this.#finishing || this.#state === 'complete' || this.#state === 'failed';
  }

  /** Fills every peer's free request slots. */
  #pump(): void {
    const partial = this.#partial;
    if (!partial || this.#finished) return;
    if (partial.have.complete && isCompleteIndex(partial.index)) {
      void this.#finish();
      return;
    }
    const { maxInFlightPerPeer, maxStoringChunks } = this.#downloader.options;
    // The quickest holders choose first, so a chunk several hold goes to the one that sends it
    // soonest: a seeder every device asks at once answers in seconds, and asked for chunks the
    // receivers also held it kept the last ones of a fan-out waiting on it while their uplinks
    // idled. Shuffled first, so peers alike (or not yet timed) take turns.
    const expectedMs = (state: PeerState) => state.chunkMs ?? this.#chunkMs ?? 0;
    const peers = shuffle([...this.#peers.entries()]).sort(([, a], [, b]) => expectedMs(a) - expectedMs(b));
    const now = performance.now();
    let view: PickView | undefined;
    let asked = true;
    while (asked) {
      asked = false;
      for (const [peer, state] of peers) {
        if (this.#storing >= maxStoringChunks) return;
        if (state.inFlight.size >= maxInFlightPerPeer || !this.#peers.has(peer)) continue;
        if (state.busyUntil > now) {
          // Armed here, at every pass, not only on the busy answer: a wake set for an earlier
          // pause fired while this one still ran, and with no wake left for it the transfer of a
          // blob only that holder had waited forever.
          this.#pumpIn(state.busyUntil - now);
          continue;
        }
        const chunk = this.#pick(peer, state, (view ??= this.#pickView()));
        if (chunk === undefined) continue;
        this.#request(peer, state, chunk);
        asked = true;
      }
    }
  }

  /**
   * What to ask `peer` for: a chunk a reader waits for; else the rarest chunks, for the peer to
   * pick from (or the one, when only one is rarest); else an endgame duplicate.
   */
  #pick(peer: string, state: PeerState, view: PickView): number | ChunkBitmap | undefined {
    const partial = this.#partial!;
    // Only chunks our index names can be verified, so only those are asked for.
    const named = partial.index.chunks.length;
    const holds = (i: number) => i < named && (state.have === 'all' || state.have.has(i));
    const open = (i: number) => !partial.have.has(i) && !this.#asked.get(i)?.peers.size && holds(i);
    // A reader's chunks go in order unless a swarm is at work: when some source is itself
    // still downloading, devices are streaming this blob at once, all want the same next chunks,
    // and asking for them would make the holder send every chunk to everyone (a central
    // registry again). Rarest-first spreads distinct chunks, which the devices then trade; the
    // blob is whole no later, and clients such as containerd unpack a layer only once it is.
    // With whole holders only, it goes in order: the client's first bytes come after one chunk,
    // not after a random share of the blob, and chunks land in the order the whole-blob hash
    // takes them, so none is read back from disk to be hashed. Each whole holder is asked to
    // pick among the next open chunks of its share: it hands out the first it has not sent, which
    // for a lone client is the next in order, while devices that start pulling together, before
    // gossip tells them of each other, get different chunks rather than each the first ones.
    const { wholeHolders, holders } = view;
    // This whole holder's share of the chunks: index mod the number of whole holders.
    const mine = wholeHolders.indexOf(peer);
    const inShare = (i: number) => i % wholeHolders.length === mine;
    if (wholeHolders.length === this.#peers.size) {
      for (const position of this.#readers.values()) {
        const next: number[] = [];
        for (let i = position; i < partial.have.length && next.length < IN_ORDER_WINDOW; i++) {
          if (inShare(i) && open(i)) next.push(i);
        }
        if (next.length > 0) return next.length === 1 ? next[0] : wanted(next, partial.have.length);
      }
    }
    // A holder of the whole blob picks among the rarest: it alone knows at once which of them it
    // has already sent to someone (gossip tells us a second late), so devices asking one seeder at
    // once get different chunks instead of the same ones. A partial holder is asked for one chunk
    // by index: a pick is only named once its answer arrives, so picks sent to several partial
    // holders at once would often bring the same chunk twice. Chunks only that partial holder has
    // are the exception: nobody else could be asked for them, and a holder pulling the blob
    // through answers such a pick with a chunk it has not sent yet, or busy (see ChunkDataPlane).
    const chunks = partial.have.length;
    let rarest: number[] = [];
    let rarestCount = Infinity;
    for (let i = 0; i < chunks; i++) {
      if (!open(i)) continue;
      const count = holders[i]!;
      if (count < rarestCount) [rarest, rarestCount] = [[i], count];
      else if (count === rarestCount) rarest.push(i);
    }
    const unpicked = (candidates: number[]) => {
      const unnamed = [...this.#unnamedPicks.values()];
      return candidates.filter((i) => !unnamed.some((w) => w.has(i)));
    };
    if (rarest.length > 0 && state.have !== 'all') {
      if (rarestCount > 1) return rarest[Math.floor(Math.random() * rarest.length)];
      const from = unpicked(rarest);
      return from.length > 0 ? wanted(from, chunks) : undefined;
    }
    if (rarest.length > 0) {
      // A pick is only named once its answer comes, so what it may bring is asked of no one
      // else meanwhile, and whole holders asked at once each pick from a share of their own.
      const share = rarest.filter(inShare);
      const from = unpicked(share.length > 0 ? share : rarest);
      return from.length <= 1 ? from[0] : wanted(from, chunks);
    }
    // Endgame: every missing chunk is asked of someone; ask a second peer for the oldest late one.
    const { endgameDuplicates } = this.#downloader.options;
    const late = performance.now() - Math.max(ENDGAME_MIN_WAIT_MS, 2 * (this.#chunkMs ?? 0));
    let nextLate = Infinity;
    for (const [i, asked] of this.#asked) {
      if (partial.have.has(i) || asked.received || !holds(i) || asked.peers.has(peer) || asked.peers.size >= endgameDuplicates) continue;
      if (asked.since <= late) return i;
      nextLate = Math.min(nextLate, asked.since - late);
    }
    if (nextLate < Infinity) this.#pumpIn(nextLate);
    return undefined;
  }

  /**
   * How many peers hold each chunk, and the whole holders: counted once per pump rather than
   * per pick (peers times chunks for each of up to twice as many picks as peers), as neither
   * changes while a pump runs.
   */
  #pickView(): PickView {
    const chunks = this.#partial!.have.length;
    const holders = new Uint16Array(chunks);
    const wholeHolders: string[] = [];
    for (const [peer, state] of this.#peers) {
      if (state.have === 'all') wholeHolders.push(peer);
      else for (let i = 0; i < chunks; i++) if (state.have.has(i)) holders[i]!++;
    }
    if (wholeHolders.length > 0) for (let i = 0; i < chunks; i++) holders[i]! += wholeHolders.length;
    return { holders, wholeHolders: wholeHolders.sort() };
  }

  /**
   * Pumps again in `ms` (or sooner, if already due): when an outstanding request becomes late, or
   * a busy holder may be asked again.
   */
  #pumpIn(ms: number): void {
    const due = performance.now() + ms + 1;
    if (this.#wakeTimer && this.#wakeDue <= due) return;
    clearTimeout(this.#wakeTimer);
    this.#wakeDue = due;
    this.#wakeTimer = setTimeout(() => {
      this.#wakeTimer = undefined;
      this.#pump();
    }, ms + 1);
    this.#wakeTimer.unref();
  }

  #request(peer: string, state: PeerState, ask: number | ChunkBitmap): void {
    const controller = new AbortController();
    const signal = AbortSignal.any([this.#abort.signal, controller.signal]);
    // A pick waits under a key of its own until the peer names its chunk, then counts as asked
    // for it, so that chunk is neither asked of anyone else nor picked again.
    const pickKey = typeof ask === 'number' ? undefined : -++this.#picks;
    let key = pickKey ?? (ask as number);
    let asked: AskedChunk | undefined;
    const started = performance.now();
    const askedFor = (chunk: number): void => {
      if (pickKey !== undefined && this.#unnamedPicks.delete(pickKey)) queueMicrotask(() => this.#pump());
      if (chunk !== key && state.inFlight.has(chunk)) return;
      state.inFlight.delete(key);
      state.inFlight.set((key = chunk), controller);
      asked = this.#asked.get(chunk) ?? { peers: new Set<string>(), since: started };
      asked.peers.add(peer);
      this.#asked.set(chunk, asked);
    };
    state.inFlight.set(key, controller);
    if (pickKey === undefined) askedFor(key);
    else this.#unnamedPicks.set(pickKey, ask as ChunkBitmap);
    let storing = false;
    const received = (): void => {
      // The peer's slot is free for the next request while these bytes are verified and written.
      storing = true;
      this.#storing++;
      state.inFlight.delete(key);
      if (asked) asked.received = true;
      this.#pump();
    };
    this.#downloader.fetchChunk(this.#partial!, peer, ask, signal, askedFor, received).then(
      (result) => {
        if (storing) this.#storing--;
        state.inFlight.delete(key);
        if (pickKey !== undefined) this.#unnamedPicks.delete(pickKey);
        if (asked) {
          asked.peers.delete(peer);
          if (asked.peers.size === 0) this.#asked.delete(key);
        }
        if (result.outcome === 'ok') {
          const ms = performance.now() - started;
          this.#chunkMs = average(this.#chunkMs, ms);
          state.chunkMs = average(state.chunkMs, ms);
        }
        this.#settled(peer, state, result);
      },
      (err: Error) => this.#fail(err),
    );
  }

  #settled(peer: string, state: PeerState, result: ChunkOutcome): void {
    const options = this.#downloader.options;
    switch (result.outcome) {
      case 'ok': {
        const chunk = result.index;
        state.failures = 0;
        state.busyPauseMs = BUSY_PAUSE_MIN_MS;
        const { length } = chunkSpan(this.#partial!.index, chunk);
        this.#sources[peer] = (this.#sources[peer] ?? 0) + length;
        this.#fetched += length;
        // Endgame duplicates of this chunk are no longer needed.
        for (const [other, s] of this.#peers) if (other !== peer) s.inFlight.get(chunk)?.abort();
        options.directory.announcePartial(this.blob, this.#partial!.have);
        this.#notify();
        break;
      }
      case 'busy': {
        // Not a failure: it is sending what it can. Others are asked meanwhile.
        const pause = state.busyPauseMs * (0.75 + Math.random() / 2);
        state.busyUntil = performance.now() + pause;
        state.busyPauseMs = Math.min(BUSY_PAUSE_MAX_MS, 2 * state.busyPauseMs);
        break;
      }
      case 'missing':
        // It no longer holds what it claimed: leave it out until it says otherwise.
        this.#peers.delete(peer);
        break;
      case 'bad':
        this.#peers.delete(peer);
        for (const controller of state.inFlight.values()) controller.abort();
        this.#downloader.ban(peer, this.blob, result.index);
        break;
      case 'failed':
        if (++state.failures >= options.maxPeerFailures) this.#peers.delete(peer);
        break;
      case 'aborted':
        break;
    }
    this.#pump();
  }

  async #finish(): Promise<void> {
    if (this.#finished) return;
    this.#finishing = true;
    this.#state = 'verifying';
    this.#stopTimers();
    try {
      const info = await this.#partial!.commit();
      this.#state = 'complete';
      this.#notify();
      // The store's commit event has the blob announced (see MeshPublisher), as for any other.
      this.#settle.resolve(info);
    } catch (err) {
      this.#finishing = false;
      this.#fail(err as Error);
    }
  }

  #fail(err: Error): void {
    if (this.#state === 'complete' || this.#state === 'failed') return;
    this.#state = 'failed';
    this.#stopTimers();
    this.#abort.abort(err);
    void this.#partial?.close();
    this.#settle.reject(err);
    this.#notify();
  }

  #stopTimers(): void {
    clearInterval(this.#timer);
    clearInterval(this.#growTimer);
    clearTimeout(this.#wakeTimer);
    this.#downloader.options.directory.removeEventListener('availability', this.#onAvailability);
  }

  #notify(): void {
    const current = this.#progress;
    this.#progress = Promise.withResolvers<void>();
    current.resolve();
  }
}

/** A pick's bitmap: `chunks` set, in a blob of `length` chunks. */
function wanted(chunks: number[], length: number): ChunkBitmap {
  const want = new ChunkBitmap(length);
  for (const i of chunks) want.set(i);
  return want;
}

/** A running average of chunk times with `ms` taken in. */
function average(current: number | undefined, ms: number): number {
  return current === undefined ? ms : current + CHUNK_TIME_WEIGHT * (ms - current);
}
