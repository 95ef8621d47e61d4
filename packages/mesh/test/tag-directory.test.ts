import { test } from 'node:test';
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { mkdtemp, readdir, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { generateKeyPair } from '@libp2p/crypto/keys';
import type { PrivateKey, Stream } from '@libp2p/interface';
import { peerIdFromPrivateKey } from '@libp2p/peer-id';
import {
  compareTagRecords,
  decodeTagRecord,
  decodeTagTable,
  encodeTagRecord,
  encodeTagTable,
  MAX_CARRIED_MANIFEST_BYTES,
  MeshHost,
  signTagRecord,
  TAG_SYNC_PROTOCOL,
  TAG_TOPIC,
  TagDirectory,
  TagFormatError,
  tagSigningBytes,
  verifyTagRecord,
  type MeshLog,
  type TagDirectoryOptions,
  type TagFields,
  type TagRecord,
} from '../src/index.ts';
import { LOOPBACK, waitFor, waitForSubscriptions } from './fixtures/membership-mesh.ts';

const digest = (n: number) => `sha256:${n.toString(16).padStart(64, '0')}`;
const LIMITS = { maxBytes: 1 << 20, maxRecords: 100, maxRecordBytes: 256 * 1024 };
// A CIDv0 (sha256) peer id, as RSA keys get: its public key is not inline.
const RSA_PEER_ID = 'QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N';

function fields(tag: string, n: number, repository = 'docker.io/library/app'): TagFields {
  return {
    repository,
    tag,
    digest: digest(n),
    mediaType: 'application/vnd.oci.image.manifest.v1+json',
    size: 500 + n,
    chunkIndexes: { [digest(1000 + n)]: digest(2000 + n), [digest(1001 + n)]: digest(2001 + n) },
  };
}

/** `base` naming `manifest` (digest and size) and carrying it. */
function carrying(base: TagFields, manifest: Buffer): TagFields {
  return { ...base, digest: `sha256:${createHash('sha256').update(manifest).digest('hex')}`, size: manifest.byteLength, manifest: manifest.toString('base64') };
}

interface Device {
  host: MeshHost;
  key: PrivateKey;
  id: string;
  tags?: TagDirectory;
  /** Every 'tag' event this device's directory dispatched. */
  events: TagRecord[];
}

/** Hosts on 127.0.0.1 (mDNS off: lo has no multicast here), each with its own key, stopped in stopAll(). */
class TagMesh {
  readonly devices: Device[] = [];

  async host(bootstrap: Device[] = [], key?: PrivateKey): Promise<Device> {
    key ??= await generateKeyPair('Ed25519');
    const host = new MeshHost({ listen: LOOPBACK, mdns: false, privateKey: key, bootstrap: bootstrap.map((device) => device.host.multiaddrs[0].toString()) });
    const device: Device = { host, key, id: '', events: [] };
    this.devices.push(device);
    await host.start();
    device.id = host.peerId.toString();
    return device;
  }

  async device(bootstrap: Device[] = [], options: Partial<TagDirectoryOptions> = {}, key?: PrivateKey): Promise<Device> {
    const device = await this.host(bootstrap, key);
    device.tags = new TagDirectory(device.host, { privateKey: device.key, ...options });
    device.tags.addEventListener('tag', (evt) => device.events.push(evt.detail));
    await device.tags.start();
    return device;
  }

  async stopAll(): Promise<void> {
    await Promise.all(this.devices.map(stopDevice));
  }
}

async function stopDevice(device: Device): Promise<void> {
  await device.tags?.stop();
  await device.host.stop();
}

/** Plays the asking side of a table exchange from a raw host: sends `payload`, returns the answer. */
async function askSync(from: Device, to: Device, payload: Uint8Array): Promise<Uint8Array> {
  const stream = await from.host.node.dialProtocol(to.host.multiaddrs[0], TAG_SYNC_PROTOCOL);
  stream.send(payload);
  await stream.close();
  const chunks: Uint8Array[] = [];
  for await (const chunk of stream) chunks.push(chunk.subarray());
  return Buffer.concat(chunks);
}

interface Logged {
  msg: string;
  err?: Error;
  peer?: string;
}

function recordingLog(): MeshLog & { entries: Logged[] } {
  const entries: Logged[] = [];
  const record = (obj: object, msg: string) => entries.push({ ...obj, msg });
  return { entries, debug: record, warn: record };
}

test('records sign, verify, encode canonically and order deterministically', async () => {
  const key = await generateKeyPair('Ed25519');
  const publisher = peerIdFromPrivateKey(key).toString();
  const record = await signTagRecord({ ...fields('v1', 1), time: 1_000, publisher }, key);
  assert.equal(await verifyTagRecord(record), true);
  assert.deepEqual(decodeTagRecord(encodeTagRecord(record), 4096), record);

  // Key order of chunkIndexes does not change the signed bytes.
  const reversed = Object.fromEntries(Object.entries(record.chunkIndexes).reverse());
  assert.deepEqual(tagSigningBytes({ ...record, chunkIndexes: reversed }), tagSigningBytes(record));
  // Any field changed after signing breaks the signature.
  for (const altered of [{ digest: digest(9) }, { time: 1_001 }, { tag: 'v2' }, { chunkIndexes: { [digest(1001)]: digest(7) } }]) {
    assert.equal(await verifyTagRecord({ ...record, ...altered }), false, JSON.stringify(altered));
  }
  // Standard base64 is accepted and stored as base64url, so equal records compare equal.
  const standard = Buffer.from(record.signature, 'base64url').toString('base64');
  const decoded = decodeTagRecord(new TextEncoder().encode(JSON.stringify({ v: 1, ...record, signature: standard })), 4096);
  assert.equal(decoded.signature, record.signature);

  const bad = (change: Record<string, unknown>) => new TextEncoder().encode(JSON.stringify({ v: 1, ...record, ...change }));
  for (const change of [
    { publisher: RSA_PEER_ID },
    { publisher: 'not-a-peer-id' },
    { repository: 'docker.io' },
    { repository: 'docker.io/Library/app' },
    { repository: `docker.io/${'a'.repeat(256)}` },
    { tag: '.hidden' },
    { digest: 'sha256:abc' },
    { mediaType: 'json' },
    { size: -1 },
    { time: 1.5 },
    { signature: 'not base64!' },
    { chunkIndexes: { 'sha512:00': digest(1) } },
    { chunkIndexes: Object.fromEntries(Array.from({ length: 1025 }, (_, i) => [digest(i), digest(i)])) },
    { v: 2 },
  ]) {
    assert.throws(() => decodeTagRecord(bad(change), 1 << 20), TagFormatError, JSON.stringify(change).slice(0, 80));
  }
  assert.throws(() => decodeTagRecord(encodeTagRecord(record), 100), /exceeds 100/);
  // Registry namespaces as the gateway makes them: with a port, or an IPv6 literal.
  for (const repository of ['localhost:5000/app', '[::1]:5000/team/app', 'Registry.Example/app']) {
    assert.equal(decodeTagRecord(bad({ repository }), 4096).repository, repository);
  }

  const base = { ...record, time: 5, publisher: 'b', signature: 'b' };
  assert.ok(compareTagRecords({ ...base, time: 6, publisher: 'a' }, base) > 0, 'newer time wins over publisher');
  assert.ok(compareTagRecords({ ...base, publisher: 'c', signature: 'a' }, base) > 0, 'greater publisher wins over signature');
  assert.ok(compareTagRecords({ ...base, signature: 'c' }, base) > 0, 'greater signature breaks the last tie');
  assert.equal(compareTagRecords({ ...base }, base), 0);
  assert.ok(compareTagRecords({ ...base, publisher: 'B' }, base) < 0, 'code-unit order, not locale order');
});

test('a record carries a small manifest outside its signature, pinned by the signed digest and size', async () => {
  const key = await generateKeyPair('Ed25519');
  const publisher = peerIdFromPrivateKey(key).toString();
  const manifest = Buffer.from(JSON.stringify({ schemaVersion: 2, layers: [] }));
  const carried = { ...carrying(fields('v1', 1), manifest), manifest: undefined };
  const bare = await signTagRecord({ ...carried, time: 1_000, publisher }, key);
  const record = await signTagRecord({ ...carried, manifest: manifest.toString('base64'), time: 1_000, publisher }, key);
  assert.equal(record.signature, bare.signature, 'the manifest is not signed');
  assert.equal(await verifyTagRecord(record), true);
  assert.deepEqual(decodeTagRecord(encodeTagRecord(record), 4096), record);
  assert.deepEqual(decodeTagTable(encodeTagTable([record, bare]), LIMITS), [record, bare]);
  // base64url is taken and kept as standard base64, so equal records encode equally.
  const url = new TextEncoder().encode(JSON.stringify({ v: 1, ...record, manifest: manifest.toString('base64url') }));
  assert.equal(decodeTagRecord(url, 4096).manifest, record.manifest);

  const wire = (change: Record<string, unknown>) => new TextEncoder().encode(JSON.stringify({ v: 1, ...record, ...change }));
  const other = Buffer.from(JSON.stringify({ schemaVersion: 2, layers: [{}] }));
  for (const [what, change] of [
    ['other bytes', { manifest: other.toString('base64') }],
    ['one byte changed', { manifest: Buffer.from(manifest.toString().replace('2', '3')).toString('base64') }],
    ['the right bytes with a wrong size', { manifest: Buffer.concat([manifest, Buffer.from(' ')]).toString('base64') }],
    ['not base64', { manifest: 'not base64!' }],
    ['not a string', { manifest: 12 }],
    ['over the limit', { manifest: Buffer.alloc(MAX_CARRIED_MANIFEST_BYTES + 1).toString('base64') }],
  ] as const) {
    assert.throws(() => decodeTagRecord(wire(change), 1 << 20), TagFormatError, what);
  }
  // Publishing checks the same: a device cannot sign a record whose manifest is not its digest's.
  await assert.rejects(signTagRecord({ ...carried, manifest: other.toString('base64'), time: 1, publisher }, key), TagFormatError);
});

test('a record published on one device is on the others within 2 s, with its chunk index digests', async () => {
  const mesh = new TagMesh();
  try {
    const a = await mesh.device();
    const b = await mesh.device([a]);
    const c = await mesh.device([a, b]);
    await waitForSubscriptions([a, b, c], TAG_TOPIC);

    const started = Date.now();
    // With a carried manifest, which travels with the record.
    const record = await a.tags!.publish(carrying(fields('latest', 1), Buffer.from('{"schemaVersion":2}')));
    assert.ok(record.manifest);
    await waitFor('b and c to have the record', () => [b, c].every((device) => device.tags!.get('docker.io/library/app', 'latest') !== undefined), 2_000);
    assert.ok(Date.now() - started < 2_000);
    assert.equal(record.publisher, a.id);
    for (const device of [a, b, c]) {
      assert.deepEqual(device.tags!.get('docker.io/library/app', 'latest'), record);
      assert.deepEqual(device.tags!.list(), [record]);
      assert.deepEqual(device.events, [record]);
      assert.equal(device.tags!.chunkIndexDigest(digest(1001)), digest(2001));
      assert.equal(device.tags!.chunkIndexDigest(digest(1)), undefined);
    }
    assert.throws(() => {
      (b.tags!.get('docker.io/library/app', 'latest')!.chunkIndexes as Record<string, string>)[digest(5)] = digest(6);
    }, TypeError, 'records handed out cannot change the table');

    // A re-tag on another device wins everywhere, even if its clock is behind a's.
    const retag = await c.tags!.publish(fields('latest', 2));
    assert.ok(retag.time > record.time);
    await waitFor('a and b to take the re-tag', () => [a, b].every((device) => device.tags!.get('docker.io/library/app', 'latest')?.digest === digest(2)), 2_000);
    // The newest record naming a blob gives its chunk index digest.
    const shared = { ...fields('other', 3), chunkIndexes: { [digest(1002)]: digest(77) } };
    await b.tags!.publish(shared);
    await waitFor('a to take the other tag', () => a.tags!.list().length === 2, 2_000);
    assert.equal(a.tags!.chunkIndexDigest(digest(1002)), digest(77));
    assert.equal(a.tags!.chunkIndexDigest(digest(1003)), digest(2003));
  } finally {
    await mesh.stopAll();
  }
});

test('a device that connects later gets the whole table by sync, and gives its own', async () => {
  const mesh = new TagMesh();
  try {
    // No periodic resync within the test: only the exchange on connect can spread these.
    const quiet = { resyncIntervalMs: 3_600_000 };
    const a = await mesh.device([], quiet);
    const published = [await a.tags!.publish(fields('v1', 1)), await a.tags!.publish(fields('v2', 2, 'ghcr.io/team/tool'))];
    const b = await mesh.device([], quiet);
    const own = await b.tags!.publish(fields('edge', 3));
    await b.host.node.dial(a.host.multiaddrs[0]);

    await waitFor('b to have a\'s table', () => b.tags!.list().length === 3);
    await waitFor('a to have b\'s record', () => a.tags!.list().length === 3);
    const all = [own, ...published];
    assert.deepEqual(a.tags!.list(), all);
    assert.deepEqual(b.tags!.list(), all);
    assert.deepEqual(b.events, [own, ...published]);
  } finally {
    await mesh.stopAll();
  }
});

test('a table over maxSyncBytes is sent cut to its newest records', async () => {
  const mesh = new TagMesh();
  try {
    const log = recordingLog();
    const a = await mesh.device([], { maxSyncBytes: 3_000, log });
    const published: TagRecord[] = [];
    for (let n = 1; n <= 8; n++) published.push(await a.tags!.publish(fields(`v${n}`, n)));
    const b = await mesh.device([a]);
    await waitFor('b to get part of the table', () => b.tags!.list().length > 0);
    const received = b.tags!.list().map((record) => record.tag);
    assert.ok(received.length < published.length, `b got ${received}`);
    // "Newest" is the record order (time, then publisher and signature): records published in one millisecond tie on time.
    const newest = [...published].sort((x, y) => compareTagRecords(y, x)).slice(0, received.length);
    assert.deepEqual(received, newest.map((record) => record.tag).sort());
    assert.ok(log.entries.some((entry) => entry.msg === 'tag table exceeds maxSyncBytes, sync sends the newest records'));
  } finally {
    await mesh.stopAll();
  }
});

test('a record that reached one peer by sync only reaches the others by the periodic resync', async () => {
  const mesh = new TagMesh();
  try {
    const a = await mesh.device([], { resyncIntervalMs: 200 });
    const b = await mesh.device([a], { resyncIntervalMs: 200 });
    await waitForSubscriptions([a, b], TAG_TOPIC);
    // A third party's record handed to b alone: b applies it but does not gossip it.
    const outsider = await mesh.host();
    const record = await signTagRecord({ ...fields('relayed', 4), time: Date.now(), publisher: outsider.id }, outsider.key);
    await askSync(outsider, b, encodeTagTable([record]));
    assert.deepEqual(b.tags!.get('docker.io/library/app', 'relayed'), record);
    // a verifies the relayed record against its publisher's key, not b's.
    await waitFor('a to get it by resync', () => a.tags!.get('docker.io/library/app', 'relayed') !== undefined, 2_000);
    assert.deepEqual(a.tags!.get('docker.io/library/app', 'relayed'), record);
  } finally {
    await mesh.stopAll();
  }
});

test('conflicting records for one tag converge to the same winner on every device, whatever the arrival order', async () => {
  const mesh = new TagMesh();
  try {
    const quiet = { resyncIntervalMs: 3_600_000 };
    const x = await mesh.device([], quiet);
    const y = await mesh.device([], quiet);
    const p = await mesh.host();
    const q = await mesh.host();
    // Same time: the greater publisher id wins.
    const time = Date.now();
    const fromP = await signTagRecord({ ...fields('race', 5), time, publisher: p.id }, p.key);
    const fromQ = await signTagRecord({ ...fields('race', 6), time, publisher: q.id }, q.key);
    const winner = compareTagRecords(fromP, fromQ) > 0 ? fromP : fromQ;
    await askSync(p, x, encodeTagTable([fromP]));
    await askSync(q, x, encodeTagTable([fromQ]));
    await askSync(q, y, encodeTagTable([fromQ]));
    await askSync(p, y, encodeTagTable([fromP]));
    assert.deepEqual(x.tags!.get('docker.io/library/app', 'race'), winner);
    assert.deepEqual(y.tags!.get('docker.io/library/app', 'race'), winner);
    // Both took the first arrival, and only the winner replaced it.
    assert.equal(x.events.length + y.events.length, 3);

    // Two devices re-tag while apart; once they meet, both keep the newer record, as does a joiner.
    const first = await x.tags!.publish(fields('apart', 7));
    await new Promise((resolve) => setTimeout(resolve, 5));
    const second = await y.tags!.publish(fields('apart', 8));
    await y.host.node.dial(x.host.multiaddrs[0]);
    const z = await mesh.device([x, y], quiet);
    await waitFor('x, y and z to agree', () => [x, y, z].every((device) => device.tags!.get('docker.io/library/app', 'apart')?.digest === second.digest));
    assert.ok(second.time > first.time);
    for (const device of [x, y, z]) assert.deepEqual(device.tags!.get('docker.io/library/app', 'race'), winner);
  } finally {
    await mesh.stopAll();
  }
});

test('forged records are dropped from gossip and from sync, never relayed, and the device keeps working', async () => {
  const mesh = new TagMesh();
  try {
    const a = await mesh.device();
    const c = await mesh.device([a]);
    // The forger runs no TagDirectory: it publishes raw payloads, its messages signed by itself.
    const forger = await mesh.host([a]);
    const pubsub = forger.host.node.services.pubsub;
    pubsub.subscribe(TAG_TOPIC);
    await waitForSubscriptions([a, c], TAG_TOPIC);
    await waitFor('the forger and a to exchange subscriptions', () =>
      pubsub.getSubscribers(TAG_TOPIC).some((id) => id.toString() === a.id) &&
      a.host.node.services.pubsub.getSubscribers(TAG_TOPIC).some((id) => id.toString() === forger.id),
    );
    assert.equal(forger.host.node.getConnections(c.host.peerId).length, 0, 'c hears the forger only through a');

    const honest = await signTagRecord({ ...fields('v1', 1), time: Date.now(), publisher: forger.id }, forger.key);
    // Claims to be a's record, signed with the forger's key.
    const impostor = await signTagRecord({ ...fields('v1', 2), time: Date.now() + 10, publisher: forger.id }, forger.key);
    const forgeries = [{ ...impostor, publisher: a.id }, { ...honest, digest: digest(66), time: honest.time + 20 }];
    const text = (value: string) => new TextEncoder().encode(value);
    const payloads = [
      ...forgeries.map(encodeTagRecord),
      text('not json'),
      text(JSON.stringify({ v: 1, ...honest, size: 'big' })),
      new Uint8Array(300 * 1024).fill(0x20), // over maxRecordBytes
    ];
    for (const payload of payloads) await pubsub.publish(TAG_TOPIC, payload).catch(() => {});
    await waitFor('a to reject every bad record', () => a.tags!.rejectedRecords === payloads.length);
    assert.deepEqual(a.tags!.list(), []);

    // The validator is not just saying no: the forger's own honest record is taken and relayed.
    await pubsub.publish(TAG_TOPIC, encodeTagRecord(honest));
    await waitFor('c to get the honest record through a', () => c.tags!.get('docker.io/library/app', 'v1') !== undefined, 2_000);
    assert.deepEqual(a.tags!.list(), [honest]);
    assert.equal(c.tags!.rejectedRecords, 0, 'a relayed none of the forgeries');

    // The same forgeries by sync: dropped one by one, the good record in the same table still lands.
    const good = await signTagRecord({ ...fields('v9', 9), time: Date.now(), publisher: forger.id }, forger.key);
    const answer = decodeTagTable(await askSync(forger, a, encodeTagTable([...forgeries, good])), LIMITS);
    assert.deepEqual(answer, [honest], 'a answered with its table');
    assert.equal(a.tags!.rejectedRecords, payloads.length + forgeries.length);
    assert.deepEqual(a.tags!.list(), [honest, good]);
    assert.equal(a.tags!.get('docker.io/library/app', 'v1')!.digest, digest(1));

    // a still publishes and hears c.
    await c.tags!.publish(fields('after', 10));
    await waitFor('a to hear c', () => a.tags!.get('docker.io/library/app', 'after') !== undefined, 2_000);
  } finally {
    await mesh.stopAll();
  }
});

test('a malformed or oversized sync payload ends that stream only', async () => {
  const mesh = new TagMesh();
  try {
    const log = recordingLog();
    const a = await mesh.device([], { log, maxSyncBytes: 64 * 1024, resyncIntervalMs: 3_600_000 });
    await a.tags!.publish(fields('v1', 1));
    const raw = await mesh.host();
    for (const payload of [new TextEncoder().encode('{"v":1,"records":[{"repository":1}]}'), new Uint8Array(100 * 1024).fill(0x7b)]) {
      await assert.rejects(askSync(raw, a, payload), { name: 'StreamResetError' });
    }
    const failures = () => log.entries.filter((entry) => entry.msg === 'tag sync request failed').map((entry) => entry.err!.message);
    await waitFor('a to log both failures', () => failures().length === 2);
    assert.match(failures()[0], /records\[0\]\.chunkIndexes is not an object/);
    assert.match(failures()[1], /message exceeds 65536 bytes/);
    assert.equal(a.host.node.getConnections(raw.host.peerId).length, 1, 'the connection survives');

    // A peer answering a's own sync with garbage.
    const liar = await mesh.host();
    await liar.host.node.handle(TAG_SYNC_PROTOCOL, async (stream: Stream) => {
      for await (const _chunk of stream); // read the request to its end
      stream.send(new TextEncoder().encode('{"v":1,"records":"all of them"}'));
      await stream.close();
    });
    await liar.host.node.dial(a.host.multiaddrs[0]);
    const liarFailure = () => log.entries.find((entry) => entry.msg === 'tag sync failed' && entry.peer === liar.id);
    await waitFor('a to give up on the answer', () => liarFailure() !== undefined);
    assert.match(liarFailure()!.err!.message, /records is not an array/);
    assert.equal(a.tags!.list().length, 1);

    // a still exchanges tables with an honest newcomer.
    const b = await mesh.device([a]);
    await waitFor('b to get a\'s table', () => b.tags!.list().length === 1);
  } finally {
    await mesh.stopAll();
  }
});

test('a directory restarted with the same file has its records; a tampered record in it is dropped', async () => {
  const dir = await mkdtemp(join(tmpdir(), 'shoal-tags-'));
  const mesh = new TagMesh();
  try {
    const file = join(dir, 'state', 'tags.json');
    const a = await mesh.device([], { file });
    const b = await mesh.device([a]);
    await waitForSubscriptions([a, b], TAG_TOPIC);
    const own = await a.tags!.publish(fields('v1', 1));
    const heard = await b.tags!.publish(fields('v2', 2));
    await waitFor('a to have b\'s record', () => a.tags!.list().length === 2);
    const before = a.tags!.list();
    await stopDevice(a);
    assert.deepEqual(await readdir(join(dir, 'state')), ['tags.json'], 'no temp file left');

    // Same key, fresh host and directory, nobody to sync with.
    const again = await mesh.device([], { file }, a.key);
    assert.deepEqual(again.tags!.list(), before);
    assert.deepEqual(again.events, [], 'the loaded table is not news');
    assert.equal(again.tags!.chunkIndexDigest(digest(1002)), heard.chunkIndexes[digest(1002)]);
    await stopDevice(again);

    const table = JSON.parse(await readFile(file, 'utf8')) as { records: TagRecord[] };
    table.records.find((record) => record.tag === own.tag)!.digest = digest(99);
    await writeFile(file, JSON.stringify(table));
    const tampered = await mesh.device([], { file }, a.key);
    assert.deepEqual(tampered.tags!.list(), [heard]);
    assert.equal(tampered.tags!.rejectedRecords, 1);
    await stopDevice(tampered);

    await writeFile(file, 'not json');
    const broken = new TagDirectory(tampered.host, { privateKey: a.key, file });
    await tampered.host.start();
    await assert.rejects(broken.start(), /is not a tag table/);
  } finally {
    await mesh.stopAll();
    await rm(dir, { recursive: true, force: true });
  }
});

test('TagDirectory refuses a key that is not the host\'s, publishing before start and malformed fields', async () => {
  const mesh = new TagMesh();
  try {
    const device = await mesh.host();
    const stranger = await generateKeyPair('Ed25519');
    await assert.rejects(new TagDirectory(device.host, { privateKey: stranger }).start(), /not the key of the host peer id/);
    const tags = new TagDirectory(device.host, { privateKey: device.key });
    await assert.rejects(tags.publish(fields('v1', 1)), /not started/);
    await tags.start();
    await assert.rejects(tags.publish({ ...fields('v1', 1), repository: 'App' }), TagFormatError);
    await assert.rejects(tags.publish({ ...fields('v1', 1), digest: 'latest' }), TagFormatError);
    assert.deepEqual(tags.list(), []);
    await tags.stop();
    assert.throws(() => new TagDirectory(device.host, { privateKey: device.key, maxRecords: 0 }), /maxRecords must be positive/);
  } finally {
    await mesh.stopAll();
  }
});
