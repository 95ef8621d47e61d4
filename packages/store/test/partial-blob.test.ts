import { test } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { mkdtemp, open, readdir, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { sha256Of } from '@shoal/oci';
import { ChunkBitmap, ChunkHasher, ChunkMismatchError, chunkSpan, DigestMismatchError, FsContentStore, type ChunkIndex } from '@shoal/store';

const CHUNK = 64 * 1024;

function blobOf(size: number): { bytes: Buffer; index: ChunkIndex } {
  const bytes = randomBytes(size);
  const hasher = new ChunkHasher(CHUNK);
  hasher.update(bytes);
  return { bytes, index: hasher.finish(sha256Of(bytes), size) };
}

function chunk(bytes: Buffer, index: ChunkIndex, i: number): Buffer {
  const { offset, length } = chunkSpan(index, i);
  return bytes.subarray(offset, offset + length);
}

async function withStore(fn: (store: FsContentStore, dir: string) => Promise<void>): Promise<void> {
  const dir = await mkdtemp(join(tmpdir(), 'shoal-partial-'));
  const store = await FsContentStore.open({ dir, chunkSize: CHUNK });
  try {
    await fn(store, dir);
  } finally {
    await store.close();
    await rm(dir, { recursive: true, force: true });
  }
}

test('ChunkBitmap counts, round-trips and rejects bits past its end', () => {
  const bitmap = new ChunkBitmap(10);
  bitmap.set(0);
  bitmap.set(9);
  bitmap.set(9);
  assert.equal(bitmap.count, 2);
  const copy = new ChunkBitmap(10, bitmap.toBytes());
  assert.ok(copy.has(0) && copy.has(9) && !copy.has(5));
  assert.throws(() => new ChunkBitmap(10, Uint8Array.from([0, 0x3f])), RangeError);
  assert.ok(ChunkBitmap.full(10).complete);
});

test('chunks land in any order, are verified one by one, and commit makes the blob visible', () =>
  withStore(async (store) => {
    const { bytes, index } = blobOf(5 * CHUNK + 123);
    const partial = await store.openPartial(index);
    assert.equal(await store.openPartial(index), partial, 'one object per blob');
    await assert.rejects(partial.writeChunk(2, chunk(bytes, index, 3)), ChunkMismatchError);
    for (const i of [5, 1, 3, 0, 4]) await partial.writeChunk(i, chunk(bytes, index, i));
    assert.deepEqual(await partial.readChunk(3), chunk(bytes, index, 3));
    assert.equal(await partial.readChunk(2), undefined);
    assert.equal(await store.statBlob(index.blob), undefined, 'nothing visible before commit');
    await assert.rejects(partial.commit(), /lacks 1 chunks/);
    await partial.writeChunk(2, chunk(bytes, index, 2));
    assert.deepEqual(await partial.commit(), { digest: index.blob, size: bytes.length });
    const stored = await readFile(join(store.layoutDir, 'blobs', 'sha256', index.blob.slice(7)));
    assert.ok(stored.equals(bytes));
    assert.deepEqual(await store.chunkIndex(index.blob), index);
    assert.deepEqual(await store.partialBlobs(), []);
  }));

test('chunks written all at once in random order commit intact, though each caller reuses its buffer at once', () =>
  withStore(async (store) => {
    const { bytes, index } = blobOf(40 * CHUNK + 7);
    const partial = await store.openPartial(index);
    const order = [...Array(41).keys()].sort(() => Math.random() - 0.5);
    await Promise.all(
      order.map(async (i) => {
        const buffer = Buffer.from(chunk(bytes, index, i));
        await partial.writeChunk(i, buffer);
        // The caller's buffer goes back to its pool: the whole-blob hash must not read it later.
        buffer.fill(0xff);
      }),
    );
    assert.deepEqual(await partial.commit(), { digest: index.blob, size: bytes.length });
  }));

/** A data dir in which the download of a 4-chunk blob got `chunks` and the store then stopped. */
async function withStoppedDownload(chunks: number[], fn: (dir: string, bytes: Buffer, index: ChunkIndex) => Promise<void>): Promise<void> {
  const dir = await mkdtemp(join(tmpdir(), 'shoal-partial-'));
  try {
    const { bytes, index } = blobOf(4 * CHUNK);
    const store = await FsContentStore.open({ dir, chunkSize: CHUNK });
    const partial = await store.openPartial(index);
    for (const i of chunks) await partial.writeChunk(i, chunk(bytes, index, i));
    await store.close();
    await fn(dir, bytes, index);
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}

/** Resumes the stopped download in `dir`, checks which chunks it kept, fetches the rest and commits. */
async function resumeAndFinish(dir: string, bytes: Buffer, index: ChunkIndex, kept: boolean[]): Promise<void> {
  const store = await FsContentStore.open({ dir, chunkSize: CHUNK });
  try {
    assert.deepEqual(await store.partialBlobs(), [index]);
    const resumed = await store.openPartial(index);
    assert.deepEqual(kept.map((_, i) => resumed.have.has(i)), kept);
    for (const [i, held] of kept.entries()) if (!held) await resumed.writeChunk(i, chunk(bytes, index, i));
    await resumed.commit();
    assert.equal((await store.statBlob(index.blob))?.size, bytes.length);
  } finally {
    await store.close();
  }
}

test('a partial blob resumes after a restart and drops a claimed chunk whose bytes are bad', () =>
  withStoppedDownload([0, 1, 3], async (dir, bytes, index) => {
    // A torn write: chunk 1's bytes on disk are not what was verified.
    const fh = await open(join(dir, 'partial', `sha256-${index.blob.slice(7)}`), 'r+');
    await fh.write(Buffer.from('torn'), 0, 4, CHUNK + 10);
    await fh.close();

    await resumeAndFinish(dir, bytes, index, [true, false, false, true]);
  }));

test('a claimed chunk past the end of the data file (its growth lost in a power cut) is fetched again, not fatal to the resume', () =>
  withStoppedDownload([0, 1, 3], async (dir, bytes, index) => {
    const fh = await open(join(dir, 'partial', `sha256-${index.blob.slice(7)}`), 'r+');
    await fh.truncate(3 * CHUNK + 100);
    await fh.close();

    await resumeAndFinish(dir, bytes, index, [true, true, false, false]);
  }));

test('the bitmap on disk follows the chunks as they land, without a close, so a device killed mid-download resumes from it', async () => {
  const dir = await mkdtemp(join(tmpdir(), 'shoal-partial-'));
  const stores: FsContentStore[] = [];
  try {
    const { bytes, index } = blobOf(20 * CHUNK);
    const bitmapPath = join(dir, 'partial', `sha256-${index.blob.slice(7)}.bitmap`);
    stores.push(await FsContentStore.open({ dir, chunkSize: CHUNK }));
    const first = await stores[0]!.openPartial(index);
    for (const i of [0, 9, 10, 19]) await first.writeChunk(i, chunk(bytes, index, i));
    const expected = first.have.toBytes();
    for (let tries = 0; !Buffer.from(await readFile(bitmapPath)).equals(expected); tries++) {
      assert.ok(tries < 200, 'the bitmap file never caught up with the chunks written');
      await new Promise((resolve) => setTimeout(resolve, 10));
    }
    // Killed here: nothing closed. A new process opens the same files.
    stores.push(await FsContentStore.open({ dir, chunkSize: CHUNK }));
    const resumed = await stores[1]!.openPartial(index);
    assert.deepEqual(
      [...Array(20).keys()].filter((i) => resumed.have.has(i)),
      [0, 9, 10, 19],
    );
    assert.equal((await readFile(bitmapPath)).byteLength, 3, 'one bit per chunk');
  } finally {
    for (const store of stores) await store.close();
    await rm(dir, { recursive: true, force: true });
  }
});

test('a bitmap file longer than the blob needs (left by another index) is cut to length when a partial blob opens', () =>
  withStoppedDownload([0], async (dir, bytes, index) => {
    const bitmapPath = join(dir, 'partial', `sha256-${index.blob.slice(7)}.bitmap`);
    const fh = await open(bitmapPath, 'r+');
    await fh.write(Buffer.from([0xff, 0xff, 0xff]), 0, 3, 1);
    await fh.close();
    const store = await FsContentStore.open({ dir, chunkSize: CHUNK });
    const resumed = await store.openPartial(index);
    assert.equal(resumed.have.count, 0, 'a bitmap of another shape is not trusted');
    await resumed.writeChunk(2, chunk(bytes, index, 2));
    await store.close();
    assert.deepEqual([...(await readFile(bitmapPath))], [0b0010_0000]);
  }));

test('a false chunk index fails the whole-blob check and leaves nothing behind', () =>
  withStore(async (store, dir) => {
    const { index } = blobOf(2 * CHUNK);
    const other = blobOf(2 * CHUNK);
    // Chunks that match their index but not the blob's digest.
    const lying = { ...other.index, blob: index.blob };
    const partial = await store.openPartial(lying);
    for (const i of [0, 1]) await partial.writeChunk(i, chunk(other.bytes, lying, i));
    await assert.rejects(partial.commit(), DigestMismatchError);
    assert.equal(await store.statBlob(index.blob), undefined);
    assert.deepEqual(await readdir(join(dir, 'partial')), []);
  }));

test('a growing index learned by many holders at once is written one at a time, ending at the longest', () =>
  withStore(async (store, dir) => {
    const { index } = blobOf(10 * CHUNK);
    const partial = await store.openPartial({ ...index, chunks: index.chunks.slice(0, 2) });
    const longer = (n: number) => partial.learn({ ...index, chunks: index.chunks.slice(0, n) });
    // What holders' answers do when they arrive together; each used to race on one temporary file.
    assert.deepEqual(await Promise.all([3, 5, 4, 7, 6, 8, 10, 9].map(longer)), Array(8).fill(true));
    assert.equal(partial.index.chunks.length, 10);
    const onDisk = JSON.parse(await readFile(join(dir, 'partial', `sha256-${index.blob.slice('sha256:'.length)}.index`), 'utf8')) as ChunkIndex;
    assert.equal(onDisk.chunks.length, 10);
    await partial.close();
  }));
