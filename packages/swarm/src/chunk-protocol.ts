import type { Stream, StreamCloseEvent, StreamMessageEvent } from '@libp2p/interface';
import { isDigest } from '@shoal/oci';
import { ChunkBitmap, chunkCount, isCompleteIndex, type ChunkIndex } from '@shoal/store';
import { pEvent } from 'p-event';
import type { DataPlaneTicket, Holding } from './types.ts';

/**
 * Wire format of `/shoal/chunks/1.0.0`, one request per stream:
 *
 *   requester → server: frame(request), then half-close
 *   server → requester: frame(header) [+ exactly header.length raw bytes], then close
 *
 * A frame is an unsigned LEB128 varint byte count followed by that many bytes of UTF-8 JSON.
 *
 *   {"op":"holding","blob":D[,"from":K]}     → {"status":"ok","index":{blob,size,chunkSize,chunks}[,"from":K'],"have":"all"|base64[,"growing":true]}
 *   {"op":"chunk","blob":D,"index":N}        → {"status":"ok","length":L} + L bytes
 *   {"op":"range","blob":D,"offset":O,"length":L} → {"status":"ok","length":L} + L bytes
 *   {"op":"pick","blob":D,"want":base64}     → {"status":"ok","index":N,"length":L} + L bytes
 *   any                                      → {"status":"not-found"} | {"status":"error","message":M}
 *
 * A holding request's `from` says the asker already knows the first K entries of the index: the
 * answer's `chunks` then start at entry K' = min(K, the holder's count) and `from` says K'. A
 * receiver following a blob that is still arriving from an upstream asks its source a few times
 * a second, and a whole index in every answer would repeat what it knows each time.
 * `growing` marks a holder pulling the blob through from an upstream: its index grows.
 *
 * `pick` lets the holder choose: of the chunks set in the bitmap `want`, it sends one it holds
 * and has sent least (see UploadLedger). Unknown fields are ignored (room to grow); anything else
 * malformed resets the stream.
 */
export const CHUNK_PROTOCOL = '/shoal/chunks/1.0.0';

/**
 * A request is a digest and two integers, or a pick's bitmap of wanted chunks: 24 KiB holds one
 * for ~147 000 chunks, more than a holding answer can describe, and still stops junk early.
 */
export const MAX_REQUEST_FRAME_BYTES = 24 * 1024;
/** A holding header carries the chunk index: 67 bytes per chunk, so 8 MiB covers ~125 000 chunks. */
export const MAX_HEADER_FRAME_BYTES = 8 * 1024 * 1024;
/** The largest chunk size accepted in an index, hence the largest chunk payload. */
export const MAX_CHUNK_BYTES = 16 * 1024 * 1024;
/** The largest range one request may ask for. */
export const MAX_RANGE_BYTES = 4 * 1024 * 1024;
/**
 * Payloads are handed to the stream in pieces of this size so backpressure is felt per piece.
 * 64 KiB minus 29: a piece plus yamux's 12-byte frame header fills one noise message (65 519
 * bytes of plaintext) instead of spilling 29 bytes into a second; measured ~15% faster.
 */
export const SEND_PIECE_BYTES = 65_507;
/** The header of a chunk or range answer is tiny; anything bigger is a broken peer. */
export const MAX_PAYLOAD_HEADER_FRAME_BYTES = 1024;
// 4 varint bytes encode up to 2^28 - 1, far above every frame limit.
const MAX_VARINT_BYTES = 4;
const MAX_ERROR_MESSAGE_CHARS = 200;
const HEX64 = /^[0-9a-f]{64}$/;
const BASE64 = /^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$/;

export type ChunkRequest =
  /** `from`: index entries the asker already knows, left out of the answer. */
  | { op: 'holding'; blob: string; from?: number }
  | { op: 'chunk'; blob: string; index: number }
  | { op: 'range'; blob: string; offset: number; length: number }
  /** `want`: a base64 chunk bitmap, checked against the blob's chunk count by the server. */
  | { op: 'pick'; blob: string; want: string };

