import type { BlobInfo, BlobReader, ByteRange, ContentStore, StoredManifest } from '@shoal/store';

/**
 * The small interface the gateway reads through. Repository names are full names with the
 * registry namespace first (`docker.io/library/nginx`). Writes, tags, the catalog and referrers
 * go straight to `store`; reads may be satisfied from elsewhere (peers, an upstream registry)
 * and cached into the store on the way.
 */
export interface Registry {
  readonly store: ContentStore;
  getManifest(repository: string, reference: string): Promise<StoredManifest | undefined>;
  statBlob(repository: string, digest: string): Promise<BlobInfo | undefined>;
  /** Throws RangeNotSatisfiableError when `range` lies outside the blob. */
  readBlob(repository: string, digest: string, range?: ByteRange): Promise<BlobReader | undefined>;
  /** Whether what the store lacks in `repository` is asked of an upstream registry. Default false. */
  pullsThrough?(repository: string): boolean;
}

/** A registry that serves only what the local store holds. */
export class LocalRegistry implements Registry {
  readonly store: ContentStore;

  constructor(store: ContentStore) {
    this.store = store;
  }

  getManifest(repository: string, reference: string): Promise<StoredManifest | undefined> {
    return this.store.getManifest(repository, reference);
  }

  statBlob(_repository: string, digest: string): Promise<BlobInfo | undefined> {
    return this.store.statBlob(digest);
  }

  readBlob(_repository: string, digest: string, range?: ByteRange): Promise<BlobReader | undefined> {
    return this.store.readBlob(digest, range);
  }
}
