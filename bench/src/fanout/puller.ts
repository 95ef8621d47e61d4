// One device's image pull in the fan-out benchmark, run inside the device's network namespace:
//
//   ip netns exec NS node bench/src/fanout/puller.ts --registry http://HOST:PORT --image NAME:TAG
//
// It pulls the way containerd's resolver and fetcher do: HEAD the manifest by tag, GET it by
// digest, then GET the config and the layers (three at a time, containerd's default
// max_concurrent_downloads), each blob's digest checked as it streams; a broken download resumes
// with a Range request where it stopped. Bytes are hashed and dropped, not stored.
//
// Protocol with the benchmark on stdin/stdout, one JSON object per line: it prints
// {"event":"ready"}, waits for the line "go", pulls, then prints {"event":"done",...} or
// {"event":"failed","error":...} and exits.
import { createHash } from 'node:crypto';
import { createInterface } from 'node:readline';
import { parseArgs } from 'node:util';
import { Agent, request } from 'undici';

const MANIFEST_TYPES = [
  'application/vnd.oci.image.manifest.v1+json',
  'application/vnd.oci.image.index.v1+json',
  'application/vnd.docker.distribution.manifest.v2+json',
  'application/vnd.docker.distribution.manifest.list.v2+json',
];
const INDEX_TYPES = new Set([MANIFEST_TYPES[1], MANIFEST_TYPES[3]]);
const CONCURRENT_DOWNLOADS = 3;
/** containerd's CRI plugin cancels a pull that makes no progress for 5 minutes (image_pull_progress_timeout). */
const NO_PROGRESS_TIMEOUT_MS = 5 * 60_000;
const MAX_ATTEMPTS = 5;

export interface PullerResult {
  event: 'done';
  /** ms from "go" to the last verified byte. */
  ms: number;
  bytes: number;
  /** Range requests made to resume broken downloads. */
  resumes: number;
  /** ms from "go" until each layer was complete, by digest. */
  layers: Record<string, number>;
}

interface Descriptor {
  mediaType?: string;
  digest: string;
  size: number;
  platform?: { os?: string; architecture?: string };
}

class Pull {
  readonly #base: string;
  readonly #name: string;
  readonly #dispatcher = new Agent({ connections: CONCURRENT_DOWNLOADS + 1, bodyTimeout: NO_PROGRESS_TIMEOUT_MS, headersTimeout: NO_PROGRESS_TIMEOUT_MS });
  readonly #start = performance.now();
  bytes = 0;
  resumes = 0;
  readonly layers: Record<string, number> = {};

  constructor(registry: string, name: string) {
    this.#base = registry.replace(/\/$/, '');
    this.#name = name;
  }

  get elapsed(): number {
    return performance.now() - this.#start;
  }

  async run(reference: string): Promise<void> {
    const head = await this.#request('HEAD', `manifests/${reference}`, { accept: MANIFEST_TYPES.join(', ') });
    const digest = head.headers['docker-content-digest'];
    if (typeof digest !== 'string') throw new Error(`HEAD manifest ${reference}: no Docker-Content-Digest`);
    let manifest = await this.#manifest(digest);
    if (INDEX_TYPES.has(manifest.mediaType)) {
      const entries = (manifest.manifests ?? []) as Descriptor[];
      const chosen = entries.find((m) => m.platform?.os === 'linux' && m.platform.architecture === 'amd64') ?? entries[0];
      if (!chosen) throw new Error('image index lists no manifest');
      manifest = await this.#manifest(chosen.digest);
    }
    const blobs = [manifest.config as Descriptor, ...((manifest.layers ?? []) as Descriptor[])];
    let next = 0;
    const worker = async () => {
      while (next < blobs.length) {
        const blob = blobs[next++]!;
        await this.#blob(blob);
        this.layers[blob.digest] = Math.round(this.elapsed);
      }
    };
    await Promise.all(Array.from({ length: CONCURRENT_DOWNLOADS }, worker));
  }

  async close(): Promise<void> {
    await this.#dispatcher.close();
  }

  async #manifest(digest: string): Promise<Record<string, unknown> & { mediaType: string }> {
    const response = await this.#request('GET', `manifests/${digest}`, { accept: MANIFEST_TYPES.join(', ') });
    const bytes = Buffer.from(await response.body.arrayBuffer());
    checkDigest(digest, createHash('sha256').update(bytes));
    this.bytes += bytes.byteLength;
    const parsed = JSON.parse(bytes.toString('utf8')) as Record<string, unknown>;
    const mediaType = (parsed.mediaType as string | undefined) ?? String(response.headers['content-type']);
    return { ...parsed, mediaType };
  }

  /** Streams one blob through sha256; on a broken body resumes with Range from the last byte received. */
  async #blob(blob: Descriptor): Promise<void> {
    const hash = createHash('sha256');
    let received = 0;
    for (let attempt = 1; ; attempt++) {
      try {
        const headers: Record<string, string> = received > 0 ? { range: `bytes=${received}-` } : {};
        const response = await this.#request('GET', `blobs/${blob.digest}`, headers);
        if (received > 0 && response.statusCode !== 206) {
          await response.body.dump();
          throw new Error(`resume of ${blob.digest} at ${received}: HTTP ${response.statusCode}, not 206`);
        }
        for await (const chunk of response.body) {
          hash.update(chunk as Buffer);
          received += (chunk as Buffer).byteLength;
        }
        break;
      } catch (err) {
        if (attempt >= MAX_ATTEMPTS || received === 0) throw err;
        this.resumes++;
      }
    }
    if (received !== blob.size) throw new Error(`${blob.digest}: ${received} bytes, the manifest says ${blob.size}`);
    checkDigest(blob.digest, hash);
    this.bytes += received;
  }

  async #request(method: 'GET' | 'HEAD', path: string, headers: Record<string, string>) {
    const response = await request(`${this.#base}/v2/${this.#name}/${path}`, { method, headers, dispatcher: this.#dispatcher });
    if (response.statusCode !== 200 && response.statusCode !== 206) {
      const body = method === 'HEAD' ? '' : await response.body.text();
      throw new Error(`${method} ${path}: HTTP ${response.statusCode} ${body.slice(0, 300)}`);
    }
    return response;
  }
}

function checkDigest(expected: string, hash: ReturnType<typeof createHash>): void {
  const actual = `sha256:${hash.digest('hex')}`;
  if (actual !== expected) throw new Error(`content of ${expected} hashes to ${actual}`);
}

function emit(line: object): void {
  process.stdout.write(`${JSON.stringify(line)}\n`);
}

async function main(): Promise<void> {
  const { values } = parseArgs({ options: { registry: { type: 'string' }, image: { type: 'string' } } });
  const image = values.image ?? '';
  const colon = image.lastIndexOf(':');
  if (!values.registry || colon <= 0) throw new Error('usage: puller.ts --registry http://HOST:PORT --image NAME:TAG');
  const lines = createInterface({ input: process.stdin });
  emit({ event: 'ready' });
  for await (const line of lines) if (line.trim() === 'go') break;
  lines.close();
  const pull = new Pull(values.registry, image.slice(0, colon));
  try {
    await pull.run(image.slice(colon + 1));
    const result: PullerResult = { event: 'done', ms: Math.round(pull.elapsed), bytes: pull.bytes, resumes: pull.resumes, layers: pull.layers };
    emit(result);
  } finally {
    await pull.close();
  }
}

main().catch((err: Error) => {
  emit({ event: 'failed', error: err.message });
  process.exitCode = 1;
});
