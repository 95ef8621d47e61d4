import { EventEmitter } from 'node:events';
import { Readable } from 'node:stream';
import { isDigest } from '@shoal/oci';
import {
  RangeNotSatisfiableError,
  type BlobInfo,
  type BlobReader,
  type BlobWriter,
  type ByteRange,
  type ChunkIndex,
  type ContentStore,
  type GrowingBlob,
  type StoredManifest,
  type UploadReader,
} from '@shoal/store';
import type { Registry } from './registry.ts';
import { UpstreamError, type UpstreamClient } from './upstream.ts';

export interface MirroringRegistryOptions {
  store: ContentStore;
  /**
   * Upstream registries by namespace, the first component of a repository name: with
   * `docker.io` mapped, `docker.io/library/nginx` is pulled as `library/nginx`. The registry
   * owns these clients and closes them in `close()`.
   */
  upstreams: ReadonlyMap<string, UpstreamClient>;
}

/** What a pull-through is about: a manifest by tag or digest, or a blob by digest. */
export interface PullThrough {
  kind: 'manifest' | 'blob';
  repository: string;
  reference: string;
}

export interface PullThroughComplete extends PullThrough {
  digest: string;
  bytes: number;
  durationMs: number;
}

export interface PullThroughFailure extends PullThrough {
  error: Error;
  /** Bytes received before the failure. */
  bytes: number;
  durationMs: number;
}

export interface MirroringRegistryEvents {
  /** The store missed and the upstream is being asked. */
  'pull-through:start': [PullThrough];
  /** A blob's bytes started to arrive; its landed chunks can be shared (see pulling()). */
  'pull-through:blob': [{ digest: string; size: number | undefined; chunkSize: number }];
  /** The upstream does not have it either. */
  'pull-through:miss': [PullThrough];
  /** Verified and committed to the store. */
  'pull-through:complete': [PullThroughComplete];
  'pull-through:error': [PullThroughFailure];
}

/** Bytes read from a download's temp file per step; also each client stream's buffer. */
const READ_CHUNK = 256 * 1024;
/**
 * A client that has caught up with a download waits for the next piece, or at most this long:
 * progress is signalled when bytes are handed to the writer, slightly before they land on disk.
 */
const CATCH_UP_POLL_MS = 20;

interface Route {
  upstream: UpstreamClient;
  /** The repository name on the upstream. */
  name: string;
}

/** The blob was committed to the store by the time a pull would have started. */
const STORED = Symbol('stored');

/**
 * A Registry that serves the store first and, on a miss in a namespace with an upstream, pulls
 * through: manifests are verified and stored (tagged when asked by tag); a blob is downloaded
 * once per digest into a store writer, verified and committed, while every client asking for it
 * reads the bytes from the writer's file as they land. A tag already in the store is served
 * without asking the upstream, so an offline device keeps working.
 */
export class MirroringRegistry extends EventEmitter<MirroringRegistryEvents> implements Registry {
  readonly store: ContentStore;
  readonly #upstreams: ReadonlyMap<string, UpstreamClient>;
  readonly #manifestPulls = new Map<string, Promise<StoredManifest | undefined>>();
  readonly #blobPulls = new Map<string, Promise<BlobDownload | typeof STORED | undefined>>();
  /** Downloads under way, once started, by digest. */
  readonly #downloads = new Map<string, BlobDownload>();
  #closed = false;

  constructor(opts: MirroringRegistryOptions) {
    super();
    this.store = opts.store;
    this.#upstreams = opts.upstreams;
  }

  async getManifest(repository: string, reference: string): Promise<StoredManifest | undefined> {
    const local = await this.store.getManifest(repository, reference);
    if (local) return local;
    const route = this.#route(repository);
    if (!route) return undefined;
    const key = `${repository}@${reference}`;
    let pending = this.#manifestPulls.get(key);
    if (!pending) {
      pending = this.#pullManifest(route, repository, reference).finally(() => this.#manifestPulls.delete(key));
      this.#manifestPulls.set(key, pending);
    }
    return pending;
  }

