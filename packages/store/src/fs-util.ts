import { randomBytes } from 'node:crypto';
import { type FileHandle, open, rename, rm } from 'node:fs/promises';
import { dirname, join } from 'node:path';

/** fsyncs a directory so a rename inside it survives a crash. */
export async function syncDir(dir: string): Promise<void> {
  const fh = await open(dir, 'r');
  try {
    await fh.sync();
  } finally {
    await fh.close();
  }
}

export async function syncFile(path: string): Promise<void> {
  const fh = await open(path, 'r+');
  try {
    await fh.datasync();
  } finally {
    await fh.close();
  }
}

/** Writes a file so that readers see either the old or the whole new content, never a part. */
export async function writeFileAtomic(path: string, data: Uint8Array): Promise<void> {
  const dir = dirname(path);
  const tmp = join(dir, `.tmp-${randomBytes(6).toString('hex')}`);
  const fh = await open(tmp, 'w');
  try {
    await fh.writeFile(data);
    await fh.datasync();
  } catch (err) {
    await fh.close();
    await rm(tmp, { force: true });
    throw err;
  }
  await fh.close();
  await rename(tmp, path);
  await syncDir(dir);
}

/** Reads into all of `buffer` from `position`, unless the file ends first; how many bytes were read. */
export async function readFully(fh: FileHandle, buffer: Uint8Array, position: number): Promise<number> {
  let read = 0;
  while (read < buffer.byteLength) {
    const { bytesRead } = await fh.read(buffer, read, buffer.byteLength - read, position + read);
    if (bytesRead === 0) break;
    read += bytesRead;
  }
  return read;
}
