import { test } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { once } from 'node:events';
import { createReadStream, readdirSync, readlinkSync } from 'node:fs';
import type { Readable } from 'node:stream';
import { MediaType, sha256Of } from '@shoal/oci';
import { DigestMismatchError, FsContentStore, RangeNotSatisfiableError } from '@shoal/store';
import {
  MirroringRegistry,
  UpstreamClient,
  UpstreamError,
  type PullThrough,
  type PullThroughComplete,
  type PullThroughFailure,
} from '@shoal/registry-gateway';
import {
  bufferBlob,
  digestOfStream,
  pushImage,
  randomFileBlob,
  readAll,
  startCountingProxy,
  startRegistry,
  startServer,
  tempDir,
  type TestServer,
} from './upstream-fixtures.ts';

const TEST_TIMEOUT = { timeout: 180_000 };
const MiB = 1024 * 1024;
/** The streaming blob; SHOAL_PULL_THROUGH_MB=1024 runs the memory check with a 1 GB blob. */
const BIG_BLOB_BYTES = Number(process.env.SHOAL_PULL_THROUGH_MB ?? 256) * MiB;
/**
 * V8 frees stream buffers lazily, so streaming shows a plateau of tens of MiB (measured ~80 MiB
 * for 1 and 2 GB blobs); holding one copy of the default 256 MiB blob would exceed this.
 */
const RSS_GROWTH_LIMIT_MIB = 128;

interface Mirror {
  registry: MirroringRegistry;
  store: FsContentStore;
  dir: string;
  events: { start: PullThrough[]; miss: PullThrough[]; complete: PullThroughComplete[]; error: PullThroughFailure[] };
}

/** A store and a MirroringRegistry with `docker.io` pulled through from `upstreamUrl`. */
async function withMirror(upstreamUrl: string, fn: (m: Mirror) => Promise<void>): Promise<void> {
  const dir = await tempDir('shoal-mirror-');
  const store = await FsContentStore.open({ dir: dir.path });
  const registry = new MirroringRegistry({
    store,
    upstreams: new Map([['docker.io', new UpstreamClient({ url: upstreamUrl, timeoutMs: 2000 })]]),
  });
  const events: Mirror['events'] = { start: [], miss: [], complete: [], error: [] };
  registry.on('pull-through:start', (e) => events.start.push(e));
  registry.on('pull-through:miss', (e) => events.miss.push(e));
  registry.on('pull-through:complete', (e) => events.complete.push(e));
  registry.on('pull-through:error', (e) => events.error.push(e));
  try {
    await fn({ registry, store, dir: dir.path, events });
    assert.deepEqual(await store.pendingUploadFiles(), [], 'no upload temp file is left behind');
  } finally {
    await registry.close();
    await store.close();
    await dir.remove();
  }
}

/** This process's open file descriptors on files under `dir` (Linux /proc). */
function openFilesUnder(dir: string): string[] {
  const out: string[] = [];
  for (const fd of readdirSync('/proc/self/fd')) {
    try {
      const target = readlinkSync(`/proc/self/fd/${fd}`);
      if (target.startsWith(dir)) out.push(target);
    } catch {
      // closed while listing
    }
  }
  return out;
}

function blobGets(server: TestServer, digest: string): number {
  return server.requests.filter((r) => r.startsWith('GET ') && r.endsWith(`/blobs/${digest}`)).length;
}

async function readFileRange(path: string, start: number, end: number): Promise<Buffer> {
  return readAll(createReadStream(path, { start, end }));
}

/** Consumes a stream, recording how many bytes arrived before it ended or failed. */
function drain(stream: Readable): { received: () => number; done: Promise<void> } {
  let received = 0;
  const done = (async () => {
    for await (const chunk of stream) received += (chunk as Buffer).byteLength;
  })();
  return { received: () => received, done };
}

