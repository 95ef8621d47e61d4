import { randomBytes } from 'node:crypto';
import { once } from 'node:events';
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import { finished } from 'node:stream/promises';
import type { AddressInfo } from 'node:net';
import { silentLog, withoutUndefined, type MeshLog } from '@shoal/mesh';
import { isDigest } from '@shoal/oci';
import { ChunkBitmap, chunkCount } from '@shoal/store';
import { ChunkProtocolError, corrupted, decodeBitmap } from './chunk-protocol.ts';
import type { Availability, ChunkSource, DataPlaneTicket } from './types.ts';
import { UploadLedger } from './upload-ledger.ts';

export interface ChunkDataPlaneOptions {
  /** Address to listen on; peers reach it at the address of their libp2p connection. Default `0.0.0.0`. */
  host?: string;
  /** Default 0: any free port (it travels in holding answers). */
  port?: number;
  /** How long a ticket is good for. Default 600 000 ms. */
  ticketTtlMs?: number;
  /**
   * Chunks sent at once. As many requests again wait for a turn (so a slot never idles while
   * its next request is on its way); beyond that a request is answered 503 at once and the peer
   * asks again later or asks another holder. Few uploads at full speed finish each chunk soon,
   * and a chunk is worth passing on only once it is whole: a seeder on a 20 Mbit/s link sending
   * 36 chunks at once took 15 s per chunk, past the receivers' 10 s limit, and its whole uplink
   * went into chunks that were abandoned. A send ends once the kernel holds its bytes: its
   * socket buffer may take a whole chunk at once, so this bounds what is handed to the kernel,
   * not what is still on the wire. Default 4.
   */
  maxUploads?: number;
  /**
   * Chunks sent at once to picks of a blob this device is pulling through from an upstream,
   * counted with all the others. Such a device is the only way that blob enters the mesh, so its
   * uplink has to pass each chunk on as fast as its downlink brings them, and it sends each just
   * once meanwhile (see #handle). Each receiver's downlink is shared evenly among the TCP flows
   * into it; with as many flows as every other holder, a seeder pulling through held ~1/10 of
   * them where it needed 1/9, ran its uplink ~90 % full, and fell further behind its own
   * download all through the pull. Default twice maxUploads.
   */
  maxPullThroughUploads?: number;
  /** What this device has sent, for pick requests (share the chunk server's). Default a ledger of its own. */
  ledger?: UploadLedger;
  /** TEST ONLY: flip a byte in the chunks it picks, as ChunkServer's switch does. Default none. */
  corrupt?: (blob: string, index: number) => boolean;
  log?: MeshLog;
}

/**
 * `GET /v1/chunks/<digest>/<index>`, and `GET /v1/chunks/<digest>/pick` with the wanted chunks'
 * bitmap (base64) in `shoal-want`: the holder sends the one it has sent least and names it in
 * `shoal-chunk`, as `/shoal/chunks/1.0.0`'s pick does.
 */
const ROUTE = /^\/v1\/chunks\/([a-z0-9]+:[a-f0-9]+)\/(\d{1,10}|pick)$/;
/** A pick's bitmap rides in a header: room for ~147 000 chunks, as on the libp2p path. */
const MAX_HEADER_BYTES = 32 * 1024;
/** Chunks of the default size fit; a larger chunk gets a buffer of its own. */
const POOLED_BUFFER_BYTES = 1024 * 1024;
const POOL_SIZE = 16;

/** What a request asks for, and for a pick what this device holds of its blob. */
interface Wanted {
  ask: number | ChunkBitmap;
  have: Availability;
  /** A pick of a blob this device is pulling through (Holding.growing). */
  pullThrough: boolean;
}

/** A request waiting for an upload slot: `grant(false)` answers it busy. */
interface Waiter {
  peer: string;
  /** How many times this device has sent what the request would get now (see UploadLedger.sends). */
  sends(): number;
  /** Uploads at once this request may take a turn among. */
  slots: number;
  grant(granted: boolean): void;
}

