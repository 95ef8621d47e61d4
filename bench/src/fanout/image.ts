// The image the fan-out benchmark distributes: an OCI layout whose layers are gzip'd tars, each
// holding one file of random (incompressible) bytes, so no link or cache can shrink it. The gzip
// level is 0 (stored blocks): random bytes do not compress, and a real gzip stream keeps skopeo
// from compressing the layer itself on push (which would change every digest).
import { createHash, randomFillSync } from 'node:crypto';
import { createWriteStream } from 'node:fs';
import { mkdir, rename, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { Transform } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { createGzip } from 'node:zlib';
import { pack as createTarPack } from 'tar-stream';

const OCI_MANIFEST = 'application/vnd.oci.image.manifest.v1+json';
const OCI_CONFIG = 'application/vnd.oci.image.config.v1+json';
const OCI_LAYER = 'application/vnd.oci.image.layer.v1.tar+gzip';
const FILL_STEP = 2 ** 20;

export interface BenchImage {
  /** `oci:<dir>:<tag>` for skopeo. */
  ociReference: string;
  manifestDigest: string;
  /** F: manifest, config and layers, in bytes. */
  bytes: number;
  layers: Layer[];
}

interface Layer {
  digest: string;
  size: number;
  /** sha256 of the uncompressed tar. */
  diffId: string;
}

/** Writes an OCI layout at `dir` tagged `tag`, with `layers` layers sharing `totalBytes` of random file content. */
export async function generateImage(dir: string, totalBytes: number, layers: number, tag = '1'): Promise<BenchImage> {
  const blobsDir = join(dir, 'blobs', 'sha256');
  await mkdir(blobsDir, { recursive: true });
  const written: Layer[] = [];
  for (let i = 0; i < layers; i++) {
    const share = Math.floor(totalBytes / layers) + (i < totalBytes % layers ? 1 : 0);
    written.push(await writeRandomLayer(blobsDir, `layer-${i}.bin`, share));
  }
  const putJson = async (doc: unknown) => {
    const bytes = Buffer.from(JSON.stringify(doc));
    const hex = createHash('sha256').update(bytes).digest('hex');
    await writeFile(join(blobsDir, hex), bytes);
    return { digest: `sha256:${hex}`, size: bytes.byteLength };
  };
  const config = await putJson({
    architecture: 'amd64',
    os: 'linux',
    config: {},
    rootfs: { type: 'layers', diff_ids: written.map((l) => l.diffId) },
  });
  const manifest = await putJson({
    schemaVersion: 2,
    mediaType: OCI_MANIFEST,
    config: { mediaType: OCI_CONFIG, ...config },
    layers: written.map(({ digest, size }) => ({ mediaType: OCI_LAYER, digest, size })),
  });
  await writeFile(join(dir, 'oci-layout'), JSON.stringify({ imageLayoutVersion: '1.0.0' }));
  await writeFile(
    join(dir, 'index.json'),
    JSON.stringify({
      schemaVersion: 2,
      manifests: [{ mediaType: OCI_MANIFEST, ...manifest, annotations: { 'org.opencontainers.image.ref.name': tag } }],
    }),
  );
  return {
    ociReference: `oci:${dir}:${tag}`,
    manifestDigest: manifest.digest,
    bytes: manifest.size + config.size + written.reduce((sum, l) => sum + l.size, 0),
    layers: written,
  };
}

/** Sums and counts the bytes that pass through, unchanged. */
class Digesting extends Transform {
  readonly #hash = createHash('sha256');
  bytes = 0;

  override _transform(chunk: Buffer, _encoding: BufferEncoding, done: (error: null, chunk: Buffer) => void): void {
    this.#hash.update(chunk);
    this.bytes += chunk.byteLength;
    done(null, chunk);
  }

  digest(): string {
    return `sha256:${this.#hash.digest('hex')}`;
  }
}

/** One gzip'd tar holding `name` with `size` random bytes, stored by digest. */
async function writeRandomLayer(blobsDir: string, name: string, size: number): Promise<Layer> {
  const temp = join(blobsDir, `.${name}.tmp`);
  const [tarred, gzipped] = [new Digesting(), new Digesting()];
  const tar = createTarPack();
  const written = pipeline(tar, tarred, createGzip({ level: 0 }), gzipped, createWriteStream(temp));
  await new Promise<void>((resolve, reject) => {
    const entry = tar.entry({ name, size, mode: 0o644, mtime: new Date('2024-01-01T00:00:00Z') }, (error) => (error ? reject(error) : resolve()));
    const fill = async () => {
      // A fresh buffer each step: tar-stream keeps a reference to what it is given.
      const piece = (filled: number) => randomFillSync(Buffer.allocUnsafe(Math.min(FILL_STEP, size - filled)));
      let filled = 0;
      for (; size - filled > FILL_STEP; filled += FILL_STEP) {
        if (!entry.write(piece(filled))) await new Promise<void>((drained) => entry.once('drain', () => drained()));
      }
      entry.end(piece(filled));
    };
    fill().catch(reject);
  });
  tar.finalize();
  await written;
  const digest = gzipped.digest();
  await rename(temp, join(blobsDir, digest.slice('sha256:'.length)));
  return { digest, size: gzipped.bytes, diffId: tarred.digest() };
}