test('manifests are pulled through by tag and digest, stored, then served from the store offline', TEST_TIMEOUT, async () => {
  const upstream = await startRegistry();
  const proxy = await startCountingProxy(upstream.url);
  try {
    const layer = bufferBlob(randomBytes(2 * MiB));
    const v1 = await pushImage(upstream.url, 'library/app', 'v1', [layer]);
    const v2 = await pushImage(upstream.url, 'library/app', 'v2', [bufferBlob(randomBytes(1000))]);

    await withMirror(proxy.url, async ({ registry, store, events }) => {
      const byTag = await registry.getManifest('docker.io/library/app', 'v1');
      assert.deepEqual(byTag, { digest: v1.digest, mediaType: MediaType.OciManifest, size: v1.manifest.byteLength, bytes: v1.manifest });
      assert.deepEqual(await store.getManifest('docker.io/library/app', 'v1'), byTag);

      const byDigest = await registry.getManifest('docker.io/library/app', v2.digest);
      assert.deepEqual(byDigest?.bytes, v2.manifest);
      assert.deepEqual(await store.tags('docker.io/library/app'), ['v1'], 'a manifest fetched by digest is not tagged');
      assert.deepEqual(
        proxy.requests.filter((r) => r.includes('/manifests/')),
        ['GET /v2/library/app/manifests/v1', `GET /v2/library/app/manifests/${v2.digest}`],
      );
      assert.deepEqual(
        events.complete.map((e) => [e.kind, e.reference, e.digest, e.bytes]),
        [
          ['manifest', 'v1', v1.digest, v1.manifest.byteLength],
          ['manifest', v2.digest, v2.digest, v2.manifest.byteLength],
        ],
      );

      // Local first: a cached tag never asks the upstream, so it works with the upstream gone.
      const before = proxy.requests.length;
      assert.deepEqual((await registry.getManifest('docker.io/library/app', 'v1'))?.bytes, v1.manifest);
      assert.equal(proxy.requests.length, before);
      await proxy.stop();
      assert.deepEqual((await registry.getManifest('docker.io/library/app', 'v1'))?.bytes, v1.manifest);
      assert.deepEqual((await registry.getManifest('docker.io/library/app', v2.digest))?.bytes, v2.manifest);
      // What was never pulled fails cleanly with the upstream down.
      await assert.rejects(registry.getManifest('docker.io/library/app', 'v3'), UpstreamError);
      await assert.rejects(registry.statBlob('docker.io/library/app', layer.digest), UpstreamError);
      assert.deepEqual(
        events.error.map((e) => [e.kind, e.reference, e.error.name]),
        [['manifest', 'v3', 'UpstreamError']],
      );
    });
  } finally {
    await proxy.stop();
    await upstream.stop();
  }
});

