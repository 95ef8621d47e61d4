import type { Stream, StreamCloseEvent, StreamMessageEvent } from '@libp2p/interface';
import { peerIdFromString } from '@libp2p/peer-id';
import { silentLog, withoutUndefined, type MeshHost, type MeshLog } from '@shoal/mesh';
import { isDigest } from '@shoal/oci';
import type { ChunkBitmap, ChunkIndex } from '@shoal/store';
import {
  CHUNK_PROTOCOL,
  ChunkBusyError,
  ChunkProtocolError,
  ChunkStallError,
  chunkLength,
  decodeDataPlaneTicket,
  decodeHoldingHeader,
  decodePayloadHeader,
  decodePickHeader,
  encodeBitmap,
  encodeRequest,
  FrameReader,
  MAX_CHUNK_BYTES,
  MAX_HEADER_FRAME_BYTES,
  MAX_PAYLOAD_HEADER_FRAME_BYTES,
  MAX_RANGE_BYTES,
  pieces,
  StallTimer,
  type ChunkRequest,
} from './chunk-protocol.ts';
import { DataPlaneClient, type DataPlaneOrigin } from './data-plane-client.ts';
import type { ChunkTransport, DataPlaneTicket, Holding } from './types.ts';

export interface Libp2pChunkTransportOptions {
  /** Default `/shoal/chunks/1.0.0`. */
  protocol?: string;
  /**
   * A request on which no byte arrives for this long rejects with ChunkStallError, whatever the
   * caller's signal allows; it catches a peer that stops sending mid-chunk. Default 10 000 ms.
   */
  stallTimeoutMs?: number;
  /**
   * Fetch chunks over a peer's HTTP data plane when its holding answer offers one (the libp2p
   * stream stays the fallback). Default true.
   */
  useDataPlane?: boolean;
  /** Default silent. */
  log?: MeshLog;
}

/** Chunk geometry per (peer, blob) from fetchHolding answers; enough to know each chunk's length. */
const MAX_REMEMBERED_GEOMETRIES = 4096;

const POOLED_BUFFER_BYTES = 1024 * 1024;
const POOL_SIZE = 32;
/** The data plane could not serve a request; use the libp2p stream. */
const FALL_BACK = Symbol('fall back');

/**
 * ChunkTransport over `/shoal/chunks/1.0.0`: one stream per request. It checks framing and byte
 * counts, not content: the downloader verifies chunk hashes.
 */
export class Libp2pChunkTransport implements ChunkTransport {
  readonly #host: MeshHost;
  readonly #options: Required<Libp2pChunkTransportOptions>;
  // Insertion-ordered, so the oldest entry is evicted first.
  readonly #geometry = new Map<string, { size: number; chunkSize: number }>();
  /** Each peer's data plane, from its last holding answer. */
  readonly #dataPlanes = new Map<string, DataPlaneOrigin & { ticket: string }>();
  readonly #http: DataPlaneClient;
  /** Chunk buffers handed back by release(), and the pooled buffer behind each view handed out. */
  readonly #free: Buffer[] = [];
  readonly #pooled = new WeakMap<Uint8Array, Buffer>();
  readonly #bytesReceived = { dataPlane: 0, libp2p: 0 };

  constructor(host: MeshHost, options: Libp2pChunkTransportOptions = {}) {
    this.#host = host;
    this.#options = {
      protocol: CHUNK_PROTOCOL,
      stallTimeoutMs: 10_000,
      useDataPlane: true,
      log: silentLog,
      ...withoutUndefined(options),
    };
    if (!Number.isInteger(this.#options.stallTimeoutMs) || this.#options.stallTimeoutMs < 1) {
      throw new RangeError(`stallTimeoutMs must be a positive integer, got ${this.#options.stallTimeoutMs}`);
    }
    this.#http = new DataPlaneClient({ stallTimeoutMs: this.#options.stallTimeoutMs });
  }

