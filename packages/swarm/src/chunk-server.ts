import { TypedEventEmitter, type Connection, type Stream, type StreamCloseEvent, type StreamMessageEvent } from '@libp2p/interface';
import { silentLog, withoutUndefined, type MeshHost, type MeshLog } from '@shoal/mesh';
import { chunkCount } from '@shoal/store';
import { pEvent } from 'p-event';
import {
  CHUNK_PROTOCOL,
  ChunkProtocolError,
  ChunkStallError,
  chunkLength,
  corrupted,
  decodeBitmap,
  decodeRequest,
  encodeFrame,
  errorHeader,
  FrameReader,
  holdingHeader,
  MAX_CHUNK_BYTES,
  MAX_HEADER_FRAME_BYTES,
  MAX_REQUEST_FRAME_BYTES,
  pieces,
  sendBytes,
  StallTimer,
  type ChunkRequest,
} from './chunk-protocol.ts';
import type { ChunkDataPlane } from './data-plane.ts';
import type { ChunkSource } from './types.ts';
import { UploadLedger } from './upload-ledger.ts';

export interface ChunkServerOptions {
  /** Default `/shoal/chunks/1.0.0`. */
  protocol?: string;
  /**
   * Chunk and range uploads served at once to one peer. Further requests from that peer wait in
   * a per-peer FIFO queue (no `busy` answer): the requester's own deadline decides when to try
   * elsewhere, and a queued request whose stream closes leaves the queue. Default 4.
   */
  uploadSlotsPerPeer?: number;
  /** Open streams of this protocol per connection, queued ones included. Default 64. */
  maxInboundStreams?: number;
  /**
   * A stream on which nothing moves for this long is reset: the request not arriving, a send
   * waiting for the requester to read, the requester not closing its side after the answer.
   * Time spent waiting for an upload slot or on the source does not count. Default 10 000 ms.
   */
  requestTimeoutMs?: number;
  /** Default silent. */
  log?: MeshLog;
  /**
   * The HTTP data plane: holding answers then carry a ticket for it, and peers fetch chunks
   * there instead of over this protocol. Default none.
   */
  dataPlane?: ChunkDataPlane;
  /**
   * What this device has sent, for `pick` requests; share one with the data plane so both paths
   * count. Default a ledger of its own.
   */
  ledger?: UploadLedger;
  /**
   * TEST ONLY: flip a byte in served chunk payloads (all of them, or those the predicate picks),
   * to play a malicious or broken peer. Default false.
   */
  corrupt?: boolean | ((blob: string, index: number) => boolean);
}

export interface UploadEvent {
  /** Peer id of the requester. */
  peer: string;
  blob: string;
  index: number;
  bytes: number;
}

export interface ChunkServerEvents {
  /** A chunk was handed in full to the connection (`range` answers do not emit it). */
  upload: CustomEvent<UploadEvent>;
}

type ResolvedOptions = Required<Omit<ChunkServerOptions, 'corrupt' | 'dataPlane'>> &
  Pick<ChunkServerOptions, 'dataPlane'> & { corrupt: (blob: string, index: number) => boolean };


/**
 * Serves `/shoal/chunks/1.0.0` from a ChunkSource: one request per stream, answered with a header
 * frame and, for chunks and ranges, the raw bytes. A bad request costs only its own stream.
 */
export class ChunkServer extends TypedEventEmitter<ChunkServerEvents> {
  readonly #host: MeshHost;
  readonly #source: ChunkSource;
  readonly #options: ResolvedOptions;
  readonly #streams = new Set<Stream>();
  #slots: PeerSlots;
  #running = false;
  #bytesServed = 0;
  #chunksServed = 0;
  #rangesServed = 0;

