import { test } from 'node:test';
import assert from 'node:assert/strict';
import { createHash, randomBytes } from 'node:crypto';
import { setTimeout as sleep } from 'node:timers/promises';
import type { Stream, StreamCloseEvent } from '@libp2p/interface';
import { peerIdFromString } from '@libp2p/peer-id';
import { MeshHost } from '@shoal/mesh';
import { sha256Of } from '@shoal/oci';
import { ChunkBitmap, ChunkHasher, type ChunkIndex } from '@shoal/store';
import {
  CHUNK_PROTOCOL,
  ChunkBusyError,
  ChunkDataPlane,
  ChunkPeerError,
  ChunkProtocolError,
  ChunkServer,
  ChunkStallError,
  DataPlaneClient,
  Libp2pChunkTransport,
  type Availability,
  type ChunkDataPlaneOptions,
  type ChunkServerOptions,
  type ChunkSource,
  type Holding,
  type UploadEvent,
  UploadLedger,
} from '../src/index.ts';
import { waitFor } from '../../mesh/test/fixtures/membership-mesh.ts';
import { decodeRequest, encodeFrame, FrameReader } from '../src/chunk-protocol.ts';

// mDNS stays off (lo has no multicast here); hosts meet by bootstrap on 127.0.0.1.
const LOOPBACK = ['/ip4/127.0.0.1/tcp/0'];
const MiB = 1024 * 1024;
const UNKNOWN = `sha256:${'0'.repeat(64)}`;

interface MemoryBlob {
  data: Buffer;
  index: ChunkIndex;
  have: Availability;
  /** Being pulled through from an upstream (Holding.growing). */
  growing?: boolean;
}

/** A ChunkSource over random blobs in memory, with knobs for slow and failing reads. */
class MemorySource implements ChunkSource {
  readonly blobs = new Map<string, MemoryBlob>();
  delayMs = 0;
  fail = false;
  active = 0;
  maxActive = 0;
  reads = 0;
  onRead?: (blob: string, index: number) => void;

  add(size: number, chunkSize = MiB, holds: (i: number) => boolean = () => true): MemoryBlob {
    const data = randomBytes(size);
    const hasher = new ChunkHasher(chunkSize);
    hasher.update(data);
    const index = hasher.finish(sha256Of(data), size);
    const bitmap = new ChunkBitmap(index.chunks.length);
    for (let i = 0; i < index.chunks.length; i++) if (holds(i)) bitmap.set(i);
    const blob = { data, index, have: bitmap.complete ? ('all' as const) : bitmap };
    this.blobs.set(index.blob, blob);
    return blob;
  }

  async holding(blob: string): Promise<Holding | undefined> {
    if (this.fail) throw new Error('disk on fire');
    const held = this.blobs.get(blob);
    return held && { index: held.index, have: held.have, growing: held.growing };
  }

  async readChunk(blob: string, index: number): Promise<Uint8Array | undefined> {
    this.active++;
    this.maxActive = Math.max(this.maxActive, this.active);
    try {
      if (this.delayMs > 0) await sleep(this.delayMs);
      if (this.fail) throw new Error('disk on fire');
      const held = this.blobs.get(blob);
      if (!held || index >= held.index.chunks.length || (held.have !== 'all' && !held.have.has(index))) return undefined;
      this.reads++;
      const start = index * held.index.chunkSize;
      // A copy, as a store would read it; the server must not depend on owning it.
      return Uint8Array.from(held.data.subarray(start, start + held.index.chunkSize));
    } finally {
      this.active--;
      this.onRead?.(blob, index);
    }
  }
}

interface Rig {
  server: MeshHost;
  source: MemorySource;
  chunkServer: ChunkServer;
  serverId: string;
  clients: MeshHost[];
  transports: Libp2pChunkTransport[];
}

/** A server host with a ChunkServer over a MemorySource, and `clients` hosts bootstrapped to it. */
async function withRig(
  opts: { clients?: number; server?: ChunkServerOptions; stallTimeoutMs?: number },
  fn: (rig: Rig) => Promise<void>,
): Promise<void> {
  const hosts: MeshHost[] = [];
  let chunkServer: ChunkServer | undefined;
  let transports: Libp2pChunkTransport[] = [];
  try {
    const server = await startHost(hosts);
    const source = new MemorySource();
    chunkServer = new ChunkServer(server, source, opts.server);
    await chunkServer.start();
    const clients: MeshHost[] = [];
    for (let i = 0; i < (opts.clients ?? 1); i++) clients.push(await startHost(hosts, server));
    transports = clients.map((client) => new Libp2pChunkTransport(client, { stallTimeoutMs: opts.stallTimeoutMs }));
    await fn({ server, source, chunkServer, serverId: server.peerId.toString(), clients, transports });
  } finally {
    await Promise.all(transports.map((t) => t.close()));
    await chunkServer?.stop();
    await Promise.all(hosts.map((host) => host.stop()));
  }
}

/**
 * A rig whose server also runs a ChunkDataPlane (options `plane`, sharing its ledger with the chunk
 * server) over a MemorySource of its own, `planeSource`, for delays and counts on that path only;
 * `addBlob` puts a blob in both sources.
 */
async function withDataPlaneRig(
  plane: Omit<ChunkDataPlaneOptions, 'host'>,
  clients: number,
  fn: (rig: Rig & { dataPlane: ChunkDataPlane; planeSource: MemorySource; addBlob: MemorySource['add'] }) => Promise<void>,
): Promise<void> {
  const planeSource = new MemorySource();
  const dataPlane = new ChunkDataPlane(planeSource, { host: '127.0.0.1', ...plane });
  await dataPlane.start();
  try {
    await withRig({ clients, server: { dataPlane, ledger: plane.ledger } }, (rig) =>
      fn({
        ...rig,
        dataPlane,
        planeSource,
        addBlob: (...args) => {
          const blob = rig.source.add(...args);
          planeSource.blobs.set(blob.index.blob, blob);
          return blob;
        },
      }),
    );
  } finally {
    await dataPlane.stop();
  }
}

