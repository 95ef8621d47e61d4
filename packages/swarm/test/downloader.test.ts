import { test } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { Writable } from 'node:stream';
import { buffer } from 'node:stream/consumers';
import { sha256Of } from '@shoal/oci';
import { ChunkBitmap, chunkIndexDigest, chunkSpan } from '@shoal/store';
import { MemoryNetwork, NoHolderError } from '@shoal/swarm';
import { waitFor } from '../../mesh/test/fixtures/membership-mesh.ts';
import { CHUNK, indexOf, noProgressAfter, stored, withFixture, writeChunks, type Fixture } from './fixtures/devices.ts';

test('a blob is fetched from several holders at once, verified and announced', () =>
  withFixture(async (f) => {
    const bytes = randomBytes(40 * CHUNK + 17);
    const holders = [await f.device('a'), await f.device('b'), await f.device('c')];
    let digest = '';
    for (const h of holders) digest = await f.seed(h, bytes);
    const d = await f.device('d');
    const transfer = await d.downloader.fetch(digest);
    assert.equal(await d.downloader.fetch(digest), transfer, 'one transfer per blob');
    assert.deepEqual(await transfer.done, { digest, size: bytes.length });
    assert.ok((await stored(d.store, digest)).equals(bytes));
    const sources = Object.keys(transfer.info().sources);
    assert.ok(sources.length >= 2, `chunks came from ${sources.join(', ')}`);
    assert.ok((await f.net.directory('e').findHolders(digest, AbortSignal.timeout(1_000))).includes('d'), 'd announced the blob');
  }));

test('a peer that sends a corrupt chunk is banned and the blob still arrives intact', () =>
  withFixture(async (f) => {
    const bytes = randomBytes(30 * CHUNK);
    const good = await f.device('good');
    const evil = await f.device('evil');
    const digest = await f.seed(good, bytes);
    await f.seed(evil, bytes);
    f.net.setFault('evil', 'corrupt');
    const d = await f.device('d');
    const banned: string[] = [];
    d.downloader.addEventListener('peer:banned', (e) => banned.push(e.detail.peer));
    const transfer = await d.downloader.fetch(digest);
    await transfer.done;
    assert.deepEqual(banned, ['evil']);
    assert.ok(d.downloader.isBanned('evil'));
    assert.equal(transfer.info().sources.evil, undefined, 'no byte from the corrupt peer counted');
    assert.ok((await stored(d.store, digest)).equals(bytes));
    const stats = d.downloader.stats;
    assert.equal(stats.peersBanned, 1);
    // Chunks already in flight from the peer, or received and being verified, when the first failed may fail too.
    const { maxInFlightPerPeer, maxStoringChunks } = d.downloader.options;
    assert.ok(stats.chunksRejected >= 1 && stats.chunksRejected <= maxInFlightPerPeer + maxStoringChunks, `${stats.chunksRejected} rejected`);
    // An endgame duplicate is verified too, though only one copy is written.
    assert.ok(stats.chunksVerified >= 30 && stats.bytesVerified >= bytes.length, JSON.stringify(stats));
    assert.deepEqual([stats.transfersCompleted, stats.transfersFailed], [1, 0]);
  }));

test('a peer that stalls or dies mid-transfer is replaced by the other holders', () =>
  withFixture(async (f) => {
    const bytes = randomBytes(40 * CHUNK);
    const a = await f.device('a', { delayMs: 5 });
    const b = await f.device('b', { delayMs: 5 });
    const c = await f.device('c', { delayMs: 5 });
    const digest = await f.seed(a, bytes);
    await f.seed(b, bytes);
    await f.seed(c, bytes);
    const d = await f.device('d', { chunkTimeoutMs: 200 });
    const transfer = await d.downloader.fetch(digest);
    await new Promise((r) => setTimeout(r, 30));
    f.net.setFault('a', 'stall');
    f.net.kill('b');
    await transfer.done;
    assert.ok((await stored(d.store, digest)).equals(bytes));
    assert.ok(transfer.info().sources.c! > 0);
  }));