  pullsThrough(repository: string): boolean {
    return this.#route(repository) !== undefined;
  }

  async statBlob(repository: string, digest: string): Promise<BlobInfo | undefined> {
    const local = await this.store.statBlob(digest);
    if (local) return local;
    const route = this.#route(repository);
    return route?.upstream.statBlob(route.name, digest);
  }

  /**
   * On a miss, joins or starts the download of the blob and streams it as it arrives. The last
   * byte of the blob is held back until the digest is verified, so a client never sees a clean
   * end of bad content; a range that ends earlier ends as soon as its bytes are there.
   */
  async readBlob(repository: string, digest: string, range?: ByteRange): Promise<BlobReader | undefined> {
    const local = await this.store.readBlob(digest, range);
    if (local) return local;
    const route = this.#route(repository);
    if (!route) return undefined;
    const download = await this.#download(route, repository, digest);
    if (download === undefined) return undefined;
    if (download === STORED) return this.store.readBlob(digest, range);
    const size = download.size;
    if (size === undefined) {
      // Without a Content-Length the size is known only at the end.
      await download.finished;
      download.throwIfFailed();
      return this.store.readBlob(digest, range);
    }
    if (range && (range.start > range.end || range.end >= size)) throw new RangeNotSatisfiableError(size);
    const stream = await download.open(range?.start ?? 0, range?.end ?? size - 1);
    if (!stream) return this.store.readBlob(digest, range);
    return { info: { digest, size }, stream };
  }

  /**
   * A blob being pulled through right now, for sharing its landed chunks with other devices
   * before it is whole; undefined when none is (or its size is unknown).
   */
  pulling(digest: string): GrowingBlob | undefined {
    const download = this.#downloads.get(digest);
    return download && download.size !== undefined && !download.failure && !download.committed ? download : undefined;
  }

