import { connect, type Socket } from 'node:net';
import { withoutUndefined } from '@shoal/mesh';
import { ChunkProtocolError, ChunkStallError } from './chunk-protocol.ts';

export interface DataPlaneClientOptions {
  /** Idle keep-alive connections kept per data plane. Default 8. */
  maxIdlePerOrigin?: number;
  /** An idle connection is closed after this long: below the server's 30 s keep-alive. Default 20 000 ms. */
  idleTimeoutMs?: number;
  /** A request with no byte from the server for this long fails with ChunkStallError. Default 10 000 ms. */
  stallTimeoutMs?: number;
}

/** A response's status line and headers (names in lower case). */
export interface ResponseHead {
  status: number;
  headers: Map<string, string>;
  /** The body's length (Content-Length). */
  length: number;
}

/**
 * Where a response's body goes: a buffer of exactly `head.length` bytes, or undefined to read
 * and drop it (at most MAX_DROPPED_BODY_BYTES). It may throw to refuse the response; the
 * connection is then closed and the request rejects with that error.
 */
export type BodyTarget = (head: ResponseHead) => Buffer | undefined;

export interface DataPlaneOrigin {
  host: string;
  port: number;
}

/** Response heads beyond this are refused; ours are a few hundred bytes. */
const MAX_HEAD_BYTES = 8 * 1024;
/** Error bodies dropped unread are small (ours are empty); bigger ones close the connection. */
const MAX_DROPPED_BODY_BYTES = 64 * 1024;
const HEAD_END = Buffer.from('\r\n\r\n');

/**
 * The HTTP/1.1 GET client of the chunk data plane: the kernel reads each body straight into the
 * buffer the caller names (net's `onread` with a buffer per read), so a chunk is never copied
 * and no buffer is allocated per socket read. undici hands out a new 64 KiB buffer per read:
 * at 1 GB/s that external memory drove V8 into a full mark-compact about ten times a second,
 * and the receiving device spent more CPU on the client and its GC than on verifying the chunks.
 * It speaks only what ChunkDataPlane answers: Content-Length bodies, keep-alive, no pipelining.
 */
export class DataPlaneClient {
  readonly #options: Required<DataPlaneClientOptions>;
  readonly #idle = new Map<string, Connection[]>();
  readonly #open = new Set<Connection>();
  #closed = false;

  constructor(options: DataPlaneClientOptions = {}) {
    this.#options = {
      maxIdlePerOrigin: 8,
      idleTimeoutMs: 20_000,
      stallTimeoutMs: 10_000,
      ...withoutUndefined(options),
    };
  }

  /**
   * GET `path` from `origin` with `headers`; resolves with the response head once the whole body
   * is in the buffer `body` named. A connection from the pool that turns out to have been
   * closed by the server is replaced once, since a GET can be repeated.
   */
  async get(origin: DataPlaneOrigin, path: string, headers: Record<string, string>, signal: AbortSignal, body: BodyTarget): Promise<ResponseHead> {
    if (this.#closed) throw new Error('data plane client is closed');
    signal.throwIfAborted();
    const request = encodeRequest(origin, path, headers);
    const pooled = this.#idle.get(originKey(origin))?.pop();
    if (pooled) {
      try {
        return await this.#exchange(pooled, request, signal, body);
      } catch (err) {
        if (!(err instanceof StaleConnectionError)) throw err;
      }
    }
    return this.#exchange(this.#connect(origin), request, signal, body);
  }

  /** Closes every connection; requests in flight reject. */
  close(): void {
    this.#closed = true;
    for (const connection of this.#open) connection.socket.destroy();
    this.#open.clear();
    this.#idle.clear();
  }

  #connect(origin: DataPlaneOrigin): Connection {
    const connection = new Connection(origin, this.#options.stallTimeoutMs);
    this.#open.add(connection);
    connection.socket.once('close', () => {
      this.#open.delete(connection);
      this.#forgetIdle(connection);
    });
    return connection;
  }

  /** One request on `connection`, which then goes back to the pool if it may. */
  async #exchange(connection: Connection, request: string, signal: AbortSignal, body: BodyTarget): Promise<ResponseHead> {
    const head = await connection.exchange(request, signal, body);
    const key = originKey(connection.origin);
    const idle = this.#idle.get(key) ?? [];
    if (this.#closed || !connection.reusable || idle.length >= this.#options.maxIdlePerOrigin) {
      connection.socket.destroy();
      return head;
    }
    idle.push(connection);
    this.#idle.set(key, idle);
    connection.idle(this.#options.idleTimeoutMs);
    return head;
  }

  #forgetIdle(connection: Connection): void {
    const key = originKey(connection.origin);
    const idle = this.#idle.get(key);
    const at = idle?.indexOf(connection) ?? -1;
    if (at < 0) return;
    idle!.splice(at, 1);
    if (idle!.length === 0) this.#idle.delete(key);
  }
}