test("a request's slot frees once its bytes are in: while the store is slow the next requests go out, up to maxStoringChunks waiting", () =>
  withFixture(async (f) => {
    const bytes = randomBytes(24 * CHUNK);
    const digest = await f.seed(await f.device('a'), bytes);
    const d = await f.device('d', { maxInFlightPerPeer: 1, maxStoringChunks: 3 });
    let storing = 0;
    let most = 0;
    const slowed = new WeakSet<object>();
    const openPartial = d.store.openPartial.bind(d.store);
    d.store.openPartial = async (index) => {
      const partial = await openPartial(index);
      if (slowed.has(partial)) return partial;
      slowed.add(partial);
      const writeChunk = partial.writeChunk.bind(partial);
      partial.writeChunk = async (i, chunk) => {
        most = Math.max(most, ++storing);
        try {
          await new Promise((resolve) => setTimeout(resolve, 30));
          await writeChunk(i, chunk);
        } finally {
          storing--;
        }
      };
      return partial;
    };
    const transfer = await d.downloader.fetch(digest);
    await transfer.done;
    assert.ok((await stored(d.store, digest)).equals(bytes));
    assert.equal(most, 3, 'three chunks were being stored at once, with one request in flight at a time');
  }));

test('a holder answering busy is asked again after a pause, not counted as failing, while the others trade', () =>
  withFixture(async (f) => {
    const bytes = randomBytes(24 * CHUNK);
    const digest = await f.seed(await f.device('seeder', { delayMs: 10, maxUploads: 1 }), bytes);
    const devices = await Promise.all(['a', 'b', 'c', 'd'].map((name) => f.device(name, { maxPeerFailures: 1 })));
    const transfers = await Promise.all(devices.map((d) => d.downloader.fetch(digest)));
    await Promise.all(transfers.map((t) => t.done));
    for (const d of devices) assert.ok((await stored(d.store, digest)).equals(bytes), `${d.name} has the blob`);
    const busy = devices.reduce((sum, d) => sum + d.downloader.stats.requestsBusy, 0);
    assert.ok(busy > 0, 'the seeder sent one chunk at a time and answered the rest busy');
    // With maxPeerFailures 1, a busy answer counted as a failure would have dropped the only seeder.
    const fromSeeder = new Set(f.net.served.get('seeder'));
    assert.equal(fromSeeder.size, 24, 'every chunk still came from the seeder at least once');
  }));

test('a reader whose only holder answered two requests busy in a row still gets the blob once the holder has room', () =>
  withFixture(async (f) => {
    const bytes = randomBytes(8 * CHUNK);
    const seeder = await f.device('seeder');
    const digest = await f.seed(seeder, bytes);
    f.net.setFault('seeder', 'busy');
    const d = await f.device('d', { maxInFlightPerPeer: 2 });
    const transfer = await d.downloader.fetch(digest);
    const body = buffer(transfer.read(0, bytes.length - 1).stream);
    body.catch(() => {});
    // After the first busy answer the waiting reader has two requests go out at once, and both
    // come back busy: the second pause is the longer one, and the wake armed for the first fires
    // while the second still runs.
    await waitFor('three busy answers', () => d.downloader.stats.requestsBusy >= 3, 3_000);
    f.net.setFault('seeder', 'none');
    assert.ok((await Promise.race([body, noProgressAfter(transfer, 5_000)])).equals(bytes));
    await transfer.done;
  }));

test('a chunk its holder has started to send is not abandoned at chunkTimeoutMs, however long its bytes take', () =>
  withFixture(async (f) => {
    const bytes = randomBytes(6 * CHUNK);
    const index = indexOf(bytes);
    // A device still downloading is asked for chunks by index (a whole holder picks); this one
    // starts each answer at once and takes three times the limit to send it.
    const p = await f.device('p', { sendMs: 300 });
    const partial = await p.store.openPartial(index);
    await writeChunks(partial, bytes, 6);
    f.net.directory('p').announcePartial(index.blob, partial.have);
    const d = await f.device('d', { chunkTimeoutMs: 100, maxPeerFailures: 1 });
    const transfer = await d.downloader.fetch(index.blob);
    await Promise.race([transfer.done, noProgressAfter(transfer, 5_000)]);
    assert.ok((await stored(d.store, index.blob)).equals(bytes));
    assert.equal(f.net.requests.get('p'), 6, 'each chunk was asked for once');
  }));

