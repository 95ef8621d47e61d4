import { Readable } from 'node:stream';
import { buffer } from 'node:stream/consumers';
import { isDigest, parseManifest, referencedBlobs, type ParsedManifest } from '@shoal/oci';
import { DEFAULT_MAX_MANIFEST_BYTES as MAX_MANIFEST_BYTES, type Registry } from '@shoal/registry-gateway';
import {
  RangeNotSatisfiableError,
  type BlobInfo,
  type BlobReader,
  type ByteRange,
  type ContentStore,
  type StoredManifest,
} from '@shoal/store';
import { NoHolderError, type Downloader } from './downloader.ts';
import type { Transfer } from './transfer.ts';
import type { AvailabilityUpdate, ProviderDirectory } from './types.ts';

const REFERENCED_TTL_MS = 10 * 60_000;
const MAX_REFERENCED = 4096;

/** The mesh-wide tag table, as the registry needs it. */
export interface TagLookup {
  /** The record for a tag; `manifest`, when carried, is the manifest's bytes in base64, already checked against `digest`. */
  get(repository: string, tag: string): (Naming & { digest: string; mediaType: string; manifest?: string }) | undefined;
  /** The newest signed record that gives a chunk index for `blob`; undefined when none does. */
  recordNaming(blob: string): Naming | undefined;
}

/** What the registry uses of the signed record that names some content: who published it. */
export interface Naming {
  /** Peer id of the device that published the record, which held or was pulling the content. */
  publisher: string;
}

export interface SwarmRegistryOptions {
  /** What to ask when the mesh has nothing: a LocalRegistry, or a MirroringRegistry for pull-through. */
  fallback: Registry;
  downloader: Downloader;
  tags: TagLookup;
  /**
   * How often content a signed tag record names (a tag's manifest, a blob it gives a chunk index
   * for, and what a manifest it named references) is asked of the mesh before the fallback: the
   * record says the mesh has it, so a miss is most likely a loaded or restarting holder, or one
   * still pulling it through. Other content is asked once. Default 3.
   */
  recordedAttempts?: number;
  /** Wait before the second attempt, doubling after. Default 1 000 ms. */
  retryDelayMs?: number;
  /**
   * Where the fallback pulls through from an upstream, how long the mesh is searched for
   * content no record names before the upstream is asked instead. The search usually ends
   * within a second, but at a cold start's first moments, ten devices looking up the same new
   * blobs at once and starved of CPU, the seeder waited 5-6 s for it (a DHT query timing out,
   * then holding queries to members too busy to answer) before its upstream pull, which
   * everything else waits on, began. Default 1 000 ms.
   */
  upstreamAfterMs?: number;
}

/**
 * A Registry that serves the store first, then the mesh, then its fallback (upstream
 * pull-through). A tag resolves through the mesh-wide tag table, so an image pushed to any
 * device pulls from every device; blobs come chunk by chunk from every holder and stream to
 * the client in order as they land.
 */
export class SwarmRegistry implements Registry {
  readonly store: ContentStore;
  readonly #fallback: Registry;
  readonly #downloader: Downloader;
  readonly #tags: TagLookup;
  readonly #attempts: number;
  readonly #retryDelayMs: number;
  readonly #upstreamAfterMs: number;
  /**
   * Content that manifests named by records reference, with the record's publisher and until
   * when (performance.now()): a record made while its publisher was still pulling the image
   * through carries no chunk index for blobs it did not hold yet. Bounded; the oldest go first.
   */
  readonly #referenced = new Map<string, Naming & { until: number }>();

  constructor(options: SwarmRegistryOptions) {
    this.#fallback = options.fallback;
    this.store = options.fallback.store;
    this.#downloader = options.downloader;
    this.#tags = options.tags;
    this.#attempts = options.recordedAttempts ?? 3;
    this.#retryDelayMs = options.retryDelayMs ?? 1_000;
    this.#upstreamAfterMs = options.upstreamAfterMs ?? 1_000;
  }

  async getManifest(repository: string, reference: string): Promise<StoredManifest | undefined> {
    const local = await this.store.getManifest(repository, reference);
    const record = isDigest(reference) ? undefined : this.#tags.get(repository, reference);
    // The mesh's word on a tag is newer than a local copy that still points elsewhere. A small
    // manifest rides in the record itself: no holder need be found and asked, which under load
    // took a second or more of every pull's start.
    if (record && local?.digest !== record.digest) {
      const fetched = record.manifest !== undefined
        ? await this.#keepManifest(repository, Buffer.from(record.manifest, 'base64'), record, reference)
        : await this.#manifestFromMesh(repository, record.digest, record, reference);
      if (fetched) return fetched;
    }
    if (local) return local;
    if (isDigest(reference)) {
      const fetched = await this.#manifestFromMesh(repository, reference, this.#naming(reference));
      if (fetched) return fetched;
    }
    return this.#fallback.getManifest(repository, reference);
  }

  async statBlob(repository: string, digest: string): Promise<BlobInfo | undefined> {
    const local = await this.store.statBlob(digest);
    if (local) return local;
    const transfer = await this.#transfer(repository, digest, this.#naming(digest));
    if (transfer) return { digest, size: transfer.size! };
    return this.#fallback.statBlob(repository, digest);
  }