  /**
   * The peer's chunk index and availability of `blob`, or undefined when it holds none of it.
   * Given `known` (this device's index of the blob), the peer sends only the entries past it.
   */
  async fetchHolding(peer: string, blob: string, signal: AbortSignal, known?: ChunkIndex): Promise<Holding | undefined> {
    checkDigest(blob);
    const from = known?.blob === blob ? known.chunks.length : 0;
    const request: ChunkRequest = from > 0 ? { op: 'holding', blob, from } : { op: 'holding', blob };
    const { result } = await this.#request(peer, request, signal, MAX_HEADER_FRAME_BYTES, (frame) => {
      const holding = decodeHoldingHeader(frame, blob, from > 0 ? known : undefined);
      if (holding) this.#rememberDataPlane(peer, decodeDataPlaneTicket(frame));
      return { result: holding };
    });
    if (result) this.#remember(peer, blob, result.index);
    return result;
  }

  /** Chunk payload bytes received, by path, before the downloader verifies them. */
  get bytesReceived(): Readonly<{ dataPlane: number; libp2p: number }> {
    return { ...this.#bytesReceived };
  }

  /** Closes the data plane's pooled HTTP connections. */
  async close(): Promise<void> {
    this.#http.close();
  }

  /**
   * Chunk `index` of `blob` from `peer`, or undefined when the peer lacks it. Its length must be
   * what the peer's last fetchHolding index implies, else at most MAX_CHUNK_BYTES. Chunk hashes
   * are not checked here. `onStarted` hears when the answer's header is in and the bytes follow.
   */
  async fetchChunk(peer: string, blob: string, index: number, signal: AbortSignal, onStarted?: () => void): Promise<Uint8Array | undefined> {
    checkDigest(blob);
    if (!Number.isInteger(index) || index < 0 || index >= 2 ** 31) throw new RangeError(`bad chunk index ${index}`);
    const check = (got: number, length: number): void => {
      if (got !== index) throw new ChunkProtocolError(`peer sent chunk ${got} when asked for chunk ${index}`);
      this.#checkLength(peer, blob, index, length);
      onStarted?.();
    };
    return (await this.#fetch(peer, blob, index, check, signal))?.bytes;
  }

  /**
   * A chunk of `blob` that `peer` chooses among those set in `want` (the one it has sent least),
   * or undefined when it holds none of them. The chunk must be one of `want`, of the length the
   * peer's last holding answer implies; `onPicked` hears which it is once the answer's header is in.
   */
  async pickChunk(
    peer: string,
    blob: string,
    want: ChunkBitmap,
    signal: AbortSignal,
    onPicked?: (index: number) => void,
  ): Promise<{ index: number; bytes: Uint8Array } | undefined> {
    checkDigest(blob);
    const check = (index: number, length: number): void => {
      if (!want.has(index)) throw new ChunkProtocolError(`peer picked chunk ${index}, which was not asked for`);
      this.#checkLength(peer, blob, index, length);
      onPicked?.(index);
    };
    return this.#fetch(peer, blob, want, check, signal);
  }

  /**
   * A chunk by index or by the peer's pick: over its data plane when it offers one, else over a
   * stream. `check` sees the chunk's index and length before its bytes are read, and throws if
   * they are wrong.
   */
  async #fetch(
    peer: string,
    blob: string,
    ask: number | ChunkBitmap,
    check: (index: number, length: number) => void,
    signal: AbortSignal,
  ): Promise<{ index: number; bytes: Buffer } | undefined> {
    const plane = this.#dataPlanes.get(peer);
    if (plane) {
      const fetched = await this.#fetchOverDataPlane(peer, plane, blob, ask, check, signal);
      if (fetched !== FALL_BACK) {
        this.#bytesReceived.dataPlane += fetched?.bytes.byteLength ?? 0;
        return fetched;
      }
    }
    const request: ChunkRequest = typeof ask === 'number' ? { op: 'chunk', blob, index: ask } : { op: 'pick', blob, want: encodeBitmap(ask) };
    const { result, payload } = await this.#request(peer, request, signal, MAX_PAYLOAD_HEADER_FRAME_BYTES, (frame) => {
      const answer = typeof ask === 'number' ? decodePayloadHeader(frame, MAX_CHUNK_BYTES) : decodePickHeader(frame, MAX_CHUNK_BYTES);
      if (answer === undefined) return { result: undefined };
      const [index, length] = typeof answer === 'number' ? [ask as number, answer] : [answer.index, answer.length];
      check(index, length);
      return { result: index, payload: length };
    });
    if (result === undefined || !payload) return undefined;
    this.#bytesReceived.libp2p += payload.byteLength;
    return { index: result, bytes: payload };
  }

  /**
   * Throws ChunkProtocolError unless `length` is what chunk `index` must be: what the peer's last
   * holding answer implies (nothing past its own index), else 1 byte to MAX_CHUNK_BYTES.
   */
  #checkLength(peer: string, blob: string, index: number, length: number): void {
    const geometry = this.#geometry.get(key(peer, blob));
    const required = geometry ? chunkLength(geometry, index) : undefined;
    if (geometry && required === undefined) throw new ChunkProtocolError(`peer sent chunk ${index}, past the end of its own index`);
    if (length === 0 || length > MAX_CHUNK_BYTES || (required !== undefined && length !== required)) {
      throw new ChunkProtocolError(`peer announced ${length} bytes for chunk ${index}, expected ${required ?? 'at most 16 MiB'}`);
    }
  }

  /** `length` bytes of `blob` from `offset` (length at most MAX_RANGE_BYTES), or undefined when the peer lacks some. */
  async fetchRange(peer: string, blob: string, offset: number, length: number, signal: AbortSignal): Promise<Uint8Array | undefined> {
    checkDigest(blob);
    if (!Number.isSafeInteger(offset) || offset < 0) throw new RangeError(`bad range offset ${offset}`);
    if (!Number.isInteger(length) || length < 0 || length > MAX_RANGE_BYTES) throw new RangeError(`range length must be 0 to ${MAX_RANGE_BYTES}`);
    const { payload } = await this.#request(peer, { op: 'range', blob, offset, length }, signal, MAX_PAYLOAD_HEADER_FRAME_BYTES, (frame) => {
      const announced = decodePayloadHeader(frame, MAX_RANGE_BYTES);
      if (announced === undefined) return { result: undefined };
      if (announced !== length) throw new ChunkProtocolError(`peer announced ${announced} bytes for a range of ${length}`);
      return { result: undefined, payload: length };
    });
    return payload;
  }

  /**
   * A chunk over the peer's HTTP data plane; FALL_BACK when that path is unusable (refused,
   * ticket rejected), so the libp2p stream is tried; ChunkBusyError when the peer is sending all
   * it sends at once (the stream would only add to its load). Checks as for a stream.
   */
  async #fetchOverDataPlane(
    peer: string,
    plane: DataPlaneOrigin & { ticket: string },
    blob: string,
    ask: number | ChunkBitmap,
    check: (index: number, length: number) => void,
    signal: AbortSignal,
  ): Promise<{ index: number; bytes: Buffer } | undefined | typeof FALL_BACK> {
    const picking = typeof ask !== 'number';
    let answered = false;
    let chunk: { index: number; bytes: Buffer } | undefined;
    let status: number;
    try {
      ({ status } = await this.#http.get(
        plane,
        `/v1/chunks/${blob}/${picking ? 'pick' : ask}`,
        { authorization: `Bearer ${plane.ticket}`, ...(picking ? { 'shoal-want': encodeBitmap(ask) } : {}) },
        signal,
        (head) => {
          answered = true;
          if (head.status !== 200) return undefined;
          const index = picking ? Number(head.headers.get('shoal-chunk')) : ask;
          if (!Number.isInteger(index) || index < 0) throw new ChunkProtocolError(`peer's data plane named no valid chunk (${String(head.headers.get('shoal-chunk'))})`);
          check(index, head.length);
          chunk = { index, bytes: this.#buffer(head.length) };
          return chunk.bytes;
        },
      ));
    } catch (err) {
      signal.throwIfAborted();
      if (answered) throw err;
      this.#options.log.debug({ peer, err }, 'data plane unreachable; using the libp2p stream');
      this.#dataPlanes.delete(peer);
      return FALL_BACK;
    }
    if (status === 200) return chunk;
    if (status === 404) return undefined;
    if (status === 503) throw new ChunkBusyError(`peer's data plane is sending as many chunks as it allows`);
    // A rejected ticket is renewed by the next holding answer; until then, the stream.
    if (status === 401) this.#dataPlanes.delete(peer);
    return FALL_BACK;
  }

  /**
   * A buffer for a chunk: reused when one was released. Allocating 1 MiB per chunk drives V8
   * into a full GC every 64 MiB, which cost more CPU than receiving the bytes.
   */
  #buffer(length: number): Buffer {
    if (length > POOLED_BUFFER_BYTES) return Buffer.allocUnsafe(length);
    const view = (this.#free.pop() ?? Buffer.allocUnsafeSlow(POOLED_BUFFER_BYTES)).subarray(0, length);
    this.#pooled.set(view, view);
    return view;
  }

  release(bytes: Uint8Array): void {
    if (!this.#pooled.has(bytes)) return;
    this.#pooled.delete(bytes);
    if (this.#free.length < POOL_SIZE) this.#free.push(Buffer.from(bytes.buffer, bytes.byteOffset, POOLED_BUFFER_BYTES));
  }

  /** Where `peer`'s data plane is: the address of our libp2p connection to it, and the port it offered. */
  #rememberDataPlane(peer: string, ticket: DataPlaneTicket | undefined): void {
    if (!ticket || !this.#options.useDataPlane) return;
    const remote = this.#host.node.getConnections(peerIdFromString(peer))[0]?.remoteAddr;
    const ip = remote?.getComponents().find((c) => c.name === 'ip4' || c.name === 'ip6');
    if (!ip?.value) return;
    this.#dataPlanes.set(peer, { host: ip.value, port: ticket.port, ticket: ticket.ticket });
  }

  #remember(peer: string, blob: string, index: { size: number; chunkSize: number }): void {
    const k = key(peer, blob);
    this.#geometry.delete(k);
    this.#geometry.set(k, { size: index.size, chunkSize: index.chunkSize });
    if (this.#geometry.size > MAX_REMEMBERED_GEOMETRIES) this.#geometry.delete(this.#geometry.keys().next().value!);
  }

  /**
   * One request on a fresh stream: sends the frame, half-closes, reads the header and then exactly
   * the payload length it announces straight into a buffer from the chunk pool. Resolves only when the
   * peer has closed its side, so surplus bytes are caught; rejects on anything else.
   */
  async #request<T>(
    peer: string,
    request: ChunkRequest,
    signal: AbortSignal,
    maxHeaderBytes: number,
    onHeader: (frame: Buffer) => { result: T; payload?: number },
  ): Promise<{ result: T; payload?: Buffer }> {
    signal.throwIfAborted();
    const stream = await this.#host.node.dialProtocol(peerIdFromString(peer), this.#options.protocol, { signal });
    try {
      return await receive(stream, request, signal, maxHeaderBytes, this.#options.stallTimeoutMs, onHeader, (length) => this.#buffer(length));
    } catch (err) {
      this.#options.log.debug({ peer, request, err }, 'chunk request failed');
      throw err;
    }
  }
}

function receive<T>(
  stream: Stream,
  request: ChunkRequest,
  signal: AbortSignal,
  maxHeaderBytes: number,
  stallTimeoutMs: number,
  onHeader: (frame: Buffer) => { result: T; payload?: number },
  allocate: (length: number) => Buffer,
): Promise<{ result: T; payload?: Buffer }> {
  return new Promise((resolve, reject) => {
    const reader = new FrameReader(maxHeaderBytes);
    let header: { result: T; payload?: number } | undefined;
    let payload: Buffer | undefined;
    let filled = 0;
    let settled = false;

    const cleanup = (): void => {
      settled = true;
      stall.pause();
      signal.removeEventListener('abort', onAbort);
      stream.removeEventListener('message', onMessage);
      stream.removeEventListener('end', onEnd);
      stream.removeEventListener('close', onClose);
    };
    const fail = (err: unknown): void => {
      if (settled) return;
      cleanup();
      stream.abort(err instanceof Error ? err : new Error(String(err)));
      reject(err);
    };
    const consume = (piece: Uint8Array): void => {
      if (!header) {
        const read = reader.push(piece);
        if (!read) return;
        header = onHeader(read.frame);
        if (header.payload !== undefined) payload = allocate(header.payload);
        piece = read.rest;
        if (piece.byteLength === 0) return;
      }
      if (!payload || filled + piece.byteLength > payload.byteLength) {
        throw new ChunkProtocolError(`peer sent more than the ${payload?.byteLength ?? 0} bytes it announced`);
      }
      payload.set(piece, filled);
      filled += piece.byteLength;
    };
    const onMessage = (evt: StreamMessageEvent): void => {
      stall.touch();
      try {
        for (const piece of pieces(evt.data)) consume(piece);
      } catch (err) {
        fail(err);
      }
    };
    const onEnd = (): void => {
      // abort() and a remote reset emit 'end' too; 'close' follows with the reason.
      if (settled || (stream.status !== 'open' && stream.status !== 'closed')) return;
      if (!header) return fail(new ChunkProtocolError('peer closed the stream before a whole answer'));
      if (payload && filled < payload.byteLength) {
        return fail(new ChunkProtocolError(`peer closed the stream after ${filled} of ${payload.byteLength} bytes`));
      }
      cleanup();
      resolve({ result: header.result, payload });
    };
    const onClose = (evt: StreamCloseEvent): void => {
      if (evt.error) fail(evt.error);
      else onEnd();
    };
    const onAbort = (): void => fail(signal.reason);
    const stall = new StallTimer(stallTimeoutMs, () => fail(new ChunkStallError(`no data from peer for ${stallTimeoutMs} ms`)));

    signal.addEventListener('abort', onAbort, { once: true });
    stream.addEventListener('message', onMessage);
    stream.addEventListener('end', onEnd);
    stream.addEventListener('close', onClose);
    if (signal.aborted) return fail(signal.reason);
    try {
      stream.send(encodeRequest(request));
      // Half-close: the server needs nothing more, and our FIN tells it so.
      stream.close({ signal }).catch(fail);
    } catch (err) {
      fail(err);
    }
  });
}

function checkDigest(blob: string): void {
  if (!isDigest(blob)) throw new TypeError(`not a digest: ${JSON.stringify(blob.slice(0, 80))}`);
}

function key(peer: string, blob: string): string {
  return `${peer} ${blob}`;
}
