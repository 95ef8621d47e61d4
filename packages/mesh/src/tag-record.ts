import { createHash } from 'node:crypto';
import type { PrivateKey } from '@libp2p/interface';
import { peerIdFromString } from '@libp2p/peer-id';

/** Wire and file format version of tag records and tables; a new format gets a new topic and protocol. */
export const TAG_FORMAT_VERSION = 1;
/** Most blobs one record may name in chunkIndexes. */
export const MAX_CHUNK_INDEXES = 1024;
/**
 * Largest manifest a record carries. Image manifests and indexes are mostly 0.5-4 KiB; a larger
 * one is fetched from a holder instead, so records (which every device keeps) stay small.
 */
export const MAX_CARRIED_MANIFEST_BYTES = 8 * 1024;

// Signed bytes start with this so a tag signature can never pass for any other message signed by
// the device key (the same key signs pubsub messages and the noise handshake).
const SIGNATURE_DOMAIN = new TextEncoder().encode('shoal-tag-record:');
// Repository = registry namespace (as the gateway accepts it: DNS name or IPv4 with an optional
// port, or a bracketed IPv6 literal) + '/' + OCI name. Mirrors @shoal/oci reference.ts.
const NAME_COMPONENT = '[a-z0-9]+(?:(?:\\.|_|__|-+)[a-z0-9]+)*';
const NAME = new RegExp(`^${NAME_COMPONENT}(?:/${NAME_COMPONENT})*$`);
const REGISTRY = /^(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)*|\[[0-9a-fA-F:.]+\])(?::[0-9]{1,5})?$/;
const MAX_NAME = 255;
const TAG = /^[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}$/;
const DIGEST = /^sha256:[0-9a-f]{64}$/;
// RFC 6838 type/subtype without parameters, as manifest media types are.
const MEDIA_TYPE = /^[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}\/[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}$/;
const BASE64 = /^[A-Za-z0-9+/_-]+={0,2}$/;
const MAX_SIGNATURE = 512;
const MAX_PEER_ID = 128;

/** What publish() is given: the tag and the manifest it names. */
export interface TagFields {
  /** Registry namespace and name, e.g. `docker.io/library/app`. */
  repository: string;
  /** OCI tag: `[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}`. */
  tag: string;
  /** Manifest digest, `sha256:<64 hex>`. */
  digest: string;
  /** Manifest media type. */
  mediaType: string;
  /** Manifest size in bytes. */
  size: number;
  /** Blob digest -> digest of that blob's chunk index, for layers and config; at most 1024 entries. */
  chunkIndexes: Record<string, string>;
  /**
   * The manifest's bytes, base64, when it is at most MAX_CARRIED_MANIFEST_BYTES, so a device
   * serves the tag without fetching the manifest from a holder. Not signed, and need not be:
   * it must hash to the signed `digest`, or the whole record is malformed.
   */
  manifest?: string;
}

/** A mesh-wide `repository:tag` -> manifest mapping, signed by the device that published it. */
export interface TagRecord extends TagFields {
  /** Publisher's clock at publish (ms since the epoch); the newer record for a tag wins. */
  time: number;
  /** Peer id of the publishing device; its key verifies the signature. */
  publisher: string;
  /** base64url of the publisher's signature over tagSigningBytes(record). */
  signature: string;
}

export class TagFormatError extends Error {
  override name = 'TagFormatError';
}

/**
 * Orders two records for the same tag; the greater one wins. Newer time first, then publisher,
 * then signature, so every node picks the same winner whatever order records arrive in.
 */
export function compareTagRecords(a: TagRecord, b: TagRecord): number {
  return compare(a.time, b.time) || compare(a.publisher, b.publisher) || compare(a.signature, b.signature);
}

/** The bytes a record's signature covers: a domain prefix, then fixed-key-order JSON of every field but signature and the carried manifest. */
export function tagSigningBytes(record: Omit<TagRecord, 'signature'>): Uint8Array {
  const json = new TextEncoder().encode(JSON.stringify(unsigned(record)));
  const bytes = new Uint8Array(SIGNATURE_DOMAIN.byteLength + json.byteLength);
  bytes.set(SIGNATURE_DOMAIN);
  bytes.set(json, SIGNATURE_DOMAIN.byteLength);
  return bytes;
}

/** Checks the fields and signs them; the publisher is the key's peer id. */
export async function signTagRecord(fields: TagFields & { time: number; publisher: string }, privateKey: PrivateKey): Promise<TagRecord> {
  const record = { ...checkTagFields(fields), time: checkInteger(fields.time, 'time'), publisher: checkPublisher(fields.publisher, 'publisher') };
  const signature = await privateKey.sign(tagSigningBytes(record));
  return { ...record, signature: Buffer.from(signature).toString('base64url') };
}

