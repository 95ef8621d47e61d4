import type { Readable, Writable } from 'node:stream';
import type { ParsedManifest } from '@shoal/oci';
import type { PartialBlob } from './partial-blob.ts';

/** Bytes to write: a Readable, an async generator, or an array of buffers. */
export type ByteSource = AsyncIterable<Uint8Array> | Iterable<Uint8Array>;

export interface BlobInfo {
  digest: string;
  size: number;
}

/** An inclusive byte range, as HTTP Range uses. */
export interface ByteRange {
  start: number;
  end: number;
}

export interface BlobReader {
  info: BlobInfo;
  /** The bytes as a stream. Use either this or `sendTo`, once. */
  readonly stream: Readable;
  /**
   * Optional fast path for serving: writes the bytes to `out` (left open) without allocating
   * per chunk, resolving once all are written. Readers that offer it release their resources
   * when it settles.
   */
  sendTo?(out: Writable): Promise<void>;
}

/**
 * An in-progress blob write (an upload session). Bytes land in a private temp file and become
 * visible only through `commit`, after the digest is verified.
 */
export interface BlobWriter {
  readonly id: string;
  /** Bytes accepted so far. */
  readonly size: number;
  readonly startedAt: number;
  /** Size of the chunks the chunk index is computed over. */
  readonly chunkSize: number;
  /** sha256 (hex) of each whole chunk accepted so far, in order. */
  chunkHashes(): string[];
  /**
   * Appends a stream. If the source fails part way, the bytes of this call are discarded and
   * the writer stays at its previous size, so the client can retry from there.
   */
  append(source: ByteSource): Promise<number>;
  /** Verifies the bytes against `digest`, then makes the blob visible atomically. */
  commit(digest: string): Promise<BlobInfo>;
  abort(): Promise<void>;
  /**
   * Opens the bytes written so far for reading, to serve a blob while it is still arriving.
   * Bytes of an append in progress become visible as they land (an append that fails is
   * rolled back). An open reader keeps reading the same bytes after commit or abort.
   */
  openReader(): Promise<UploadReader>;
}

/** Read access to the bytes an upload has written (see BlobWriter.openReader). */
export interface UploadReader {
  /** Reads up to `buffer.byteLength` bytes at `position`; resolves with how many were there. */
  read(buffer: Uint8Array, position: number): Promise<number>;
  /** Bytes in the file now: everything before this offset has landed. */
  landed(): Promise<number>;
  close(): Promise<void>;
}

/**
 * A blob arriving in order at this device (a pull-through from an upstream) whose completed
 * chunks can be shared before it is whole.
 */
export interface GrowingBlob {
  /** A provisional chunk index naming the chunks whose bytes have all landed. */
  index(): Promise<ChunkIndex>;
  /** Reads landed bytes at `position`; fewer than asked means the rest has not landed. */
  read(buffer: Uint8Array, position: number): Promise<number>;
}

/** What a store reports as it changes (for announcing content to the mesh). */
export interface ContentStoreEvents {
  /** A blob (layer, config or manifest) became visible. */
  'blob:committed': [BlobInfo];
  'blob:deleted': [string];
  /** A tag was set (by a push, a pull-through, or a mesh tag record). */
  tagged: [{ repository: string; tag: string; manifest: ParsedManifest }];
}

/** A manifest as the store keeps it: exact bytes plus what the catalog needs. */
export interface StoredManifest {
  digest: string;
  mediaType: string;
  size: number;
  bytes: Buffer;
}

/** What the referrers API reports for one manifest. */
export interface ReferrerDescriptor {
  mediaType: string;
  digest: string;
  size: number;
  artifactType?: string;
  annotations?: Record<string, string>;
}

/**
 * The content store: blobs by digest (shared by all repositories, as content addressing
 * allows) and manifests and tags per repository. Repository names are full names including
 * the registry namespace, e.g. `docker.io/library/nginx`.
 */
export interface ContentStore {
  on<K extends keyof ContentStoreEvents>(event: K, listener: (...args: ContentStoreEvents[K]) => void): this;
  off<K extends keyof ContentStoreEvents>(event: K, listener: (...args: ContentStoreEvents[K]) => void): this;
  statBlob(digest: string): Promise<BlobInfo | undefined>;
  /**
   * Reads committed bytes of `digest` at `position` into `buffer` (no allocation, for serving
   * chunks from reused buffers); how many were read, or undefined if the blob is absent.
   */
  readBlobAt(digest: string, buffer: Uint8Array, position: number): Promise<number | undefined>;
  /** Opens a blob, or undefined if absent. `range` must lie within the blob. */
  readBlob(digest: string, range?: ByteRange): Promise<BlobReader | undefined>;
  createWriter(): Promise<BlobWriter>;
  /** An upload session by id, or undefined if unknown or expired. */
  getWriter(id: string): BlobWriter | undefined;
  /** Writes a whole stream as a blob, verified against `digest`. */
  putBlob(digest: string, source: ByteSource): Promise<BlobInfo>;
  deleteBlob(digest: string): Promise<boolean>;
  /** Digests of every committed blob. */
  listBlobs(): Promise<string[]>;
  /** The chunk index of a committed blob. */
  chunkIndex(digest: string): Promise<ChunkIndex | undefined>;
  /**
   * Opens the partial blob that assembles `index.blob` chunk by chunk, resuming the one on disk
   * when it was started with the same index. One object per blob while it is open.
   */
  openPartial(index: ChunkIndex): Promise<PartialBlob>;
  /** The partial blob of `digest` if one is open now, else undefined. */
  openedPartial(digest: string): Promise<PartialBlob | undefined>;
  /** The chunk indexes of the partial blobs on disk, open or not (downloads to resume). */
  partialBlobs(): Promise<ChunkIndex[]>;

  /** Stores manifest bytes (as a blob) and records it in `repository`, tagging it if asked. */
  putManifest(repository: string, manifest: ParsedManifest, tag?: string): Promise<void>;
  /** Resolves a tag or digest within a repository. */
  getManifest(repository: string, reference: string): Promise<StoredManifest | undefined>;
  /** Removes a manifest from a repository, with every tag that points at it. */
  deleteManifest(repository: string, digest: string): Promise<boolean>;
  deleteTag(repository: string, tag: string): Promise<boolean>;
  tags(repository: string): Promise<string[] | undefined>;
  repositories(): Promise<string[]>;
  referrers(repository: string, digest: string): Promise<ReferrerDescriptor[]>;
  /** Every tag in the store: repository, tag, manifest digest and media type. */
  listImages(): Promise<TaggedImage[]>;
  close(): Promise<void>;
}

export interface TaggedImage {
  repository: string;
  tag: string;
  digest: string;
  mediaType: string;
  /** Manifest size plus the sizes of the blobs it references (children for an index). */
  size: number;
}

/** sha256 of each fixed-size chunk of a blob; deterministic, so any honest holder agrees. */
export interface ChunkIndex {
  blob: string;
  size: number;
  chunkSize: number;
  chunks: string[];
}
