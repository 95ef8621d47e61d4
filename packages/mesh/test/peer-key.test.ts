import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, readFile, rm, stat, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { peerIdFromPrivateKey } from '@libp2p/peer-id';
import { loadOrCreatePeerKey, PEER_KEY_FILE } from '../src/index.ts';

test('loadOrCreatePeerKey creates an owner-only key once and returns the same identity afterwards', async () => {
  const dir = await mkdtemp(join(tmpdir(), 'shoal-peer-key-'));
  try {
    const dataDir = join(dir, 'data');
    const created = await loadOrCreatePeerKey(dataDir);
    assert.equal(created.type, 'Ed25519');
    assert.equal((await stat(join(dataDir, PEER_KEY_FILE))).mode & 0o777, 0o600);

    const loaded = await loadOrCreatePeerKey(dataDir);
    assert.ok(peerIdFromPrivateKey(loaded).equals(peerIdFromPrivateKey(created)));

    // Concurrent first use agrees on one identity.
    const racingDir = join(dir, 'racing');
    const racing = await Promise.all([loadOrCreatePeerKey(racingDir), loadOrCreatePeerKey(racingDir)]);
    assert.ok(peerIdFromPrivateKey(racing[0]).equals(peerIdFromPrivateKey(racing[1])));
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
});

test('loadOrCreatePeerKey refuses a corrupt key file and leaves it in place', async () => {
  const dir = await mkdtemp(join(tmpdir(), 'shoal-peer-key-'));
  try {
    const path = join(dir, PEER_KEY_FILE);
    await writeFile(path, 'garbage');
    await assert.rejects(loadOrCreatePeerKey(dir), new RegExp(`${path} is not a libp2p private key`));
    assert.equal(await readFile(path, 'utf8'), 'garbage');
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
});