  constructor(host: MeshHost, source: ChunkSource, options: ChunkServerOptions = {}) {
    super();
    this.#host = host;
    this.#source = source;
    const { corrupt, ...rest } = options;
    this.#options = {
      protocol: CHUNK_PROTOCOL,
      uploadSlotsPerPeer: 4,
      maxInboundStreams: 64,
      requestTimeoutMs: 10_000,
      log: silentLog,
      ledger: new UploadLedger(),
      ...withoutUndefined(rest),
      corrupt: typeof corrupt === 'function' ? corrupt : () => corrupt === true,
    };
    const { uploadSlotsPerPeer, maxInboundStreams, requestTimeoutMs } = this.#options;
    for (const [name, value] of Object.entries({ uploadSlotsPerPeer, maxInboundStreams, requestTimeoutMs })) {
      if (!Number.isInteger(value) || value < 1) throw new RangeError(`${name} must be a positive integer, got ${value}`);
    }
    this.#slots = new PeerSlots(uploadSlotsPerPeer);
  }

  /** Payload bytes of chunks and ranges handed in full to connections. */
  get bytesServed(): number {
    return this.#bytesServed;
  }

  get chunksServed(): number {
    return this.#chunksServed;
  }

  get rangesServed(): number {
    return this.#rangesServed;
  }

  async start(): Promise<void> {
    if (this.#running) return;
    await this.#host.node.handle(this.#options.protocol, this.#onStream, { maxInboundStreams: this.#options.maxInboundStreams });
    this.#running = true;
  }

  /** Stops taking requests and resets the streams in progress. */
  async stop(): Promise<void> {
    if (!this.#running) return;
    this.#running = false;
    try {
      await this.#host.node.unhandle(this.#options.protocol);
    } catch {
      // The host was stopped first: nothing is handled any more anyway.
    }
    const stopped = new Error('chunk server stopped');
    for (const stream of this.#streams) stream.abort(stopped);
    this.#streams.clear();
  }

  #onStream = async (stream: Stream, connection: Connection): Promise<void> => {
    const peer = connection.remotePeer.toString();
    if (!this.#running) {
      stream.abort(new Error('chunk server stopped'));
      return;
    }
    this.#streams.add(stream);
    const stall = new StallTimer(this.#options.requestTimeoutMs, () => stream.abort(new ChunkStallError('chunk request stalled')));
    let request: ChunkRequest | undefined;
    try {
      request = await readRequest(stream, stall);
      await this.#answer(peer, request, stream, stall);
      // The stream is done once the requester's half-close arrives; the stall timer resets a
      // requester that never sends it, so it cannot pin one of maxInboundStreams.
      if (stream.status === 'open') {
        stall.touch();
        await pEvent(stream, 'close');
      }
    } catch (err) {
      stream.abort(err as Error);
      this.#options.log.debug({ peer, request, err }, 'chunk request failed');
    } finally {
      stall.pause();
      this.#streams.delete(stream);
    }
  };

  async #answer(peer: string, request: ChunkRequest, stream: Stream, stall: StallTimer): Promise<void> {
    switch (request.op) {
      case 'holding':
        return this.#answerHolding(peer, request.blob, request.from, stream, stall);
      case 'chunk':
        return this.#withSlot(peer, stream, stall, () => {
          this.#options.ledger.record(request.blob, request.index);
          return this.#answerChunk(peer, request.blob, request.index, stream, stall);
        });
      case 'pick':
        return this.#withSlot(peer, stream, stall, () => this.#answerPick(peer, request, stream, stall));
      case 'range':
        return this.#withSlot(peer, stream, stall, () => this.#answerRange(request, stream, stall));
    }
  }

  async #answerHolding(peer: string, blob: string, from: number | undefined, stream: Stream, stall: StallTimer): Promise<void> {
    const holding = await this.#fromSource(stall, 'holding', blob, () => this.#source.holding(blob));
    if (holding === failed) return this.#sendHeader(stream, stall, errorHeader('holding unavailable'));
    if (!holding) return this.#sendHeader(stream, stall, { status: 'not-found' });
    const { index, have } = holding;
    if (have !== 'all' && have.length !== chunkCount(index)) {
      this.#options.log.warn({ blob, bitmap: have.length, chunks: chunkCount(index) }, 'chunk source bitmap does not match its index');
      return this.#sendHeader(stream, stall, errorHeader('inconsistent holding'));
    }
    const header = encodeFrame(holdingHeader(holding, this.#options.dataPlane?.ticketFor(peer), from));
    if (header.byteLength > MAX_HEADER_FRAME_BYTES) {
      this.#options.log.warn({ blob, bytes: header.byteLength }, 'chunk index too large for a holding answer');
      return this.#sendHeader(stream, stall, errorHeader('chunk index too large'));
    }
    await sendBytes(stream, header, () => stall.touch());
    await this.#close(stream, stall);
  }

  /** The holder's choice among the wanted chunks; a bitmap of the wrong size breaks the protocol. */
  async #answerPick(peer: string, request: Extract<ChunkRequest, { op: 'pick' }>, stream: Stream, stall: StallTimer): Promise<void> {
    const { blob } = request;
    const holding = await this.#fromSource(stall, 'holding', blob, () => this.#source.holding(blob));
    if (holding === failed) return this.#sendHeader(stream, stall, errorHeader('holding unavailable'));
    if (!holding) return this.#sendHeader(stream, stall, { status: 'not-found' });
    const want = decodeBitmap(request.want, chunkCount(holding.index), 'pick request');
    const index = this.#options.ledger.pick(blob, want, holding.have);
    if (index === undefined) return this.#sendHeader(stream, stall, { status: 'not-found' });
    return this.#answerChunk(peer, blob, index, stream, stall, { index });
  }

  /** Sends chunk `index`; `named` goes into the header (a pick answer says which chunk it is). */
  async #answerChunk(peer: string, blob: string, index: number, stream: Stream, stall: StallTimer, named: { index?: number } = {}): Promise<void> {
    const data = await this.#fromSource(stall, 'chunk', blob, () => this.#source.readChunk(blob, index));
    if (data === failed) return this.#sendHeader(stream, stall, errorHeader('chunk unavailable'));
    if (!data) return this.#sendHeader(stream, stall, { status: 'not-found' });
    if (data.byteLength === 0 || data.byteLength > MAX_CHUNK_BYTES) {
      this.#options.log.warn({ blob, index, bytes: data.byteLength }, 'chunk source gave a chunk of impossible size');
      return this.#sendHeader(stream, stall, errorHeader('chunk unavailable'));
    }
    const payload = this.#options.corrupt(blob, index) ? corrupted(data) : data;
    await sendBytes(stream, encodeFrame({ status: 'ok', ...named, length: payload.byteLength }), () => stall.touch());
    await sendBytes(stream, payload, () => stall.touch());
    await this.#close(stream, stall);
    this.#bytesServed += payload.byteLength;
    this.#chunksServed++;
    this.safeDispatchEvent('upload', { detail: { peer, blob, index, bytes: payload.byteLength } });
  }

  /** A range is cut from the chunks that cover it, read one at a time as they are sent. */
  async #answerRange(request: Extract<ChunkRequest, { op: 'range' }>, stream: Stream, stall: StallTimer): Promise<void> {
    const { blob, offset, length } = request;
    const holding = await this.#fromSource(stall, 'holding', blob, () => this.#source.holding(blob));
    if (holding === failed) return this.#sendHeader(stream, stall, errorHeader('holding unavailable'));
    if (!holding) return this.#sendHeader(stream, stall, { status: 'not-found' });
    const { index, have } = holding;
    if (offset + length > index.size) return this.#sendHeader(stream, stall, errorHeader(`range ends past the blob's ${index.size} bytes`));
    const first = Math.floor(offset / index.chunkSize);
    const last = length === 0 ? first - 1 : Math.floor((offset + length - 1) / index.chunkSize);
    for (let i = first; i <= last; i++) {
      if (have !== 'all' && !have.has(i)) return this.#sendHeader(stream, stall, { status: 'not-found' });
    }
    await sendBytes(stream, encodeFrame({ status: 'ok', length }), () => stall.touch());
    for (let i = first; i <= last; i++) {
      // The header is out: a chunk missing now can only be reported by resetting the stream.
      const data = await this.#fromSource(stall, 'chunk', blob, () => this.#source.readChunk(blob, i));
      if (data === failed || !data || data.byteLength !== chunkLength(index, i)) {
        throw new Error(`chunk ${i} of ${blob} unreadable while serving a range`);
      }
      const start = Math.max(offset - i * index.chunkSize, 0);
      const end = Math.min(offset + length - i * index.chunkSize, data.byteLength);
      const slice = data.subarray(start, end);
      await sendBytes(stream, this.#options.corrupt(blob, i) ? corrupted(slice) : slice, () => stall.touch());
    }
    await this.#close(stream, stall);
    this.#bytesServed += length;
    this.#rangesServed++;
  }

  /** Runs `serve` holding one of the peer's upload slots; queue time is not a stall. */
  async #withSlot(peer: string, stream: Stream, stall: StallTimer, serve: () => Promise<void>): Promise<void> {
    stall.pause();
    const release = await this.#slots.acquire(peer, stream);
    try {
      stall.touch();
      await serve();
    } finally {
      release();
    }
  }

  /** Calls the source with the stall timer paused; a throw is logged and returns `failed`. */
  async #fromSource<T>(stall: StallTimer, what: string, blob: string, call: () => Promise<T>): Promise<T | typeof failed> {
    stall.pause();
    try {
      return await call();
    } catch (err) {
      this.#options.log.warn({ blob, err }, `chunk source failed to give ${what}`);
      return failed;
    } finally {
      stall.touch();
    }
  }

  async #sendHeader(stream: Stream, stall: StallTimer, header: object): Promise<void> {
    await sendBytes(stream, encodeFrame(header), () => stall.touch());
    await this.#close(stream, stall);
  }

  /** Closes our side once everything queued is in the connection (the stall timer bounds the wait). */
  async #close(stream: Stream, stall: StallTimer): Promise<void> {
    stall.touch();
    await stream.close();
  }
}