export type HoldingHeader =
  | { status: 'ok'; index: ChunkIndex; from?: number; have: 'all' | string; growing?: true; dataPlane?: DataPlaneTicket }
  | { status: 'not-found' }
  | { status: 'error'; message: string };

export type PayloadHeader = { status: 'ok'; length: number } | { status: 'not-found' } | { status: 'error'; message: string };

/** The peer broke the protocol: malformed or oversized frame, wrong byte count, bad index. */
export class ChunkProtocolError extends Error {
  override name = 'ChunkProtocolError';
}

/** The peer answered `{"status":"error"}`: it failed to serve the request. */
export class ChunkPeerError extends Error {
  override name = 'ChunkPeerError';
}

/**
 * The holder is sending as many chunks as it allows at once: ask it again a little later, or ask
 * another holder. Not a failure of the peer.
 */
export class ChunkBusyError extends Error {
  override name = 'ChunkBusyError';
}

/** No bytes moved on a stream for the stall limit. */
export class ChunkStallError extends Error {
  override name = 'ChunkStallError';
}

export function encodeFrame(value: unknown): Uint8Array {
  const body = Buffer.from(JSON.stringify(value));
  const prefix: number[] = [];
  let n = body.byteLength;
  do {
    prefix.push((n & 0x7f) | (n >= 0x80 ? 0x80 : 0));
    n = Math.floor(n / 0x80);
  } while (n > 0);
  const frame = Buffer.allocUnsafe(prefix.length + body.byteLength);
  frame.set(prefix, 0);
  frame.set(body, prefix.length);
  return frame;
}

/**
 * Collects one length-prefixed frame from pieces as they arrive. The buffer grows with the bytes
 * actually received, so a peer announcing a large frame and sending nothing costs nothing.
 */
export class FrameReader {
  readonly #max: number;
  #varint = 0;
  #varintBytes = 0;
  #length: number | undefined;
  #buffer = Buffer.alloc(0);
  #filled = 0;

  constructor(maxFrameBytes: number) {
    this.#max = maxFrameBytes;
  }

