import { test } from 'node:test';
import assert from 'node:assert/strict';
import { ChunkBitmap } from '@shoal/store';
import { UploadLedger } from '@shoal/swarm';

const BLOB = `sha256:${'a'.repeat(64)}`;

test('a ledger hands out every wanted chunk once before any twice, in no fixed order', () => {
  const orders = new Set<string>();
  for (let round = 0; round < 5; round++) {
    const ledger = new UploadLedger();
    const want = ChunkBitmap.full(32);
    const first = Array.from({ length: 32 }, () => ledger.pick(BLOB, want, 'all')!);
    assert.deepEqual([...first].sort((a, b) => a - b), Array.from({ length: 32 }, (_, i) => i), 'each chunk once');
    const second = Array.from({ length: 32 }, () => ledger.pick(BLOB, want, 'all')!);
    assert.equal(new Set(second).size, 32, 'then each a second time');
    orders.add(first.join());
  }
  assert.ok(orders.size > 1, 'ties are broken at random, so devices asking at once get different chunks');
});

test('a ledger picks only wanted chunks the device holds, counting sends by index too', () => {
  const ledger = new UploadLedger();
  const have = new ChunkBitmap(8);
  for (const i of [1, 2, 3, 6]) have.set(i);
  const want = ChunkBitmap.full(8);
  want.clear(3);
  ledger.record(BLOB, 1);
  ledger.record(BLOB, 6);
  assert.equal(ledger.pick(BLOB, want, have), 2, 'held, wanted and never sent');
  assert.ok([1, 2, 6].includes(ledger.pick(BLOB, want, have)!), 'then among those sent once');
  const unheld = new ChunkBitmap(8);
  unheld.set(0);
  assert.equal(ledger.pick(BLOB, unheld, have), undefined, 'nothing wanted is held');
  assert.equal(ledger.pick(`sha256:${'b'.repeat(64)}`, unheld, 'all'), 0, 'another blob has counts of its own');
});
