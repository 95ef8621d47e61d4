import { randomBytes } from 'node:crypto';
import { mkdir, open, rename, rm } from 'node:fs/promises';
import { dirname } from 'node:path';
import type { Stream } from '@libp2p/interface';

/** Small I/O helpers shared by the mesh services' table exchanges and state files. */

/** Readers see the old file or the whole new one: write a temp file beside it, fsync, rename. */
export async function writeFileAtomic(path: string, data: Uint8Array): Promise<void> {
  await mkdir(dirname(path), { recursive: true });
  const tmp = `${path}.${randomBytes(6).toString('hex')}.tmp`;
  const handle = await open(tmp, 'w', 0o600);
  try {
    await handle.writeFile(data);
    await handle.datasync();
  } catch (err) {
    await handle.close();
    await rm(tmp, { force: true });
    throw err;
  }
  await handle.close();
  await rename(tmp, path);
}

export async function sendAndClose(stream: Stream, bytes: Uint8Array, signal: AbortSignal): Promise<void> {
  stream.send(bytes);
  await stream.close({ signal });
}

/** Reads until the remote closes its side; a message over maxBytes aborts the stream. */
export async function readToEnd(stream: Stream, maxBytes: number, signal: AbortSignal): Promise<Uint8Array> {
  const onAbort = () => stream.abort(signal.reason as Error);
  signal.throwIfAborted();
  signal.addEventListener('abort', onAbort, { once: true });
  try {
    const chunks: Uint8Array[] = [];
    let length = 0;
    for await (const chunk of stream) {
      length += chunk.byteLength;
      if (length > maxBytes) throw new Error(`message exceeds ${maxBytes} bytes`);
      chunks.push(chunk.subarray());
    }
    return Buffer.concat(chunks, length);
  } finally {
    signal.removeEventListener('abort', onAbort);
  }
}