async function startHost(hosts: MeshHost[], bootstrap?: MeshHost): Promise<MeshHost> {
  const host = new MeshHost({ listen: LOOPBACK, mdns: false, bootstrap: bootstrap ? [bootstrap.multiaddrs[0]!.toString()] : [] });
  hosts.push(host);
  await host.start();
  return host;
}

function sha256Hex(bytes: Uint8Array): string {
  return createHash('sha256').update(bytes).digest('hex');
}

function signal(ms = 30_000): AbortSignal {
  return AbortSignal.timeout(ms);
}

function chunkStreams(host: MeshHost): Stream[] {
  return host.node.getConnections().flatMap((connection) => connection.streams.filter((stream) => stream.protocol === CHUNK_PROTOCOL));
}

/** Opens a raw chunk stream, sends `bytes` (and half-closes if asked), and resolves with how the stream ended. */
async function rawExchange(from: MeshHost, to: string, bytes: Uint8Array[], halfClose = true): Promise<{ error?: Error; received: number }> {
  const stream = await from.node.dialProtocol(peerIdFromString(to), CHUNK_PROTOCOL, { signal: signal(5_000) });
  let received = 0;
  stream.addEventListener('message', (evt) => {
    received += evt.data.byteLength;
  });
  const closed = new Promise<StreamCloseEvent>((resolve) => stream.addEventListener('close', resolve, { once: true }));
  for (const piece of bytes) stream.send(piece);
  if (halfClose) await stream.close().catch(() => {});
  const evt = await closed;
  return { error: evt.error, received };
}

test('holding answers the whole index with "all", a partial blob with its bitmap, an unknown blob with undefined', async () => {
  await withRig({}, async ({ source, serverId, transports: [transport] }) => {
    const whole = source.add(3 * MiB + 5);
    const partial = source.add(20 * MiB + 1, MiB, (i) => i % 3 === 0 || i === 20);

    const gotWhole = await transport!.fetchHolding(serverId, whole.index.blob, signal());
    assert.deepEqual(gotWhole, { index: whole.index, have: 'all' });

    const gotPartial = await transport!.fetchHolding(serverId, partial.index.blob, signal());
    assert.deepEqual(gotPartial!.index, partial.index);
    assert.ok(gotPartial!.have instanceof ChunkBitmap);
    assert.equal(gotPartial!.have.length, 21);
    assert.deepEqual(gotPartial!.have.toBytes(), (partial.have as ChunkBitmap).toBytes());
    assert.equal(gotPartial!.have.count, 8);

    assert.equal(await transport!.fetchHolding(serverId, UNKNOWN, signal()), undefined);
    await assert.rejects(transport!.fetchHolding(serverId, 'sha256:nope', signal()), TypeError);
  });
});

test('a holding asked with a known index leaves out the known entries, and the transport answers the whole index', async () => {
  await withRig({}, async ({ source, serverId, transports: [transport] }) => {
    const pulling = source.add(12 * MiB, MiB, (i) => i < 7);
    pulling.growing = true;
    const full = pulling.index;
    const provisional = { ...full, chunks: full.chunks.slice(0, 7) };
    pulling.index = provisional;
    const known = { ...provisional, chunks: provisional.chunks.slice(0, 4) };

    const got = await transport!.fetchHolding(serverId, pulling.index.blob, signal(), known);
    assert.deepEqual(got!.index, provisional);
    assert.equal(got!.growing, true);
    assert.equal((got!.have as ChunkBitmap).count, 7);

    // Knowing more than the holder has (or all of it) costs nothing and loses nothing.
    assert.deepEqual((await transport!.fetchHolding(serverId, pulling.index.blob, signal(), full))!.index, provisional);
    const whole = source.add(3 * MiB);
    assert.deepEqual(await transport!.fetchHolding(serverId, whole.index.blob, signal(), whole.index), { index: whole.index, have: 'all' });
  });
});

test('every chunk of a ~40 MiB blob arrives intact, the short last chunk included; uploads are counted', async () => {
  await withRig({}, async ({ source, chunkServer, serverId, clients, transports: [transport] }) => {
    const blob = source.add(40 * MiB + 123_457);
    const { index } = blob;
    assert.equal(index.chunks.length, 41);
    const uploads: UploadEvent[] = [];
    chunkServer.addEventListener('upload', (evt) => uploads.push(evt.detail));

    // Without a prior holding the transport only bounds the length; with one it knows each length.
    const first = await transport!.fetchChunk(serverId, index.blob, 0, signal());
    assert.equal(sha256Hex(first!), index.chunks[0]);
    await transport!.fetchHolding(serverId, index.blob, signal());
    for (let i = 0; i < index.chunks.length; i++) {
      const chunk = await transport!.fetchChunk(serverId, index.blob, i, signal());
      assert.ok(chunk, `chunk ${i}`);
      assert.equal(sha256Hex(chunk), index.chunks[i], `chunk ${i} hash`);
      assert.equal(chunk.byteLength, i === 40 ? 123_457 : MiB);
    }
    assert.equal(chunkServer.chunksServed, 42);
    assert.equal(chunkServer.bytesServed, 41 * MiB + 123_457);
    assert.equal(uploads.length, 42);
    assert.deepEqual(uploads.at(-1), { peer: clients[0]!.peerId.toString(), blob: index.blob, index: 40, bytes: 123_457 });
    await waitFor('streams to close on both ends', () => chunkStreams(clients[0]!).length === 0);
  });
});

test('not-found: an unknown blob, a chunk the bitmap lacks, a chunk past the end, a range over a missing chunk', async () => {
  await withRig({}, async ({ source, serverId, transports: [transport] }) => {
    const partial = source.add(4 * MiB, MiB, (i) => i !== 2);
    const { blob } = partial.index;
    assert.equal(await transport!.fetchChunk(serverId, UNKNOWN, 0, signal()), undefined);
    assert.equal(await transport!.fetchChunk(serverId, blob, 2, signal()), undefined);
    assert.equal(await transport!.fetchChunk(serverId, blob, 4, signal()), undefined);
    assert.equal(await transport!.fetchRange(serverId, blob, 2 * MiB - 10, 20, signal()), undefined);
    assert.equal(await transport!.fetchRange(serverId, UNKNOWN, 0, 1, signal()), undefined);
    const held = await transport!.fetchChunk(serverId, blob, 3, signal());
    assert.equal(sha256Hex(held!), partial.index.chunks[3]);
  });
});

