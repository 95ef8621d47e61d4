import { randomBytes } from 'node:crypto';
import { link, mkdir, open, readFile, unlink } from 'node:fs/promises';
import { join } from 'node:path';
import { generateKeyPair, privateKeyFromProtobuf, privateKeyToProtobuf } from '@libp2p/crypto/keys';
import type { PrivateKey } from '@libp2p/interface';

export const PEER_KEY_FILE = 'peer.key';

/**
 * The node's libp2p identity, kept in `<dataDir>/peer.key` (protobuf-encoded private key,
 * mode 0600) so the peer id survives restarts. Creates an Ed25519 key on first use.
 * A file that exists but cannot be decoded is an error, never silently replaced.
 */
export async function loadOrCreatePeerKey(dataDir: string): Promise<PrivateKey> {
  const path = join(dataDir, PEER_KEY_FILE);
  const existing = await readPeerKey(path);
  if (existing) return existing;

  await mkdir(dataDir, { recursive: true, mode: 0o700 });
  const key = await generateKeyPair('Ed25519');
  const tmpPath = `${path}.${randomBytes(6).toString('hex')}.tmp`;
  const file = await open(tmpPath, 'wx', 0o600);
  try {
    await file.writeFile(privateKeyToProtobuf(key));
    await file.sync();
  } finally {
    await file.close();
  }
  try {
    // link() refuses to replace an existing file: if another process created the key first,
    // use that one so both agree on the identity.
    await link(tmpPath, path);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'EEXIST') throw err;
  } finally {
    await unlink(tmpPath);
  }
  return (await readPeerKey(path))!;
}

async function readPeerKey(path: string): Promise<PrivateKey | undefined> {
  let bytes: Uint8Array;
  try {
    bytes = await readFile(path);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
    throw err;
  }
  try {
    return privateKeyFromProtobuf(bytes);
  } catch (err) {
    throw new Error(`${path} is not a libp2p private key (protobuf): ${(err as Error).message}`, { cause: err });
  }
}