test('nobody holding the blob is a NoHolderError', () =>
  withFixture(async (f) => {
    const d = await f.device('d');
    await assert.rejects(d.downloader.fetch(sha256Of('nothing')), NoHolderError);
    assert.equal(d.downloader.list().length, 0);
    assert.equal(d.downloader.stats.transfersFailed, 1);
  }));

test('a device serves the chunks it has while it is still downloading', () =>
  withFixture(async (f) => {
    const bytes = randomBytes(60 * CHUNK);
    const seeder = await f.device('seeder', { delayMs: 3 });
    const digest = await f.seed(seeder, bytes);
    const b = await f.device('b', { delayMs: 1 });
    const c = await f.device('c', { delayMs: 1 });
    const [tb, tc] = await Promise.all([b.downloader.fetch(digest), c.downloader.fetch(digest)]);
    await Promise.all([tb.done, tc.done]);
    assert.ok((await stored(b.store, digest)).equals(bytes) && (await stored(c.store, digest)).equals(bytes));
    // Each fetched something from the other, which held only part of the blob at the time.
    assert.ok((tb.info().sources.c ?? 0) + (tc.info().sources.b ?? 0) > 0, JSON.stringify([tb.info().sources, tc.info().sources]));
  }));

test('with a vouched-for chunk index, holders that report another index are not used', () =>
  withFixture(async (f) => {
    const bytes = randomBytes(8 * CHUNK);
    const index = indexOf(bytes);
    const honest = await f.device('honest');
    const digest = await f.seed(honest, bytes);
    // A liar that claims the blob with a made-up index whose chunks match its own bytes.
    const junk = randomBytes(8 * CHUNK);
    const lie = { ...indexOf(junk), blob: digest };
    f.net.add('liar', {
      holding: async () => ({ index: lie, have: 'all' }),
      readChunk: async (_b, i) => {
        const { offset, length } = chunkSpan(lie, i);
        return junk.subarray(offset, offset + length);
      },
    });
    await f.net.directory('liar').announce(digest);
    const d = await f.device('d', { trustedIndexDigest: () => chunkIndexDigest(index) });
    const transfer = await d.downloader.fetch(digest);
    await transfer.done;
    assert.deepEqual(Object.keys(transfer.info().sources), ['honest']);
  }));

test('a stream and a pooled sender follow the download in order and hold the last byte until the blob is verified', () =>
  withFixture(async (f) => {
    const bytes = randomBytes(20 * CHUNK + 5);
    const a = await f.device('a', { delayMs: 3 });
    const digest = await f.seed(a, bytes);
    const d = await f.device('d');
    const transfer = await d.downloader.fetch(digest);
    // Like a socket, it has the bytes once it calls back (the sender then reuses its buffer).
    const parts: Buffer[] = [];
    const sent = new Writable({ write: (chunk: Buffer, _enc, done) => (parts.push(Buffer.from(chunk)), done()) });
    const [whole, range] = await Promise.all([
      buffer(transfer.read(0, bytes.length - 1).stream),
      buffer(transfer.read(CHUNK - 3, 3 * CHUNK).stream),
      transfer.read(5, bytes.length - 1).sendTo!(sent).then(() => sent.end()),
    ]);
    assert.ok(whole.equals(bytes));
    assert.ok(range.equals(bytes.subarray(CHUNK - 3, 3 * CHUNK + 1)));
    assert.ok(Buffer.concat(parts).equals(bytes.subarray(5)));
    assert.equal(transfer.info().state, 'complete');
  }));

test("with whole holders only, a reader's next chunks come first, so its first byte follows the first chunk", () =>
  withFixture(async (f) => {
    const chunks = 48;
    const bytes = randomBytes(chunks * CHUNK);
    let digest = '';
    for (const name of ['a', 'b', 'c']) digest = await f.seed(await f.device(name, { delayMs: 10 }), bytes);
    const d = await f.device('d');
    const transfer = await d.downloader.fetch(digest);
    const stream = transfer.read(0, bytes.length - 1).stream;
    const heldAtFirstByte = await new Promise<number>((resolve) => stream.once('data', () => resolve(transfer.info().chunksHeld)));
    assert.ok((await buffer(stream)).length > 0);
    await transfer.done;
    // Rarest-first among three equal holders would bring chunk 0 after half the blob on average.
    assert.ok(heldAtFirstByte <= 6, `${heldAtFirstByte} of ${chunks} chunks held when the first byte was read`);
  }));