test('range: within a chunk, across chunk boundaries, at the end, empty; past the end is an error', async () => {
  await withRig({}, async ({ source, chunkServer, serverId, transports: [transport] }) => {
    const { data, index } = source.add(10 * MiB + 777, MiB);
    const cases: [number, number][] = [
      [0, 100],
      [5, MiB],
      [MiB - 3, 3 * MiB + 6],
      [2 * MiB, 4 * MiB],
      [10 * MiB, 777],
      [10 * MiB + 700, 77],
      [123, 0],
    ];
    for (const [offset, length] of cases) {
      const got = await transport!.fetchRange(serverId, index.blob, offset, length, signal());
      assert.ok(got, `range ${offset}+${length}`);
      assert.ok(data.subarray(offset, offset + length).equals(got), `range ${offset}+${length} bytes`);
    }
    assert.equal(chunkServer.rangesServed, cases.length);
    await assert.rejects(transport!.fetchRange(serverId, index.blob, 10 * MiB + 700, 78, signal()), ChunkPeerError);
    await assert.rejects(transport!.fetchRange(serverId, index.blob, 0, 4 * MiB + 1, signal()), RangeError);
  });
});

test('aborting mid-transfer rejects with the reason, leaks no stream, and both nodes keep serving', async () => {
  await withRig({}, async ({ source, server, chunkServer, serverId, clients, transports: [transport] }) => {
    const { index } = source.add(16 * MiB, 16 * MiB);
    let readDone!: () => void;
    const read = new Promise<void>((resolve) => (readDone = resolve));
    source.onRead = () => readDone();
    const controller = new AbortController();
    const fetching = transport!.fetchChunk(serverId, index.blob, 0, controller.signal);
    await read;
    // The server has the chunk and is sending its 16 MiB now.
    await sleep(2);
    controller.abort(new Error('user gave up'));
    await assert.rejects(fetching, /user gave up/);
    source.onRead = undefined;

    await waitFor('chunk streams to be gone on both ends', () => chunkStreams(server).length === 0 && chunkStreams(clients[0]!).length === 0);
    assert.equal(chunkServer.chunksServed, 0, 'the upload was cut off mid-chunk');
    const again = await transport!.fetchChunk(serverId, index.blob, 0, signal());
    assert.equal(sha256Hex(again!), index.chunks[0]);
    // Already aborted: rejects at once, without a stream.
    await assert.rejects(transport!.fetchChunk(serverId, index.blob, 0, AbortSignal.abort(new Error('too late'))), /too late/);
  });
});

test('aborting while a stalling peer is halfway through a chunk rejects and resets its stream', async () => {
  const hosts: MeshHost[] = [];
  try {
    const rogue = await startHost(hosts);
    const client = await startHost(hosts, rogue);
    let halfSent!: () => void;
    const sent = new Promise<void>((resolve) => (halfSent = resolve));
    const rogueClosed = new Promise<StreamCloseEvent>((resolve) => {
      void rogue.node.handle(CHUNK_PROTOCOL, (stream) => {
        stream.addEventListener('close', resolve, { once: true });
        stream.send(encodeFrame({ status: 'ok', length: MiB }));
        stream.send(new Uint8Array(100_000));
        halfSent();
      });
    });
    const controller = new AbortController();
    const transport = new Libp2pChunkTransport(client);
    const fetching = transport.fetchChunk(rogue.peerId.toString(), UNKNOWN, 0, controller.signal);
    await sent;
    await sleep(50);
    controller.abort(new Error('enough'));
    await assert.rejects(fetching, /enough/);
    const closed = await rogueClosed;
    assert.ok(closed.error, 'the rogue saw a reset');
    assert.equal(client.node.getConnections(rogue.peerId).length, 1, 'the connection survives');
  } finally {
    await Promise.all(hosts.map((host) => host.stop()));
  }
});

