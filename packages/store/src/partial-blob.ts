import { createHash } from 'node:crypto';
import { type FileHandle, open, readFile, rename, rm, writeFile } from 'node:fs/promises';
import { Digester, parseDigest } from '@shoal/oci';
import { ChunkBitmap } from './chunk-bitmap.ts';
import { chunkCount, decodeChunkIndex, encodeChunkIndex, indexesAgree, isCompleteIndex } from './chunk-index.ts';
import { ChunkMismatchError, DigestMismatchError } from './errors.ts';
import { readFully } from './fs-util.ts';
import type { BlobInfo, ChunkIndex } from './types.ts';

/**
 * A blob being assembled from chunks in any order, each verified against the chunk index
 * before it is written. Its bytes and bitmap live on disk, so a download resumes after a
 * restart; it becomes a visible blob only through `commit`, after the whole-blob digest check.
 */
export interface PartialBlob {
  readonly digest: string;
  /** The chunk index; provisional (a prefix of the chunks) until `learn` completes it. */
  readonly index: ChunkIndex;
  /** The chunks held so far (a live view: do not modify). */
  readonly have: ChunkBitmap;
  /**
   * Verifies `bytes` as chunk `i` (ChunkMismatchError if not, or if the index does not name
   * chunk `i` yet), writes and records it.
   */
  writeChunk(i: number, bytes: Uint8Array): Promise<void>;
  /**
   * Extends a provisional index with a longer one for the same blob. Returns false (and changes
   * nothing) when `index` disagrees with the chunks already named.
   */
  learn(index: ChunkIndex): Promise<boolean>;
  /** The bytes of chunk `i` (in `into` when given and big enough), or undefined when it is not held. */
  readChunk(i: number, into?: Uint8Array): Promise<Uint8Array | undefined>;
  /** Reads held bytes at `position` into `buffer` (the caller checks `have` first). */
  read(buffer: Uint8Array, position: number): Promise<number>;
  /** Once every chunk is held: verifies the whole blob and makes it visible atomically. */
  commit(): Promise<BlobInfo>;
  /** Deletes the partial blob and its state. */
  abort(): Promise<void>;
  /** Closes it, keeping its bytes and bitmap on disk so a later open resumes. */
  close(): Promise<void>;
}

/** Byte offset and length of chunk `i`. */
export function chunkSpan(index: ChunkIndex, i: number): { offset: number; length: number } {
  const offset = i * index.chunkSize;
  return { offset, length: Math.min(index.chunkSize, index.size - offset) };
}

/** Written bytes that start a background flush to disk. */
const FLUSH_BYTES = 32 * 1024 * 1024;

export interface PartialBlobPaths {
  data: string;
  bitmap: string;
  index: string;
}

/** How the store takes a finished partial blob into the layout. */
export type AdoptFile = (path: string, digest: string, index: ChunkIndex) => Promise<BlobInfo>;

export class FsPartialBlob implements PartialBlob {
  readonly digest: string;
  index: ChunkIndex;
  readonly have: ChunkBitmap;
  readonly #paths: PartialBlobPaths;
  readonly #fh: FileHandle;
  /** The bitmap file, open for the partial blob's life and written in place. */
  readonly #bitmapFh: FileHandle;
  readonly #adopt: AdoptFile;
  readonly #onClose: () => void;
  /** Whole-blob hash of the contiguous prefix of held chunks, advanced as chunks land. */
  #digester = new Digester('sha256');
  #hashedChunks = 0;
  #scratchBuffer: Buffer | undefined;
  #hashing: Promise<void> = Promise.resolve();
  #writing: Promise<void> = Promise.resolve();
  /** Bytes written since the last background flush started, and that flush while it runs. */
  #unflushed = 0;
  #flushing: Promise<void> | undefined;
  /** A #hashAhead pass is running. */
  #hashingAhead = false;
  #bitmapWrite: Promise<void> | undefined;
  #indexWrite: Promise<void> = Promise.resolve();
  #bitmapDirty = false;
  #closed = false;

