import { test } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { sha256Of } from '@shoal/oci';
import { FsContentStore } from '@shoal/store';
import { StoreChunkSource } from '@shoal/swarm';
import { CHUNK } from './fixtures/devices.ts';

test('a committed blob deleted from the store: chunk reads fail at once, holding answers within a second', async () => {
  const dir = await mkdtemp(join(tmpdir(), 'shoal-store-source-'));
  const store = await FsContentStore.open({ dir, chunkSize: CHUNK });
  try {
    const bytes = randomBytes(3 * CHUNK + 5);
    const digest = sha256Of(bytes);
    await store.putBlob(digest, [bytes]);
    const source = new StoreChunkSource(store);

    const holding = await source.holding(digest);
    assert.equal(holding?.have, 'all');
    assert.equal(holding?.index.chunks.length, 4);
    assert.deepEqual(Buffer.from((await source.readChunk(digest, 3))!), bytes.subarray(3 * CHUNK));
    assert.deepEqual(Buffer.from((await source.readChunk(digest, 1, Buffer.alloc(CHUNK)))!), bytes.subarray(CHUNK, 2 * CHUNK));
    assert.equal(await source.readChunk(digest, 4), undefined, 'past the last chunk');

    assert.ok(await store.deleteBlob(digest));
    assert.equal(await source.readChunk(digest, 0), undefined, 'a read finds the blob gone at once');
    // The read dropped what was cached, so the next holding query asks the store.
    assert.equal(await source.holding(digest), undefined);

    // Cached again, then deleted behind the cache: a holding answer may lag by up to a second.
    await store.putBlob(digest, [bytes]);
    assert.equal((await source.holding(digest))?.have, 'all');
    assert.ok(await store.deleteBlob(digest));
    await sleep(1_100);
    assert.equal(await source.holding(digest), undefined, 'gone from holding answers after the recheck interval');
  } finally {
    await store.close();
    await rm(dir, { recursive: true, force: true });
  }
});