test('malformed, oversized and silent requests reset only their own stream; the server keeps serving', async () => {
  const failures: unknown[] = [];
  const log = { debug: (obj: { err?: unknown }, msg: string) => msg === 'chunk request failed' && failures.push(obj.err), warn() {} };
  await withRig({ server: { requestTimeoutMs: 300, log } }, async ({ source, serverId, clients: [client], transports: [transport] }) => {
    const { index } = source.add(2 * MiB);
    const connection = client!.node.getConnections(peerIdFromString(serverId))[0]!;
    const valid = (request: object) => encodeFrame(request);
    const bad: [string, RegExp, Uint8Array[], boolean?][] = [
      ['non-JSON body', /not JSON/, [Buffer.from([5, 0xff, 0xfe, 0, 1, 2])]],
      ['oversized frame', /30000 bytes exceeds 24576/, [Buffer.from([0xb0, 0xea, 0x01]), randomBytes(100)]],
      ['overlong varint', /prefix too long/, [Buffer.from([0x80, 0x80, 0x80, 0x80, 0x01])]],
      ['JSON array', /not a JSON object/, [valid([1, 2, 3])]],
      ['unknown op', /unknown request op/, [valid({ op: 'delete', blob: index.blob })]],
      ['bad digest', /blob digest/, [valid({ op: 'holding', blob: 'sha256:XYZ' })]],
      ['upper-case digest', /blob digest/, [valid({ op: 'holding', blob: index.blob.toUpperCase() })]],
      ['holding from a negative entry', /valid from/, [valid({ op: 'holding', blob: index.blob, from: -1 })]],
      ['negative index', /valid index/, [valid({ op: 'chunk', blob: index.blob, index: -1 })]],
      ['fractional index', /valid index/, [valid({ op: 'chunk', blob: index.blob, index: 1.5 })]],
      ['string index', /valid index/, [valid({ op: 'chunk', blob: index.blob, index: '1' })]],
      ['range too long', /range length/, [valid({ op: 'range', blob: index.blob, offset: 0, length: 4 * MiB + 1 })]],
      ['negative offset', /valid offset/, [valid({ op: 'range', blob: index.blob, offset: -1, length: 1 })]],
      ['pick without a bitmap', /valid bitmap/, [valid({ op: 'pick', blob: index.blob })]],
      ['pick bitmap not base64', /valid bitmap/, [valid({ op: 'pick', blob: index.blob, want: '!!' })]],
      ['pick bitmap of the wrong size', /bad bitmap/, [valid({ op: 'pick', blob: index.blob, want: 'AAAA' })]],
      ['data after the request', /data after the request/, [Buffer.concat([valid({ op: 'chunk', blob: index.blob, index: 0 }), Buffer.from([0])])]],
      ['truncated frame', /ended before a whole request/, [valid({ op: 'holding', blob: index.blob }).subarray(0, 20)]],
      ['nothing at all, stream left open', /stalled/, [], false],
    ];
    for (const [what, reason, bytes, halfClose] of bad) {
      const before = failures.length;
      const outcome = await rawExchange(client!, serverId, bytes, halfClose ?? true);
      assert.ok(outcome.error, `${what}: the server reset the stream`);
      assert.equal(outcome.received, 0, `${what}: no answer`);
      await waitFor(`${what}: logged`, () => failures.length > before);
      const expected = halfClose === false ? ChunkStallError : ChunkProtocolError;
      assert.ok(failures.slice(before).every((err) => err instanceof expected && reason.test(err.message)), `${what}: ${failures.slice(before).join('; ')}`);
    }
    // A well-formed request with an unknown extra field is fine.
    const ok = await rawExchange(client!, serverId, [valid({ op: 'holding', blob: UNKNOWN, future: true })]);
    assert.equal(ok.error, undefined);
    assert.ok(ok.received > 0);

    assert.equal(client!.node.getConnections(peerIdFromString(serverId))[0], connection, 'same connection throughout');
    const chunk = await transport!.fetchChunk(serverId, index.blob, 1, signal());
    assert.equal(sha256Hex(chunk!), index.chunks[1]);
  });
});

test('with one upload slot per peer a peer never gets two chunks at once, and another peer has its own slot', async () => {
  await withRig({ clients: 2, server: { uploadSlotsPerPeer: 1 } }, async ({ source, serverId, transports: [a, b] }) => {
    const { index } = source.add(6 * MiB);
    source.delayMs = 60;
    const all = await Promise.all([0, 1, 2, 3, 4, 5].map((i) => a!.fetchChunk(serverId, index.blob, i, signal())));
    all.forEach((chunk, i) => assert.equal(sha256Hex(chunk!), index.chunks[i]));
    assert.equal(source.maxActive, 1, 'one peer, one slot');

    source.maxActive = 0;
    await Promise.all([a, b].flatMap((t) => [0, 1, 2].map((i) => t!.fetchChunk(serverId, index.blob, i, signal()))));
    assert.equal(source.maxActive, 2, 'one slot each for two peers');
  });
});

test('a queued request whose requester gives up leaves the queue', async () => {
  await withRig({ server: { uploadSlotsPerPeer: 1 } }, async ({ source, server, serverId, transports: [transport] }) => {
    const { index } = source.add(3 * MiB);
    source.delayMs = 200;
    const first = transport!.fetchChunk(serverId, index.blob, 0, signal());
    await sleep(50);
    await assert.rejects(transport!.fetchChunk(serverId, index.blob, 1, AbortSignal.timeout(50)));
    const third = transport!.fetchChunk(serverId, index.blob, 2, signal());
    assert.equal(sha256Hex((await first)!), index.chunks[0]);
    assert.equal(sha256Hex((await third)!), index.chunks[2]);
    assert.equal(source.reads, 2, 'the abandoned request was never read');
    await waitFor('server streams to close', () => chunkStreams(server).length === 0);
  });
});

test('the corrupt switch flips a byte in the chunks it picks and only those', async () => {
  await withRig({ server: { corrupt: (_blob, i) => i === 1 } }, async ({ source, serverId, transports: [transport] }) => {
    const { data, index } = source.add(3 * MiB);
    const good = await transport!.fetchChunk(serverId, index.blob, 0, signal());
    const bad = await transport!.fetchChunk(serverId, index.blob, 1, signal());
    assert.equal(sha256Hex(good!), index.chunks[0]);
    assert.equal(bad!.byteLength, MiB, 'same length, so only the hash check can tell');
    assert.notEqual(sha256Hex(bad!), index.chunks[1]);
    const original = data.subarray(MiB, 2 * MiB);
    assert.equal(bad!.filter((byte, i) => byte !== original[i]).length, 1);
    // The store's copy is untouched: a later honest server would serve it right.
    assert.equal(sha256Of(data), index.blob);
  });
  await withRig({ server: { corrupt: true } }, async ({ source, serverId, transports: [transport] }) => {
    const { index } = source.add(MiB);
    assert.notEqual(sha256Hex((await transport!.fetchChunk(serverId, index.blob, 0, signal()))!), index.chunks[0]);
  });
});

test('a source that throws gets an error answer, not a crash, and the server recovers', async () => {
  await withRig({}, async ({ source, serverId, transports: [transport] }) => {
    const { index } = source.add(2 * MiB);
    source.fail = true;
    await assert.rejects(transport!.fetchHolding(serverId, index.blob, signal()), ChunkPeerError);
    await assert.rejects(transport!.fetchChunk(serverId, index.blob, 0, signal()), ChunkPeerError);
    await assert.rejects(transport!.fetchRange(serverId, index.blob, 0, 10, signal()), ChunkPeerError);
    source.fail = false;
    assert.equal(sha256Hex((await transport!.fetchChunk(serverId, index.blob, 1, signal()))!), index.chunks[1]);
  });
});