  private constructor(
    digest: string,
    index: ChunkIndex,
    have: ChunkBitmap,
    paths: PartialBlobPaths,
    fh: FileHandle,
    bitmapFh: FileHandle,
    adopt: AdoptFile,
    onClose: () => void,
  ) {
    this.digest = digest;
    this.index = index;
    this.have = have;
    this.#paths = paths;
    this.#fh = fh;
    this.#bitmapFh = bitmapFh;
    this.#adopt = adopt;
    this.#onClose = onClose;
  }

  /**
   * Opens the partial blob at `paths`, resuming it when its saved index is the same one: every
   * chunk the saved bitmap claims is hashed again, so a torn write is fetched anew, not trusted.
   */
  static async open(index: ChunkIndex, paths: PartialBlobPaths, adopt: AdoptFile, onClose: () => void): Promise<FsPartialBlob> {
    if (parseDigest(index.blob).algorithm !== 'sha256') throw new Error(`partial blobs need sha256 digests, not ${index.blob}`);
    let saved: Uint8Array | undefined;
    try {
      // A saved index that agrees with this one (it may know more or fewer chunks) resumes.
      const savedIndex = decodeChunkIndex(await readFile(paths.index), { provisional: true });
      if (indexesAgree(savedIndex, index)) {
        saved = await readFile(paths.bitmap);
        if (savedIndex.chunks.length > index.chunks.length) index = savedIndex;
      }
    } catch {
      // Nothing to resume.
    }
    let have = new ChunkBitmap(chunkCount(index));
    if (saved) {
      try {
        have = new ChunkBitmap(chunkCount(index), saved);
      } catch {
        // A bitmap of another shape: start over.
      }
    }
    const fh = await open(paths.data, saved ? 'r+' : 'w+');
    let bitmapFh: FileHandle | undefined;
    try {
      await writeFileReplacing(paths.index, encodeChunkIndex(index));
      bitmapFh = await open(paths.bitmap, saved ? 'r+' : 'w+');
      const blob = new FsPartialBlob(index.blob, index, have, paths, fh, bitmapFh, adopt, onClose);
      if (saved) await blob.#reverify();
      // What the file says from now on; a saved bitmap of another shape is cut to this one's length.
      await blob.#writeBitmap();
      await bitmapFh.truncate(Math.ceil(have.length / 8));
      await blob.#hashAhead();
      return blob;
    } catch (err) {
      // A failed open keeps no file open: the store opens the partial blob afresh on the next request.
      await bitmapFh?.close().catch(() => {});
      await fh.close().catch(() => {});
      throw err;
    }
  }