/**
 * The bulk path for chunks: plain HTTP beside the libp2p host. libp2p's noise and yamux cost
 * about 25 CPU seconds per GB on a small device; integrity does not need them, because every
 * chunk is verified against its hash anyway. Who may fetch is still decided over libp2p (pnet
 * and noise): a ticket, bound to one peer, is only handed out in a `/shoal/chunks/1.0.0`
 * holding answer. Bytes on this path are not encrypted; run with the data plane off where
 * layer contents are secret from the LAN.
 */
export class ChunkDataPlane {
  readonly #source: ChunkSource;
  readonly #options: Required<Omit<ChunkDataPlaneOptions, 'corrupt'>> & Pick<ChunkDataPlaneOptions, 'corrupt'>;
  /** ticket -> peer and expiry; and each peer's current ticket. */
  readonly #tickets = new Map<string, { peer: string; expires: number }>();
  readonly #byPeer = new Map<string, string>();
  #server: Server | undefined;
  #active = 0;
  /** Requests waiting for an upload slot (see #acquire), and the slots each peer holds. */
  readonly #waiting: Waiter[] = [];
  readonly #serving = new Map<string, number>();
  readonly #free: Buffer[] = [];
  #bytesServed = 0;
  #refused = 0;

  constructor(source: ChunkSource, options: ChunkDataPlaneOptions = {}) {
    this.#source = source;
    const given = withoutUndefined(options);
    const maxUploads = given.maxUploads ?? 4;
    this.#options = {
      host: '0.0.0.0',
      port: 0,
      ticketTtlMs: 600_000,
      maxUploads,
      maxPullThroughUploads: 2 * maxUploads,
      log: silentLog,
      ledger: new UploadLedger(),
      ...given,
    };
  }

  get port(): number {
    return (this.#server?.address() as AddressInfo | null)?.port ?? 0;
  }

  get bytesServed(): number {
    return this.#bytesServed;
  }

  /** Requests answered busy (503): the slots were taken and as many waited, or a pull-through had nothing new for a pick. */
  get uploadsRefused(): number {
    return this.#refused;
  }

  async start(): Promise<void> {
    if (this.#server) return;
    const server = createServer({ keepAliveTimeout: 30_000, maxHeaderSize: MAX_HEADER_BYTES }, (req, res) => void this.#handle(req, res));
    server.listen(this.#options.port, this.#options.host);
    await once(server, 'listening');
    this.#server = server;
  }

  async stop(): Promise<void> {
    const server = this.#server;
    this.#server = undefined;
    if (!server) return;
    server.closeAllConnections();
    await new Promise<void>((resolve) => server.close(() => resolve()));
  }

  /** The ticket `peer` fetches with: its current one, or a new one when that is old. */
  ticketFor(peer: string): DataPlaneTicket | undefined {
    if (!this.#server) return undefined;
    const now = Date.now();
    const current = this.#byPeer.get(peer);
    const entry = current === undefined ? undefined : this.#tickets.get(current);
    // Renewed at half its life, so a peer never holds one about to lapse.
    if (current !== undefined && entry && entry.expires - now >= this.#options.ticketTtlMs / 2) return { port: this.port, ticket: current };
    if (current !== undefined) this.#tickets.delete(current);
    const ticket = randomBytes(24).toString('base64url');
    this.#tickets.set(ticket, { peer, expires: now + this.#options.ticketTtlMs });
    this.#byPeer.set(peer, ticket);
    this.#sweep(now);
    return { port: this.port, ticket };
  }

  #sweep(now: number): void {
    for (const [ticket, { peer, expires }] of this.#tickets) {
      if (expires > now) continue;
      this.#tickets.delete(ticket);
      if (this.#byPeer.get(peer) === ticket) this.#byPeer.delete(peer);
    }
  }

  /**
   * An upload slot for `peer`'s request answering on `res`: at once, after a wait, or none (then
   * it has been answered busy, or its client went away while it waited). Waiting requests are
   * served by what they would get, chunks this device has sent fewest times first: a seeder
   * asked for two layers at once sent copies of one layer's chunks while the other still had
   * chunks it had never sent, which nobody else could pass on, and the pull ended waiting on it.
   * Among equals, slots go round the peers: a waiting request of a peer with nothing in service
   * goes before those of peers being served, and when the queue is full a request takes the
   * place of a worse one: one that would get a chunk sent more often, or one of a peer holding
   * more slots. First come, first served, a seeder's slots stayed with the few devices whose next
   * request arrived as their last chunk ended, while the others, answered busy and pausing,
   * waited ten seconds for a first chunk they could pass on.
   */
  async #acquire(res: ServerResponse, peer: string, sends: () => number, slots: number): Promise<boolean> {
    if (this.#active < slots) {
      this.#take(peer);
      return true;
    }
    if (this.#waiting.length >= slots) {
      const rank = (waiter: Waiter) => [waiter.sends(), this.#load(waiter.peer)] as const;
      const worst = this.#waiting.reduce((a, b) => (before(rank(a), rank(b)) ? b : a));
      // A peer's own load counts the request it is making, so two peers one slot apart do not swap places forever.
      if (!before([sends(), this.#load(peer) + 1], rank(worst))) {
        this.#refuse(res);
        return false;
      }
      this.#waiting.splice(this.#waiting.indexOf(worst), 1);
      worst.grant(false);
    }
    return new Promise<boolean>((resolve) => {
      const waiter: Waiter = {
        peer,
        sends,
        slots,
        grant: (granted) => {
          res.off('close', gone);
          if (!granted && !res.headersSent) this.#refuse(res);
          resolve(granted);
        },
      };
      const gone = (): void => {
        this.#waiting.splice(this.#waiting.indexOf(waiter), 1);
        resolve(false);
      };
      this.#waiting.push(waiter);
      res.once('close', gone);
    });
  }

  /** Answers busy: the peer asks again later or asks another holder. */
  #refuse(res: ServerResponse): void {
    this.#refused++;
    answer(res, 503);
  }

  /** Slots `peer` holds and requests it has waiting. */
  #load(peer: string): number {
    return (this.#serving.get(peer) ?? 0) + this.#waiting.filter((w) => w.peer === peer).length;
  }

  #take(peer: string): void {
    this.#active++;
    this.#serving.set(peer, (this.#serving.get(peer) ?? 0) + 1);
  }

  /** Frees `peer`'s slot and hands it to the best waiting request (see #acquire). */
  #release(peer: string): void {
    this.#active--;
    const left = (this.#serving.get(peer) ?? 1) - 1;
    if (left > 0) this.#serving.set(peer, left);
    else this.#serving.delete(peer);
    // Only a request allowed more slots than are in use (a pull-through pick may be) takes this one.
    const eligible = this.#waiting.filter((w) => w.slots > this.#active);
    if (eligible.length === 0) return;
    const rank = (waiter: Waiter) => [waiter.sends(), this.#serving.get(waiter.peer) ?? 0] as const;
    const next = eligible.reduce((a, b) => (before(rank(b), rank(a)) ? b : a));
    this.#waiting.splice(this.#waiting.indexOf(next), 1);
    this.#take(next.peer);
    next.grant(true);
  }

  /**
   * What a request asks for: chunk `index`, or for a pick the wanted chunks' bitmap with what this
   * device holds of the blob (an empty bitmap when nothing). Only a pick looks the blob up: for a
   * blob still being pulled through, that builds its provisional index, and doing so for every
   * request, refused ones included, cost a cold start's seeder the CPU it fed the others with.
   * ChunkProtocolError for a bad bitmap.
   */
  async #wanted(blob: string, index: string, want: string | string[] | undefined): Promise<Wanted> {
    if (index !== 'pick') return { ask: Number(index), have: 'all', pullThrough: false };
    if (typeof want !== 'string') throw new ChunkProtocolError('pick request without a shoal-want bitmap');
    const holding = await this.#source.holding(blob);
    if (!holding) return { ask: new ChunkBitmap(0), have: 'all', pullThrough: false };
    return { ask: decodeBitmap(want, chunkCount(holding.index), 'pick request'), have: holding.have, pullThrough: holding.growing === true };
  }

  async #handle(req: IncomingMessage, res: ServerResponse): Promise<void> {
    const route = req.method === 'GET' ? ROUTE.exec(req.url ?? '') : null;
    if (!route || !isDigest(route[1]!)) return answer(res, 400);
    const auth = /^Bearer (\S+)$/.exec(req.headers.authorization ?? '');
    const entry = auth ? this.#tickets.get(auth[1]!) : undefined;
    if (!entry || entry.expires <= Date.now()) return answer(res, 401);
    const blob = route[1]!;
    let wanted: Wanted;
    try {
      wanted = await this.#wanted(blob, route[2]!, req.headers['shoal-want']);
    } catch (err) {
      this.#options.log.debug({ peer: entry.peer, blob, err }, 'data plane request failed');
      return answer(res, err instanceof ChunkProtocolError ? 400 : 500);
    }
    const { ask, have, pullThrough } = wanted;
    const { ledger, maxUploads, maxPullThroughUploads } = this.#options;
    // A pick of nothing held is answered 404, which is cheap, so it goes first.
    const sends = () => ledger.sends(blob, ask, have) ?? -1;
    if (!(await this.#acquire(res, entry.peer, sends, pullThrough ? maxPullThroughUploads : maxUploads))) return;
    const buffer = this.#free.pop() ?? Buffer.allocUnsafeSlow(POOLED_BUFFER_BYTES);
    let reusable = true;
    let index: number | undefined;
    // A send counted in the ledger that does not reach the requester (it timed out waiting, or
    // the chunk is gone) is taken back: counted, a chunk nobody received passed for sent, and a
    // seeder offered it again only after every other chunk.
    let delivered = false;
    try {
      if (typeof ask === 'number') {
        index = ask;
        ledger.record(blob, index);
      } else {
        // A partial holder's chunks grew while the request waited.
        const holding = await this.#source.holding(blob);
        const picked = holding && ask.length === chunkCount(holding.index) ? ledger.pickFrom(blob, ask, holding) : undefined;
        if (picked === 'busy') return this.#refuse(res);
        index = picked;
      }
      if (index === undefined) return answer(res, 404);
      const data = await this.#source.readChunk(blob, index, buffer);
      if (!data) return answer(res, 404);
      const payload = this.#options.corrupt?.(blob, index) ? corrupted(data) : data;
      res.writeHead(200, { 'content-type': 'application/octet-stream', 'content-length': payload.byteLength, 'shoal-chunk': index });
      res.end(payload);
      // The socket may still hold the bytes: the buffer is free again once they are written.
      reusable = false;
      // finished() also settles for an answer whose client left before it was written: waiting
      // for a 'close' already emitted held the upload slot for good.
      const written = await finished(res).then(
        () => true,
        () => res.writableFinished,
      );
      reusable = written;
      if (!written) return;
      delivered = true;
      this.#bytesServed += payload.byteLength;
    } catch (err) {
      this.#options.log.debug({ peer: entry.peer, blob, index, err }, 'data plane request failed');
      if (!res.headersSent) answer(res, err instanceof ChunkProtocolError ? 400 : 500);
      else res.destroy();
    } finally {
      if (index !== undefined && !delivered) ledger.unrecord(blob, index);
      this.#release(entry.peer);
      // Buffers are reused rather than allocated per chunk: 1 MiB allocations drive V8 into a
      // full GC every 64 MiB, which cost more CPU than the serving itself.
      if (reusable && this.#free.length < POOL_SIZE) this.#free.push(buffer);
    }
  }
}

/** Whether rank `a` goes before rank `b`: compared field by field, lower first. */
function before(a: readonly number[], b: readonly number[]): boolean {
  for (let i = 0; i < a.length; i++) if (a[i] !== b[i]) return a[i]! < b[i]!;
  return false;
}

/** An answer without a body. Its length is explicit: node would send `writeHead(n).end()` chunked. */
function answer(res: ServerResponse, status: number): void {
  res.writeHead(status, { 'content-length': 0 }).end();
}
