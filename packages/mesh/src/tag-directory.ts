import { readFile } from 'node:fs/promises';
import { TopicValidatorResult, type Message } from '@libp2p/gossipsub';
import { TypedEventEmitter, type PeerId, type PrivateKey } from '@libp2p/interface';
import { peerIdFromPrivateKey } from '@libp2p/peer-id';
import { writeFileAtomic } from './io.ts';
import { TableExchange } from './table-exchange.ts';
import type { MeshHost, MeshLog, MeshNode } from './mesh-host.ts';
import { silentLog, withoutUndefined } from './options.ts';
import {
  compareTagRecords,
  decodeTagRecord,
  decodeTagTable,
  encodeTagRecord,
  encodeTagTable,
  signTagRecord,
  verifyTagRecord,
  type TagFields,
  type TagRecord,
} from './tag-record.ts';

export const TAG_TOPIC = '/shoal/tags/1';
export const TAG_SYNC_PROTOCOL = '/shoal/tags/sync/1.0.0';

export interface TagDirectoryEvents {
  /**
   * A record, published here or received, became the current one for its repository:tag.
   * Records loaded from the file at start are the starting table, not news: no event.
   */
  tag: CustomEvent<TagRecord>;
}

export interface TagDirectoryOptions {
  /** This device's key; it signs published records and must be the host's identity. */
  privateKey: PrivateKey;
  /** JSON file the table is kept in across restarts, replaced atomically. Default none (memory only). */
  file?: string;
  /** Gossipsub topic records are published on. Default `/shoal/tags/1`. */
  topic?: string;
  /** Protocol of the table exchange with connected peers. Default `/shoal/tags/sync/1.0.0`. */
  syncProtocol?: string;
  /** Largest record accepted (and published), as a gossip message. Default 262 144 bytes (256 KiB). */
  maxRecordBytes?: number;
  /** Most repository:tag keys kept; records for further keys are ignored. Default 10 000. */
  maxRecords?: number;
  /** Largest table exchanged by sync; a bigger table is sent newest records first, cut to fit. Default 33 554 432 bytes (32 MiB). */
  maxSyncBytes?: number;
  /** Limit for one table exchange. Default 5 000 ms. */
  syncTimeoutMs?: number;
  /** How often the table is exchanged with one random connected peer, healing missed gossip. Default 30 000 ms. */
  resyncIntervalMs?: number;
  /** Default silent. */
  log?: MeshLog;
}

type ResolvedOptions = Required<Omit<TagDirectoryOptions, 'file'>> & Pick<TagDirectoryOptions, 'file'>;

// One exchange gives a peer the whole table, so a few in parallel are plenty.
const MAX_CONCURRENT_SYNCS = 4;

/**
 * Mesh-wide `repository:tag` -> manifest table. Every record is signed by the device that
 * published it and checked against the key in its publisher's peer id wherever it arrives, by
 * gossip or by a table exchange, so relays need not be trusted. For one tag the newest record
 * wins (compareTagRecords), which every node decides the same way.
 */
export class TagDirectory extends TypedEventEmitter<TagDirectoryEvents> {
  readonly #host: MeshHost;
  readonly #options: ResolvedOptions;
  /** Current record per `repository:tag`. */
  readonly #records = new Map<string, TagRecord>();
  readonly #exchange: TableExchange;
  #node: MeshNode | undefined;
  #loaded = false;
  #resyncTimer: NodeJS.Timeout | undefined;
  /** The file write under way; it writes again while #dirty, so writes never overlap. */
  #saving: Promise<void> | undefined;
  #dirty = false;
  #rejected = 0;