test('the transport rejects a peer that breaks the protocol', async () => {
  const hosts: MeshHost[] = [];
  try {
    const rogue = await startHost(hosts);
    const client = await startHost(hosts, rogue);
    const blob = sha256Of('rogue');
    const hex = (n: number) => Array.from({ length: n }, (_, i) => sha256Hex(Buffer.from([i])));
    // size 10 in chunks of 4: 4 + 4 + 2 bytes.
    const index = { blob, size: 10, chunkSize: 4, chunks: hex(3) };
    let answer: (stream: Stream) => void = () => {};
    const requests: unknown[] = [];
    await rogue.node.handle(CHUNK_PROTOCOL, (stream) => {
      const reader = new FrameReader(1024);
      stream.addEventListener('message', (evt) => {
        for (const piece of evt.data instanceof Uint8Array ? [evt.data] : evt.data) {
          const read = reader.push(piece);
          if (read) requests.push(decodeRequest(read.frame));
        }
      });
      answer(stream);
    });
    const transport = new Libp2pChunkTransport(client, { stallTimeoutMs: 300 });
    const peer = rogue.peerId.toString();
    const serve = (...parts: Uint8Array[]) => {
      answer = (stream) => {
        for (const part of parts) stream.send(part);
        void stream.close();
      };
    };
    const bitmap = (bytes: number[]) => Buffer.from(bytes).toString('base64');

    const holdingCases: [string, object, RegExp][] = [
      ['another blob', { status: 'ok', index: { ...index, blob: UNKNOWN }, have: 'all' }, /another blob/],
      ['too many chunks', { status: 'ok', index: { ...index, chunks: hex(4) }, have: 'all' }, /number of chunks/],
      ['all of a provisional index', { status: 'ok', index: { ...index, chunks: hex(2) }, have: 'all' }, /provisional/],
      ['a chunk a provisional index does not name', { status: 'ok', index: { ...index, chunks: hex(1) }, have: bitmap([0b11000000]) }, /provisional/],
      ['bad chunk hash', { status: 'ok', index: { ...index, chunks: [...hex(2), 'x'.repeat(64)] }, have: 'all' }, /bad chunk hash/],
      ['zero chunk size', { status: 'ok', index: { ...index, chunkSize: 0 }, have: 'all' }, /bad chunk size/],
      ['chunk size over 16 MiB', { status: 'ok', index: { blob, size: 17 * MiB, chunkSize: 17 * MiB, chunks: hex(1) }, have: 'all' }, /bad chunk size/],
      ['bitmap of the wrong size', { status: 'ok', index, have: bitmap([0xe0, 0]) }, /2 bytes for 3 chunks/],
      ['bitmap with bits past the end', { status: 'ok', index, have: bitmap([0xf0]) }, /bits past its last chunk/],
      ['bitmap not base64', { status: 'ok', index, have: '!!' }, /not base64/],
      ['unknown status', { status: 'maybe' }, /unknown status/],
    ];
    for (const [what, header, message] of holdingCases) {
      serve(encodeFrame(header));
      await assert.rejects(transport.fetchHolding(peer, blob, signal()), { name: 'ChunkProtocolError', message }, what);
    }
    serve(encodeFrame({ status: 'ok', index, have: bitmap([0xa0]) }));
    const holding = await transport.fetchHolding(peer, blob, signal());
    assert.deepEqual([0, 1, 2].map((i) => (holding!.have as ChunkBitmap).has(i)), [true, false, true]);
    assert.deepEqual(requests.at(-1), { op: 'holding', blob });

    // An answer that leaves out entries continues the index the request said it knew, and only that.
    const known = { ...index, chunks: index.chunks.slice(0, 2) };
    const rest = { ...index, chunks: index.chunks.slice(2) };
    const continuedCases: [string, object, ChunkIndex | undefined, RegExp][] = [
      ['entries left out unasked', { status: 'ok', index: rest, from: 2, have: 'all' }, undefined, /did not know/],
      ['more left out than known', { status: 'ok', index: { ...index, chunks: [] }, from: 3, have: 'all' }, known, /did not know/],
      ['a from of 0', { status: 'ok', index, from: 0, have: 'all' }, known, /did not know/],
      ['another chunk size', { status: 'ok', index: { ...rest, chunkSize: 5 }, from: 2, have: 'all' }, known, /another geometry/],
    ];
    for (const [what, header, asked, message] of continuedCases) {
      serve(encodeFrame(header));
      await assert.rejects(transport.fetchHolding(peer, blob, signal(), asked), { name: 'ChunkProtocolError', message }, what);
    }
    serve(encodeFrame({ status: 'ok', index: rest, from: 2, have: bitmap([0xc0]), growing: true }));
    const grown = await transport.fetchHolding(peer, blob, signal(), known);
    assert.deepEqual(grown!.index, index);
    assert.equal(grown!.growing, true);
    assert.equal((grown!.have as ChunkBitmap).count, 2);
    assert.deepEqual(requests.at(-1), { op: 'holding', blob, from: 2 });

    const chunkCases: [string, number, Uint8Array[], RegExp][] = [
      ['more bytes than announced', 0, [encodeFrame({ status: 'ok', length: 4 }), Buffer.alloc(5)], /more than the 4 bytes/],
      ['fewer bytes, then close', 0, [encodeFrame({ status: 'ok', length: 4 }), Buffer.alloc(3)], /after 3 of 4 bytes/],
      ['a full-size last chunk', 2, [encodeFrame({ status: 'ok', length: 4 }), Buffer.alloc(4)], /4 bytes for chunk 2, expected 2/],
      ['a chunk past its own index', 3, [encodeFrame({ status: 'ok', length: 2 }), Buffer.alloc(2)], /past the end of its own index/],
      ['bytes after not-found', 0, [encodeFrame({ status: 'not-found' }), Buffer.alloc(1)], /more than the 0 bytes/],
      ['oversized header', 0, [Buffer.from([0x81, 0x08]), Buffer.alloc(1025)], /1025 bytes exceeds 1024/],
      ['no header at all', 0, [], /before a whole answer/],
      ['negative length', 0, [encodeFrame({ status: 'ok', length: -1 })], /announces -1 bytes/],
    ];
    for (const [what, i, parts, message] of chunkCases) {
      serve(...parts);
      await assert.rejects(transport.fetchChunk(peer, blob, i, signal()), { name: 'ChunkProtocolError', message }, what);
    }
    serve(encodeFrame({ status: 'ok', length: 2 }), Buffer.from([1, 2]));
    assert.deepEqual([...(await transport.fetchChunk(peer, blob, 2, signal()))!], [1, 2]);
    // onStarted hears a chunk's answer header (the bytes follow), not a not-found answer.
    let headers = 0;
    serve(encodeFrame({ status: 'ok', length: 2 }), Buffer.from([1, 2]));
    assert.deepEqual([...(await transport.fetchChunk(peer, blob, 2, signal(), () => headers++))!], [1, 2]);
    serve(encodeFrame({ status: 'not-found' }));
    assert.equal(await transport.fetchChunk(peer, blob, 2, signal(), () => headers++), undefined);
    assert.equal(headers, 1);
    serve(encodeFrame({ status: 'ok', length: 5 }), Buffer.alloc(5));
    await assert.rejects(transport.fetchRange(peer, blob, 0, 4, signal()), ChunkProtocolError);
    // A pick must name a chunk that was asked for, with that chunk's length.
    const want = new ChunkBitmap(3);
    want.set(1);
    const pickCases: [string, Uint8Array[], RegExp][] = [
      ['a chunk not asked for', [encodeFrame({ status: 'ok', index: 0, length: 4 }), Buffer.alloc(4)], /picked chunk 0, which was not asked for/],
      ['no chunk named', [encodeFrame({ status: 'ok', length: 4 }), Buffer.alloc(4)], /names no valid chunk/],
      ['the wrong length', [encodeFrame({ status: 'ok', index: 1, length: 2 }), Buffer.alloc(2)], /2 bytes for chunk 1, expected 4/],
    ];
    for (const [what, parts, message] of pickCases) {
      serve(...parts);
      await assert.rejects(transport.pickChunk(peer, blob, want, signal()), { name: 'ChunkProtocolError', message }, what);
    }
    serve(encodeFrame({ status: 'ok', index: 1, length: 4 }), Buffer.from([1, 2, 3, 4]));
    assert.deepEqual(await transport.pickChunk(peer, blob, want, signal()), { index: 1, bytes: Buffer.from([1, 2, 3, 4]) });
    assert.deepEqual(requests.at(-1), { op: 'pick', blob, want: Buffer.from([0x40]).toString('base64') });

    // A peer that announces a chunk and then goes quiet is cut off by the stall limit.
    answer = (stream) => {
      stream.send(encodeFrame({ status: 'ok', length: 4 }));
      stream.send(Buffer.alloc(1));
    };
    const started = Date.now();
    await assert.rejects(transport.fetchChunk(peer, blob, 0, signal()), ChunkStallError);
    assert.ok(Date.now() - started < 2_000);
    assert.equal(client.node.getConnections(rogue.peerId).length, 1, 'the connection survives');
  } finally {
    await Promise.all(hosts.map((host) => host.stop()));
  }
});

