import { test } from 'node:test';
import assert from 'node:assert/strict';
import { sha256Of } from '@shoal/oci';
import { ChunkBitmap } from '@shoal/store';
import { AVAILABILITY_TOPIC, blobCid, MeshProviderDirectory, type AvailabilityUpdate } from '@shoal/swarm';
import { TestMesh, waitFor } from '../../mesh/test/fixtures/membership-mesh.ts';

test('MeshProviderDirectory: DHT records for whole blobs, gossip for partial ones and withdrawals', async () => {
  const mesh = new TestMesh();
  const directories: MeshProviderDirectory[] = [];
  try {
    const a = await mesh.host();
    const b = await mesh.host([a]);
    const c = await mesh.host([a, b]);
    const [da, db, dc] = [a, b, c].map((d) => {
      const directory = new MeshProviderDirectory(d.host, { partialIntervalMs: 50 });
      directory.start();
      directories.push(directory);
      return directory;
    });
    const dhtSize = (d: typeof a) => (d.host.node.services.dht as unknown as { routingTable: { size: number } }).routingTable.size;
    await waitFor('DHT routing tables', () => [a, b, c].every((d) => dhtSize(d) >= 2));
    // Gossip needs the subscriptions exchanged before a publish reaches anyone.
    const topicPeers = (d: typeof a) => d.host.node.services.pubsub.getSubscribers(AVAILABILITY_TOPIC).length;
    await waitFor('availability subscriptions', () => [a, b, c].every((d) => topicPeers(d) >= 2));

    const updates: AvailabilityUpdate[] = [];
    dc!.addEventListener('availability', (e) => updates.push(e.detail));
    const messages: { from: string; blobs: number }[] = [];
    c.host.node.services.pubsub.addEventListener('message', (e) => {
      if (e.detail.topic !== AVAILABILITY_TOPIC || e.detail.type !== 'signed') return;
      const { blobs } = JSON.parse(new TextDecoder().decode(e.detail.data)) as { blobs: unknown[] };
      messages.push({ from: e.detail.from.toString(), blobs: blobs.length });
    });
    const blob = sha256Of('a layer');
    await da!.announce(blob);
    assert.deepEqual(await dc!.findHolders(blob, AbortSignal.timeout(5_000)), [a.id]);
    await waitFor('the announcement gossiped', () => updates.some((u) => u.peer === a.id && u.have === 'all'));

    const have = new ChunkBitmap(10);
    have.set(3);
    db!.announcePartial(blob, have);
    have.set(4);
    db!.announcePartial(blob, have);
    await waitFor('the partial bitmap gossiped', () => updates.some((u) => u.peer === b.id && u.have !== 'all' && u.have?.has(4) === true));
    assert.deepEqual(new Set(await dc!.findHolders(blob, AbortSignal.timeout(5_000))), new Set([a.id, b.id]));

    // The first word on a blob goes at once; bitmaps of several blobs that grow within one
    // interval then travel in one message (the first after a quiet spell goes at once, the rest
    // wait for the interval and go together).
    const fromB = () => messages.filter((m) => m.from === b.id);
    const layers = [sha256Of('layer 0'), sha256Of('layer 1'), sha256Of('layer 2'), sha256Of('layer 3')];
    const bitmaps = layers.map(() => new ChunkBitmap(4));
    let before = fromB().length;
    layers.forEach((layer, i) => db!.announcePartial(layer, bitmaps[i]!));
    await waitFor('every layer gossiped', () => layers.every((layer) => updates.some((u) => u.peer === b.id && u.blob === layer)));
    assert.equal(fromB().length - before, layers.length, 'a message for each new blob');
    before = fromB().length;
    layers.forEach((layer, i) => {
      bitmaps[i]!.set(1);
      db!.announcePartial(layer, bitmaps[i]!);
    });
    const grown = (layer: string) => updates.some((u) => u.peer === b.id && u.blob === layer && u.have !== 'all' && u.have?.has(1) === true);
    await waitFor('every grown bitmap gossiped', () => layers.every(grown));
    assert.ok(fromB().length - before <= 2, `${fromB().length - before} messages for four grown bitmaps`);
    assert.ok(fromB().at(-1)!.blobs >= 3, 'the last message carries the bitmaps that waited');

    await db!.withdraw(blob);
    await waitFor('the withdrawal gossiped', () => updates.some((u) => u.peer === b.id && u.have === undefined));
    assert.ok(!(await dc!.findHolders(blob, AbortSignal.timeout(5_000))).includes(b.id));

    // Malformed availability is rejected by the validator, and the directory keeps working.
    const updatesBefore = updates.length;
    const bad = [
      { blobs: [{ blob: 'nope', have: 'all' }] },
      { blobs: [{ blob: sha256Of('x'), have: 'all' }, { blob: sha256Of('y'), have: 'AAA=', chunks: 3 }] }, // one bad bitmap spoils it
      { blobs: [] },
      { blob: sha256Of('x'), have: 'all' }, // the format before batching
    ];
    for (const message of bad) {
      await a.host.node.services.pubsub.publish(AVAILABILITY_TOPIC, new TextEncoder().encode(JSON.stringify(message))).catch(() => {});
    }
    await da!.announce(sha256Of('another'));
    await waitFor('a later good message', () => updates.length > updatesBefore);
    assert.deepEqual(updates.slice(updatesBefore).map((u) => u.blob), [sha256Of('another')]);
  } finally {
    for (const d of directories) d.stop();
    await mesh.stopAll();
  }
});

