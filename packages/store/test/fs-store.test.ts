import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Readable } from 'node:stream';
import { parseManifest, sha256Of } from '@shoal/oci';
import { chunkIndexDigest, DigestMismatchError, FsContentStore, RangeNotSatisfiableError } from '@shoal/store';

async function withStore(fn: (store: FsContentStore, dir: string) => Promise<void>, chunkSize?: number): Promise<void> {
  const dir = await mkdtemp(join(tmpdir(), 'shoal-store-'));
  const store = await FsContentStore.open(chunkSize ? { dir, chunkSize } : { dir });
  try {
    await fn(store, dir);
  } finally {
    await store.close();
    await rm(dir, { recursive: true, force: true });
  }
}

async function text(stream: Readable): Promise<string> {
  const parts: Buffer[] = [];
  for await (const c of stream) parts.push(c as Buffer);
  return Buffer.concat(parts).toString();
}

test('a blob is verified, committed and readable by range', () =>
  withStore(async (store) => {
    const data = Buffer.from('hello shoal');
    const info = await store.putBlob(sha256Of(data), [data]);
    assert.equal(info.size, data.length);
    const r = await store.readBlob(sha256Of(data), { start: 6, end: 10 });
    assert.equal(await text(r!.stream), 'shoal');
    await assert.rejects(store.readBlob(sha256Of(data), { start: 5, end: 11 }), RangeNotSatisfiableError);
  }));

test('a wrong digest stores nothing and leaves no temp file', () =>
  withStore(async (store) => {
    const data = Buffer.from('payload');
    const wrong = sha256Of('other');
    await assert.rejects(store.putBlob(wrong, [data]), DigestMismatchError);
    assert.equal(await store.statBlob(wrong), undefined);
    assert.equal(await store.statBlob(sha256Of(data)), undefined);
    assert.deepEqual(await store.pendingUploadFiles(), []);
  }));

test('a source that fails mid-stream rolls the upload back to its last good size', () =>
  withStore(async (store) => {
    const w = await store.createWriter();
    await w.append([Buffer.from('abc')]);
    const failing = Readable.from(
      (async function* () {
        yield Buffer.from('def');
        throw new Error('client went away');
      })(),
    );
    await assert.rejects(w.append(failing), /client went away/);
    assert.equal(w.size, 3);
    await w.append([Buffer.from('xyz')]);
    const info = await w.commit(sha256Of('abcxyz'));
    assert.equal(info.size, 6);
  }));

test('chunk index lists sha256 of each chunk and is deterministic', () =>
  withStore(async (store) => {
    const data = Buffer.alloc(10, 1);
    await store.putBlob(sha256Of(data), [data.subarray(0, 3), data.subarray(3)]);
    const index = await store.chunkIndex(sha256Of(data));
    assert.ok(index);
    assert.equal(index.chunkSize, 4);
    assert.deepEqual(index.chunks, [
      sha256Of(data.subarray(0, 4)).slice(7),
      sha256Of(data.subarray(4, 8)).slice(7),
      sha256Of(data.subarray(8)).slice(7),
    ]);
    assert.equal(chunkIndexDigest(index), chunkIndexDigest({ ...index }));
  }, 4));

test('manifests and tags live per repository and survive a reopen as index.json', async () => {
  const dir = await mkdtemp(join(tmpdir(), 'shoal-store-'));
  try {
    const config = Buffer.from('{}');
    const manifest = parseManifest(
      Buffer.from(
        JSON.stringify({
          schemaVersion: 2,
          mediaType: 'application/vnd.oci.image.manifest.v1+json',
          config: { mediaType: 'application/vnd.oci.image.config.v1+json', digest: sha256Of(config), size: 2 },
          layers: [],
        }),
      ),
    );
    let store = await FsContentStore.open({ dir });
    await store.putBlob(sha256Of(config), [config]);
    await store.putManifest('docker.io/library/app', manifest, '1');
    await store.putManifest('ghcr.io/x/app', manifest);
    await store.close();
    store = await FsContentStore.open({ dir });
    assert.equal((await store.getManifest('docker.io/library/app', '1'))?.digest, manifest.digest);
    assert.equal(await store.getManifest('ghcr.io/x/app', '1'), undefined);
    assert.ok(await store.getManifest('ghcr.io/x/app', manifest.digest));
    assert.deepEqual(await store.repositories(), ['docker.io/library/app', 'ghcr.io/x/app']);
    const index = JSON.parse(await readFile(join(dir, 'oci', 'index.json'), 'utf8'));
    assert.ok(index.manifests.some((m: any) => m.annotations['org.opencontainers.image.ref.name'] === 'docker.io/library/app:1'));
    await store.deleteManifest('docker.io/library/app', manifest.digest);
    assert.deepEqual(await store.tags('docker.io/library/app'), undefined);
    await store.close();
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
});

test('usage counts committed blobs only', () =>
  withStore(async (store) => {
    assert.deepEqual(await store.usage(), { blobs: 0, bytes: 0 });
    const w = await store.createWriter();
    await w.append([Buffer.alloc(100)]);
    assert.deepEqual(await store.usage(), { blobs: 0, bytes: 0 });
    await w.commit(sha256Of(Buffer.alloc(100)));
    await store.putBlob(sha256Of('abc'), [Buffer.from('abc')]);
    assert.deepEqual(await store.usage(), { blobs: 2, bytes: 103 });
  }));
