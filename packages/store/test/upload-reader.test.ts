import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Readable } from 'node:stream';
import { sha256Of } from '@shoal/oci';
import { FsContentStore, type UploadReader } from '@shoal/store';

async function readAt(reader: UploadReader, position: number, length: number): Promise<string> {
  const buf = Buffer.alloc(length);
  const n = await reader.read(buf, position);
  return buf.subarray(0, n).toString();
}

test('an upload reader sees bytes as they are appended and keeps reading after commit', { timeout: 20_000 }, async () => {
  const dir = await mkdtemp(join(tmpdir(), 'shoal-store-'));
  const store = await FsContentStore.open({ dir });
  try {
    const writer = await store.createWriter();
    await writer.append([Buffer.from('hello ')]);
    const reader = await writer.openReader();
    assert.equal(await readAt(reader, 0, 64), 'hello ');

    // A second append still in progress: the bytes it has written are visible before it ends.
    let release!: () => void;
    const gate = new Promise<void>((resolve) => (release = resolve));
    const appending = writer.append(
      Readable.from(
        (async function* () {
          yield Buffer.from('shoal');
          await gate;
          yield Buffer.from('!');
        })(),
      ),
    );
    let seen = '';
    while (seen !== 'shoal') {
      seen = await readAt(reader, 6, 64);
      if (seen !== 'shoal') await new Promise((r) => setTimeout(r, 5));
    }
    release();
    await appending;
    assert.equal(await readAt(reader, 6, 64), 'shoal!');

    await writer.commit(sha256Of('hello shoal!'));
    assert.equal(await readAt(reader, 0, 64), 'hello shoal!');
    assert.equal(await readAt(reader, 12, 64), '');
    await reader.close();
    await assert.rejects(writer.openReader());
  } finally {
    await store.close();
    await rm(dir, { recursive: true, force: true });
  }
});

test('an aborted upload refuses new readers and leaves no file', async () => {
  const dir = await mkdtemp(join(tmpdir(), 'shoal-store-'));
  const store = await FsContentStore.open({ dir });
  try {
    const writer = await store.createWriter();
    await writer.append([Buffer.from('partial')]);
    const reader = await writer.openReader();
    await writer.abort();
    assert.equal(await readAt(reader, 0, 64), 'partial');
    await reader.close();
    await assert.rejects(writer.openReader(), /closed/);
    assert.deepEqual(await store.pendingUploadFiles(), []);
  } finally {
    await store.close();
    await rm(dir, { recursive: true, force: true });
  }
});
