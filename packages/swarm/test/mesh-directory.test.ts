import { test } from 'node:test';
import assert from 'node:assert/strict';
import { sha256Of } from '@shoal/oci';
import { ChunkBitmap } from '@shoal/store';
import { MeshProviderDirectory, type AvailabilityUpdate } from '@shoal/swarm';
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
    const topicPeers = (d: typeof a) => d.host.node.services.pubsub.getSubscribers('/shoal/availability/1').length;
    await waitFor('availability subscriptions', () => [a, b, c].every((d) => topicPeers(d) >= 2));

    const updates: AvailabilityUpdate[] = [];
    dc!.addEventListener('availability', (e) => updates.push(e.detail));
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

    await db!.withdraw(blob);
    await waitFor('the withdrawal gossiped', () => updates.some((u) => u.peer === b.id && u.have === undefined));
    assert.ok(!(await dc!.findHolders(blob, AbortSignal.timeout(5_000))).includes(b.id));

    // Malformed availability is rejected by the validator, and the directory keeps working.
    const before = updates.length;
    await a.host.node.services.pubsub.publish('/shoal/availability/1', new TextEncoder().encode('{"blob":"nope","have":"all"}')).catch(() => {});
    await da!.announce(sha256Of('another'));
    await waitFor('a later good message', () => updates.length > before);
    assert.ok(updates.slice(before).every((u) => u.blob.startsWith('sha256:')));
  } finally {
    for (const d of directories) d.stop();
    await mesh.stopAll();
  }
});