const failed = Symbol('failed');

/**
 * Reads the one request frame. Any byte after it is a protocol violation and resets the stream;
 * the listener stays attached so such bytes never pile up unread.
 */
function readRequest(stream: Stream, stall: StallTimer): Promise<ChunkRequest> {
  return new Promise((resolve, reject) => {
    const reader = new FrameReader(MAX_REQUEST_FRAME_BYTES);
    let request: ChunkRequest | undefined;
    const onMessage = (evt: StreamMessageEvent): void => {
      stall.touch();
      try {
        for (const piece of pieces(evt.data)) {
          if (request) throw new ChunkProtocolError('data after the request');
          const read = reader.push(piece);
          if (!read) continue;
          request = decodeRequest(read.frame);
          if (read.rest.byteLength > 0) throw new ChunkProtocolError('data after the request');
          stream.removeEventListener('end', onEnd);
          stream.removeEventListener('close', onClose);
          resolve(request);
        }
      } catch (err) {
        stream.removeEventListener('message', onMessage);
        stream.removeEventListener('end', onEnd);
        stream.removeEventListener('close', onClose);
        reject(err as Error);
        stream.abort(err as Error);
      }
    };
    const onEnd = (): void => {
      // abort() and a remote reset emit 'end' too; 'close' follows with the reason.
      if (stream.status !== 'open' && stream.status !== 'closed') return;
      stream.removeEventListener('message', onMessage);
      stream.removeEventListener('close', onClose);
      reject(new ChunkProtocolError('stream ended before a whole request'));
    };
    const onClose = (evt: StreamCloseEvent): void => {
      stream.removeEventListener('message', onMessage);
      stream.removeEventListener('end', onEnd);
      reject(evt.error ?? new ChunkProtocolError('stream closed before a whole request'));
    };
    stream.addEventListener('message', onMessage);
    stream.addEventListener('end', onEnd, { once: true });
    stream.addEventListener('close', onClose, { once: true });
  });
}