  /** Feeds bytes; returns the frame and whatever followed it once the frame is complete. */
  push(data: Uint8Array): { frame: Buffer; rest: Uint8Array } | undefined {
    let offset = 0;
    while (this.#length === undefined) {
      if (offset >= data.byteLength) return undefined;
      const byte = data[offset++]!;
      this.#varint += (byte & 0x7f) * 2 ** (7 * this.#varintBytes);
      this.#varintBytes++;
      if ((byte & 0x80) === 0) {
        if (this.#varint > this.#max) throw new ChunkProtocolError(`frame of ${this.#varint} bytes exceeds ${this.#max}`);
        this.#length = this.#varint;
      } else if (this.#varintBytes >= MAX_VARINT_BYTES) {
        throw new ChunkProtocolError('frame length prefix too long');
      }
    }
    const take = Math.min(this.#length - this.#filled, data.byteLength - offset);
    if (this.#filled + take > this.#buffer.byteLength) {
      const grown = Buffer.allocUnsafe(Math.min(this.#length, Math.max(this.#filled + take, this.#buffer.byteLength * 2, 4096)));
      grown.set(this.#buffer.subarray(0, this.#filled));
      this.#buffer = grown;
    }
    this.#buffer.set(data.subarray(offset, offset + take), this.#filled);
    this.#filled += take;
    offset += take;
    if (this.#filled < this.#length) return undefined;
    return { frame: this.#buffer.subarray(0, this.#length), rest: data.subarray(offset) };
  }
}

export function encodeRequest(request: ChunkRequest): Uint8Array {
  return encodeFrame(request);
}

/** Parses and validates a request frame; throws ChunkProtocolError. */
export function decodeRequest(frame: Uint8Array): ChunkRequest {
  const doc = parseObject(frame);
  const { op, blob } = doc;
  if (typeof blob !== 'string' || !isDigest(blob)) throw new ChunkProtocolError('request has no valid blob digest');
  switch (op) {
    case 'holding':
      if (doc.from === undefined) return { op, blob };
      if (!isIndex(doc.from)) throw new ChunkProtocolError('holding request has no valid from');
      return { op, blob, from: doc.from };
    case 'chunk':
      if (!isIndex(doc.index)) throw new ChunkProtocolError('chunk request has no valid index');
      return { op, blob, index: doc.index };
    case 'range': {
      const { offset, length } = doc;
      if (!(Number.isSafeInteger(offset) && (offset as number) >= 0)) throw new ChunkProtocolError('range request has no valid offset');
      if (!(Number.isSafeInteger(length) && (length as number) >= 0 && (length as number) <= MAX_RANGE_BYTES)) {
        throw new ChunkProtocolError(`range length must be an integer from 0 to ${MAX_RANGE_BYTES}`);
      }
      if (!Number.isSafeInteger((offset as number) + (length as number))) throw new ChunkProtocolError('range end out of bounds');
      return { op, blob, offset: offset as number, length: length as number };
    }
    case 'pick':
      if (typeof doc.want !== 'string' || !BASE64.test(doc.want)) throw new ChunkProtocolError('pick request has no valid bitmap');
      return { op, blob, want: doc.want };
    default:
      throw new ChunkProtocolError('unknown request op');
  }
}

/** The answer to a holding request; `from` index entries the asker knows are left out. */
export function holdingHeader(holding: Holding, dataPlane?: DataPlaneTicket, from = 0): HoldingHeader {
  const { blob, size, chunkSize, chunks } = holding.index;
  const have = holding.have === 'all' || holding.have.complete ? 'all' : encodeBitmap(holding.have);
  const skip = Math.min(from, chunks.length);
  return {
    status: 'ok',
    index: { blob, size, chunkSize, chunks: skip > 0 ? chunks.slice(skip) : chunks },
    ...(skip > 0 ? { from: skip } : {}),
    have,
    ...(holding.growing ? { growing: true as const } : {}),
    ...(dataPlane ? { dataPlane } : {}),
  };
}

/** The data plane ticket in a holding answer, if it carries a well-formed one. */
export function decodeDataPlaneTicket(frame: Uint8Array): DataPlaneTicket | undefined {
  const { dataPlane } = parseObject(frame);
  if (!isObject(dataPlane)) return undefined;
  const { port, ticket } = dataPlane;
  if (!Number.isInteger(port) || (port as number) < 1 || (port as number) > 65535) return undefined;
  if (typeof ticket !== 'string' || !/^[A-Za-z0-9_-]{16,128}$/.test(ticket)) return undefined;
  return { port: port as number, ticket };
}

/** A copy of `data` with one byte flipped (the test-only fault switch). */
export function corrupted(data: Uint8Array): Uint8Array {
  const copy = Uint8Array.from(data);
  if (copy.byteLength > 0) copy[copy.byteLength >> 1]! ^= 0xff;
  return copy;
}

/**
 * Parses a holding header for `blob`: the holding, undefined for not-found; throws on anything
 * else. `known` is the index the request said it knew (its `from`): an answer leaving out entries
 * continues it.
 */
export function decodeHoldingHeader(frame: Uint8Array, blob: string, known?: ChunkIndex): Holding | undefined {
  const doc = parseObject(frame);
  if (doc.status === 'not-found') return undefined;
  if (doc.status === 'error') throw peerError(doc);
  if (doc.status !== 'ok') throw new ChunkProtocolError('holding answer has an unknown status');
  const index = validateChunkIndex(continued(doc.index, doc.from, known), blob);
  // A holder can only hold chunks its index names (a provisional index names the first few).
  if (doc.have === 'all') {
    if (!isCompleteIndex(index)) throw new ChunkProtocolError('holding answer claims all chunks of a provisional index');
    return { index, have: 'all' };
  }
  if (typeof doc.have !== 'string') throw new ChunkProtocolError('holding answer has no valid availability');
  const have = decodeBitmap(doc.have, chunkCount(index), 'holding answer');
  for (let i = index.chunks.length; i < have.length; i++) {
    if (have.has(i)) throw new ChunkProtocolError('holding answer holds a chunk its provisional index does not name');
  }
  return { index, have, ...(doc.growing === true ? { growing: true } : {}) };
}

/** An answer's index with the `from` entries it left out taken from `known`, as validateChunkIndex expects. */
function continued(index: unknown, from: unknown, known: ChunkIndex | undefined): unknown {
  if (from === undefined) return index;
  if (!isIndex(from) || from === 0 || !known || from > known.chunks.length) {
    throw new ChunkProtocolError('holding answer leaves out index entries the request did not know');
  }
  if (!isObject(index) || !Array.isArray(index.chunks)) return index;
  // The left-out entries are ours only if the holder cuts the blob the same way.
  if (index.size !== known.size || index.chunkSize !== known.chunkSize) {
    throw new ChunkProtocolError('holding answer continues an index of another geometry');
  }
  return { ...index, chunks: [...known.chunks.slice(0, from), ...index.chunks] };
}

export function encodeBitmap(bitmap: ChunkBitmap): string {
  return Buffer.from(bitmap.toBytes()).toString('base64');
}

/** A base64 bitmap of `chunks` chunks from the wire (a holding answer's, a pick's); throws ChunkProtocolError. */
export function decodeBitmap(base64: string, chunks: number, what: string): ChunkBitmap {
  if (!BASE64.test(base64)) throw new ChunkProtocolError(`${what} has a bitmap that is not base64`);
  try {
    return new ChunkBitmap(chunks, Buffer.from(base64, 'base64'));
  } catch (err) {
    throw new ChunkProtocolError(`${what} has a bad bitmap: ${(err as Error).message}`);
  }
}

/** Parses the header of a pick answer: the chunk the holder chose and its length, undefined for not-found. */
export function decodePickHeader(frame: Uint8Array, maxLength: number): { index: number; length: number } | undefined {
  const length = decodePayloadHeader(frame, maxLength);
  if (length === undefined) return undefined;
  const { index } = parseObject(frame);
  if (!isIndex(index)) throw new ChunkProtocolError('pick answer names no valid chunk');
  return { index, length };
}

/** Parses the header of a chunk or range answer: the payload length, undefined for not-found. */
export function decodePayloadHeader(frame: Uint8Array, maxLength: number): number | undefined {
  const doc = parseObject(frame);
  if (doc.status === 'not-found') return undefined;
  if (doc.status === 'error') throw peerError(doc);
  if (doc.status !== 'ok') throw new ChunkProtocolError('answer has an unknown status');
  const { length } = doc;
  if (!(Number.isSafeInteger(length) && (length as number) >= 0 && (length as number) <= maxLength)) {
    throw new ChunkProtocolError(`answer announces ${String(length)} bytes, at most ${maxLength} allowed`);
  }
  return length as number;
}

/**
 * A chunk index as decodeChunkIndex accepts it, for `blob`: integer size and chunk size (at most
 * MAX_CHUNK_BYTES), at most ceil(size / chunkSize) hex sha256 chunk hashes (fewer for a blob
 * still arriving at its holder: a provisional index). Returns a clean copy.
 */
export function validateChunkIndex(value: unknown, blob: string): ChunkIndex {
  if (!isObject(value)) throw new ChunkProtocolError('chunk index is not an object');
  const { size, chunkSize, chunks } = value;
  if (value.blob !== blob) throw new ChunkProtocolError('chunk index is for another blob');
  if (!(Number.isSafeInteger(size) && (size as number) >= 0)) throw new ChunkProtocolError('chunk index has a bad size');
  if (!(Number.isSafeInteger(chunkSize) && (chunkSize as number) > 0 && (chunkSize as number) <= MAX_CHUNK_BYTES)) {
    throw new ChunkProtocolError('chunk index has a bad chunk size');
  }
  if (!Array.isArray(chunks) || chunks.length > Math.ceil((size as number) / (chunkSize as number))) {
    throw new ChunkProtocolError('chunk index has the wrong number of chunks');
  }
  if (!chunks.every((c) => typeof c === 'string' && HEX64.test(c))) throw new ChunkProtocolError('chunk index has a bad chunk hash');
  return { blob, size: size as number, chunkSize: chunkSize as number, chunks: [...(chunks as string[])] };
}

/** Byte length of chunk `i` of a blob of `size` bytes cut in `chunkSize` chunks (the last is shorter); undefined past the end. */
export function chunkLength(index: Pick<ChunkIndex, 'size' | 'chunkSize'>, i: number): number | undefined {
  const count = Math.ceil(index.size / index.chunkSize);
  if (!Number.isInteger(i) || i < 0 || i >= count) return undefined;
  return i === count - 1 ? index.size - index.chunkSize * (count - 1) : index.chunkSize;
}

export function errorHeader(message: string): { status: 'error'; message: string } {
  return { status: 'error', message: message.slice(0, MAX_ERROR_MESSAGE_CHARS) };
}

function peerError(doc: Record<string, unknown>): ChunkPeerError {
  const message = typeof doc.message === 'string' ? doc.message.slice(0, MAX_ERROR_MESSAGE_CHARS) : 'no reason given';
  return new ChunkPeerError(`peer failed the request: ${message}`);
}

function parseObject(frame: Uint8Array): Record<string, unknown> {
  let doc: unknown;
  try {
    doc = JSON.parse(Buffer.from(frame.buffer, frame.byteOffset, frame.byteLength).toString('utf8'));
  } catch {
    throw new ChunkProtocolError('frame is not JSON');
  }
  if (!isObject(doc)) throw new ChunkProtocolError('frame is not a JSON object');
  return doc;
}

function isObject(value: unknown): value is Record<string, unknown> {
  return typeof value === 'object' && value !== null && !Array.isArray(value);
}

function isIndex(value: unknown): value is number {
  // No index can exceed what MAX_HEADER_FRAME_BYTES can describe; 2^31 is a generous cap.
  return Number.isInteger(value) && (value as number) >= 0 && (value as number) < 2 ** 31;
}

// ---- stream helpers shared by the server and the transport ----

/** The Uint8Arrays of a 'message' event's data, without copying. */
export function pieces(data: StreamMessageEvent['data']): Iterable<Uint8Array> {
  return data instanceof Uint8Array ? [data] : data;
}

/** Calls `onStall` when touch() was not called for `ms`; paused while waiting on something that is not the peer. */
export class StallTimer {
  readonly #ms: number;
  readonly #onStall: () => void;
  #timer: NodeJS.Timeout | undefined;

  constructor(ms: number, onStall: () => void) {
    this.#ms = ms;
    this.#onStall = onStall;
    this.touch();
  }

  touch(): void {
    clearTimeout(this.#timer);
    this.#timer = setTimeout(this.#onStall, this.#ms);
    this.#timer.unref();
  }

  pause(): void {
    clearTimeout(this.#timer);
    this.#timer = undefined;
  }
}

/**
 * Sends `bytes` in pieces of at most SEND_PIECE_BYTES, waiting for 'drain' whenever send() reports
 * a full buffer, so at most one piece is queued beyond what the muxer accepted. Rejects if the
 * stream closes meanwhile (a stall timer aborting it ends the wait too).
 */
export async function sendBytes(stream: Stream, bytes: Uint8Array, onProgress?: () => void): Promise<void> {
  for (let offset = 0; offset < bytes.byteLength; offset += SEND_PIECE_BYTES) {
    if (!stream.send(bytes.subarray(offset, offset + SEND_PIECE_BYTES))) await drained(stream);
    onProgress?.();
  }
}

/** Waits for 'drain'; rejects with the close reason if the stream closes first. */
async function drained(stream: Stream): Promise<void> {
  if (stream.status !== 'open' || stream.writeStatus !== 'writable') throw new Error(`stream is ${stream.status}`);
  try {
    // Not stream.onDrain(): its promise is never reset after the first drain.
    await pEvent(stream, 'drain', { rejectionEvents: ['close'] });
  } catch (evt) {
    throw (evt as StreamCloseEvent).error ?? new Error('stream closed while sending');
  }
}