  constructor(host: MeshHost, options: TagDirectoryOptions) {
    super();
    this.#host = host;
    this.#options = {
      topic: TAG_TOPIC,
      syncProtocol: TAG_SYNC_PROTOCOL,
      maxRecordBytes: 256 * 1024,
      maxRecords: 10_000,
      maxSyncBytes: 32 * 1024 * 1024,
      syncTimeoutMs: 5_000,
      resyncIntervalMs: 30_000,
      log: silentLog,
      ...withoutUndefined(options),
    };
    if (!this.#options.privateKey) throw new TypeError('TagDirectory needs the device privateKey');
    for (const key of ['maxRecordBytes', 'maxRecords', 'maxSyncBytes', 'syncTimeoutMs', 'resyncIntervalMs'] as const) {
      if (!(this.#options[key] > 0)) throw new RangeError(`TagDirectory ${key} must be positive`);
    }
    this.#exchange = new TableExchange({
      protocol: this.#options.syncProtocol,
      maxBytes: () => this.#options.maxSyncBytes,
      timeoutMs: this.#options.syncTimeoutMs,
      maxConcurrent: MAX_CONCURRENT_SYNCS,
      table: () => this.#syncMessage(),
      merge: (bytes, from) => this.#mergeSync(bytes, from),
      name: 'tag sync',
      log: this.#options.log,
    });
  }

  /** Records dropped as malformed, oversized or badly signed (gossip, sync or file) since construction. */
  get rejectedRecords(): number {
    return this.#rejected;
  }