test('concurrent whole and ranged reads share one upstream download; later reads come from the store', TEST_TIMEOUT, async () => {
  const dir = await tempDir('shoal-mirror-content-');
  const upstream = await startRegistry();
  const proxy = await startCountingProxy(upstream.url);
  try {
    const big = await randomFileBlob(dir.path, BIG_BLOB_BYTES);
    const small = await randomFileBlob(dir.path, 3 * MiB + 17);
    await pushImage(upstream.url, 'library/big', 'v1', [big, small]);

    await withMirror(proxy.url, async ({ registry, store, events }) => {
      const repo = 'docker.io/library/big';
      assert.deepEqual(await registry.statBlob(repo, big.digest), { digest: big.digest, size: big.size });

      // Peak RSS growth while five clients read the big blob at once.
      const baseline = process.memoryUsage().rss;
      let peak = baseline;
      const sampler = setInterval(() => (peak = Math.max(peak, process.memoryUsage().rss)), 20);
      const range = { start: 1000, end: 2 * MiB + 999 };
      const tail = { start: big.size - 5000, end: big.size - 1 };
      let results;
      try {
        results = await Promise.all([
          ...[1, 2, 3].map(async () => {
            const r = await registry.readBlob(repo, big.digest);
            assert.deepEqual(r!.info, { digest: big.digest, size: big.size });
            return digestOfStream(r!.stream);
          }),
          registry.readBlob(repo, big.digest, range).then((r) => readAll(r!.stream)),
          registry.readBlob(repo, big.digest, tail).then((r) => readAll(r!.stream)),
        ]);
      } finally {
        clearInterval(sampler);
      }
      const growthMiB = (peak - baseline) / MiB;
      console.log(`pull-through of ${big.size / MiB} MiB to 5 readers: peak RSS growth ${growthMiB.toFixed(1)} MiB`);
      for (const whole of results.slice(0, 3)) assert.deepEqual(whole, { digest: big.digest, size: big.size });
      assert.deepEqual(results[3], await readFileRange(big.path, range.start, range.end));
      assert.deepEqual(results[4], await readFileRange(big.path, tail.start, tail.end));
      assert.ok(growthMiB < RSS_GROWTH_LIMIT_MIB, `RSS grew by ${growthMiB.toFixed(1)} MiB: the blob must be streamed, not buffered`);

      assert.equal(blobGets(proxy, big.digest), 1, 'one upstream download for all readers');
      assert.deepEqual(
        events.complete.filter((e) => e.kind === 'blob').map((e) => [e.reference, e.bytes]),
        [[big.digest, big.size]],
      );
      assert.deepEqual(await store.statBlob(big.digest), { digest: big.digest, size: big.size });

      // Ranged first read of the small blob, then everything again with the upstream gone.
      const smallRange = { start: MiB, end: 2 * MiB };
      const first = await registry.readBlob(repo, small.digest, smallRange);
      assert.equal((await readAll(first!.stream)).byteLength, MiB + 1);
      await once(registry, 'pull-through:complete');
      await proxy.stop();
      const again = await registry.readBlob(repo, big.digest);
      assert.deepEqual(await digestOfStream(again!.stream), { digest: big.digest, size: big.size });
      const smallWhole = await registry.readBlob(repo, small.digest);
      assert.deepEqual(await digestOfStream(smallWhole!.stream), { digest: small.digest, size: small.size });
      assert.deepEqual(await store.chunkIndex(small.digest).then((c) => c?.size), small.size);
      await assert.rejects(registry.readBlob(repo, small.digest, { start: 0, end: small.size }), RangeNotSatisfiableError);
      assert.equal(blobGets(proxy, small.digest), 1);
    });
  } finally {
    await proxy.stop();
    await upstream.stop();
    await dir.remove();
  }
});

/** A fake upstream serving one blob in two parts, the second only after `release()`. */
async function gatedUpstream(bytes: Buffer, firstPart: number) {
  let release!: () => void;
  const gate = new Promise<void>((resolve) => (release = resolve));
  const server = await startServer((req, res) => {
    if (!req.url!.endsWith(`/blobs/${sha256Of(bytes)}`)) {
      res.writeHead(404).end();
      return;
    }
    res.writeHead(200, { 'content-length': String(bytes.byteLength), 'content-type': 'application/octet-stream' });
    res.write(bytes.subarray(0, firstPart));
    void gate.then(() => res.end(bytes.subarray(firstPart)));
  });
  return { server, release };
}