test('devices that start together get different chunks from one seeder: it sends each once before any twice', () =>
  withFixture(
    async (f) => {
      const chunks = 48;
      const bytes = randomBytes(chunks * CHUNK);
      const digest = await f.seed(await f.device('seeder', { delayMs: 5 }), bytes);
      // No endgame duplicates: a receiver that finishes early may rightly ask the seeder again for
      // a late chunk, a second send this test is not about.
      const receivers = await Promise.all(['r1', 'r2', 'r3', 'r4', 'r5'].map((name) => f.device(name, { delayMs: 5, endgameDuplicates: 1 })));
      const transfers = await Promise.all(receivers.map((r) => r.downloader.fetch(digest)));
      await Promise.all(transfers.map((t) => t.done));
      for (const r of receivers) assert.ok((await stored(r.store, digest)).equals(bytes), `${r.name} holds the blob`);
      const sent = f.net.served.get('seeder')!;
      // Availability reaches the others 50 ms late, so only the seeder knows what it has sent.
      assert.equal(new Set(sent.slice(0, chunks)).size, Math.min(chunks, sent.length), `the seeder's first sends: ${sent.slice(0, chunks).join(' ')}`);
      assert.ok(transfers.some((t) => Object.keys(t.info().sources).length > 1), 'receivers traded chunks');
    },
    new MemoryNetwork({ gossipDelayMs: 50 }),
  ));

test('endgame duplicates only late requests: with eight prompt holders the last chunks are asked once', () =>
  withFixture(async (f) => {
    const chunks = 40;
    const bytes = randomBytes(chunks * CHUNK);
    let digest = '';
    for (const name of ['a', 'b', 'c', 'd', 'e', 'f', 'g', 'h']) digest = await f.seed(await f.device(name, { delayMs: 20 }), bytes);
    const r = await f.device('r');
    await (await r.downloader.fetch(digest)).done;
    assert.ok((await stored(r.store, digest)).equals(bytes));
    const requests = [...f.net.requests.values()].reduce((sum, n) => sum + n, 0);
    assert.ok(requests <= chunks + 2, `${requests} chunk requests for ${chunks} chunks`);
  }));

test('a transfer with enough sources stops looking holders up and relies on availability gossip', () =>
  withFixture(async (f) => {
    const bytes = randomBytes(48 * CHUNK);
    let digest = '';
    for (const name of ['a', 'b', 'c', 'd']) digest = await f.seed(await f.device(name, { delayMs: 25 }), bytes);
    const lookups = async (rediscoverBelowPeers: number) => {
      const name = `r${rediscoverBelowPeers}`;
      const directory = f.net.directory(name);
      const findHolders = directory.findHolders.bind(directory);
      let calls = 0;
      directory.findHolders = (blob, signal) => {
        calls++;
        return findHolders(blob, signal);
      };
      const r = await f.device(name, { rediscoverMs: 20, rediscoverBelowPeers });
      await (await r.downloader.fetch(digest)).done;
      assert.ok((await stored(r.store, digest)).equals(bytes));
      return calls;
    };
    assert.equal(await lookups(3), 1, 'four sources: only the lookup that started the transfer');
    const repeated = await lookups(10);
    assert.ok(repeated > 3, `below the threshold the lookup repeats: ${repeated}`);
  }));

test('a resumed download fetches only the chunks it lacks', () =>
  withFixture(async (f) => {
    const bytes = randomBytes(16 * CHUNK);
    const index = indexOf(bytes);
    const a = await f.device('a');
    const digest = await f.seed(a, bytes);
    const d = await f.device('d');
    const partial = await d.store.openPartial(index);
    await writeChunks(partial, bytes, 10);
    await partial.close();
    const [resumable] = await d.store.partialBlobs();
    const transfer = await d.downloader.fetch(digest, { index: resumable });
    await transfer.done;
    const served = f.net.served.get('a')!;
    assert.equal(served.length, 6, `chunks served: ${served.join(' ')}`);
    assert.ok((await stored(d.store, digest)).equals(bytes));
  }));

/**
 * Device `a` pulling a random 25-chunk blob through from an upstream: a chunk lands every
 * `everyMs`, then `beforeCommit` runs and the blob is committed, which settles `arriving`.
 */
