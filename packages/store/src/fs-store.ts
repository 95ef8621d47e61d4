import { randomUUID } from 'node:crypto';
import { EventEmitter } from 'node:events';
import { createReadStream, createWriteStream } from 'node:fs';
import { Readable, type Writable } from 'node:stream';
import { type FileHandle, mkdir, open, readdir, readFile, rename, rm, stat, truncate } from 'node:fs/promises';
import { join } from 'node:path';
import { pipeline } from 'node:stream/promises';
import { Digester, isDigest, parseDigest, parseManifest, type ParsedManifest } from '@shoal/oci';
import { ManifestCatalog, manifestMeta, type ManifestMeta } from './catalog.ts';
import { ChunkHasher, DEFAULT_CHUNK_SIZE, decodeChunkIndex, encodeChunkIndex } from './chunk-index.ts';
import { DigestMismatchError, RangeNotSatisfiableError, UploadBusyError } from './errors.ts';
import { sendFileRange } from './file-sender.ts';
import { FsPartialBlob, readPartialIndex, type PartialBlob } from './partial-blob.ts';
import { readFully, syncDir, syncFile, writeFileAtomic } from './fs-util.ts';
import type {
  BlobInfo,
  BlobReader,
  BlobWriter,
  ByteRange,
  ByteSource,
  ChunkIndex,
  ContentStore,
  ContentStoreEvents,
  ReferrerDescriptor,
  StoredManifest,
  TaggedImage,
  UploadReader,
} from './types.ts';

export interface FsContentStoreOptions {
  /** Data directory; the OCI image layout lives in `<dir>/oci`. */
  dir: string;
  /** Chunk size for chunk indexes (default 1 MiB). */
  chunkSize?: number;
  /** Upload sessions idle longer than this are discarded (default 1 hour). */
  uploadTtlMs?: number;
}

const READ_HIGH_WATER_MARK = 1024 * 1024;

/**
 * The content store on disk. `<dir>/oci` is a plain OCI image layout (oci-layout, index.json,
 * blobs/<alg>/<hex>) that skopeo and umoci read directly; upload temp files live in
 * `<dir>/uploads` (same file system, so commit is a rename) and chunk indexes in `<dir>/chunks`.
 */
export class FsContentStore extends EventEmitter<ContentStoreEvents> implements ContentStore {
  readonly layoutDir: string;
  readonly #uploadsDir: string;
  readonly #chunksDir: string;
  readonly #partialDir: string;
  /** Open partial blobs by digest: one object per blob, shared by every caller. */
  readonly #partials = new Map<string, Promise<FsPartialBlob>>();
  readonly #chunkSize: number;
  readonly #uploadTtlMs: number;
  readonly #writers = new Map<string, FsBlobWriter>();
  #catalog = new ManifestCatalog();
  #persisting: Promise<void> = Promise.resolve();
  #sweeper?: NodeJS.Timeout;

  private constructor(opts: FsContentStoreOptions) {
    super();
    this.layoutDir = join(opts.dir, 'oci');
    this.#uploadsDir = join(opts.dir, 'uploads');
    this.#chunksDir = join(opts.dir, 'chunks');
    this.#partialDir = join(opts.dir, 'partial');
    this.#chunkSize = opts.chunkSize ?? DEFAULT_CHUNK_SIZE;
    this.#uploadTtlMs = opts.uploadTtlMs ?? 60 * 60 * 1000;
  }

  static async open(opts: FsContentStoreOptions): Promise<FsContentStore> {
    const store = new FsContentStore(opts);
    await store.#init();
    return store;
  }