test('clients get bytes as they arrive; a range is served once its bytes exist; a client leaving does not stop the download', TEST_TIMEOUT, async () => {
  const bytes = randomBytes(4 * MiB);
  const digest = sha256Of(bytes);
  const { server, release } = await gatedUpstream(bytes, 2 * MiB);
  try {
    await withMirror(server.url, async ({ registry, store, dir, events }) => {
      const repo = 'docker.io/library/slow';
      const whole = await registry.readBlob(repo, digest);
      assert.equal(whole!.info.size, bytes.byteLength);
      // Bytes flow while the upstream still holds back the second half.
      const leaving = whole!.stream;
      let seen = 0;
      for await (const chunk of leaving) {
        seen += (chunk as Buffer).byteLength;
        if (seen >= MiB) break; // the client goes away
      }
      assert.ok(leaving.destroyed);

      const early = await registry.readBlob(repo, digest, { start: 100, end: MiB + 99 });
      assert.deepEqual(await readAll(early!.stream), bytes.subarray(100, MiB + 100));

      const tail = await registry.readBlob(repo, digest, { start: 3 * MiB, end: 4 * MiB - 1 });
      const tailBytes = readAll(tail!.stream);
      assert.equal(events.complete.length, 0);
      assert.equal(await store.statBlob(digest), undefined);

      const completed = once(registry, 'pull-through:complete');
      release();
      const [complete] = (await completed) as [PullThroughComplete];
      assert.equal(complete.bytes, bytes.byteLength);
      assert.deepEqual(await tailBytes, bytes.subarray(3 * MiB));
      assert.deepEqual(await store.statBlob(digest), { digest, size: bytes.byteLength });
      assert.equal(blobGets(server, digest), 1);
      // Every client stream, the one that left included, has closed its file.
      await Promise.all([leaving, early!.stream, tail!.stream].map((s) => (s.closed ? undefined : once(s, 'close'))));
      assert.deepEqual(openFilesUnder(dir), []);
    });
  } finally {
    release();
    await server.stop();
  }
});

test('bytes that do not match the digest commit nothing and end every client stream with an error', TEST_TIMEOUT, async () => {
  const good = randomBytes(3 * MiB);
  const digest = sha256Of(good);
  const corrupt = Buffer.from(good);
  corrupt[corrupt.length - 1]! ^= 0xff;
  const truncatedDigest = sha256Of('truncated');
  // The corrupt blob's last part waits for `release`, so both clients are reading before it fails.
  let release!: () => void;
  const gate = new Promise<void>((resolve) => (release = resolve));
  const server = await startServer((req, res) => {
    if (req.url!.endsWith(`/blobs/${digest}`)) {
      res.writeHead(200, { 'content-length': String(corrupt.byteLength) });
      res.write(corrupt.subarray(0, MiB));
      void gate.then(() => res.end(corrupt.subarray(MiB)));
    } else if (req.url!.endsWith(`/blobs/${truncatedDigest}`)) {
      res.writeHead(200, { 'content-length': String(MiB) });
      res.write(randomBytes(1000), () => res.destroy());
    } else {
      res.writeHead(404).end();
    }
  });
  /** Opens and reads a blob; a download that fails first may also reject the open. */
  const readThrough = (registry: MirroringRegistry, d: string) =>
    registry.readBlob('docker.io/library/bad', d).then((r) => readAll(r!.stream));
  try {
    await withMirror(server.url, async ({ registry, store, events }) => {
      const repo = 'docker.io/library/bad';
      const failed = once(registry, 'pull-through:error');
      const whole = await registry.readBlob(repo, digest);
      const tail = await registry.readBlob(repo, digest, { start: good.length - 10, end: good.length - 1 });
      const readers = [drain(whole!.stream), drain(tail!.stream)];
      release();
      await Promise.all(readers.map((r) => assert.rejects(r.done, DigestMismatchError)));
      assert.ok(readers[0]!.received() < good.length, 'the client never receives the whole bad blob');
      assert.ok(readers[1]!.received() < 10);
      await failed;
      assert.equal(await store.statBlob(digest), undefined);
      assert.deepEqual(
        events.error.map((e) => [e.kind, e.reference, e.error.name, e.bytes]),
        [['blob', digest, 'DigestMismatchError', good.length]],
      );

      await assert.rejects(readThrough(registry, truncatedDigest));
      assert.equal(await store.statBlob(truncatedDigest), undefined);

      // A failure is not remembered: the next read tries the upstream again.
      const failedAgain = once(registry, 'pull-through:error');
      await assert.rejects(readThrough(registry, digest), (err: Error) => {
        const cause = err instanceof UpstreamError ? err.cause : err;
        assert.ok(cause instanceof DigestMismatchError, `unexpected ${err.stack}`);
        return true;
      });
      await failedAgain;
      assert.equal(blobGets(server, digest), 2);
    });
  } finally {
    release();
    await server.stop();
  }
});

