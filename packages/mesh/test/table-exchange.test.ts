import { test } from 'node:test';
import assert from 'node:assert/strict';
import type { PeerId } from '@libp2p/interface';
import { TableExchange } from '../src/table-exchange.ts';
import { TestMesh, waitFor } from './fixtures/membership-mesh.ts';

const PROTOCOL = '/shoal/test/exchange/1.0.0';
const silentLog = { debug() {}, warn() {} };

function exchange(table: string, merged: string[], mergeDelayMs = 0): TableExchange {
  return new TableExchange({
    protocol: PROTOCOL,
    maxBytes: () => 1024,
    timeoutMs: 5_000,
    maxConcurrent: 1,
    table: () => new TextEncoder().encode(table),
    merge: async (bytes: Uint8Array, from: PeerId) => {
      await new Promise((resolve) => setTimeout(resolve, mergeDelayMs));
      merged.push(`${new TextDecoder().decode(bytes)} from ${from.toString().slice(-6)}`);
    },
    name: 'test exchange',
    log: silentLog,
  });
}

test('exchanges asked for beyond maxConcurrent wait for a slot instead of being dropped', async () => {
  const mesh = new TestMesh();
  try {
    const asker = await mesh.host();
    const peers = [await mesh.host([asker]), await mesh.host([asker]), await mesh.host([asker])];
    const answered: string[] = [];
    for (const [i, peer] of peers.entries()) await exchange(`table ${i}`, answered).start(peer.host.node);
    const merged: string[] = [];
    // A slow merge keeps the one slot busy while the others are asked for.
    const mine = exchange('mine', merged, 200);
    await mine.start(asker.host.node);

    for (const peer of peers) void mine.with(peer.host.peerId);
    void mine.with(peers[1]!.host.peerId); // already waiting: not asked twice
    await waitFor('every peer to be exchanged with', () => merged.length === peers.length);
    assert.deepEqual(
      merged.map((line) => line.split(' from ')[0]).sort(),
      ['table 0', 'table 1', 'table 2'],
    );
    assert.equal(answered.length, peers.length, 'each peer was asked once');
    await mine.stop();
  } finally {
    await mesh.stopAll();
  }
});
