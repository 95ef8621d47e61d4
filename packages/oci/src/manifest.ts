import { parseDigest, sha256Of } from './digest.ts';
import { isIndexMediaType, isManifestMediaType, MediaType } from './media-types.ts';

export interface Descriptor {
  mediaType: string;
  digest: string;
  size: number;
  annotations?: Record<string, string>;
  artifactType?: string;
  platform?: Record<string, unknown>;
}

/**
 * A manifest or index together with the exact bytes it arrived as. The digest is always
 * computed over those bytes; the bytes are never re-serialised.
 */
export interface ParsedManifest {
  readonly bytes: Buffer;
  readonly digest: string;
  readonly mediaType: string;
  readonly kind: 'manifest' | 'index';
  readonly config?: Descriptor;
  readonly layers: readonly Descriptor[];
  /** Child manifests of an index. */
  readonly manifests: readonly Descriptor[];
  readonly subject?: Descriptor;
  readonly artifactType?: string;
  readonly annotations?: Record<string, string>;
}

export class InvalidManifestError extends Error {
  override name = 'InvalidManifestError';
}

/**
 * Parses manifest bytes. `contentType` is the media type the client declared (the
 * Content-Type of a PUT); it wins over a missing `mediaType` field, and must agree with a
 * present one.
 */
export function parseManifest(bytes: Buffer, contentType?: string): ParsedManifest {
  let doc: unknown;
  try {
    doc = JSON.parse(bytes.toString('utf8'));
  } catch {
    throw new InvalidManifestError('manifest is not valid JSON');
  }
  if (!isObject(doc)) throw new InvalidManifestError('manifest must be a JSON object');
  if (doc.schemaVersion !== 2) throw new InvalidManifestError('schemaVersion must be 2');
  const declared = contentType ? stripParams(contentType) : undefined;
  const field = doc.mediaType;
  if (field !== undefined && typeof field !== 'string') throw new InvalidManifestError('mediaType must be a string');
  if (declared && isManifestMediaType(declared) && field !== undefined && field !== declared) {
    throw new InvalidManifestError(`mediaType "${field}" does not match Content-Type "${declared}"`);
  }
  let mediaType = (declared && isManifestMediaType(declared) ? declared : undefined) ?? field;
  if (mediaType === undefined) {
    // OCI manifests may omit mediaType; tell the two kinds apart by shape.
    mediaType = Array.isArray(doc.manifests) ? MediaType.OciIndex : MediaType.OciManifest;
  }
  if (!isManifestMediaType(mediaType)) throw new InvalidManifestError(`unsupported manifest media type "${mediaType}"`);

  const kind = isIndexMediaType(mediaType) ? 'index' : 'manifest';
  const out: {
    -readonly [K in keyof ParsedManifest]: ParsedManifest[K];
  } = { bytes, digest: sha256Of(bytes), mediaType, kind, layers: [], manifests: [] };
  if (kind === 'manifest') {
    out.config = descriptor(doc.config, 'config');
    if (!Array.isArray(doc.layers)) throw new InvalidManifestError('layers must be an array');
    out.layers = doc.layers.map((l, i) => descriptor(l, `layers[${i}]`));
  } else {
    if (!Array.isArray(doc.manifests)) throw new InvalidManifestError('manifests must be an array');
    out.manifests = doc.manifests.map((m, i) => descriptor(m, `manifests[${i}]`));
  }
  if (doc.subject !== undefined) out.subject = descriptor(doc.subject, 'subject');
  if (doc.artifactType !== undefined) {
    if (typeof doc.artifactType !== 'string') throw new InvalidManifestError('artifactType must be a string');
    out.artifactType = doc.artifactType;
  }
  if (doc.annotations !== undefined) out.annotations = stringMap(doc.annotations, 'annotations');
  return out;
}

/** The blobs (config and layers) a manifest needs; an index needs manifests instead. */
export function referencedBlobs(m: ParsedManifest): Descriptor[] {
  return m.config ? [m.config, ...m.layers] : [...m.layers];
}

/** The artifact type the referrers API reports: artifactType, else the config media type. */
export function effectiveArtifactType(m: ParsedManifest): string | undefined {
  return m.artifactType ?? m.config?.mediaType;
}

function descriptor(value: unknown, where: string): Descriptor {
  if (!isObject(value)) throw new InvalidManifestError(`${where} must be a descriptor object`);
  const { mediaType, digest, size } = value;
  if (typeof mediaType !== 'string' || mediaType === '') throw new InvalidManifestError(`${where}.mediaType missing`);
  if (typeof digest !== 'string') throw new InvalidManifestError(`${where}.digest missing`);
  try {
    parseDigest(digest);
  } catch (err) {
    throw new InvalidManifestError(`${where}.digest: ${(err as Error).message}`);
  }
  if (typeof size !== 'number' || !Number.isSafeInteger(size) || size < 0) {
    throw new InvalidManifestError(`${where}.size must be a non-negative integer`);
  }
  const d: Descriptor = { mediaType, digest, size };
  if (value.annotations !== undefined) d.annotations = stringMap(value.annotations, `${where}.annotations`);
  if (typeof value.artifactType === 'string') d.artifactType = value.artifactType;
  if (isObject(value.platform)) d.platform = value.platform;
  return d;
}

function stringMap(value: unknown, where: string): Record<string, string> {
  if (!isObject(value)) throw new InvalidManifestError(`${where} must be an object`);
  for (const v of Object.values(value)) {
    if (typeof v !== 'string') throw new InvalidManifestError(`${where} values must be strings`);
  }
  return value as Record<string, string>;
}

function isObject(v: unknown): v is Record<string, unknown> {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

function stripParams(contentType: string): string {
  return contentType.split(';')[0]!.trim();
}