/** True if the publisher's key, taken from its peer id, verifies the signature. */
export async function verifyTagRecord(record: TagRecord): Promise<boolean> {
  try {
    const publicKey = peerIdFromString(record.publisher).publicKey;
    if (!publicKey) return false;
    return await publicKey.verify(tagSigningBytes(record), Buffer.from(record.signature, 'base64url'));
  } catch {
    return false;
  }
}

/** One record as gossiped. */
export function encodeTagRecord(record: TagRecord): Uint8Array {
  return new TextEncoder().encode(JSON.stringify({ v: TAG_FORMAT_VERSION, ...canonical(record) }));
}

/** Parses and schema-checks a gossiped record (the signature is not checked); throws TagFormatError. */
export function decodeTagRecord(bytes: Uint8Array, maxBytes: number): TagRecord {
  return parseTagRecord(parseVersionedJson(bytes, maxBytes, 'tag record'), 'tag record');
}

/** A whole table, as exchanged by sync and kept in the directory's file. */
export function encodeTagTable(records: TagRecord[]): Uint8Array {
  return new TextEncoder().encode(JSON.stringify({ v: TAG_FORMAT_VERSION, records: records.map(canonical) }));
}

export interface TagTableLimits {
  maxBytes: number;
  maxRecords: number;
  /** Each record must fit in a gossip message of this size, as if its publisher had sent it. */
  maxRecordBytes: number;
}

/** Parses a table (signatures are not checked); one malformed record makes the whole table malformed. */
export function decodeTagTable(bytes: Uint8Array, { maxBytes, maxRecords, maxRecordBytes }: TagTableLimits): TagRecord[] {
  const { records } = parseVersionedJson(bytes, maxBytes, 'tag table');
  if (!Array.isArray(records)) throw new TagFormatError('tag table: records is not an array');
  if (records.length > maxRecords) throw new TagFormatError(`tag table: ${records.length} records, more than ${maxRecords}`);
  return records.map((value, index) => {
    const where = `tag table: records[${index}]`;
    const record = parseTagRecord(value, where);
    const recordBytes = encodeTagRecord(record).byteLength;
    if (recordBytes > maxRecordBytes) {
      throw new TagFormatError(`${where} takes ${recordBytes} bytes, more than a record may (${maxRecordBytes})`);
    }
    return record;
  });
}

/** Throws TagFormatError unless `value` holds well-formed tag fields; returns only those fields. */
export function checkTagFields(value: unknown, where = 'tag'): TagFields {
  if (!isPlainObject(value)) throw new TagFormatError(`${where} is not an object`);
  const { chunkIndexes } = value;
  if (!isPlainObject(chunkIndexes)) throw new TagFormatError(`${where}.chunkIndexes is not an object`);
  const entries = Object.entries(chunkIndexes);
  if (entries.length > MAX_CHUNK_INDEXES) throw new TagFormatError(`${where}.chunkIndexes has more than ${MAX_CHUNK_INDEXES} entries`);
  for (const [blob, index] of entries) {
    if (!DIGEST.test(blob)) throw new TagFormatError(`${where}.chunkIndexes has a key that is not a sha256 digest`);
    checkPattern(index, `${where}.chunkIndexes[${blob}]`, DIGEST, 71);
  }
  return {
    repository: checkRepository(value.repository, `${where}.repository`),
    tag: checkPattern(value.tag, `${where}.tag`, TAG, 128),
    digest: checkPattern(value.digest, `${where}.digest`, DIGEST, 71),
    mediaType: checkPattern(value.mediaType, `${where}.mediaType`, MEDIA_TYPE, 255),
    size: checkInteger(value.size, `${where}.size`),
    chunkIndexes: Object.fromEntries(entries) as Record<string, string>,
    ...(value.manifest !== undefined && { manifest: checkCarriedManifest(value, `${where}.manifest`) }),
  };
}