test('a blob sent without Content-Length is served once it is complete and verified', TEST_TIMEOUT, async () => {
  const bytes = randomBytes(MiB + 3);
  const digest = sha256Of(bytes);
  const server = await startServer((_req, res) => {
    res.writeHead(200, { 'transfer-encoding': 'chunked' });
    res.write(bytes.subarray(0, 1000));
    res.end(bytes.subarray(1000));
  });
  try {
    await withMirror(server.url, async ({ registry }) => {
      const r = await registry.readBlob('docker.io/library/chunked', digest, { start: 10, end: 19 });
      assert.equal(r!.info.size, bytes.byteLength);
      assert.deepEqual(await readAll(r!.stream), bytes.subarray(10, 20));
    });
  } finally {
    await server.stop();
  }
});

test('a namespace without an upstream is a plain miss; upstream 404 is a miss; a dead upstream fails fast', TEST_TIMEOUT, async () => {
  const upstream = await startRegistry();
  const proxy = await startCountingProxy(upstream.url);
  const dead = await startServer(() => {});
  await dead.stop();
  try {
    await withMirror(proxy.url, async ({ registry, events }) => {
      const absent = sha256Of('absent');
      assert.equal(await registry.getManifest('ghcr.io/org/app', 'v1'), undefined);
      assert.equal(await registry.readBlob('ghcr.io/org/app', absent), undefined);
      assert.equal(await registry.statBlob('ghcr.io/org/app', absent), undefined);
      assert.equal(await registry.getManifest('app', 'v1'), undefined);
      assert.deepEqual(proxy.requests, []);

      assert.equal(await registry.getManifest('docker.io/library/none', 'v1'), undefined);
      assert.equal(await registry.readBlob('docker.io/library/none', absent), undefined);
      assert.equal(await registry.statBlob('docker.io/library/none', absent), undefined);
      assert.deepEqual(
        events.miss.map((e) => [e.kind, e.reference]),
        [
          ['manifest', 'v1'],
          ['blob', absent],
        ],
      );
    });
    await withMirror(dead.url, async ({ registry, events }) => {
      await assert.rejects(registry.getManifest('docker.io/library/app', 'v1'), UpstreamError);
      await assert.rejects(registry.readBlob('docker.io/library/app', sha256Of('x')), UpstreamError);
      assert.deepEqual(
        events.error.map((e) => e.kind),
        ['manifest', 'blob'],
      );
    });
  } finally {
    await proxy.stop();
    await upstream.stop();
  }
});

test('close() ends downloads in flight with an error and leaves nothing behind', TEST_TIMEOUT, async () => {
  const bytes = randomBytes(2 * MiB);
  const { server, release } = await gatedUpstream(bytes, MiB);
  const dir = await tempDir('shoal-mirror-close-');
  const store = await FsContentStore.open({ dir: dir.path });
  const registry = new MirroringRegistry({ store, upstreams: new Map([['docker.io', new UpstreamClient({ url: server.url })]]) });
  try {
    const r = await registry.readBlob('docker.io/library/app', sha256Of(bytes));
    const ended = assert.rejects(drain(r!.stream).done, /closing/);
    await registry.close();
    await ended;
    assert.equal(await store.statBlob(sha256Of(bytes)), undefined);
    assert.deepEqual(await store.pendingUploadFiles(), []);
    await assert.rejects(registry.getManifest('docker.io/library/app', 'v1'), /closed/);
  } finally {
    release();
    await store.close();
    await server.stop();
    await dir.remove();
  }
});