test('stop() resets uploads in progress and stops answering', async () => {
  await withRig({}, async ({ source, chunkServer, serverId, transports: [transport] }) => {
    const { index } = source.add(2 * MiB);
    source.delayMs = 300;
    const pending = transport!.fetchChunk(serverId, index.blob, 0, signal());
    await sleep(100);
    await chunkServer.stop();
    await assert.rejects(pending);
    source.delayMs = 0;
    await assert.rejects(transport!.fetchChunk(serverId, index.blob, 0, signal()));
    await chunkServer.start();
    assert.equal(sha256Hex((await transport!.fetchChunk(serverId, index.blob, 0, signal()))!), index.chunks[0]);
  });
});

test('throughput sanity: 64 MiB in 1 MiB chunks, 4 requests in flight (printed, not asserted)', async () => {
  await withRig({}, async ({ source, serverId, transports: [transport] }) => {
    const { index } = source.add(64 * MiB);
    await transport!.fetchChunk(serverId, index.blob, 0, signal()); // warm up
    let next = 0;
    let bytes = 0;
    const started = performance.now();
    await Promise.all(
      Array.from({ length: 4 }, async () => {
        while (next < index.chunks.length) {
          const i = next++;
          const chunk = await transport!.fetchChunk(serverId, index.blob, i, signal());
          bytes += chunk!.byteLength;
        }
      }),
    );
    const seconds = (performance.now() - started) / 1000;
    assert.equal(bytes, 64 * MiB);
    console.log(`chunk protocol throughput: ${(bytes / 1e6 / seconds).toFixed(0)} MB/s (${(bytes / MiB / seconds).toFixed(0)} MiB/s) over loopback, both ends in one process`);
  });
});

test('with a data plane, chunks travel over HTTP with a ticket from the holding answer; without one, over the stream', () =>
  withDataPlaneRig({}, 1, async ({ addBlob, dataPlane, chunkServer, serverId, transports: [transport] }) => {
    const blob = addBlob(3 * MiB + 5);
    assert.ok(await transport!.fetchHolding(serverId, blob.index.blob, signal()));
    for (let i = 0; i < 4; i++) {
      const bytes = await transport!.fetchChunk(serverId, blob.index.blob, i, signal());
      assert.equal(sha256Hex(bytes!), blob.index.chunks[i]);
    }
    assert.equal(dataPlane.bytesServed, blob.data.length, 'every chunk came over the data plane');
    assert.equal(chunkServer.chunksServed, 0);
    assert.deepEqual(transport!.bytesReceived, { dataPlane: blob.data.length, libp2p: 0 });
    assert.equal(await transport!.fetchChunk(serverId, UNKNOWN, 0, signal()), undefined, 'a 404 is not-found');
    assert.equal(sha256Hex((await transport!.fetchChunk(serverId, blob.index.blob, 0, signal()))!), blob.index.chunks[0]);
    assert.equal(chunkServer.chunksServed, 0, 'the 404 left the data plane in use: no request went over the stream');

    // A request without a valid ticket is refused; the transport falls back to the stream.
    const plain = await fetch(`http://127.0.0.1:${dataPlane.port}/v1/chunks/${blob.index.blob}/0`, { headers: { authorization: 'Bearer nope' } });
    assert.equal(plain.status, 401);
    await dataPlane.stop();
    const again = await transport!.fetchChunk(serverId, blob.index.blob, 1, signal());
    assert.equal(sha256Hex(again!), blob.index.chunks[1]);
    assert.equal(chunkServer.chunksServed, 1, 'served over the libp2p stream once the data plane was gone');
    assert.deepEqual(transport!.bytesReceived, { dataPlane: blob.data.length + MiB, libp2p: MiB });
  }));