/** Per-peer counting semaphore with a FIFO queue; a waiter whose stream closes leaves the queue. */
class PeerSlots {
  readonly #perPeer: number;
  readonly #peers = new Map<string, { active: number; waiting: Array<() => void> }>();

  constructor(perPeer: number) {
    this.#perPeer = perPeer;
  }

  async acquire(peer: string, stream: Stream): Promise<() => void> {
    let entry = this.#peers.get(peer);
    if (!entry) {
      entry = { active: 0, waiting: [] };
      this.#peers.set(peer, entry);
    }
    const slots = entry;
    const release = once(() => {
      const next = slots.waiting.shift();
      // The slot passes straight to the next waiter, so `active` is unchanged.
      if (next) next();
      else if (--slots.active === 0) this.#peers.delete(peer);
    });
    if (slots.active < this.#perPeer) {
      slots.active++;
      return release;
    }
    if (stream.status !== 'open') throw new Error('stream closed while queued for an upload slot');
    await new Promise<void>((resolve, reject) => {
      const grant = (): void => {
        stream.removeEventListener('close', onClose);
        resolve();
      };
      const onClose = (): void => {
        slots.waiting.splice(slots.waiting.indexOf(grant), 1);
        if (slots.active === 0 && slots.waiting.length === 0) this.#peers.delete(peer);
        reject(new Error('stream closed while queued for an upload slot'));
      };
      slots.waiting.push(grant);
      stream.addEventListener('close', onClose, { once: true });
    });
    return release;
  }
}

function once(fn: () => void): () => void {
  let called = false;
  return () => {
    if (called) return;
    called = true;
    fn();
  };
}