test('MeshProviderDirectory: while the device is busy, an announced blob is gossiped at once and its DHT record waits; a gossiped whole holder or likely holders spare the DHT lookup', async () => {
  const mesh = new TestMesh();
  const directories: MeshProviderDirectory[] = [];
  try {
    const a = await mesh.host();
    const b = await mesh.host([a]);
    const c = await mesh.host([a, b]);
    let busy = true;
    const da = new MeshProviderDirectory(a.host, { busy: () => busy });
    const dc = new MeshProviderDirectory(c.host);
    for (const d of [da, dc]) {
      d.start();
      directories.push(d);
    }
    const dhtSize = (d: typeof a) => (d.host.node.services.dht as unknown as { routingTable: { size: number } }).routingTable.size;
    await waitFor('DHT routing tables', () => [a, b, c].every((d) => dhtSize(d) >= 2));
    await waitFor('availability subscriptions', () => [a, c].every((d) => d.host.node.services.pubsub.getSubscribers(AVAILABILITY_TOPIC).length >= 1));
    const updates: AvailabilityUpdate[] = [];
    dc.addEventListener('availability', (e) => updates.push(e.detail));
    const dhtProviders = async (blob: string) => {
      const found: string[] = [];
      const signal = AbortSignal.timeout(2_000);
      try {
        for await (const provider of c.host.node.contentRouting.findProviders(blobCid(blob), { signal })) found.push(provider.id.toString());
      } catch {
        // Timed out: what was found so far is the answer.
      }
      return found;
    };

    const blob = sha256Of('a layer landed mid-pull');
    // b is a provider in the DHT only, never gossiped.
    await b.host.node.contentRouting.provide(blobCid(blob), { signal: AbortSignal.timeout(5_000) });
    assert.deepEqual(await dc.findHolders(blob, AbortSignal.timeout(5_000)), [b.id], 'found in the DHT');
    // Given likely holders (itself left out), those are the answer: the DHT is not asked.
    assert.deepEqual(await dc.findHolders(blob, AbortSignal.timeout(5_000), [a.id, c.id]), [a.id], 'likely holders, no DHT lookup');
    assert.deepEqual(await dc.findHolders(blob, AbortSignal.timeout(5_000), [c.id]), [b.id], 'none usable: the DHT after all');
    let provided = false;
    const announced = da.announce(blob).then(() => (provided = true));
    await waitFor('the announcement gossiped', () => updates.some((u) => u.peer === a.id && u.blob === blob && u.have === 'all'));
    assert.deepEqual(await dhtProviders(blob), [b.id], 'no DHT record of a while busy');
    assert.equal(provided, false);
    assert.deepEqual(await dc.findHolders(blob, AbortSignal.timeout(5_000)), [a.id], 'a gossiped whole holder: no DHT lookup');
    busy = false;
    await announced;
    assert.deepEqual(new Set(await dhtProviders(blob)), new Set([a.id, b.id]), 'the record once idle');

    busy = true;
    const withdrawn = sha256Of('deleted before it was provided');
    const waiting = da.announce(withdrawn);
    await da.withdraw(withdrawn);
    busy = false;
    await waiting;
    assert.deepEqual(await dhtProviders(withdrawn), [], 'a blob withdrawn meanwhile is never provided');
  } finally {
    for (const d of directories) d.stop();
    await mesh.stopAll();
  }
});
