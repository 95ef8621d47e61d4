import { isIP } from 'node:net';
import { peerIdFromString } from '@libp2p/peer-id';
import { multiaddr } from '@multiformats/multiaddr';

/** Wire format version of heartbeats and sync messages; a new format gets a new topic and protocol. */
export const MEMBERSHIP_FORMAT_VERSION = 2;

// Field limits: they keep one heartbeat well under the default 8 KiB message limit.
export const MAX_ADDRESSES = 16;
export const MAX_LABELS = 32;
const MAX_TEXT = 256;
const MAX_LABEL_KEY = 64;
const MAX_URL = 1024;
export const MAX_SERVICES = 64;
export const MAX_SERVICE_META = 16;
const MAX_META_KEY = 64;
const MAX_META_VALUE = 256;
const SERVICE_NAME = /^[a-z0-9][a-z0-9._-]{0,62}$/;
const SERVICE_PROTOCOL = /^[a-z][a-z0-9+.-]{0,31}$/;
const SERVICE_URL_SCHEMES = new Set(['http:', 'https:', 'tcp:']);
// A DNS name or an IPv4 address; IPv6 is checked with isIP.
const HOST_NAME = /^(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$/;

/** A service as announced in its device's heartbeat. */
export interface ServiceRecord {
  /** Unique per device. */
  name: string;
  /** Either a port on the device's service host... */
  port?: number;
  /** ...or an explicit http(s)/tcp URL. */
  url?: string;
  /** e.g. http, grpc, tcp, udp. */
  protocol: string;
  meta?: Record<string, string>;
  /** Time left to live when the record was sent (sender's `ts`); none means as long as the device lives. */
  ttlMs?: number;
}

/** What a node announces about itself: sent when it changes, and in every table sync. */
export interface MemberRecord {
  peerId: string;
  /** Device name. */
  name: string;
  /** libp2p listen addresses. */
  addresses: string[];
  /** OCI registry gateway URL, if the device serves one. */
  gateway?: string;
  /** Admin API URL, if the device serves one. */
  api?: string;
  labels: Record<string, string>;
  /** Software version. */
  version: string;
  /** Bytes used by the content store. */
  usageBytes: number;
  /** A non-negative load figure (e.g. load average or active transfers); higher is busier. */
  load: number;
  /**
   * The sender's sequence number when this description was last changed; it shares one counter
   * with the sender's beats, grows across restarts, and the newer record wins.
   */
  seq: number;
  /** Sender's clock (ms since the epoch) when sent; informational, liveness uses the receiver's clock. */
  ts: number;
  /** Host for the endpoints of port-based services; absent means taken from `addresses`. */
  serviceHost?: string;
  /** Registered services; absent means none. */
  services?: ServiceRecord[];
}

/** A member as relayed in a sync answer: the record plus how long ago the relaying node last heard it. */
export interface SyncedMember extends MemberRecord {
  ageMs: number;
}

export class MembershipFormatError extends Error {
  override name = 'MembershipFormatError';
}

/**
 * The small heartbeat a node sends while its record is unchanged: the signer is the member, so
 * it carries no peer id, only liveness, the changing figures and which record is current.
 */
export interface Beat {
  /** The sender's sequence number (shared with its records); newer than every earlier one. */
  seq: number;
  /** `seq` of the sender's current record: a receiver holding an older one asks for it. */
  recordSeq: number;
  usageBytes: number;
  load: number;
}

/**
 * A member's probe of another went unanswered: receivers treat the named member as suspect
 * unless they heard from it more recently, and the member itself, if alive, refutes it with a
 * heartbeat at once.
 */
export interface Suspicion {
  /** The member that did not answer. */
  peerId: string;
  /** The highest seq of that member the sender held: a heartbeat above it refutes the suspicion. */
  seq: number;
}

/**
 * A message on the membership topic: the sender's whole record, a beat, a suspicion, or a relay
 * (members the sender has just learned of, with the age of its news of each, as in a sync answer).
 */
export type Heartbeat =
  | { record: MemberRecord; beat?: never; suspicion?: never; relay?: never }
  | { beat: Beat; record?: never; suspicion?: never; relay?: never }
  | { suspicion: Suspicion; record?: never; beat?: never; relay?: never }
  | { relay: SyncedMember[]; record?: never; beat?: never; suspicion?: never };

/** A heartbeat carrying the whole record (sent at start and whenever the record changes). */
export function encodeHeartbeat(record: MemberRecord): Uint8Array {
  return new TextEncoder().encode(JSON.stringify({ v: MEMBERSHIP_FORMAT_VERSION, ...record }));
}

export function encodeBeat(beat: Beat): Uint8Array {
  return new TextEncoder().encode(JSON.stringify({ v: MEMBERSHIP_FORMAT_VERSION, beat }));
}

export function encodeSuspicion(suspicion: Suspicion): Uint8Array {
  return new TextEncoder().encode(JSON.stringify({ v: MEMBERSHIP_FORMAT_VERSION, suspicion }));
}

export function encodeRelay(members: SyncedMember[]): Uint8Array {
  return new TextEncoder().encode(JSON.stringify({ v: MEMBERSHIP_FORMAT_VERSION, relay: members }));
}

/** Parses and schema-checks a heartbeat; throws MembershipFormatError for anything malformed or over maxBytes. */
export function decodeHeartbeat(bytes: Uint8Array, maxBytes: number): Heartbeat {
  const message = parseVersionedJson(bytes, maxBytes, 'heartbeat');
  // The message's size bounds its entries: each fits in a heartbeat of its own as well.
  if (message.relay !== undefined) return { relay: parseSyncedMembers(message.relay, 'heartbeat.relay') };
  if (message.suspicion !== undefined) {
    const { suspicion } = message;
    if (!isPlainObject(suspicion)) throw new MembershipFormatError('heartbeat.suspicion is not an object');
    return {
      suspicion: {
        peerId: checkPeerId(suspicion.peerId, 'heartbeat.suspicion.peerId'),
        seq: checkNumber(suspicion.seq, 'heartbeat.suspicion.seq', { integer: true }),
      },
    };
  }
  if (message.beat === undefined) return { record: parseMemberRecord(message, 'heartbeat') };
  const { beat } = message;
  if (!isPlainObject(beat)) throw new MembershipFormatError('heartbeat.beat is not an object');
  return {
    beat: {
      seq: checkNumber(beat.seq, 'heartbeat.beat.seq', { integer: true }),
      recordSeq: checkNumber(beat.recordSeq, 'heartbeat.beat.recordSeq', { integer: true }),
      usageBytes: checkNumber(beat.usageBytes, 'heartbeat.beat.usageBytes', { integer: true }),
      load: checkNumber(beat.load, 'heartbeat.beat.load', { integer: false }),
    },
  };
}

export function encodeSync(members: SyncedMember[]): Uint8Array {
  return new TextEncoder().encode(JSON.stringify({ v: MEMBERSHIP_FORMAT_VERSION, members }));
}

export interface SyncLimits {
  maxBytes: number;
  maxMembers: number;
  /** Each member's record must fit in a heartbeat of this size, as if its owner had sent it. */
  maxHeartbeatBytes: number;
}

/** Parses a sync message; one malformed entry makes the whole message malformed. */
export function decodeSync(bytes: Uint8Array, { maxBytes, maxMembers, maxHeartbeatBytes }: SyncLimits): SyncedMember[] {
  const message = parseVersionedJson(bytes, maxBytes, 'sync message');
  return parseSyncedMembers(message.members, 'sync message: members', { maxMembers, maxHeartbeatBytes });
}

function parseSyncedMembers(members: unknown, where: string, limits?: Omit<SyncLimits, 'maxBytes'>): SyncedMember[] {
  if (!Array.isArray(members)) throw new MembershipFormatError(`${where} is not an array`);
  if (limits && members.length > limits.maxMembers) {
    throw new MembershipFormatError(`${where}: ${members.length} members, more than ${limits.maxMembers}`);
  }
  return members.map((value, index) => {
    const at = `${where}[${index}]`;
    const record = parseMemberRecord(value, at);
    if (limits) {
      const recordBytes = encodeHeartbeat(record).byteLength;
      if (recordBytes > limits.maxHeartbeatBytes) {
        throw new MembershipFormatError(`${at} takes ${recordBytes} bytes, more than a heartbeat may (${limits.maxHeartbeatBytes})`);
      }
    }
    const ageMs = (value as Record<string, unknown>).ageMs;
    return { ...record, ageMs: checkNumber(ageMs, `${at}.ageMs`, { integer: true }) };
  });
}

/** Throws MembershipFormatError unless `name` is an acceptable device name. */
export function checkName(value: unknown, where = 'name'): string {
  const name = checkText(value, where, MAX_TEXT);
  if (name.length === 0) throw new MembershipFormatError(`${where} is empty`);
  return name;
}

/** Throws MembershipFormatError unless `value` is an http(s) URL. */
export function checkUrl(value: unknown, where: string): string {
  const text = checkText(value, where, MAX_URL);
  const url = URL.parse(text);
  if (!url || (url.protocol !== 'http:' && url.protocol !== 'https:')) {
    throw new MembershipFormatError(`${where} is not an http(s) URL: ${JSON.stringify(text.slice(0, 80))}`);
  }
  return text;
}

/** Throws MembershipFormatError unless `value` is a DNS name, IPv4 or IPv6 address. */
export function checkHost(value: unknown, where: string): string {
  const host = checkText(value, where, 253);
  if (!HOST_NAME.test(host) && isIP(host) !== 6) throw new MembershipFormatError(`${where} is not a host name or IP address`);
  return host;
}

/** Throws MembershipFormatError unless `value` is a well-formed service record; returns only the known fields. */
export function checkService(value: unknown, where = 'service'): ServiceRecord {
  if (!isPlainObject(value)) throw new MembershipFormatError(`${where} is not an object`);
  const name = checkText(value.name, `${where}.name`, 63);
  if (!SERVICE_NAME.test(name)) throw new MembershipFormatError(`${where}.name ${JSON.stringify(name)} does not match ${SERVICE_NAME.source}`);
  const protocol = checkText(value.protocol, `${where}.protocol`, 32);
  if (!SERVICE_PROTOCOL.test(protocol)) {
    throw new MembershipFormatError(`${where}.protocol ${JSON.stringify(protocol)} does not match ${SERVICE_PROTOCOL.source}`);
  }
  const service: ServiceRecord = { name, protocol };
  if ((value.port === undefined) === (value.url === undefined)) throw new MembershipFormatError(`${where} needs either port or url`);
  if (value.port !== undefined) {
    const port = value.port;
    if (!Number.isInteger(port) || (port as number) < 1 || (port as number) > 65_535) {
      throw new MembershipFormatError(`${where}.port is not a port number (1-65535)`);
    }
    service.port = port as number;
  } else {
    const url = checkText(value.url, `${where}.url`, MAX_URL);
    if (!SERVICE_URL_SCHEMES.has(URL.parse(url)?.protocol ?? '')) {
      throw new MembershipFormatError(`${where}.url is not an http(s) or tcp URL: ${JSON.stringify(url.slice(0, 80))}`);
    }
    service.url = url;
  }
  if (value.meta !== undefined) {
    service.meta = checkStringMap(value.meta, `${where}.meta`, { maxEntries: MAX_SERVICE_META, maxKey: MAX_META_KEY, maxValue: MAX_META_VALUE });
  }
  if (value.ttlMs !== undefined) {
    const ttlMs = checkNumber(value.ttlMs, `${where}.ttlMs`, { integer: true });
    if (ttlMs === 0) throw new MembershipFormatError(`${where}.ttlMs is not positive`);
    service.ttlMs = ttlMs;
  }
  return service;
}

/** Throws MembershipFormatError unless `value` is a list of at most MAX_SERVICES services with distinct names. */
export function checkServices(value: unknown, where = 'services'): ServiceRecord[] {
  if (!Array.isArray(value) || value.length > MAX_SERVICES) {
    throw new MembershipFormatError(`${where} is not an array of at most ${MAX_SERVICES}`);
  }
  const services = value.map((service, index) => checkService(service, `${where}[${index}]`));
  const names = new Set(services.map((service) => service.name));
  if (names.size !== services.length) throw new MembershipFormatError(`${where} names a service twice`);
  return services;
}

/** Throws MembershipFormatError unless `value` is a flat string-to-string map within the label limits. */
export function checkLabels(value: unknown, where = 'labels'): Record<string, string> {
  return checkStringMap(value, where, { maxEntries: MAX_LABELS, maxKey: MAX_LABEL_KEY, maxValue: MAX_TEXT });
}

function checkStringMap(
  value: unknown,
  where: string,
  { maxEntries, maxKey, maxValue }: { maxEntries: number; maxKey: number; maxValue: number },
): Record<string, string> {
  if (!isPlainObject(value)) throw new MembershipFormatError(`${where} is not an object`);
  const entries = Object.entries(value);
  if (entries.length > maxEntries) throw new MembershipFormatError(`${where} has more than ${maxEntries} entries`);
  const map: Record<string, string> = {};
  for (const [key, text] of entries) {
    if (key.length === 0 || key.length > maxKey) {
      throw new MembershipFormatError(`${where} has a key of ${key.length} characters (1-${maxKey} allowed)`);
    }
    map[key] = checkText(text, `${where}.${key}`, maxValue);
  }
  return map;
}

function parseVersionedJson(bytes: Uint8Array, maxBytes: number, what: string): Record<string, unknown> {
  if (bytes.byteLength > maxBytes) throw new MembershipFormatError(`${what} of ${bytes.byteLength} bytes exceeds ${maxBytes}`);
  let value: unknown;
  try {
    value = JSON.parse(new TextDecoder('utf-8', { fatal: true }).decode(bytes));
  } catch (err) {
    throw new MembershipFormatError(`${what} is not UTF-8 JSON: ${(err as Error).message}`);
  }
  if (!isPlainObject(value)) throw new MembershipFormatError(`${what} is not a JSON object`);
  if (value.v !== MEMBERSHIP_FORMAT_VERSION) {
    throw new MembershipFormatError(`${what} has version ${JSON.stringify(value.v)}, expected ${MEMBERSHIP_FORMAT_VERSION}`);
  }
  return value;
}

/** Checks every field and returns only the known ones, so extra fields never reach the table. */
function parseMemberRecord(value: unknown, where: string): MemberRecord {
  if (!isPlainObject(value)) throw new MembershipFormatError(`${where} is not an object`);
  const peerId = checkPeerId(value.peerId, `${where}.peerId`);
  const { addresses } = value;
  if (!Array.isArray(addresses) || addresses.length > MAX_ADDRESSES) {
    throw new MembershipFormatError(`${where}.addresses is not an array of at most ${MAX_ADDRESSES}`);
  }
  const record: MemberRecord = {
    peerId,
    name: checkName(value.name, `${where}.name`),
    addresses: addresses.map((address, index) => checkMultiaddr(address, `${where}.addresses[${index}]`)),
    labels: checkLabels(value.labels, `${where}.labels`),
    version: checkText(value.version, `${where}.version`, 64),
    usageBytes: checkNumber(value.usageBytes, `${where}.usageBytes`, { integer: true }),
    load: checkNumber(value.load, `${where}.load`, { integer: false }),
    seq: checkNumber(value.seq, `${where}.seq`, { integer: true }),
    ts: checkNumber(value.ts, `${where}.ts`, { integer: true }),
  };
  if (value.gateway !== undefined) record.gateway = checkUrl(value.gateway, `${where}.gateway`);
  if (value.api !== undefined) record.api = checkUrl(value.api, `${where}.api`);
  if (value.serviceHost !== undefined) record.serviceHost = checkHost(value.serviceHost, `${where}.serviceHost`);
  if (value.services !== undefined) record.services = checkServices(value.services, `${where}.services`);
  return record;
}

function checkPeerId(value: unknown, where: string): string {
  const peerId = checkText(value, where, 128);
  try {
    peerIdFromString(peerId);
  } catch {
    throw new MembershipFormatError(`${where} is not a peer id`);
  }
  return peerId;
}

function checkMultiaddr(value: unknown, where: string): string {
  const text = checkText(value, where, MAX_TEXT);
  try {
    multiaddr(text);
  } catch {
    throw new MembershipFormatError(`${where} is not a multiaddr`);
  }
  return text;
}

function checkText(value: unknown, where: string, maxLength: number): string {
  if (typeof value !== 'string') throw new MembershipFormatError(`${where} is not a string`);
  if (value.length > maxLength) throw new MembershipFormatError(`${where} is longer than ${maxLength} characters`);
  return value;
}

function checkNumber(value: unknown, where: string, { integer }: { integer: boolean }): number {
  const valid = integer ? Number.isSafeInteger(value) : Number.isFinite(value);
  if (!valid || (value as number) < 0) {
    throw new MembershipFormatError(`${where} is not a non-negative ${integer ? 'integer' : 'number'}`);
  }
  return value as number;
}

function isPlainObject(value: unknown): value is Record<string, unknown> {
  return typeof value === 'object' && value !== null && !Array.isArray(value);
}