  /** Loads the file (first start only), joins the topic, serves the sync protocol and syncs with every connected peer. */
  async start(): Promise<void> {
    if (this.#node) return;
    const node = this.#host.node;
    if (!peerIdFromPrivateKey(this.#options.privateKey).equals(node.peerId)) {
      throw new Error('TagDirectory privateKey is not the key of the host peer id');
    }
    if (!this.#loaded) {
      await this.#load();
      this.#loaded = true;
    }
    const { topic, resyncIntervalMs } = this.#options;
    await this.#exchange.start(node);
    this.#node = node;
    node.services.pubsub.topicValidators.set(topic, this.#validate);
    node.services.pubsub.addEventListener('message', this.#onMessage);
    node.services.pubsub.subscribe(topic);
    node.addEventListener('peer:connect', this.#onConnect);
    this.#resyncTimer = setInterval(() => this.#resync(), resyncIntervalMs);
    for (const peer of node.getPeers()) void this.#exchange.with(peer);
  }

  /** Leaves the topic and stops serving syncs; resolves once the file holds the table. */
  async stop(): Promise<void> {
    const node = this.#node;
    if (!node) return;
    this.#node = undefined;
    clearInterval(this.#resyncTimer);
    const { topic } = this.#options;
    node.removeEventListener('peer:connect', this.#onConnect);
    node.services.pubsub.removeEventListener('message', this.#onMessage);
    if (node.status === 'started') node.services.pubsub.unsubscribe(topic);
    await this.#exchange.stop();
    node.services.pubsub.topicValidators.delete(topic);
    await this.#saving;
  }

  /**
   * Signs and applies a record for `repository:tag`, then gossips it. Its time is at least one
   * past the current record's, so a re-tag here always wins here, whatever the clocks say.
   * Resolves once the record is in the file. Throws TagFormatError for malformed fields and
   * RangeError when the record would exceed maxRecordBytes or the table is full.
   */
  async publish(fields: TagFields): Promise<TagRecord> {
    const node = this.#node;
    if (!node) throw new Error('TagDirectory is not started');
    const key = tagKey(fields.repository, fields.tag);
    let record: TagRecord;
    // Another record for the tag may land while signing; sign again after it so ours wins.
    do {
      const current = this.#records.get(key);
      if (!current && this.#records.size >= this.#options.maxRecords) {
        throw new RangeError(`TagDirectory already holds maxRecords (${this.#options.maxRecords}) tags`);
      }
      const time = Math.max(Date.now(), (current?.time ?? -1) + 1);
      record = await signTagRecord({ ...fields, time, publisher: node.peerId.toString() }, this.#options.privateKey);
      const bytes = encodeTagRecord(record).byteLength;
      if (bytes > this.#options.maxRecordBytes) {
        throw new RangeError(`tag record takes ${bytes} bytes, more than maxRecordBytes (${this.#options.maxRecordBytes})`);
      }
    } while (!this.#apply(record));
    await Promise.all([this.#persist(), this.#gossip(node, record)]);
    return record;
  }

  get(repository: string, tag: string): TagRecord | undefined {
    return this.#records.get(tagKey(repository, tag));
  }

  /** Every current record, by repository then tag. */
  list(): TagRecord[] {
    return [...this.#records.values()].sort((a, b) => order(a.repository, b.repository) || order(a.tag, b.tag));
  }

  /** The newest record that gives a chunk index digest for a blob. */
  recordNaming(blobDigest: string): TagRecord | undefined {
    let newest: TagRecord | undefined;
    for (const record of this.#records.values()) {
      if (Object.hasOwn(record.chunkIndexes, blobDigest) && (!newest || compareTagRecords(record, newest) > 0)) newest = record;
    }
    return newest;
  }

  /** The chunk index digest of a blob, from the newest record that names it. */
  chunkIndexDigest(blobDigest: string): string | undefined {
    return this.recordNaming(blobDigest)?.chunkIndexes[blobDigest];
  }

  async #gossip(node: MeshNode, record: TagRecord): Promise<void> {
    try {
      await node.services.pubsub.publish(this.#options.topic, encodeTagRecord(record));
    } catch (err) {
      // Alone on the topic: the record is applied here and the next sync spreads it.
      if ((err as Error).message === 'PublishError.NoPeersSubscribedToTopic') return;
      this.#options.log.warn({ err, ...about(record) }, 'tag record not gossiped');
    }
  }

  /** Makes `record` current if it beats the current one for its tag; false if it does not or the table is full. */
  #apply(record: TagRecord, announce = true): boolean {
    const key = tagKey(record.repository, record.tag);
    const current = this.#records.get(key);
    if (current && compareTagRecords(record, current) <= 0) return false;
    if (!current && this.#records.size >= this.#options.maxRecords) {
      this.#options.log.warn({ ...about(record), max: this.#options.maxRecords }, 'tag table full, record ignored');
      return false;
    }
    // Handed out by get(), list() and events: frozen so no caller can change the table.
    Object.freeze(record.chunkIndexes);
    this.#records.set(key, Object.freeze(record));
    if (announce) this.dispatchEvent(new CustomEvent('tag', { detail: record }));
    return true;
  }

  /** True if `record` would beat the current record for its tag; checked before the (costlier) signature. */
  #isNews(record: TagRecord): boolean {
    const current = this.#records.get(tagKey(record.repository, record.tag));
    return !current || compareTagRecords(record, current) > 0;
  }

  /** Verifies and applies a schema-checked record from a peer; a bad signature drops it. */
  async #admit(record: TagRecord, from: string): Promise<boolean> {
    if (!this.#isNews(record)) return false;
    if (!(await verifyTagRecord(record))) {
      this.#rejected++;
      this.#options.log.warn({ from, ...about(record) }, 'tag record with a bad signature dropped');
      return false;
    }
    return this.#apply(record);
  }

  /** Gossipsub topic validator: a rejected message is neither delivered nor forwarded. */
  #validate = async (_propagationSource: PeerId, message: Message): Promise<TopicValidatorResult> => {
    const record = this.#decodeGossip(message);
    if (!record) return TopicValidatorResult.Reject;
    // Stale or replayed: drop quietly without penalising whoever forwarded it.
    if (!this.#isNews(record)) return TopicValidatorResult.Ignore;
    if (await verifyTagRecord(record)) return TopicValidatorResult.Accept;
    this.#rejected++;
    this.#options.log.warn(about(record), 'gossiped tag record with a bad signature');
    return TopicValidatorResult.Reject;
  };

  #onMessage = (evt: CustomEvent<Message>): void => {
    if (evt.detail.topic !== this.#options.topic) return;
    const record = this.#decodeGossip(evt.detail);
    if (!record) return;
    // The validator checked the signature, but other records may have landed since.
    void this.#admit(record, evt.detail.type === 'signed' ? evt.detail.from.toString() : 'unknown').then((applied) => {
      if (applied) return this.#persist();
    });
  };

  #decodeGossip(message: Message): TagRecord | undefined {
    try {
      return decodeTagRecord(message.data, this.#options.maxRecordBytes);
    } catch (err) {
      this.#rejected++;
      this.#options.log.debug({ from: message.type === 'signed' ? message.from.toString() : 'unknown', err }, 'malformed tag record');
      return undefined;
    }
  }

  #onConnect = (evt: CustomEvent<PeerId>): void => {
    void this.#exchange.with(evt.detail);
  };

  #resync(): void {
    const peers = this.#node?.getPeers() ?? [];
    if (peers.length > 0) void this.#exchange.with(peers[Math.floor(Math.random() * peers.length)]);
  }

  get #tableLimits() {
    const { maxSyncBytes, maxRecords, maxRecordBytes } = this.#options;
    return { maxBytes: maxSyncBytes, maxRecords, maxRecordBytes };
  }

  /** The table as a sync message: all of it, or the newest records that fit in maxSyncBytes. */
  #syncMessage(): Uint8Array {
    const { maxSyncBytes, log } = this.#options;
    const records = [...this.#records.values()];
    const all = encodeTagTable(records);
    if (all.byteLength <= maxSyncBytes) return all;
    records.sort((a, b) => compareTagRecords(b, a));
    // Slack for the table's own framing, then the records' bytes plus a separator each.
    let budget = maxSyncBytes - 64;
    const fitting = records.filter((record) => {
      const bytes = encodeTagRecord(record).byteLength + 1;
      if (bytes > budget) return false;
      budget -= bytes;
      return true;
    });
    log.warn({ records: records.length, sent: fitting.length, maxSyncBytes }, 'tag table exceeds maxSyncBytes, sync sends the newest records');
    return encodeTagTable(fitting);
  }

  /** Decodes a peer's table and admits every record in it; throws (ending that stream only) if it is malformed. */
  async #mergeSync(bytes: Uint8Array, remotePeer: PeerId): Promise<void> {
    const from = remotePeer.toString();
    let records: TagRecord[];
    try {
      records = decodeTagTable(bytes, this.#tableLimits);
    } catch (err) {
      this.#rejected++;
      throw err;
    }
    let applied = 0;
    for (const record of records) if (await this.#admit(record, from)) applied++;
    if (applied > 0) await this.#persist();
  }

  /** Reads the file into the table; a record in it that is malformed or badly signed is dropped. */
  async #load(): Promise<void> {
    const { file } = this.#options;
    if (file === undefined) return;
    let bytes: Uint8Array;
    try {
      bytes = await readFile(file);
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') return;
      throw err;
    }
    let records: TagRecord[];
    try {
      // This node wrote it: bounded by maxRecords when written, which may have been set higher then.
      records = decodeTagTable(bytes, { ...this.#tableLimits, maxBytes: Infinity, maxRecords: Infinity });
    } catch (err) {
      // Never silently replaced: it may hold records published here that no other node has yet.
      throw new Error(`${file} is not a tag table: ${(err as Error).message}`, { cause: err });
    }
    for (const record of records) {
      if (!(await verifyTagRecord(record))) {
        this.#rejected++;
        this.#options.log.warn({ file, ...about(record) }, 'tag record in file with a bad signature dropped');
        continue;
      }
      this.#apply(record, false);
    }
  }

  /** Writes the table to the file soon; resolves once a write that includes the table as it is now is done. */
  #persist(): Promise<void> {
    if (this.#options.file === undefined) return Promise.resolve();
    this.#dirty = true;
    this.#saving ??= this.#save(this.#options.file);
    return this.#saving;
  }

  async #save(file: string): Promise<void> {
    while (this.#dirty) {
      this.#dirty = false;
      try {
        await writeFileAtomic(file, encodeTagTable(this.list()));
      } catch (err) {
        this.#options.log.warn({ file, err }, 'tag table not saved');
      }
    }
    this.#saving = undefined;
  }
}

function tagKey(repository: string, tag: string): string {
  // A repository never contains ':', so the key is unambiguous.
  return `${repository}:${tag}`;
}

/** Log fields naming a record. */
function about(record: TagRecord): { publisher: string; repository: string; tag: string } {
  return { publisher: record.publisher, repository: record.repository, tag: record.tag };
}

function order(a: string, b: string): number {
  return a < b ? -1 : a > b ? 1 : 0;
}