  async #reverify(): Promise<void> {
    for (let i = 0; i < this.have.length; i++) {
      if (!this.have.has(i)) continue;
      if (i >= this.index.chunks.length) {
        this.have.clear(i);
        continue;
      }
      // A chunk the file is too short for (its bitmap write reached the disk, the file's growth
      // did not) is not held, just as one with bad bytes is.
      const bytes = await this.#readStored(i);
      if (!bytes || sha256Hex(bytes) !== this.index.chunks[i]) this.have.clear(i);
    }
  }

  async writeChunk(i: number, bytes: Uint8Array): Promise<void> {
    if (this.#closed) throw new Error(`partial blob ${this.digest} is closed`);
    const { offset, length } = chunkSpan(this.index, i);
    if (i < 0 || i >= this.index.chunks.length || bytes.byteLength !== length || (await sha256HexOffThread(bytes)) !== this.index.chunks[i]) {
      throw new ChunkMismatchError(this.digest, i);
    }
    if (this.have.has(i)) return;
    await this.#write(bytes, offset);
    this.have.set(i);
    this.#saveBitmap();
    // The next chunk of the whole-blob hash is hashed from `bytes` now; any other waits for its
    // turn and is read back then. A chunk's request never waits for chunks before it: with
    // chunks landing in random order, waiting made each one wait for the read-back of the gap
    // it closed, and the whole transfer went at the pace of that one chain.
    if (!this.#hashingAhead && i === this.#hashedChunks) {
      this.#digester.update(bytes);
      this.#hashedChunks++;
    }
    void this.#hashAhead();
  }

  /**
   * Writes `bytes` at `offset`, one write at a time: concurrent writes to one file queue on the
   * kernel's inode lock, and the waiting thread spins for it, costing more CPU than the copy.
   */
  #write(bytes: Uint8Array, offset: number): Promise<void> {
    const next = this.#writing.then(async () => {
      for (let written = 0; written < bytes.byteLength; ) {
        written += (await this.#fh.write(bytes, written, bytes.byteLength - written, offset + written)).bytesWritten;
      }
      this.#unflushed += bytes.byteLength;
      if (this.#unflushed >= FLUSH_BYTES && !this.#flushing) this.#flush();
    });
    this.#writing = next.catch(() => {});
    return next;
  }

  /**
   * Flushes what is written so far to disk in the background, so that commit's datasync (which
   * the client's last byte waits for) has only the tail left: left to the kernel, a 1 GiB layer
   * met the disk only at commit, 0.6 s here and many seconds on an SD card.
   */
  #flush(): void {
    this.#unflushed = 0;
    this.#flushing = this.#fh
      .datasync()
      .catch(() => {})
      .finally(() => (this.#flushing = undefined));
  }

  async learn(index: ChunkIndex): Promise<boolean> {
    if (!indexesAgree(this.index, index)) return false;
    if (index.chunks.length <= this.index.chunks.length) return true;
    this.index = { ...this.index, chunks: [...index.chunks] };
    await this.#saveIndex();
    return true;
  }

  /**
   * Writes the index as it is by then, one write at a time: holders answer a growing blob's
   * refresh and availability queries concurrently, and two writes at once raced on the
   * temporary file (the second rename found it gone and failed the transfer).
   */
  #saveIndex(): Promise<void> {
    const next = this.#indexWrite.then(() => (this.#closed ? undefined : writeFileReplacing(this.#paths.index, encodeChunkIndex(this.index))));
    this.#indexWrite = next.catch(() => {});
    return next;
  }

  /**
   * Feeds the held chunks that follow the hashed prefix to the whole-blob hash, reading them back
   * (from the page cache) into one reused buffer; one pass at a time. Resolves when the pass
   * that is running then has ended.
   */
  #hashAhead(): Promise<void> {
    if (this.#hashingAhead || !this.have.has(this.#hashedChunks)) return this.#hashing;
    this.#hashingAhead = true;
    const pass = (async () => {
      try {
        while (!this.#closed && this.#hashedChunks < this.have.length && this.have.has(this.#hashedChunks)) {
          this.#digester.update(await this.#readSpan(this.#hashedChunks, this.#scratch()));
          this.#hashedChunks++;
        }
      } finally {
        this.#hashingAhead = false;
      }
    })();
    // A failed read leaves the prefix short: commit sees that and fails.
    this.#hashing = pass.catch(() => {});
    return this.#hashing;
  }

  /**
   * Writes the bitmap over its file in place, no fsync: resume re-verifies what it claims, and a
   * torn write only loses chunks landed since the save before. Writes coalesce. Writing a new
   * file and renaming it over the old cost an open, a write, a close and a rename per chunk,
   * which grew with every step down in chunk size.
   */
  #saveBitmap(): void {
    this.#bitmapDirty = true;
    if (this.#bitmapWrite) return;
    this.#bitmapWrite = (async () => {
      while (this.#bitmapDirty && !this.#closed) {
        this.#bitmapDirty = false;
        await this.#writeBitmap();
      }
    })()
      .catch(() => {})
      .finally(() => (this.#bitmapWrite = undefined));
  }

  async #writeBitmap(): Promise<void> {
    const bits = this.have.toBytes();
    await this.#bitmapFh.write(bits, 0, bits.byteLength, 0);
  }

  async readChunk(i: number, into?: Uint8Array): Promise<Uint8Array | undefined> {
    if (this.#closed || !this.have.has(i)) return undefined;
    return this.#readSpan(i, into);
  }

  #scratch(): Buffer {
    this.#scratchBuffer ??= Buffer.allocUnsafeSlow(this.index.chunkSize);
    return this.#scratchBuffer;
  }

  /** Chunk `i`'s bytes, in `into` when it is big enough (then valid only until its next use). */
  async #readSpan(i: number, into?: Uint8Array): Promise<Uint8Array> {
    const bytes = await this.#readStored(i, into);
    if (!bytes) throw new Error(`partial blob ${this.digest} is shorter than chunk ${i}`);
    return bytes;
  }

  /** What the file holds where chunk `i` goes (see #readSpan), or undefined when it ends before. */
  async #readStored(i: number, into?: Uint8Array): Promise<Uint8Array | undefined> {
    const { offset, length } = chunkSpan(this.index, i);
    const buffer = into && into.byteLength >= length ? into.subarray(0, length) : Buffer.allocUnsafe(length);
    return (await readFully(this.#fh, buffer, offset)) < length ? undefined : buffer;
  }

  async read(buffer: Uint8Array, position: number): Promise<number> {
    return (await this.#fh.read(buffer, 0, buffer.byteLength, position)).bytesRead;
  }

  async commit(): Promise<BlobInfo> {
    if (!this.have.complete || !isCompleteIndex(this.index)) {
      throw new Error(`partial blob ${this.digest} lacks ${this.have.length - this.have.count} chunks`);
    }
    // A pass may stop at a chunk that landed while it read the one before: go until none is left.
    while (this.#hashedChunks < this.have.length) {
      const before = this.#hashedChunks;
      await this.#hashAhead();
      if (this.#hashedChunks === before) throw new Error(`partial blob ${this.digest}: whole-blob hash stuck at chunk ${before}`);
    }
    const actual = this.#digester.peek();
    if (actual !== this.digest) {
      // Every chunk matched the index, so the index itself was false: nothing here is usable.
      await this.abort();
      throw new DigestMismatchError(this.digest, actual);
    }
    await this.#fh.datasync();
    await this.#close();
    const info = await this.#adopt(this.#paths.data, this.digest, this.index);
    await rm(this.#paths.bitmap, { force: true });
    await rm(this.#paths.index, { force: true });
    return info;
  }

  async abort(): Promise<void> {
    await this.#close();
    await Promise.all(Object.values(this.#paths).map((path) => rm(path, { force: true })));
  }

  close(): Promise<void> {
    return this.#close();
  }

  async #close(): Promise<void> {
    if (this.#closed) return;
    this.#closed = true;
    this.#onClose();
    await this.#writing;
    await this.#flushing;
    await this.#hashing;
    // A last bitmap write may have been skipped while closing: write the final state.
    await this.#bitmapWrite;
    await this.#indexWrite;
    await this.#writeBitmap().catch(() => {});
    await this.#bitmapFh.close();
    await this.#fh.close();
  }
}

/** Replaces a small file by rename (no fsync: what it records is checked again on resume). */
async function writeFileReplacing(path: string, data: Uint8Array): Promise<void> {
  const tmp = `${path}.tmp`;
  await writeFile(tmp, data);
  await rename(tmp, path);
}

/** The chunk index a partial blob on disk was started with, or undefined if it is unreadable. */
export async function readPartialIndex(path: string): Promise<ChunkIndex | undefined> {
  try {
    return decodeChunkIndex(await readFile(path), { provisional: true });
  } catch {
    return undefined;
  }
}

/** Hashes on the libuv pool (WebCrypto), so verifying chunks does not hold up the event loop. */
async function sha256HexOffThread(bytes: Uint8Array): Promise<string> {
  return Buffer.from(await crypto.subtle.digest('SHA-256', bytes as Uint8Array<ArrayBuffer>)).toString('hex');
}

function sha256Hex(bytes: Uint8Array): string {
  return createHash('sha256').update(bytes).digest('hex');
}