  async #init(): Promise<void> {
    await mkdir(join(this.layoutDir, 'blobs', 'sha256'), { recursive: true });
    await mkdir(this.#chunksDir, { recursive: true });
    // Partial blobs do survive a restart: their chunks are verified one by one.
    await mkdir(this.#partialDir, { recursive: true });
    // Uploads do not survive a restart: their hash state was in memory.
    await rm(this.#uploadsDir, { recursive: true, force: true });
    await mkdir(this.#uploadsDir, { recursive: true });
    const layoutFile = join(this.layoutDir, 'oci-layout');
    if (!(await exists(layoutFile))) {
      await writeFileAtomic(layoutFile, Buffer.from('{"imageLayoutVersion":"1.0.0"}\n'));
    }
    const indexFile = join(this.layoutDir, 'index.json');
    if (await exists(indexFile)) {
      this.#catalog = await ManifestCatalog.fromIndexJson(await readFile(indexFile), (d) => this.#loadMeta(d));
    } else {
      await writeFileAtomic(indexFile, this.#catalog.toIndexJson());
    }
    this.#sweeper = setInterval(() => void this.#sweepUploads(), Math.min(this.#uploadTtlMs, 60_000));
    this.#sweeper.unref();
  }

  async #loadMeta(digest: string): Promise<ManifestMeta | undefined> {
    try {
      return manifestMeta(parseManifest(await readFile(this.#blobPath(digest))));
    } catch {
      return undefined;
    }
  }

  #blobPath(digest: string): string {
    const { algorithm, hex } = parseDigest(digest);
    return join(this.layoutDir, 'blobs', algorithm, hex);
  }

  #chunkIndexPath(digest: string): string {
    const { algorithm, hex } = parseDigest(digest);
    return join(this.#chunksDir, `${algorithm}-${hex}.json`);
  }

  async statBlob(digest: string): Promise<BlobInfo | undefined> {
    try {
      const s = await stat(this.#blobPath(digest));
      return { digest, size: s.size };
    } catch (err) {
      if (isNotFound(err)) return undefined;
      throw err;
    }
  }

  async readBlobAt(digest: string, buffer: Uint8Array, position: number): Promise<number | undefined> {
    let fh: FileHandle;
    try {
      fh = await open(this.#blobPath(digest), 'r');
    } catch (err) {
      if (isNotFound(err)) return undefined;
      throw err;
    }
    try {
      return await readFully(fh, buffer, position);
    } finally {
      await fh.close();
    }
  }

  async readBlob(digest: string, range?: ByteRange): Promise<BlobReader | undefined> {
    let fh;
    try {
      fh = await open(this.#blobPath(digest), 'r');
    } catch (err) {
      if (isNotFound(err)) return undefined;
      throw err;
    }
    const { size } = await fh.stat();
    if (range && (range.start > range.end || range.end >= size)) {
      await fh.close();
      throw new RangeNotSatisfiableError(size);
    }
    if (size === 0) {
      await fh.close();
      return { info: { digest, size }, stream: Readable.from([]) };
    }
    return new FileBlobReader({ digest, size }, fh, range?.start ?? 0, range?.end ?? size - 1);
  }

  async createWriter(): Promise<BlobWriter> {
    const id = randomUUID();
    const path = join(this.#uploadsDir, id);
    await (await open(path, 'wx')).close();
    const writer = new FsBlobWriter(id, path, this.#chunkSize, {
      commit: (w, digest, chunks) => this.#commit(w, digest, chunks),
      forget: (w) => this.#writers.delete(w.id),
    });
    this.#writers.set(id, writer);
    return writer;
  }

  getWriter(id: string): BlobWriter | undefined {
    return this.#writers.get(id);
  }

  async putBlob(digest: string, source: ByteSource): Promise<BlobInfo> {
    const writer = await this.createWriter();
    try {
      await writer.append(source);
      return await writer.commit(digest);
    } catch (err) {
      await writer.abort();
      throw err;
    }
  }

  /** Verifies, fsyncs and renames an upload into the layout, then records its chunk index. */
  async #commit(writer: FsBlobWriter, digest: string, hasher: ChunkHasher): Promise<BlobInfo> {
    const { algorithm } = parseDigest(digest);
    const actual = writer.runningDigest(algorithm) ?? (await hashFile(writer.path, algorithm));
    if (actual !== digest) throw new DigestMismatchError(digest, actual);
    await syncFile(writer.path);
    this.#writers.delete(writer.id);
    return this.#adopt(writer.path, digest, hasher.finish(digest, writer.size));
  }

  openPartial(index: ChunkIndex): Promise<PartialBlob> {
    let pending = this.#partials.get(index.blob);
    if (!pending) {
      const { algorithm, hex } = parseDigest(index.blob);
      const base = join(this.#partialDir, `${algorithm}-${hex}`);
      const forget = () => {
        if (this.#partials.get(index.blob) === pending) this.#partials.delete(index.blob);
      };
      pending = FsPartialBlob.open(
        index,
        { data: base, bitmap: `${base}.bitmap`, index: `${base}.index` },
        (path, digest, chunks) => this.#adopt(path, digest, chunks),
        forget,
      );
      this.#partials.set(index.blob, pending);
      pending.catch(forget);
    }
    return pending;
  }

  /** The partial blob of `digest` if one is open now (for serving its chunks), else undefined. */
  async openedPartial(digest: string): Promise<PartialBlob | undefined> {
    return this.#partials.get(digest)?.catch(() => undefined);
  }

  async partialBlobs(): Promise<ChunkIndex[]> {
    const out: ChunkIndex[] = [];
    for (const name of await readdir(this.#partialDir)) {
      if (!/^sha256-[0-9a-f]{64}\.index$/.test(name)) continue;
      const index = await readPartialIndex(join(this.#partialDir, name));
      if (index && `sha256-${index.blob.slice(7)}.index` === name) out.push(index);
    }
    return out;
  }

  /** Moves a verified, fsync'd file into the layout and records its chunk index. */
  async #adopt(path: string, digest: string, index: ChunkIndex): Promise<BlobInfo> {
    const { algorithm } = parseDigest(digest);
    await mkdir(join(this.layoutDir, 'blobs', algorithm), { recursive: true });
    await rename(path, this.#blobPath(digest));
    await syncDir(join(this.layoutDir, 'blobs', algorithm));
    await writeFileAtomic(this.#chunkIndexPath(digest), encodeChunkIndex(index));
    this.emit('blob:committed', { digest, size: index.size });
    return { digest, size: index.size };
  }

  async deleteBlob(digest: string): Promise<boolean> {
    try {
      await rm(this.#blobPath(digest));
    } catch (err) {
      if (isNotFound(err)) return false;
      throw err;
    }
    await rm(this.#chunkIndexPath(digest), { force: true });
    this.emit('blob:deleted', digest);
    return true;
  }

  async chunkIndex(digest: string): Promise<ChunkIndex | undefined> {
    try {
      return decodeChunkIndex(await readFile(this.#chunkIndexPath(digest)));
    } catch (err) {
      if (!isNotFound(err)) throw err;
    }
    // A blob placed in the layout by another tool: index it now.
    const info = await this.statBlob(digest);
    if (!info) return undefined;
    const index = (await chunkFile(this.#blobPath(digest), this.#chunkSize)).finish(digest, info.size);
    await writeFileAtomic(this.#chunkIndexPath(digest), encodeChunkIndex(index));
    return index;
  }

  async putManifest(repository: string, manifest: ParsedManifest, tag?: string): Promise<void> {
    if (!(await this.statBlob(manifest.digest))) {
      await this.putBlob(manifest.digest, [manifest.bytes]);
    }
    this.#catalog.add(repository, manifestMeta(manifest), tag);
    await this.#persist();
    if (tag !== undefined) this.emit('tagged', { repository, tag, manifest });
  }

  async getManifest(repository: string, reference: string): Promise<StoredManifest | undefined> {
    const meta = this.#catalog.resolve(repository, reference);
    if (!meta) return undefined;
    let bytes: Buffer;
    try {
      bytes = await readFile(this.#blobPath(meta.digest));
    } catch (err) {
      if (isNotFound(err)) return undefined;
      throw err;
    }
    return { digest: meta.digest, mediaType: meta.mediaType, size: bytes.byteLength, bytes };
  }

  async deleteManifest(repository: string, digest: string): Promise<boolean> {
    if (!this.#catalog.removeManifest(repository, digest)) return false;
    await this.#persist();
    return true;
  }

  async deleteTag(repository: string, tag: string): Promise<boolean> {
    if (!this.#catalog.removeTag(repository, tag)) return false;
    await this.#persist();
    return true;
  }

  async tags(repository: string): Promise<string[] | undefined> {
    return this.#catalog.tags(repository);
  }

  async repositories(): Promise<string[]> {
    return this.#catalog.repositories();
  }

  async referrers(repository: string, digest: string): Promise<ReferrerDescriptor[]> {
    return this.#catalog.referrers(repository, digest);
  }

  async listImages(): Promise<TaggedImage[]> {
    const out: TaggedImage[] = [];
    for (const { repository, tag, meta } of this.#catalog.taggedImages()) {
      out.push({ repository, tag, digest: meta.digest, mediaType: meta.mediaType, size: await this.#imageSize(meta) });
    }
    return out;
  }

  async #imageSize(meta: ManifestMeta): Promise<number> {
    try {
      const m = parseManifest(await readFile(this.#blobPath(meta.digest)));
      const children = m.kind === 'index' ? m.manifests : m.config ? [m.config, ...m.layers] : m.layers;
      return meta.size + children.reduce((sum, d) => sum + d.size, 0);
    } catch {
      return meta.size;
    }
  }

  /** Writes index.json; calls are chained so the file always ends at the newest state. */
  #persist(): Promise<void> {
    const next = this.#persisting.then(() =>
      writeFileAtomic(join(this.layoutDir, 'index.json'), this.#catalog.toIndexJson()),
    );
    this.#persisting = next.catch(() => {});
    return next;
  }

  async #sweepUploads(): Promise<void> {
    const cutoff = Date.now() - this.#uploadTtlMs;
    for (const writer of this.#writers.values()) {
      if (writer.lastActivity < cutoff && !writer.busy) await writer.abort().catch(() => {});
    }
  }

  async close(): Promise<void> {
    clearInterval(this.#sweeper);
    // Partial blobs stay on disk to resume; only their handles close.
    for (const pending of [...this.#partials.values()]) await (await pending.catch(() => undefined))?.close();
    await this.#persisting;
    for (const writer of [...this.#writers.values()]) await writer.abort().catch(() => {});
  }

  async listBlobs(): Promise<string[]> {
    const out: string[] = [];
    const blobs = join(this.layoutDir, 'blobs');
    for (const algorithm of await readdir(blobs)) {
      for (const entry of await readdir(join(blobs, algorithm), { withFileTypes: true })) {
        const digest = `${algorithm}:${entry.name}`;
        if (entry.isFile() && isDigest(digest)) out.push(digest);
      }
    }
    return out;
  }

  /** Committed blobs and the bytes they hold (walks the layout: call it now and then, not per request). */
  async usage(): Promise<{ blobs: number; bytes: number }> {
    const digests = await this.listBlobs();
    let bytes = 0;
    for (const digest of digests) bytes += (await stat(this.#blobPath(digest)).catch(() => ({ size: 0 }))).size;
    return { blobs: digests.length, bytes };
  }

  /** Files in the uploads directory, for tests that check nothing half-written is left. */
  async pendingUploadFiles(): Promise<string[]> {
    return readdir(this.#uploadsDir);
  }
}

/** A committed blob in the layout: a stream on demand, or the pooled sender for serving. */
class FileBlobReader implements BlobReader {
  readonly info: BlobInfo;
  readonly #fh: FileHandle;
  readonly #start: number;
  readonly #end: number;

  constructor(info: BlobInfo, fh: FileHandle, start: number, end: number) {
    this.info = info;
    this.#fh = fh;
    this.#start = start;
    this.#end = end;
  }

  get stream(): Readable {
    return createReadStream('', { fd: this.#fh, start: this.#start, end: this.#end, highWaterMark: READ_HIGH_WATER_MARK });
  }

  async sendTo(out: Writable): Promise<void> {
    try {
      await sendFileRange(this.#fh, this.#start, this.#end, out);
    } finally {
      await this.#fh.close();
    }
  }
}

interface WriterHooks {
  commit(writer: FsBlobWriter, digest: string, chunks: ChunkHasher): Promise<BlobInfo>;
  forget(writer: FsBlobWriter): void;
}

class FsBlobWriter implements BlobWriter {
  readonly id: string;
  readonly path: string;
  readonly startedAt = Date.now();
  lastActivity = Date.now();
  busy = false;
  #size = 0;
  #digester = new Digester('sha256');
  #chunks: ChunkHasher;
  #hooks: WriterHooks;
  #closed = false;

  constructor(id: string, path: string, chunkSize: number, hooks: WriterHooks) {
    this.id = id;
    this.path = path;
    this.#chunks = new ChunkHasher(chunkSize);
    this.#hooks = hooks;
  }

  get size(): number {
    return this.#size;
  }

  get chunkSize(): number {
    return this.#chunks.chunkSize;
  }

  chunkHashes(): string[] {
    return this.#chunks.completed();
  }

  runningDigest(algorithm: string): string | undefined {
    return algorithm === this.#digester.algorithm ? this.#digester.peek() : undefined;
  }

  async append(source: ByteSource): Promise<number> {
    if (this.busy) throw new UploadBusyError();
    if (this.#closed) throw new Error('upload is closed');
    this.busy = true;
    const before = { size: this.#size, digester: this.#digester.copy(), chunks: this.#chunks.copy() };
    const self = this;
    try {
      await pipeline(
        source,
        async function* (chunks: ByteSource) {
          for await (const chunk of chunks) {
            self.#digester.update(chunk);
            self.#chunks.update(chunk);
            self.#size += chunk.byteLength;
            self.lastActivity = Date.now();
            yield chunk;
          }
        },
        createWriteStream(this.path, { flags: 'a', highWaterMark: READ_HIGH_WATER_MARK }),
      );
    } catch (err) {
      // Roll back to the last complete append so a retry continues from a known offset.
      this.#size = before.size;
      this.#digester = before.digester;
      this.#chunks = before.chunks;
      await truncate(this.path, before.size).catch(() => {});
      throw err;
    } finally {
      this.busy = false;
    }
    return this.#size;
  }

  async commit(digest: string): Promise<BlobInfo> {
    if (this.busy) throw new UploadBusyError();
    this.busy = true;
    try {
      return await this.#hooks.commit(this, digest, this.#chunks);
    } catch (err) {
      await this.abort();
      throw err;
    } finally {
      this.busy = false;
    }
  }

  async openReader(): Promise<UploadReader> {
    if (this.#closed) throw new Error('upload is closed');
    // An open descriptor survives the rename of commit and the unlink of abort.
    const fh = await open(this.path, 'r');
    return {
      read: async (buffer, position) => (await fh.read(buffer, 0, buffer.byteLength, position)).bytesRead,
      landed: async () => (await fh.stat()).size,
      close: () => fh.close(),
    };
  }

  async abort(): Promise<void> {
    this.#closed = true;
    this.#hooks.forget(this);
    await rm(this.path, { force: true });
  }
}

async function hashFile(path: string, algorithm: 'sha256' | 'sha512'): Promise<string> {
  const d = new Digester(algorithm);
  for await (const chunk of createReadStream(path, { highWaterMark: READ_HIGH_WATER_MARK })) d.update(chunk as Buffer);
  return d.peek();
}

async function chunkFile(path: string, chunkSize: number): Promise<ChunkHasher> {
  const h = new ChunkHasher(chunkSize);
  for await (const chunk of createReadStream(path, { highWaterMark: READ_HIGH_WATER_MARK })) h.update(chunk as Buffer);
  return h;
}

async function exists(path: string): Promise<boolean> {
  try {
    await stat(path);
    return true;
  } catch (err) {
    if (isNotFound(err)) return false;
    throw err;
  }
}

function isNotFound(err: unknown): boolean {
  return (err as NodeJS.ErrnoException)?.code === 'ENOENT';
}