  async readBlob(repository: string, digest: string, range?: ByteRange): Promise<BlobReader | undefined> {
    const local = await this.store.readBlob(digest, range);
    if (local) return local;
    const transfer = await this.#transfer(repository, digest, this.#naming(digest));
    if (!transfer) return this.#fallback.readBlob(repository, digest, range);
    const size = transfer.size!;
    if (size === 0) return { info: { digest, size }, stream: Readable.from([]) };
    if (range && (range.start > range.end || range.end >= size)) throw new RangeNotSatisfiableError(size);
    return transfer.read(range?.start ?? 0, range?.end ?? size - 1);
  }

  /** The signed tag record naming `digest`, if any: the mesh is then asked for it more than once. */
  #naming(digest: string): Naming | undefined {
    const record = this.#tags.recordNaming(digest);
    if (record) return record;
    const referenced = this.#referenced.get(digest);
    return referenced && referenced.until > performance.now() ? referenced : undefined;
  }

  #expectReferences(manifest: ParsedManifest, { publisher }: Naming): void {
    const until = performance.now() + REFERENCED_TTL_MS;
    for (const { digest } of [...referencedBlobs(manifest), ...manifest.manifests]) {
      this.#referenced.delete(digest);
      this.#referenced.set(digest, { publisher, until });
    }
    for (const digest of this.#referenced.keys()) {
      if (this.#referenced.size <= MAX_REFERENCED) break;
      this.#referenced.delete(digest);
    }
  }

  /**
   * The mesh transfer of `digest`, or undefined when no device in the mesh holds it; content a
   * record names is asked again (1 s, then 2 s later by default) before that answer, and other
   * content is searched for at most upstreamAfterMs where `repository` has an upstream.
   */
  async #transfer(repository: string, digest: string, naming: Naming | undefined): Promise<Transfer | undefined> {
    if (!digest.startsWith('sha256:')) return undefined;
    const attempts = naming ? this.#attempts : 1;
    const limited = !naming && this.#fallback.pullsThrough?.(repository) === true;
    for (let attempt = 1, wait = this.#retryDelayMs; ; attempt++, wait *= 2) {
      // A holder gossiped while this attempt searches or while it waits cuts the wait short: at
      // a cold start the seeder says so as its first chunk lands, a second or two after the
      // others first asked.
      const news = holderNews(this.#downloader.options.directory, digest);
      try {
        return await this.#downloader.fetch(digest, {
          lookup: limited ? AbortSignal.timeout(this.#upstreamAfterMs) : undefined,
          // The first attempt asks only the record's publisher and holders gossip names: ten
          // devices searching the whole mesh (a DHT query, then every member) for blobs a seeder
          // had not started pulling yet took the CPU its start needed. Later ones search it all.
          likely: naming && attempt === 1 ? [naming.publisher] : undefined,
        });
      } catch (err) {
        if (!(err instanceof NoHolderError)) throw err;
        if (attempt >= attempts) return undefined;
        await news.within(wait);
      } finally {
        news.stop();
      }
    }
  }

  /** Fetches a manifest by digest from the mesh, checks it parses, and records it (tagged if asked). */
  async #manifestFromMesh(repository: string, digest: string, naming: Naming | undefined, tag?: string): Promise<StoredManifest | undefined> {
    let info = await this.store.statBlob(digest);
    if (!info) {
      const transfer = await this.#transfer(repository, digest, naming);
      if (!transfer) return undefined;
      info = await transfer.done;
    }
    // Only something manifest-sized is read into memory.
    if (info.size > MAX_MANIFEST_BYTES) return undefined;
    const reader = await this.store.readBlob(digest);
    if (!reader) return undefined;
    return this.#keepManifest(repository, await buffer(reader.stream), naming, tag);
  }

  /** Checks that `bytes` parse as a manifest and records it (tagged if asked). */
  async #keepManifest(repository: string, bytes: Buffer, naming: Naming | undefined, tag?: string): Promise<StoredManifest> {
    const manifest = parseManifest(bytes);
    if (naming) this.#expectReferences(manifest, naming);
    await this.store.putManifest(repository, manifest, tag);
    return { digest: manifest.digest, mediaType: manifest.mediaType, size: bytes.byteLength, bytes };
  }
}

/**
 * Listens, from now until stop(), for availability news naming a holder of `blob`. within(ms)
 * resolves once some has come (at once if it already has), or after `ms`.
 */
function holderNews(directory: ProviderDirectory, blob: string): { within(ms: number): Promise<void>; stop(): void } {
  const heard = Promise.withResolvers<void>();
  const onNews = ({ detail }: CustomEvent<AvailabilityUpdate>) => {
    if (detail.blob === blob && detail.have) heard.resolve();
  };
  directory.addEventListener('availability', onNews);
  return {
    within: (ms) =>
      new Promise<void>((resolve) => {
        const timer = setTimeout(resolve, ms);
        void heard.promise.then(() => {
          clearTimeout(timer);
          resolve();
        });
      }),
    stop: () => directory.removeEventListener('availability', onNews),
  };
}
