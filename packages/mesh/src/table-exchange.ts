import type { Connection, PeerId, Stream } from '@libp2p/interface';
import { readToEnd, sendAndClose } from './io.ts';
import type { MeshLog, MeshNode } from './mesh-host.ts';

export interface TableExchangeOptions {
  protocol: string;
  /** Largest table accepted; a bigger one aborts that stream. */
  maxBytes: () => number;
  /** Limit for one exchange. */
  timeoutMs: number;
  /** Exchanges running at once (each way). */
  maxConcurrent: number;
  /** Our table, taken afresh for each exchange. */
  table: () => Uint8Array;
  /** Takes in a peer's table; a throw ends only that exchange. */
  merge: (bytes: Uint8Array, from: PeerId) => void | Promise<void>;
  /** What to call it in debug logs, e.g. `membership sync`. */
  name: string;
  log: MeshLog;
}

/**
 * Anti-entropy over one protocol: two peers swap whole tables, each merging the other's. The
 * asker sends first; the answerer replies with its table as it was before merging, so the
 * asker's entries are not echoed back. Bounded, timed out, and a failure costs only its stream.
 */
export class TableExchange {
  readonly #options: TableExchangeOptions;
  readonly #running = new Set<string>();
  /** Peers waiting for a free slot, in order; a peer is in one of the two sets at most. */
  readonly #waiting = new Map<string, PeerId>();
  #node: MeshNode | undefined;
  #stopping = new AbortController();

  constructor(options: TableExchangeOptions) {
    this.#options = options;
  }

  async start(node: MeshNode): Promise<void> {
    this.#stopping = new AbortController();
    const { protocol, maxConcurrent } = this.#options;
    await node.handle(protocol, (stream, connection) => this.#answer(stream, connection), {
      maxInboundStreams: maxConcurrent,
      maxOutboundStreams: maxConcurrent,
    });
    this.#node = node;
  }

  async stop(): Promise<void> {
    const node = this.#node;
    this.#node = undefined;
    this.#waiting.clear();
    this.#stopping.abort(new Error(`${this.#options.name} stopped`));
    if (node?.status === 'started') await node.unhandle(this.#options.protocol);
  }

  /**
   * Swaps tables with `peer`, unless an exchange with it is running or waiting. When too many
   * run, it waits for a slot: a device that starts among many meets them all at once, and an
   * exchange dropped then would leave both sides waiting for heartbeats to learn of each other.
   */
  async with(peer: PeerId): Promise<void> {
    const node = this.#node;
    const key = peer.toString();
    if (!node || this.#running.has(key) || this.#waiting.has(key)) return;
    if (this.#running.size >= this.#options.maxConcurrent) {
      this.#waiting.set(key, peer);
      return;
    }
    this.#running.add(key);
    const signal = this.#signal();
    let stream: Stream | undefined;
    try {
      stream = await node.dialProtocol(peer, this.#options.protocol, { signal });
      await sendAndClose(stream, this.#options.table(), signal);
      await this.#options.merge(await readToEnd(stream, this.#options.maxBytes(), signal), peer);
    } catch (err) {
      stream?.abort(err as Error);
      this.#options.log.debug({ peer: key, err }, `${this.#options.name} failed`);
    } finally {
      this.#running.delete(key);
      const [next] = this.#waiting.values();
      if (next) {
        this.#waiting.delete(next.toString());
        void this.with(next);
      }
    }
  }

  async #answer(stream: Stream, connection: Connection): Promise<void> {
    const signal = this.#signal();
    try {
      const request = await readToEnd(stream, this.#options.maxBytes(), signal);
      const answer = this.#options.table();
      await this.#options.merge(request, connection.remotePeer);
      await sendAndClose(stream, answer, signal);
    } catch (err) {
      stream.abort(err as Error);
      this.#options.log.debug({ peer: connection.remotePeer.toString(), err }, `${this.#options.name} request failed`);
    }
  }

  #signal(): AbortSignal {
    return AbortSignal.any([this.#stopping.signal, AbortSignal.timeout(this.#options.timeoutMs)]);
  }
}
