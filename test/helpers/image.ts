import { createHash, randomBytes } from 'node:crypto';
import { createWriteStream } from 'node:fs';
import { mkdir, readFile, rename, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { Transform } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { createGzip, constants as zlibConstants } from 'node:zlib';
import { pack as createTarPack, type Pack } from 'tar-stream';

/** busybox-static's binary; the test image runs it, so no network is needed to build one. */
export const BUSYBOX_PATH = '/bin/busybox';

const OCI_MANIFEST = 'application/vnd.oci.image.manifest.v1+json';
const OCI_INDEX = 'application/vnd.oci.image.index.v1+json';
const OCI_CONFIG = 'application/vnd.oci.image.config.v1+json';
const OCI_LAYER_GZIP = 'application/vnd.oci.image.layer.v1.tar+gzip';
const REF_NAME = 'org.opencontainers.image.ref.name';
// Fixed timestamps keep layers identical apart from what a test asks to vary.
const EPOCH = new Date('2024-01-01T00:00:00Z');

export interface Descriptor {
  mediaType: string;
  digest: string;
  size: number;
  annotations?: Record<string, string>;
}

export interface TestImageOptions {
  /** The OCI layout directory to create. */
  dir: string;
  /** The tag (ref.name in index.json); default '1'. */
  tag?: string;
  /** What the image's Cmd prints; default a unique "hello from shoal <random>". */
  message?: string;
  /** Adds a second layer holding this many MiB of random (incompressible) bytes. */
  randomLayerMiB?: number;
  /** Tags an OCI image index (one entry, this platform) instead of the manifest itself. */
  asIndex?: boolean;
}

export interface TestImage {
  layoutDir: string;
  tag: string;
  /** `oci:<dir>:<tag>` for skopeo. */
  ociReference: string;
  message: string;
  /** The image manifest. */
  manifest: Descriptor;
  manifestBytes: Buffer;
  /** The image index, with `asIndex`. */
  index?: Descriptor;
  indexBytes?: Buffer;
  /** What the tag names: the index with `asIndex`, else the manifest. */
  tagged: Descriptor;
  config: Descriptor;
  layers: Descriptor[];
}

/** sha256 of everything that flows through, passing the bytes on unchanged. */
class HashingPassThrough extends Transform {
  readonly hash = createHash('sha256');
  size = 0;

  override _transform(chunk: Buffer, _encoding: BufferEncoding, callback: () => void): void {
    this.hash.update(chunk);
    this.size += chunk.length;
    this.push(chunk);
    callback();
  }

  digest(): string {
    return `sha256:${this.hash.digest('hex')}`;
  }
}

function platformArchitecture(): string {
  const byNodeArch: Record<string, string> = { x64: 'amd64', arm64: 'arm64', arm: 'arm', ppc64: 'ppc64le', s390x: 's390x' };
  return byNodeArch[process.arch] ?? process.arch;
}

async function writeBlob(layoutDir: string, bytes: Buffer, mediaType: string): Promise<Descriptor> {
  const hex = createHash('sha256').update(bytes).digest('hex');
  await writeFile(join(layoutDir, 'blobs', 'sha256', hex), bytes);
  return { mediaType, digest: `sha256:${hex}`, size: bytes.length };
}

function addDirectory(tar: Pack, name: string, mode = 0o755): void {
  tar.entry({ name, type: 'directory', mode, mtime: EPOCH });
}

function addSymlink(tar: Pack, name: string, target: string): void {
  tar.entry({ name, type: 'symlink', linkname: target, mode: 0o777, mtime: EPOCH });
}

function addFile(tar: Pack, name: string, content: string | Buffer, mode = 0o644): Promise<void> {
  return new Promise((resolve, reject) => {
    tar.entry({ name, mode, mtime: EPOCH }, content, (error) => (error ? reject(error) : resolve()));
  });
}

/** A file of `size` random bytes, written a MiB at a time with backpressure. */
function addRandomFile(tar: Pack, name: string, size: number): Promise<void> {
  return new Promise((resolve, reject) => {
    const entry = tar.entry({ name, size, mode: 0o644, mtime: EPOCH }, (error) => (error ? reject(error) : resolve()));
    const chunkSize = 1024 * 1024;
    const writeAll = async () => {
      let remaining = size;
      for (; remaining > chunkSize; remaining -= chunkSize) {
        if (!entry.write(randomBytes(chunkSize))) await new Promise<void>((drained) => entry.once('drain', () => drained()));
      }
      entry.end(randomBytes(remaining));
    };
    writeAll().catch(reject);
  });
}

/**
 * Streams a gzip layer into the layout's blobs: `fill` adds tar entries. Returns the layer
 * descriptor and its diffID (sha256 of the uncompressed tar).
 */
async function writeLayer(
  layoutDir: string,
  gzipLevel: number,
  fill: (tar: Pack) => Promise<void>,
): Promise<{ descriptor: Descriptor; diffId: string }> {
  const tar = createTarPack();
  const uncompressed = new HashingPassThrough();
  const compressed = new HashingPassThrough();
  const temporary = join(layoutDir, 'blobs', 'sha256', `.layer-${randomBytes(8).toString('hex')}`);
  const written = pipeline(tar, uncompressed, createGzip({ level: gzipLevel }), compressed, createWriteStream(temporary));
  await fill(tar);
  tar.finalize();
  await written;
  const digest = compressed.digest();
  await rename(temporary, join(layoutDir, 'blobs', 'sha256', digest.slice('sha256:'.length)));
  return { descriptor: { mediaType: OCI_LAYER_GZIP, digest, size: compressed.size }, diffId: uncompressed.digest() };
}

/**
 * Builds a runnable single-platform OCI image layout with no network: a layer with busybox and a
 * few links, a Cmd that echoes a unique message, and optionally a layer of random bytes.
 */
export async function buildTestImage(options: TestImageOptions): Promise<TestImage> {
  const layoutDir = options.dir;
  const tag = options.tag ?? '1';
  const message = options.message ?? `hello from shoal ${randomBytes(6).toString('hex')}`;
  await mkdir(join(layoutDir, 'blobs', 'sha256'), { recursive: true });

  const base = await writeLayer(layoutDir, zlibConstants.Z_DEFAULT_COMPRESSION, async (tar) => {
    addDirectory(tar, 'bin/');
    await addFile(tar, 'bin/busybox', await readFile(BUSYBOX_PATH), 0o755); // ~2 MB
    for (const applet of ['sh', 'echo', 'cat', 'ls']) addSymlink(tar, `bin/${applet}`, 'busybox');
    addDirectory(tar, 'etc/');
    await addFile(tar, 'etc/shoal-message', `${message}\n`);
    addDirectory(tar, 'tmp/', 0o1777);
  });
  const layers = [base];
  if (options.randomLayerMiB) {
    const size = Math.round(options.randomLayerMiB * 1024 * 1024);
    layers.push(
      await writeLayer(layoutDir, zlibConstants.Z_BEST_SPEED, async (tar) => {
        addDirectory(tar, 'data/');
        await addRandomFile(tar, 'data/random.bin', size);
      }),
    );
  }

  const configJson = {
    created: EPOCH.toISOString(),
    architecture: platformArchitecture(),
    os: 'linux',
    config: { Env: ['PATH=/bin'], Cmd: ['/bin/busybox', 'echo', message] },
    rootfs: { type: 'layers', diff_ids: layers.map((layer) => layer.diffId) },
    history: layers.map(() => ({ created: EPOCH.toISOString(), created_by: 'shoal e2e image builder' })),
  };
  const config = await writeBlob(layoutDir, Buffer.from(JSON.stringify(configJson)), OCI_CONFIG);
  const manifestJson = {
    schemaVersion: 2,
    mediaType: OCI_MANIFEST,
    config,
    layers: layers.map((layer) => layer.descriptor),
  };
  const manifestBytes = Buffer.from(JSON.stringify(manifestJson));
  const manifest = await writeBlob(layoutDir, manifestBytes, OCI_MANIFEST);

  let index: Descriptor | undefined;
  let indexBytes: Buffer | undefined;
  if (options.asIndex) {
    const platform = { architecture: platformArchitecture(), os: 'linux' };
    indexBytes = Buffer.from(JSON.stringify({ schemaVersion: 2, mediaType: OCI_INDEX, manifests: [{ ...manifest, platform }] }));
    index = await writeBlob(layoutDir, indexBytes, OCI_INDEX);
  }
  const tagged = index ?? manifest;
  const layoutIndex = { schemaVersion: 2, manifests: [{ ...tagged, annotations: { [REF_NAME]: tag } }] };
  await writeFile(join(layoutDir, 'index.json'), JSON.stringify(layoutIndex));
  await writeFile(join(layoutDir, 'oci-layout'), JSON.stringify({ imageLayoutVersion: '1.0.0' }));

  return {
    layoutDir,
    tag,
    ociReference: `oci:${layoutDir}:${tag}`,
    message,
    manifest,
    manifestBytes,
    ...(index ? { index, indexBytes } : {}),
    tagged,
    config,
    layers: layers.map((layer) => layer.descriptor),
  };
}

/** The index.json entries of an OCI layout whose ref.name is `refName`. */
export async function layoutEntries(layoutDir: string, refName: string): Promise<Descriptor[]> {
  const index = JSON.parse(await readFile(join(layoutDir, 'index.json'), 'utf8')) as { manifests?: Descriptor[] };
  return (index.manifests ?? []).filter((entry) => entry.annotations?.[REF_NAME] === refName);
}

/** Reads a blob of an OCI layout by digest. */
export function readLayoutBlob(layoutDir: string, digest: string): Promise<Buffer> {
  const [algorithm, hex] = digest.split(':');
  return readFile(join(layoutDir, 'blobs', algorithm, hex));
}