test('pick: the holder sends the wanted chunk it has sent least, over the data plane and the stream, counted in one ledger', () =>
  withDataPlaneRig({ ledger: new UploadLedger() }, 1, async ({ addBlob, dataPlane, chunkServer, serverId, transports: [transport] }) => {
    // Chunk 5 is missing at the holder: it is never picked.
    const blob = addBlob(6 * MiB + 5, MiB, (i) => i !== 5);
    const digest = blob.index.blob;
    await transport!.fetchHolding(serverId, digest, signal());
    const want = ChunkBitmap.full(7);
    want.clear(6);
    const bytes = await transport!.fetchChunk(serverId, digest, 0, signal());
    assert.equal(sha256Hex(bytes!), blob.index.chunks[0]);
    const picked: number[] = [];
    const heard: number[] = [];
    const pick = async () => {
      const got = await transport!.pickChunk(serverId, digest, want, signal(), (i) => heard.push(i));
      assert.ok(got, 'a wanted chunk the holder has');
      assert.equal(sha256Hex(got.bytes), blob.index.chunks[got.index], `chunk ${got.index} has its own bytes`);
      picked.push(got.index);
    };
    await pick();
    await pick();
    assert.equal(dataPlane.bytesServed, 3 * MiB, 'over the data plane');
    await dataPlane.stop();
    await pick();
    await pick();
    assert.equal(chunkServer.chunksServed, 2, 'then over the stream');
    assert.deepEqual(heard, picked, 'onPicked named each chunk');
    assert.deepEqual(
      [...picked].sort(),
      [1, 2, 3, 4],
      'the chunks never sent, each once: chunk 0 went out by index, chunk 5 is not held, chunk 6 not wanted',
    );
    await pick();
    assert.ok([0, 1, 2, 3, 4].includes(picked.at(-1)!), 'then one sent once');
    const none = new ChunkBitmap(7);
    none.set(5);
    assert.equal(await transport!.pickChunk(serverId, digest, none, signal()), undefined, 'none of the wanted chunks is held');
  }));

test('a data plane sends maxUploads chunks at once, queues as many more and answers the rest busy; the transport says so and does not fall back to the stream', () =>
  withDataPlaneRig({ maxUploads: 1 }, 1, async ({ addBlob, planeSource: source, dataPlane, chunkServer, serverId, transports: [transport] }) => {
    const blob = addBlob(3 * MiB);
    await transport!.fetchHolding(serverId, blob.index.blob, signal());
    source.delayMs = 300;
    const first = transport!.fetchChunk(serverId, blob.index.blob, 0, signal());
    while (source.active === 0) await sleep(5);
    const second = transport!.fetchChunk(serverId, blob.index.blob, 1, signal());
    await sleep(50);
    assert.equal(source.reads + source.active, 1, 'the second request waits for the one slot');
    await assert.rejects(transport!.fetchChunk(serverId, blob.index.blob, 2, signal()), ChunkBusyError);
    for (const [i, pending] of [first, second].entries()) assert.equal(sha256Hex((await pending)!), blob.index.chunks[i]);
    assert.equal(source.maxActive, 1, 'one chunk sent at a time');
    assert.equal(dataPlane.uploadsRefused, 1);
    assert.equal(chunkServer.chunksServed, 0, 'the busy request did not go over the libp2p stream instead');
    source.delayMs = 0;
    assert.equal(sha256Hex((await transport!.fetchChunk(serverId, blob.index.blob, 2, signal()))!), blob.index.chunks[2], 'asked again once a slot was free');
  }));

test("a data plane's slots go round the peers: a peer with nothing in service takes the queued place of one being served", () =>
  withDataPlaneRig({ maxUploads: 1 }, 2, async ({ addBlob, planeSource: source, dataPlane, serverId, transports: [greedy, newcomer] }) => {
    const blob = addBlob(3 * MiB);
    for (const t of [greedy!, newcomer!]) await t.fetchHolding(serverId, blob.index.blob, signal());
    source.delayMs = 300;
    const served = greedy!.fetchChunk(serverId, blob.index.blob, 0, signal());
    while (source.active === 0) await sleep(5);
    const queued = greedy!.fetchChunk(serverId, blob.index.blob, 1, signal());
    await sleep(50);
    const fair = newcomer!.fetchChunk(serverId, blob.index.blob, 2, signal());
    await assert.rejects(queued, ChunkBusyError, "the greedy peer's queued request gave way");
    assert.equal(sha256Hex((await served)!), blob.index.chunks[0]);
    assert.equal(sha256Hex((await fair)!), blob.index.chunks[2], 'the newcomer was served next');
    assert.equal(dataPlane.uploadsRefused, 1);
  }));

test("a data plane serves first what it has never sent: a request for a new chunk takes the queued place of one for a chunk sent before, even from a peer being served", () =>
  withDataPlaneRig({ maxUploads: 1, ledger: new UploadLedger() }, 2, async ({ addBlob, planeSource: source, dataPlane, serverId, transports: [first, second] }) => {
    const sent = addBlob(3 * MiB);
    const fresh = addBlob(2 * MiB);
    for (const t of [first!, second!]) for (const blob of [sent, fresh]) await t.fetchHolding(serverId, blob.index.blob, signal());
    assert.ok(await first!.fetchChunk(serverId, sent.index.blob, 0, signal()), 'chunk 0 of one layer has been sent once');
    source.delayMs = 300;
    const served = first!.fetchChunk(serverId, sent.index.blob, 1, signal());
    while (source.active === 0) await sleep(5);
    const copy = second!.fetchChunk(serverId, sent.index.blob, 0, signal());
    await sleep(50);
    // From the peer already being served, which among equals would have to give way.
    const novel = first!.fetchChunk(serverId, fresh.index.blob, 0, signal());
    await assert.rejects(copy, ChunkBusyError, 'the copy gave up its queued place');
    assert.equal(sha256Hex((await served)!), sent.index.chunks[1]);
    assert.equal(sha256Hex((await novel)!), fresh.index.chunks[0]);
    assert.equal(dataPlane.uploadsRefused, 1);

  }));

