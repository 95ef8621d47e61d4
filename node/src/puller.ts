import { canonicalRepository, parseManifest, parseReference, referencedBlobs, type Descriptor } from '@shoal/oci';
import type { Registry } from '@shoal/registry-gateway';
import type { Downloader } from '@shoal/swarm';

/** One line of a pull's progress, as POST /api/pull streams it and `shoal pull` draws it. */
export type PullEvent =
  | { type: 'manifest'; repository: string; digest: string; blobs: { digest: string; size: number }[] }
  | { type: 'progress'; digest: string; size: number; bytes: number; rate: number; sources: number; done: boolean }
  | { type: 'done'; repository: string; digest: string; bytes: number; ms: number }
  | { type: 'error'; message: string };

export interface PullerOptions {
  registry: Registry;
  downloader: Downloader;
  defaultNamespace: string;
  /** Platform picked from a multi-platform index. Default this machine's (linux/amd64 style). */
  platform?: { os: string; architecture: string };
  /** How often progress lines are produced per blob. Default 500 ms. */
  progressIntervalMs?: number;
}

/**
 * Prefetches an image into the local store through the node's registry, so exactly what a
 * client pull would do happens (mesh first, then upstream), while reporting progress.
 */
export class Puller {
  readonly #options: Required<PullerOptions>;

  constructor(options: PullerOptions) {
    this.#options = {
      platform: { os: 'linux', architecture: goArch(process.arch) },
      progressIntervalMs: 500,
      ...options,
    };
  }

  async *pull(image: string): AsyncGenerator<PullEvent> {
    const started = performance.now();
    const { registry } = this.#options;
    const ref = parseReference(image);
    const repository = canonicalRepository(ref.registry ?? this.#options.defaultNamespace, ref.name);
    let manifest = await registry.getManifest(repository, ref.digest ?? ref.tag ?? 'latest');
    if (!manifest) throw new Error(`${image}: no such image in the mesh or upstream`);
    let parsed = parseManifest(manifest.bytes);
    if (parsed.kind === 'index') {
      const child = this.#pickPlatform(parsed.manifests);
      if (!child) throw new Error(`${image}: no manifest for ${this.#options.platform.os}/${this.#options.platform.architecture}`);
      manifest = await registry.getManifest(repository, child.digest);
      if (!manifest) throw new Error(`${image}: manifest ${child.digest} is not available`);
      parsed = parseManifest(manifest.bytes);
    }
    const blobs = referencedBlobs(parsed).map(({ digest, size }) => ({ digest, size }));
    yield { type: 'manifest', repository, digest: parsed.digest, blobs };
    let bytes = 0;
    for (const blob of blobs) {
      yield* this.#fetchBlob(repository, blob);
      bytes += blob.size;
    }
    yield { type: 'done', repository, digest: parsed.digest, bytes, ms: Math.round(performance.now() - started) };
  }

  /** Reads the blob through the registry (which stores it) and reports progress as it goes. */
  async *#fetchBlob(repository: string, blob: { digest: string; size: number }): AsyncGenerator<PullEvent> {
    const { registry, downloader, progressIntervalMs } = this.#options;
    const started = performance.now();
    if (await registry.store.statBlob(blob.digest)) {
      yield { type: 'progress', ...blob, bytes: blob.size, rate: 0, sources: 0, done: true };
      return;
    }
    const reader = await registry.readBlob(repository, blob.digest);
    if (!reader) throw new Error(`blob ${blob.digest} is not available in the mesh or upstream`);
    let bytes = 0;
    let last = 0;
    for await (const piece of reader.stream as AsyncIterable<Buffer>) {
      bytes += piece.byteLength;
      const now = performance.now();
      if (now - last >= progressIntervalMs) {
        last = now;
        yield this.#progress(blob, bytes, started, downloader, false);
      }
    }
    yield this.#progress(blob, bytes, started, downloader, true);
  }

  #progress(blob: { digest: string; size: number }, bytes: number, started: number, downloader: Downloader, done: boolean): PullEvent {
    const transfer = downloader.get(blob.digest)?.info();
    const seconds = Math.max(0.001, (performance.now() - started) / 1000);
    return {
      type: 'progress',
      ...blob,
      bytes,
      rate: Math.round(bytes / seconds),
      sources: transfer ? Object.keys(transfer.sources).length : 0,
      done,
    };
  }

  #pickPlatform(children: readonly Descriptor[]): Descriptor | undefined {
    const { os, architecture } = this.#options.platform;
    return children.find((c) => c.platform?.os === os && c.platform?.architecture === architecture) ?? (children.length === 1 ? children[0] : undefined);
  }
}

/** Node's arch names as OCI platforms spell them. */
function goArch(arch: string): string {
  return ({ x64: 'amd64', ia32: '386', arm64: 'arm64', arm: 'arm' } as Record<string, string>)[arch] ?? arch;
}
