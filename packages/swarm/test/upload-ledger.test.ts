import { test } from 'node:test';
import assert from 'node:assert/strict';
import { ChunkBitmap } from '@shoal/store';
import { UploadLedger } from '@shoal/swarm';

const BLOB = `sha256:${'a'.repeat(64)}`;

test('a ledger hands out every wanted chunk once before any twice, each round in blob order', () => {
  const ledger = new UploadLedger();
  const want = ChunkBitmap.full(32);
  const inOrder = Array.from({ length: 32 }, (_, i) => i);
  const first = Array.from({ length: 32 }, () => ledger.pick(BLOB, want, 'all')!);
  assert.deepEqual(first, inOrder, 'each chunk once, in order: devices asking one after another get different chunks');
  const second = Array.from({ length: 32 }, () => ledger.pick(BLOB, want, 'all')!);
  assert.deepEqual(second, inOrder, 'then each a second time');
  ledger.record(BLOB, 0);
  ledger.record(BLOB, 2);
  assert.deepEqual([ledger.pick(BLOB, want, 'all'), ledger.pick(BLOB, want, 'all')], [1, 3], 'the first of the least sent');
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

test('a ledger tells how often a request would get a chunk sent, without counting a send', () => {
  const ledger = new UploadLedger();
  const have = new ChunkBitmap(4);
  for (const i of [0, 1, 2]) have.set(i);
  ledger.record(BLOB, 0);
  ledger.record(BLOB, 0);
  ledger.record(BLOB, 1);
  assert.equal(ledger.sends(BLOB, 0, have), 2, 'by index');
  assert.equal(ledger.sends(BLOB, 3, have), 0, 'never sent');
  const want = new ChunkBitmap(4);
  want.set(0);
  want.set(1);
  assert.equal(ledger.sends(BLOB, want, have), 1, 'a pick gets the least sent of those wanted and held');
  assert.equal(ledger.sends(BLOB, want, have), 1, 'asking did not count as a send');
  const unheld = new ChunkBitmap(4);
  unheld.set(3);
  assert.equal(ledger.sends(BLOB, unheld, have), undefined, 'none held');
  ledger.unrecord(BLOB, 1);
  ledger.unrecord(BLOB, 1);
  assert.equal(ledger.sends(BLOB, 1, have), 0, 'a send taken back, never below none');
});

test('a ledger sends each chunk of a blob being pulled through once, and answers busy when every wanted one has gone out', () => {
  const ledger = new UploadLedger();
  const have = new ChunkBitmap(6);
  for (const i of [0, 1, 2]) have.set(i);
  const index = { blob: BLOB, size: 6, chunkSize: 1, chunks: ['x', 'y', 'z'] };
  const pulling = { index, have, growing: true };
  const want = ChunkBitmap.full(6);
  assert.deepEqual([0, 1, 2].map(() => ledger.pickFrom(BLOB, want, pulling)), [0, 1, 2], 'each held chunk once');
  assert.equal(ledger.pickFrom(BLOB, want, pulling), 'busy', 'every held chunk has gone out');
  have.set(3);
  assert.equal(ledger.pickFrom(BLOB, want, pulling), 3, 'a chunk that landed since');
  const unheld = new ChunkBitmap(6);
  unheld.set(5);
  assert.equal(ledger.pickFrom(BLOB, unheld, pulling), undefined, 'nothing wanted is held: not busy, absent');
  assert.equal(ledger.pickFrom(BLOB, want, { index, have }), 0, 'a blob not pulled through gets its least sent chunk again');
});