/** The carried manifest of checked-so-far fields `value`, in standard base64, if it is the one `digest` names. */
function checkCarriedManifest(value: Record<string, unknown>, where: string): string {
  const { manifest } = value;
  if (typeof manifest !== 'string' || manifest.length > Math.ceil(MAX_CARRIED_MANIFEST_BYTES / 3) * 4 || !BASE64.test(manifest)) {
    throw new TagFormatError(`${where} is not base64 of at most ${MAX_CARRIED_MANIFEST_BYTES} bytes`);
  }
  const bytes = Buffer.from(manifest, 'base64');
  if (bytes.byteLength !== value.size || `sha256:${createHash('sha256').update(bytes).digest('hex')}` !== value.digest) {
    throw new TagFormatError(`${where} does not match the record's digest and size`);
  }
  // One encoding only, so equal records encode equally wherever they came from.
  return bytes.toString('base64');
}

/** Checks every field and returns only the known ones, with the signature in base64url. */
function parseTagRecord(value: unknown, where: string): TagRecord {
  const fields = checkTagFields(value, where);
  const { time, publisher, signature } = value as Record<string, unknown>;
  return {
    ...fields,
    time: checkInteger(time, `${where}.time`),
    publisher: checkPublisher(publisher, `${where}.publisher`),
    // One encoding only, so equal records compare equal wherever they came from.
    signature: Buffer.from(checkPattern(signature, `${where}.signature`, BASE64, MAX_SIGNATURE), 'base64url').toString('base64url'),
  };
}

/** Every field in a fixed order, chunkIndexes sorted by blob digest. */
function canonical(record: TagRecord): TagRecord {
  return { ...unsigned(record), ...(record.manifest !== undefined && { manifest: record.manifest }), signature: record.signature };
}

function unsigned(record: Omit<TagRecord, 'signature'>): Omit<TagRecord, 'signature'> {
  const chunkIndexes = Object.fromEntries(Object.entries(record.chunkIndexes).sort(([a], [b]) => compare(a, b)));
  const { repository, tag, digest, mediaType, size, time, publisher } = record;
  return { repository, tag, digest, mediaType, size, chunkIndexes, time, publisher };
}

function checkRepository(value: unknown, where: string): string {
  if (typeof value !== 'string') throw new TagFormatError(`${where} is not a string`);
  const slash = value.indexOf('/');
  const registry = value.slice(0, slash);
  const name = value.slice(slash + 1);
  if (slash < 0 || registry.length > MAX_NAME || !REGISTRY.test(registry) || name.length > MAX_NAME || !NAME.test(name)) {
    throw new TagFormatError(`${where} is not a registry namespace and OCI repository name: ${JSON.stringify(value.slice(0, 80))}`);
  }
  return value;
}

/** A peer id whose public key is inline (Ed25519, secp256k1), so a signature can be checked without a lookup. */
function checkPublisher(value: unknown, where: string): string {
  if (typeof value !== 'string' || value.length > MAX_PEER_ID) throw new TagFormatError(`${where} is not a peer id`);
  let hasKey: boolean;
  try {
    hasKey = peerIdFromString(value).publicKey !== undefined;
  } catch {
    throw new TagFormatError(`${where} is not a peer id`);
  }
  if (!hasKey) throw new TagFormatError(`${where} does not carry its public key`);
  return value;
}

function checkPattern(value: unknown, where: string, pattern: RegExp, maxLength: number): string {
  if (typeof value !== 'string' || value.length > maxLength || !pattern.test(value)) {
    throw new TagFormatError(`${where} does not match ${pattern.source}`);
  }
  return value;
}

function checkInteger(value: unknown, where: string): number {
  if (!Number.isSafeInteger(value) || (value as number) < 0) throw new TagFormatError(`${where} is not a non-negative integer`);
  return value as number;
}

function parseVersionedJson(bytes: Uint8Array, maxBytes: number, what: string): Record<string, unknown> {
  if (bytes.byteLength > maxBytes) throw new TagFormatError(`${what} of ${bytes.byteLength} bytes exceeds ${maxBytes}`);
  let value: unknown;
  try {
    value = JSON.parse(new TextDecoder('utf-8', { fatal: true }).decode(bytes));
  } catch (err) {
    throw new TagFormatError(`${what} is not UTF-8 JSON: ${(err as Error).message}`);
  }
  if (!isPlainObject(value)) throw new TagFormatError(`${what} is not a JSON object`);
  if (value.v !== TAG_FORMAT_VERSION) throw new TagFormatError(`${what} has version ${JSON.stringify(value.v)}, expected ${TAG_FORMAT_VERSION}`);
  return value;
}

// Code-unit order, the same on every node (localeCompare is not).
function compare(a: string | number, b: string | number): number {
  return a < b ? -1 : a > b ? 1 : 0;
}

function isPlainObject(value: unknown): value is Record<string, unknown> {
  return typeof value === 'object' && value !== null && !Array.isArray(value);
}