  /** Stops downloads in flight (their clients get an error), then closes the upstream clients. */
  async close(): Promise<void> {
    this.#closed = true;
    const downloads = await Promise.allSettled(this.#blobPulls.values());
    for (const d of downloads) {
      if (d.status === 'fulfilled' && d.value instanceof BlobDownload) d.value.cancel(new Error('registry is closing'));
    }
    await Promise.allSettled([
      ...downloads.map((d) => (d.status === 'fulfilled' && d.value instanceof BlobDownload ? d.value.finished : undefined)),
      ...this.#manifestPulls.values(),
    ]);
    await Promise.all([...this.#upstreams.values()].map((u) => u.close()));
  }

  #route(repository: string): Route | undefined {
    const slash = repository.indexOf('/');
    if (slash <= 0) return undefined;
    const upstream = this.#upstreams.get(repository.slice(0, slash));
    if (!upstream) return undefined;
    if (this.#closed) throw new Error('registry is closed');
    return { upstream, name: repository.slice(slash + 1) };
  }

  async #pullManifest(route: Route, repository: string, reference: string): Promise<StoredManifest | undefined> {
    const event: PullThrough = { kind: 'manifest', repository, reference };
    const started = performance.now();
    this.emit('pull-through:start', event);
    try {
      const manifest = await route.upstream.getManifest(route.name, reference);
      if (!manifest) {
        this.emit('pull-through:miss', event);
        return undefined;
      }
      await this.store.putManifest(repository, manifest, isDigest(reference) ? undefined : reference);
      const bytes = manifest.bytes.byteLength;
      this.emit('pull-through:complete', { ...event, digest: manifest.digest, bytes, durationMs: performance.now() - started });
      return { digest: manifest.digest, mediaType: manifest.mediaType, size: bytes, bytes: manifest.bytes };
    } catch (err) {
      this.emit('pull-through:error', { ...event, error: err as Error, bytes: 0, durationMs: performance.now() - started });
      throw err;
    }
  }

  /** The one download of `digest`: joined if under way, else started. */
  #download(route: Route, repository: string, digest: string): Promise<BlobDownload | typeof STORED | undefined> {
    let pending = this.#blobPulls.get(digest);
    if (!pending) {
      const forget = () => {
        if (this.#blobPulls.get(digest) === started) this.#blobPulls.delete(digest);
      };
      const started = this.#startDownload(route, repository, digest, forget);
      pending = started;
      this.#blobPulls.set(digest, started);
      started.then((d) => (d instanceof BlobDownload ? undefined : forget()), forget);
    }
    return pending;
  }

  /** Starts a download; `forget` runs when it has ended, before its events are emitted. */
  async #startDownload(
    route: Route,
    repository: string,
    digest: string,
    forget: () => void,
  ): Promise<BlobDownload | typeof STORED | undefined> {
    // The blob may have been committed since the caller looked.
    if (await this.store.statBlob(digest)) return STORED;
    const event: PullThrough = { kind: 'blob', repository, reference: digest };
    const started = performance.now();
    const failed = (error: Error, bytes: number) =>
      this.emit('pull-through:error', { ...event, error, bytes, durationMs: performance.now() - started });
    this.emit('pull-through:start', event);
    try {
      const blob = await route.upstream.getBlob(route.name, digest);
      if (!blob) {
        this.emit('pull-through:miss', event);
        return undefined;
      }
      let writer: BlobWriter;
      try {
        writer = await this.store.createWriter();
      } catch (err) {
        blob.body.destroy();
        throw err;
      }
      const download = new BlobDownload(digest, blob.size, writer, blob.body);
      this.#downloads.set(digest, download);
      this.emit('pull-through:blob', { digest, size: blob.size, chunkSize: writer.chunkSize });
      void download.finished.then(() => {
        this.#downloads.delete(digest);
        forget();
        if (download.failure) failed(download.failure, download.received);
        else
          this.emit('pull-through:complete', {
            ...event,
            digest,
            bytes: download.received,
            durationMs: performance.now() - started,
          });
      });
      return download;
    } catch (err) {
      failed(err as Error, 0);
      throw err;
    }
  }
}

/**
 * One upstream blob being written through a store writer. Clients read the writer's file
 * behind it; `finished` settles (never rejects) once the blob is committed or has failed.
 */
class BlobDownload implements GrowingBlob {
  readonly digest: string;
  readonly size: number | undefined;
  readonly finished: Promise<void>;
  received = 0;
  committed = false;
  failure: Error | undefined;
  readonly #writer: BlobWriter;
  readonly #body: Readable;
  #progress = Promise.withResolvers<void>();
  /** One reader of the writer's file for sharing, opened on first use, closed at the end. */
  #sharing: Promise<UploadReader> | undefined;

  constructor(digest: string, size: number | undefined, writer: BlobWriter, body: Readable) {
    this.digest = digest;
    this.size = size;
    this.#writer = writer;
    this.#body = body;
    this.finished = this.#run();
    void this.finished.then(() => this.#sharing?.then((r) => r.close()).catch(() => {}));
  }

  async index(): Promise<ChunkIndex> {
    const landed = await (await this.#sharingReader()).landed();
    const chunkSize = this.#writer.chunkSize;
    // Only chunks whose every byte is in the file: the hasher sees bytes slightly before they land.
    const whole = landed >= this.size! ? Infinity : Math.floor(landed / chunkSize);
    const chunks = this.#writer.chunkHashes().slice(0, whole);
    return { blob: this.digest, size: this.size!, chunkSize, chunks };
  }

  async read(buffer: Uint8Array, position: number): Promise<number> {
    return (await this.#sharingReader()).read(buffer, position);
  }

  #sharingReader(): Promise<UploadReader> {
    this.#sharing ??= this.#writer.openReader();
    return this.#sharing;
  }

  async #run(): Promise<void> {
    const self = this;
    try {
      await this.#writer.append(
        (async function* () {
          for await (const chunk of self.#body) {
            self.received += (chunk as Buffer).byteLength;
            yield chunk as Buffer;
            // The writer asked for more: the previous chunk is on its way to disk.
            self.#notify();
          }
        })(),
      );
      this.#notify();
      if (this.size !== undefined && this.received !== this.size) {
        throw new UpstreamError(`upstream sent ${this.received} bytes of ${this.digest}, Content-Length ${this.size}`, 200);
      }
      await this.#writer.commit(this.digest);
      this.committed = true;
    } catch (err) {
      this.failure = err as Error;
      this.#body.destroy();
      await this.#writer.abort().catch(() => {});
    } finally {
      this.#notify();
    }
  }