async function pullThrough(f: Fixture, everyMs: number, opts: { sendMs?: number; beforeCommit?: () => void } = {}) {
  const bytes = randomBytes(24 * CHUNK + 100);
  const digest = sha256Of(bytes);
  const full = indexOf(bytes);
  let landed = 0;
  const growing = {
    index: async () => ({ ...full, chunks: full.chunks.slice(0, Math.floor(landed / CHUNK)) }),
    read: async (buffer: Uint8Array, position: number) => {
      const n = Math.max(0, Math.min(buffer.byteLength, landed - position));
      bytes.copy(buffer, 0, position, position + n);
      return n;
    },
  };
  const a = await f.device('a', { sendMs: opts.sendMs, growing: (blob) => (blob === digest && landed < bytes.length ? growing : undefined) });
  f.net.directory('a').announcePartial(digest, new ChunkBitmap(full.chunks.length));
  const arriving = (async () => {
    while (landed < bytes.length) {
      await new Promise((r) => setTimeout(r, everyMs));
      landed = Math.min(bytes.length, landed + CHUNK);
    }
    opts.beforeCommit?.();
    await f.seed(a, bytes);
  })();
  return { bytes, digest, arriving, pulling: () => landed < bytes.length };
}

test('devices pulling together from a holder that pulls the blob through get each chunk from it once and trade the rest', () =>
  withFixture(async (f) => {
    // A chunk lands every 20 ms; each send takes 30 ms, so the devices' requests overlap.
    let sentWhilePulling: number[] = [];
    const { bytes, digest, arriving } = await pullThrough(f, 20, { sendMs: 30, beforeCommit: () => (sentWhilePulling = [...(f.net.served.get('a') ?? [])]) });
    const devices = await Promise.all(['b', 'c', 'd'].map((name) => f.device(name, { growingRefreshMs: 5, sendMs: 30 })));
    const transfers = await Promise.all(devices.map((d) => d.downloader.fetch(digest)));
    const infos = await Promise.all(transfers.map(async (t) => (await t.done, t.info())));
    await arriving;
    for (const d of devices) assert.ok((await stored(d.store, digest)).equals(bytes), `${d.name} has the blob`);
    const once = new Set(sentWhilePulling);
    assert.equal(once.size, sentWhilePulling.length, `while pulling, a sent no chunk twice: ${sentWhilePulling.join(' ')}`);
    assert.ok(sentWhilePulling.length >= 12, `${sentWhilePulling.length} of 25 chunks went out while a pulled`);
    const traded = infos.reduce((sum, info) => sum + Object.entries(info.sources).reduce((n, [peer, got]) => n + (peer === 'a' ? 0 : got), 0), 0);
    assert.ok(traded >= bytes.length, `the devices passed each other at least a blob's worth: ${traded} bytes`);
    // Following the growing index, each device asked the holder pulling through, not each other,
    // how far it got: a 5 ms refresh over ~0.5 s is ~100 queries each to a, a handful to b, c, d.
    const asked = Object.fromEntries(['a', 'b', 'c', 'd'].map((name) => [name, f.net.holdingQueries.get(name) ?? 0]));
    assert.ok(asked.a! >= 60, `a was asked ${asked.a} times`);
    for (const name of ['b', 'c', 'd']) assert.ok(asked[name]! <= asked.a! / 5, `${name} was asked ${asked[name]} times, a ${asked.a}`);
  }));

test('a blob still arriving at its holder from an upstream is fetched chunk by chunk as it lands', () =>
  withFixture(async (f) => {
    // The holder's pull-through: a chunk lands every 25 ms; the blob is committed at the end.
    const { bytes, digest, arriving, pulling } = await pullThrough(f, 25);
    const d = await f.device('d', { growingRefreshMs: 5 });
    let early = 0;
    d.downloader.addEventListener('chunk', () => {
      if (pulling()) early++;
    });
    const transfer = await d.downloader.fetch(digest);
    const streamed = buffer(transfer.read(0, bytes.length - 1).stream);
    await transfer.done;
    await arriving;
    assert.ok((await streamed).equals(bytes));
    assert.ok((await stored(d.store, digest)).equals(bytes));
    // Most chunks were fetched before the holder had the whole blob.
    assert.ok(early >= 12, `${early} of 25 chunks arrived while the holder was still pulling`);
  }));
