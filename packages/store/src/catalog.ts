import { effectiveArtifactType, isDigest, type ParsedManifest } from '@shoal/oci';
import type { ReferrerDescriptor } from './types.ts';

/** Annotations Shoal adds to index.json entries; ref.name is what skopeo and umoci resolve. */
export const REF_NAME = 'org.opencontainers.image.ref.name';
export const REPOSITORY_ANNOTATION = 'io.shoal.repository';
export const TAG_ANNOTATION = 'io.shoal.tag';

/** What the catalog remembers of a manifest without re-reading it. */
export interface ManifestMeta {
  digest: string;
  mediaType: string;
  size: number;
  subject?: string;
  artifactType?: string;
  annotations?: Record<string, string>;
}

export function manifestMeta(m: ParsedManifest): ManifestMeta {
  const meta: ManifestMeta = { digest: m.digest, mediaType: m.mediaType, size: m.bytes.byteLength };
  if (m.subject) meta.subject = m.subject.digest;
  const artifactType = effectiveArtifactType(m);
  if (artifactType) meta.artifactType = artifactType;
  if (m.annotations) meta.annotations = m.annotations;
  return meta;
}

interface Repository {
  manifests: Set<string>;
  tags: Map<string, string>;
}

interface IndexEntry {
  mediaType: string;
  digest: string;
  size: number;
  annotations: Record<string, string>;
}

/**
 * Manifests and tags per repository, in memory. The on-disk form is the OCI layout's
 * index.json: one entry per (repository, manifest) and one per (repository, tag).
 */
export class ManifestCatalog {
  readonly #repos = new Map<string, Repository>();
  readonly #meta = new Map<string, ManifestMeta>();

  add(repository: string, meta: ManifestMeta, tag?: string): void {
    let repo = this.#repos.get(repository);
    if (!repo) {
      repo = { manifests: new Set(), tags: new Map() };
      this.#repos.set(repository, repo);
    }
    this.#meta.set(meta.digest, meta);
    repo.manifests.add(meta.digest);
    if (tag !== undefined) repo.tags.set(tag, meta.digest);
  }

  /** A tag or digest to the manifest it names in this repository. */
  resolve(repository: string, reference: string): ManifestMeta | undefined {
    const repo = this.#repos.get(repository);
    if (!repo) return undefined;
    const digest = isDigest(reference) ? reference : repo.tags.get(reference);
    if (!digest || !repo.manifests.has(digest)) return undefined;
    return this.#meta.get(digest);
  }

  removeManifest(repository: string, digest: string): boolean {
    const repo = this.#repos.get(repository);
    if (!repo?.manifests.delete(digest)) return false;
    for (const [tag, d] of repo.tags) if (d === digest) repo.tags.delete(tag);
    if (repo.manifests.size === 0) this.#repos.delete(repository);
    if (!this.isReferenced(digest)) this.#meta.delete(digest);
    return true;
  }

  removeTag(repository: string, tag: string): boolean {
    return this.#repos.get(repository)?.tags.delete(tag) ?? false;
  }

  /** Whether any repository still holds this manifest. */
  isReferenced(digest: string): boolean {
    for (const repo of this.#repos.values()) if (repo.manifests.has(digest)) return true;
    return false;
  }

  tags(repository: string): string[] | undefined {
    const repo = this.#repos.get(repository);
    return repo ? [...repo.tags.keys()].sort() : undefined;
  }

  taggedImages(): { repository: string; tag: string; meta: ManifestMeta }[] {
    const out: { repository: string; tag: string; meta: ManifestMeta }[] = [];
    for (const [repository, repo] of [...this.#repos].sort(([a], [b]) => a.localeCompare(b))) {
      for (const [tag, digest] of [...repo.tags].sort(([a], [b]) => a.localeCompare(b))) {
        out.push({ repository, tag, meta: this.#meta.get(digest)! });
      }
    }
    return out;
  }

  repositories(): string[] {
    return [...this.#repos.keys()].sort();
  }

  referrers(repository: string, subject: string): ReferrerDescriptor[] {
    const repo = this.#repos.get(repository);
    if (!repo) return [];
    const out: ReferrerDescriptor[] = [];
    for (const digest of repo.manifests) {
      const meta = this.#meta.get(digest)!;
      if (meta.subject !== subject) continue;
      const d: ReferrerDescriptor = { mediaType: meta.mediaType, digest, size: meta.size };
      if (meta.artifactType) d.artifactType = meta.artifactType;
      if (meta.annotations) d.annotations = meta.annotations;
      out.push(d);
    }
    return out.sort((a, b) => a.digest.localeCompare(b.digest));
  }

  /** The OCI layout index.json for this catalog. */
  toIndexJson(): Buffer {
    const manifests: IndexEntry[] = [];
    for (const repository of this.repositories()) {
      const repo = this.#repos.get(repository)!;
      for (const digest of [...repo.manifests].sort()) {
        const meta = this.#meta.get(digest)!;
        manifests.push(entry(meta, { [REPOSITORY_ANNOTATION]: repository }));
      }
      for (const [tag, digest] of [...repo.tags].sort(([a], [b]) => a.localeCompare(b))) {
        const meta = this.#meta.get(digest)!;
        manifests.push(
          entry(meta, { [REF_NAME]: `${repository}:${tag}`, [REPOSITORY_ANNOTATION]: repository, [TAG_ANNOTATION]: tag }),
        );
      }
    }
    const index = { schemaVersion: 2, mediaType: 'application/vnd.oci.image.index.v1+json', manifests };
    return Buffer.from(`${JSON.stringify(index, null, 2)}\n`);
  }

  /**
   * Rebuilds a catalog from index.json. `load` supplies the full metadata of each manifest
   * (subject, artifact type), which index.json does not carry.
   */
  static async fromIndexJson(
    bytes: Buffer,
    load: (digest: string) => Promise<ManifestMeta | undefined>,
  ): Promise<ManifestCatalog> {
    const catalog = new ManifestCatalog();
    const index = JSON.parse(bytes.toString('utf8')) as { manifests?: IndexEntry[] };
    for (const e of index.manifests ?? []) {
      const repository = e.annotations?.[REPOSITORY_ANNOTATION];
      if (!repository) continue; // an entry another tool added; not part of any Shoal repository
      const meta = await load(e.digest);
      if (!meta) continue;
      catalog.add(repository, meta, e.annotations[TAG_ANNOTATION]);
    }
    return catalog;
  }
}

function entry(meta: ManifestMeta, annotations: Record<string, string>): IndexEntry {
  return { mediaType: meta.mediaType, digest: meta.digest, size: meta.size, annotations };
}