  /** Ends the download with `reason` (the writer's append fails and rolls back). */
  cancel(reason: Error): void {
    this.#body.destroy(reason);
  }

  /** For a client that asks after the failure: an UpstreamError, whatever the cause. */
  throwIfFailed(): void {
    const failure = this.failure;
    if (!failure) return;
    if (failure instanceof UpstreamError) throw failure;
    throw new UpstreamError(`pull-through of ${this.digest} failed: ${failure.message}`, undefined, { cause: failure });
  }

  /** A stream of bytes [start, end] that follows the download, or undefined once it is committed. */
  async open(start: number, end: number): Promise<Readable | undefined> {
    this.throwIfFailed();
    let reader: UploadReader;
    try {
      reader = await this.#writer.openReader();
    } catch (err) {
      if (this.committed) return undefined;
      this.throwIfFailed();
      throw err;
    }
    return new DownloadStream(this, reader, start, end);
  }

  /** Resolves at the next progress or at the end. */
  get nextProgress(): Promise<void> {
    return this.#progress.promise;
  }

  #notify(): void {
    const current = this.#progress;
    this.#progress = Promise.withResolvers<void>();
    current.resolve();
  }
}

/** Reads a range of a blob from the file behind a download, waiting for bytes not yet there. */
class DownloadStream extends Readable {
  readonly #download: BlobDownload;
  readonly #reader: UploadReader;
  readonly #end: number;
  readonly #endsBlob: boolean;
  #position: number;
  #pumping = false;

  constructor(download: BlobDownload, reader: UploadReader, start: number, end: number) {
    super({ highWaterMark: READ_CHUNK });
    this.#download = download;
    this.#reader = reader;
    this.#position = start;
    this.#end = end;
    this.#endsBlob = end === download.size! - 1;
  }

  override _read(): void {
    void this.#pump();
  }

  async #pump(): Promise<void> {
    if (this.#pumping) return;
    this.#pumping = true;
    try {
      while (!this.destroyed) {
        const download = this.#download;
        if (download.failure) {
          this.destroy(download.failure);
          return;
        }
        // The blob's last byte waits for the digest check.
        const verified = download.committed || !this.#endsBlob;
        if (this.#position > this.#end && verified) {
          this.push(null);
          return;
        }
        const progressed = download.nextProgress;
        const last = verified ? this.#end : this.#end - 1;
        if (last >= this.#position) {
          const buffer = Buffer.allocUnsafe(Math.min(READ_CHUNK, last - this.#position + 1));
          const n = await this.#reader.read(buffer, this.#position);
          if (n > 0) {
            this.#position += n;
            if (!this.push(buffer.subarray(0, n))) return;
            continue;
          }
          if (download.committed) throw new Error(`blob ${download.digest} is shorter than its size`);
        }
        await orTimeout(progressed, CATCH_UP_POLL_MS);
      }
    } catch (err) {
      this.destroy(err as Error);
    } finally {
      this.#pumping = false;
    }
  }

  override _destroy(err: Error | null, callback: (error?: Error | null) => void): void {
    this.#reader.close().then(
      () => callback(err),
      (closeErr: Error) => callback(err ?? closeErr),
    );
  }
}

function orTimeout(promise: Promise<void>, ms: number): Promise<void> {
  return new Promise((resolve) => {
    const timer = setTimeout(resolve, ms);
    void promise.then(() => {
      clearTimeout(timer);
      resolve();
    });
  });
}