test('among waiting requests a data plane grants first the one for a chunk it has never sent, whoever asked first', () =>
  withDataPlaneRig({ maxUploads: 2, ledger: new UploadLedger() }, 2, async ({ addBlob, planeSource: source, serverId, transports: [first, second] }) => {
    const sent = addBlob(3 * MiB);
    const fresh = addBlob(2 * MiB);
    for (const t of [first!, second!]) for (const blob of [sent, fresh]) await t.fetchHolding(serverId, blob.index.blob, signal());
    assert.ok(await first!.fetchChunk(serverId, sent.index.blob, 0, signal()));
    const reads: string[] = [];
    source.onRead = (blob, index) => reads.push(`${blob === fresh.index.blob ? 'fresh' : 'sent'} ${index}`);
    source.delayMs = 300;
    const served = [1, 2].map((i) => first!.fetchChunk(serverId, sent.index.blob, i, signal()));
    while (source.active < 2) await sleep(5);
    const copy = second!.fetchChunk(serverId, sent.index.blob, 0, signal());
    await sleep(50);
    const novel = second!.pickChunk(serverId, fresh.index.blob, ChunkBitmap.full(2), signal());
    await Promise.all([...served, copy, novel]);
    assert.deepEqual(reads.slice(2), [`fresh ${(await novel)!.index}`, 'sent 0'], 'the new chunk was read first, though asked for last');
  }));

test('a data plane sends each chunk of a blob it pulls through once while it pulls, with twice the upload slots for it', () =>
  withDataPlaneRig({ maxUploads: 1, ledger: new UploadLedger() }, 2, async ({ addBlob, planeSource: source, dataPlane, serverId, transports: [first, second] }) => {
    const pulling = addBlob(4 * MiB, MiB, (i) => i < 3);
    pulling.growing = true;
    const stored = addBlob(2 * MiB);
    for (const t of [first!, second!]) for (const blob of [pulling, stored]) await t.fetchHolding(serverId, blob.index.blob, signal());
    const want = ChunkBitmap.full(4);
    source.delayMs = 300;
    const picks = [first!, second!].map((t) => t.pickChunk(serverId, pulling.index.blob, want, signal()));
    await waitFor('two pull-through sends at once with maxUploads 1', () => source.active === 2, 2_000);
    const plain = first!.fetchChunk(serverId, stored.index.blob, 0, signal());
    await sleep(100);
    assert.equal(source.active, 2, 'two pull-through sends at once with maxUploads 1; the plain request waits for its one slot');
    const picked = (await Promise.all(picks)).map((got) => got!.index);
    assert.notEqual(picked[0], picked[1], 'different chunks');
    assert.equal(sha256Hex((await plain)!), stored.index.chunks[0], 'then the plain request was served');
    assert.equal(source.maxActive, 2);
    source.delayMs = 0;
    const third = await first!.pickChunk(serverId, pulling.index.blob, want, signal());
    assert.deepEqual([...picked, third!.index].sort(), [0, 1, 2], 'each chunk held, once');
    await assert.rejects(second!.pickChunk(serverId, pulling.index.blob, want, signal()), ChunkBusyError, 'every chunk held has gone out: busy');
    assert.equal(dataPlane.uploadsRefused, 1);
    pulling.growing = false;
    const again = await second!.pickChunk(serverId, pulling.index.blob, want, signal());
    assert.ok(again && [0, 1, 2].includes(again.index), 'pulled, the blob is sent again like any other');
  }));

test('a client that leaves while its chunk is read from disk gives its upload slot back, and the send is not counted', async () => {
  const source = new MemorySource();
  const blob = source.add(2 * MiB);
  const ledger = new UploadLedger();
  const dataPlane = new ChunkDataPlane(source, { host: '127.0.0.1', maxUploads: 1, ledger });
  await dataPlane.start();
  const client = new DataPlaneClient();
  try {
    const { port, ticket } = dataPlane.ticketFor('peer')!;
    const get = (i: number, s: AbortSignal) =>
      client.get({ host: '127.0.0.1', port }, `/v1/chunks/${blob.index.blob}/${i}`, { authorization: `Bearer ${ticket}` }, s, (head) =>
        head.status === 200 ? Buffer.alloc(head.length) : undefined,
      );
    source.delayMs = 200;
    const controller = new AbortController();
    const left = get(0, controller.signal);
    while (source.active === 0) await sleep(5);
    controller.abort(new Error('no longer wanted'));
    await assert.rejects(left, /no longer wanted/);
    // The read ends after its client has gone; the answer is never written.
    while (source.active > 0) await sleep(5);
    source.delayMs = 0;
    assert.equal((await get(1, signal(5_000))).status, 200, 'the one slot was free again');
    assert.equal(ledger.sends(blob.index.blob, 0, 'all'), 0, 'the chunk that never left is not counted as sent');
    assert.equal(ledger.sends(blob.index.blob, 1, 'all'), 1);
  } finally {
    client.close();
    await dataPlane.stop();
  }
});

test('the data plane applies the corrupt switch too', () =>
  withDataPlaneRig({ corrupt: () => true }, 1, async ({ addBlob, dataPlane, serverId, transports: [transport] }) => {
    const blob = addBlob(MiB);
    await transport!.fetchHolding(serverId, blob.index.blob, signal());
    const bytes = await transport!.fetchChunk(serverId, blob.index.blob, 0, signal());
    assert.notEqual(sha256Hex(bytes!), blob.index.chunks[0]);
    assert.equal(dataPlane.bytesServed, MiB);
  }));