/** A pooled connection closed before any byte of the answer: the request may go on a new one. */
class StaleConnectionError extends Error {
  override name = 'StaleConnectionError';
}

/** One request at a time on it; what is being read decides which buffer the next read fills. */
interface Exchange {
  body: BodyTarget;
  head?: ResponseHead;
  /** The body's buffer, or undefined while a body is dropped. */
  target?: Buffer;
  filled: number;
  /** Any byte of the answer arrived. */
  answered: boolean;
  resolve(head: ResponseHead): void;
  reject(err: unknown): void;
}

class Connection {
  readonly origin: DataPlaneOrigin;
  readonly socket: Socket;
  readonly #stallTimeoutMs: number;
  /** The response head being read; also the scratch for dropped bodies. */
  readonly #head = Buffer.allocUnsafe(MAX_HEAD_BYTES);
  #headLength = 0;
  #exchange: Exchange | undefined;
  #used = false;
  /** The server did not ask to close after the last answer. */
  reusable = true;

  constructor(origin: DataPlaneOrigin, stallTimeoutMs: number) {
    this.origin = origin;
    this.#stallTimeoutMs = stallTimeoutMs;
    this.socket = connect({
      host: origin.host,
      port: origin.port,
      noDelay: true,
      // Never paused: a body's buffer is always there for the next read.
      onread: { buffer: () => this.#nextBuffer(), callback: (n: number) => (this.#onRead(n), true) },
    });
    this.socket.on('error', (err) => this.#fail(err));
    this.socket.on('close', () => this.#fail(new Error('data plane connection closed')));
    this.socket.on('end', () => this.socket.destroy());
    this.socket.on('timeout', () => {
      if (this.#exchange) this.#fail(new ChunkStallError(`no data from the data plane for ${this.#stallTimeoutMs} ms`));
      else this.socket.destroy();
    });
  }

  exchange(request: string, signal: AbortSignal, body: BodyTarget): Promise<ResponseHead> {
    const reused = this.#used;
    this.#used = true;
    const { promise, resolve, reject } = Promise.withResolvers<ResponseHead>();
    const onAbort = (): void => this.#fail(signal.reason);
    signal.addEventListener('abort', onAbort, { once: true });
    const exchange: Exchange = {
      body,
      filled: 0,
      answered: false,
      resolve: (head) => {
        signal.removeEventListener('abort', onAbort);
        resolve(head);
      },
      reject: (err) => {
        signal.removeEventListener('abort', onAbort);
        // Closed before it said anything: the server had dropped the idle connection.
        const stale = reused && !exchange.answered && !signal.aborted && !(err instanceof ChunkProtocolError);
        reject(stale ? new StaleConnectionError(String(err)) : err);
      },
    };
    this.#exchange = exchange;
    this.socket.setTimeout(this.#stallTimeoutMs);
    if (signal.aborted) this.#fail(signal.reason);
    else this.socket.write(request);
    return promise;
  }

  /** Waits in the pool: closed after `ms` unless a request comes. */
  idle(ms: number): void {
    this.socket.setTimeout(ms);
  }

  /** Where the kernel puts the next bytes: the rest of the body's buffer, else the head buffer. */
  #nextBuffer(): Uint8Array {
    const exchange = this.#exchange;
    if (exchange?.head) {
      if (exchange.target) return exchange.target.subarray(exchange.filled);
      return this.#head.subarray(0, Math.min(exchange.head.length - exchange.filled, MAX_HEAD_BYTES));
    }
    // A full head buffer fails the request before this is asked; a whole buffer keeps reads valid.
    return this.#headLength < MAX_HEAD_BYTES ? this.#head.subarray(this.#headLength) : this.#head;
  }

  #onRead(n: number): void {
    const exchange = this.#exchange;
    if (!exchange) return this.#fail(new ChunkProtocolError('data plane sent bytes nobody asked for'));
    exchange.answered = true;
    try {
      if (exchange.head) {
        exchange.filled += n;
      } else {
        this.#headLength += n;
        if (!this.#readHead(exchange)) return;
      }
      if (exchange.filled === exchange.head!.length) this.#complete(exchange);
    } catch (err) {
      this.#fail(err);
    }
  }

  /** Parses the head once it is all in; copies body bytes that came with it. False while incomplete. */
  #readHead(exchange: Exchange): boolean {
    const end = this.#head.subarray(0, this.#headLength).indexOf(HEAD_END);
    if (end < 0) {
      if (this.#headLength >= MAX_HEAD_BYTES) throw new ChunkProtocolError(`data plane answer head exceeds ${MAX_HEAD_BYTES} bytes`);
      return false;
    }
    const head = parseHead(this.#head.toString('latin1', 0, end));
    this.reusable = head.headers.get('connection')?.toLowerCase() !== 'close';
    const target = exchange.body(head);
    if (target && target.byteLength !== head.length) throw new RangeError(`body buffer of ${target.byteLength} bytes for ${head.length}`);
    if (!target && head.length > MAX_DROPPED_BODY_BYTES) throw new ChunkProtocolError(`unwanted data plane answer of ${head.length} bytes`);
    const extra = this.#headLength - end - HEAD_END.length;
    if (extra > head.length) throw new ChunkProtocolError(`data plane sent more than the ${head.length} bytes it announced`);
    if (target) this.#head.copy(target, 0, end + HEAD_END.length, this.#headLength);
    exchange.head = head;
    exchange.target = target;
    exchange.filled = extra;
    this.#headLength = 0;
    return true;
  }

  #complete(exchange: Exchange): void {
    this.#exchange = undefined;
    exchange.resolve(exchange.head!);
  }

  #fail(err: unknown): void {
    const exchange = this.#exchange;
    this.#exchange = undefined;
    this.socket.destroy();
    exchange?.reject(err);
  }
}

/** The pool's key for a data plane. */
function originKey(origin: DataPlaneOrigin): string {
  return `${origin.host}:${origin.port}`;
}

function encodeRequest(origin: DataPlaneOrigin, path: string, headers: Record<string, string>): string {
  const host = origin.host.includes(':') ? `[${origin.host}]` : origin.host;
  const lines = [`GET ${path} HTTP/1.1`, `host: ${host}:${origin.port}`];
  for (const [name, value] of Object.entries(headers)) lines.push(`${name}: ${value}`);
  const request = `${lines.join('\r\n')}\r\n\r\n`;
  // Path and values are ours (digests, tickets, base64 bitmaps): anything else is a bug.
  if (/[^\x21-\x7e \r\n]/.test(request) || request.split('\r\n').length !== lines.length + 2) throw new TypeError('bad data plane request');
  return request;
}

/** Status and headers of an answer; only Content-Length bodies are accepted. */
function parseHead(text: string): ResponseHead {
  const [statusLine, ...fields] = text.split('\r\n');
  const status = /^HTTP\/1\.[01] ([2-5]\d\d)(?: |$)/.exec(statusLine!);
  if (!status) throw new ChunkProtocolError(`bad data plane status line ${JSON.stringify(statusLine!.slice(0, 80))}`);
  const headers = new Map<string, string>();
  for (const field of fields) {
    const colon = field.indexOf(':');
    if (colon <= 0) throw new ChunkProtocolError(`bad data plane header ${JSON.stringify(field.slice(0, 80))}`);
    const name = field.slice(0, colon).trim().toLowerCase();
    if (headers.has(name) && name === 'content-length') throw new ChunkProtocolError('data plane answer with two Content-Length headers');
    headers.set(name, field.slice(colon + 1).trim());
  }
  if (headers.has('transfer-encoding')) throw new ChunkProtocolError('data plane answer with Transfer-Encoding, not a Content-Length');
  const length = headers.get('content-length') ?? '';
  if (!/^\d{1,10}$/.test(length)) throw new ChunkProtocolError('data plane answer without a valid Content-Length');
  return { status: Number(status[1]), headers, length: Number(length) };
}
