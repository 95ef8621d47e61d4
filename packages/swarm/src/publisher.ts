import { MAX_CARRIED_MANIFEST_BYTES, silentLog, type TagFields } from '@shoal/mesh';
import { referencedBlobs, type ParsedManifest } from '@shoal/oci';
import { chunkIndexDigest, type BlobInfo, type ContentStore } from '@shoal/store';
import type { ProviderDirectory } from './types.ts';

/** The mesh-wide tag table (TagDirectory), as the publisher needs it. */
export interface TagPublisher {
  get(repository: string, tag: string): { digest: string } | undefined;
  publish(fields: TagFields): Promise<unknown>;
}

export interface MeshPublisherOptions {
  store: ContentStore;
  directory: ProviderDirectory;
  tags: TagPublisher;
  log?: { debug(obj: object, msg: string): void; warn(obj: object, msg: string): void };
}


/**
 * Tells the mesh what this device holds as the store changes: every committed blob gets a
 * provider record, a deleted one is withdrawn, and a tag set here (a push, a pull-through) is
 * published as a signed tag record naming the chunk index of each blob it references, and
 * carrying the manifest itself when it is small.
 */
export class MeshPublisher {
  readonly #store: ContentStore;
  readonly #directory: ProviderDirectory;
  readonly #tags: TagPublisher;
  readonly #log: NonNullable<MeshPublisherOptions['log']>;
  #running = false;

  constructor(options: MeshPublisherOptions) {
    this.#store = options.store;
    this.#directory = options.directory;
    this.#tags = options.tags;
    this.#log = options.log ?? silentLog;
  }

  start(): void {
    if (this.#running) return;
    this.#running = true;
    this.#store.on('blob:committed', this.#onCommitted);
    this.#store.on('blob:deleted', this.#onDeleted);
    this.#store.on('tagged', this.#onTagged);
  }

  stop(): void {
    this.#running = false;
    this.#store.off('blob:committed', this.#onCommitted);
    this.#store.off('blob:deleted', this.#onDeleted);
    this.#store.off('tagged', this.#onTagged);
  }

  /** Announces every blob the store holds (provider records live in memory, so after each start). */
  async announceInventory(): Promise<number> {
    let announced = 0;
    for (const digest of await this.#store.listBlobs()) {
      if (!this.#running) break;
      if (!digest.startsWith('sha256:')) continue;
      await this.#directory.announce(digest).then(
        () => announced++,
        (err) => this.#log.debug({ blob: digest, err }, 'announcing a stored blob failed'),
      );
    }
    return announced;
  }

  #onCommitted = ({ digest }: BlobInfo): void => {
    if (!digest.startsWith('sha256:')) return;
    this.#directory.announce(digest).catch((err) => this.#log.debug({ blob: digest, err }, 'announcing a blob failed'));
  };

  #onDeleted = (digest: string): void => {
    if (!digest.startsWith('sha256:')) return;
    this.#directory.withdraw(digest).catch((err) => this.#log.debug({ blob: digest, err }, 'withdrawing a blob failed'));
  };

  #onTagged = ({ repository, tag, manifest }: { repository: string; tag: string; manifest: ParsedManifest }): void => {
    // A tag set from the mesh's own record is not news.
    if (this.#tags.get(repository, tag)?.digest === manifest.digest) return;
    void this.#publishTag(repository, tag, manifest);
  };

  async #publishTag(repository: string, tag: string, manifest: ParsedManifest): Promise<void> {
    try {
      const chunkIndexes: Record<string, string> = {};
      for (const { digest } of referencedBlobs(manifest)) {
        const index = await this.#store.chunkIndex(digest).catch(() => undefined);
        if (index) chunkIndexes[digest] = chunkIndexDigest(index);
      }
      await this.#tags.publish({
        repository,
        tag,
        digest: manifest.digest,
        mediaType: manifest.mediaType,
        size: manifest.bytes.byteLength,
        chunkIndexes,
        ...(manifest.bytes.byteLength <= MAX_CARRIED_MANIFEST_BYTES && { manifest: manifest.bytes.toString('base64') }),
      });
      this.#log.debug({ repository, tag, digest: manifest.digest }, 'tag published to the mesh');
    } catch (err) {
      this.#log.warn({ repository, tag, err }, 'publishing a tag to the mesh failed');
    }
  }
}
