import { arch, hostname, platform } from 'node:os';
import { TopicValidatorResult, type GossipSub, type Message, type SubscriptionChangeData } from '@libp2p/gossipsub';
import { TypedEventEmitter, type PeerId } from '@libp2p/interface';
import { peerIdFromString } from '@libp2p/peer-id';
import { multiaddr } from '@multiformats/multiaddr';
import {
  checkHost,
  checkLabels,
  checkName,
  checkService,
  checkUrl,
  decodeHeartbeat,
  decodeSync,
  encodeBeat,
  encodeHeartbeat,
  encodeRelay,
  encodeSuspicion,
  encodeSync,
  MAX_ADDRESSES,
  MAX_SERVICES,
  type Beat,
  type Heartbeat,
  type MemberRecord,
  type ServiceRecord,
  type Suspicion,
  type SyncedMember,
} from './membership-codec.ts';
import { silentLog, withoutUndefined } from './options.ts';
import { shuffle } from './shuffle.ts';
import { TableExchange } from './table-exchange.ts';
import type { MeshHost, MeshLog, MeshNode } from './mesh-host.ts';
import type { BeaconRecord } from './record-beacon.ts';

export const MEMBERSHIP_TOPIC = '/shoal/membership/2';
export const MEMBERSHIP_SYNC_PROTOCOL = '/shoal/membership/sync/2.0.0';

export type MemberStatus = 'alive' | 'suspect' | 'down';

/** One row of the membership table, as list() and the events give it; services() lists the services. */
export interface Member extends Omit<MemberRecord, 'ts' | 'services'> {
  status: MemberStatus;
  /** When this node last heard of the member (ms since the epoch, this node's clock), directly or via sync. */
  lastSeen: number;
  /** True for this node's own row. */
  self: boolean;
}

/** A service this device offers, as given to registerService(). */
export interface ServiceRegistration {
  /** Unique on this device: `[a-z0-9][a-z0-9._-]{0,62}`. */
  name: string;
  /** Either a port (endpoint: this device's service host and the port)... */
  port?: number;
  /** ...or an explicit http(s) or tcp URL. */
  url?: string;
  /** e.g. http, grpc, tcp, udp. Default `tcp`. */
  protocol?: string;
  /** At most 16 keys of 1-64 characters, values up to 256 characters. */
  meta?: Record<string, string>;
  /** The entry expires everywhere unless registered again within this time. Default never. */
  ttlMs?: number;
}

/** One service on one device of the mesh, as services() gives it. */
export interface ServiceInstance extends Omit<ServiceRegistration, 'ttlMs'> {
  /** Device name. */
  device: string;
  peerId: string;
  /** Status of the device that runs it. */
  status: 'alive' | 'suspect';
  /** Where to reach it, e.g. `tcp://10.0.0.5:8080`, or the registered URL. */
  endpoint: string;
  /** When it expires (ms since the epoch, this node's clock), if it has a TTL. */
  expiresAt?: number;
}

/** Figures the daemon supplies for each heartbeat. */
export interface MemberStats {
  /** Bytes used by the content store. */
  usageBytes: number;
  /** A non-negative load figure; higher is busier. */
  load: number;
}

/** What this node's membership did since it started, for the dashboard and /metrics. */
export interface MembershipCounters {
  probesAnswered: number;
  probesUnanswered: number;
  /** Suspicions this node published (its probe of an alive member went unanswered). */
  suspicionsSent: number;
  /** Suspicions from members, about others or this node. */
  suspicionsReceived: number;
  /** Heartbeats that failed validation (malformed, oversized or claiming another peer's id). */
  heartbeatsRejected: number;
  /** Relay messages (members new to the table, passed on) this node published, and those it took in. */
  relaysSent: number;
  relaysReceived: number;
  /** Members' own records the mDNS beacon brought that were new to this node (a new member or a newer record). */
  beaconRecords: number;
}

export interface MembershipEvents {
  /** A member is new and alive, or was suspect or down and showed a sign of life. */
  'peer:alive': CustomEvent<Member>;
  /** A member did not answer a probe (this node's or, by a suspicion message, another's), or was not heard for `suspectAfterMs`. */
  'peer:suspect': CustomEvent<Member>;
  /** A suspect member showed no sign of life for `suspicionMs`. */
  'peer:down': CustomEvent<Member>;
  /** A member's announced information (name, addresses, URLs, labels, version, usage, load) changed. */
  'peer:updated': CustomEvent<Member>;
}

export interface MembershipOptions {
  /** Device name. Default the hostname. */
  name?: string;
  /** This device's registry gateway URL, announced to the others. Default none. */
  gatewayUrl?: string;
  /** This device's API URL, announced to the others. Default none. */
  apiUrl?: string;
  /**
   * Host (name or IP) in the endpoints of this device's port-based services. Default the first
   * non-loopback IPv4 address the device listens on, else 127.0.0.1.
   */
  serviceHost?: string;
  /** Labels added to (and overriding) the built-in `os`, `arch` and `hostname`. Default none. */
  labels?: Record<string, string>;
  /** Software version. Default `0.0.0`. */
  version?: string;
  /**
   * Called before each heartbeat for the store usage and load figures. Failing or taking longer
   * than one heartbeat interval keeps the previous figures. Default both 0.
   */
  stats?: () => MemberStats | Promise<MemberStats>;
  /** Gossipsub topic of the heartbeats. Default `/shoal/membership/2`. */
  topic?: string;
  /**
   * The mesh's heartbeat pace: a node heartbeats every heartbeatIntervalMs times the number of
   * members it counts alive (itself included), so the whole mesh sends about one heartbeat per
   * heartbeatIntervalMs whatever its size. Every member receives every heartbeat, several times
   * over (gossipsub's mesh), so this paces an idle mesh's traffic and CPU; liveness comes from
   * probes, not from heartbeats. A heartbeat is a small beat (sequence number, usage, load) unless
   * the record changed, which is announced at once. Default 3 000 ms (at 16 devices, a heartbeat
   * from each every ~48 s).
   */
  heartbeatIntervalMs?: number;
  /** Longest time between two heartbeats of a node, however large the mesh. Default 60 000 ms. */
  maxHeartbeatIntervalMs?: number;
  /**
   * This node probes one member per interval, each in turn (a random order per round), so every
   * member is probed by someone about once per interval whatever the mesh's size. Default 1 000 ms.
   */
  probeIntervalMs?: number;
  /** A probe not answered within this long failed: the member is suspect. Default 1 500 ms. */
  probeTimeoutMs?: number;
  /** A suspect member that shows no sign of life for this long is down. Default 4 000 ms. */
  suspicionMs?: number;
  /**
   * A member not heard from at all (heartbeat, probe answer, connection, table exchange) for this
   * long is suspect: a backstop for lost probes and suspicions, longer than any heartbeat
   * interval. Default 90 000 ms.
   */
  suspectAfterMs?: number;
  /** A member not heard from for this long is forgotten. Default 300 000 ms (5 min). */
  dropAfterMs?: number;
  /** How often statuses are re-evaluated. Default 500 ms. */
  checkIntervalMs?: number;
  /** Largest heartbeat accepted (and sent). Default 8 192 bytes. */
  maxHeartbeatBytes?: number;
  /** Most members kept besides this node; a sync answer holds at most one more. Default 256. */
  maxMembers?: number;
  /** Limit for one table exchange with a newly connected peer. Default 5 000 ms. */
  syncTimeoutMs?: number;
  /** Default silent. */
  log?: MeshLog;
}

type OptionalOptions = 'gatewayUrl' | 'apiUrl' | 'serviceHost';
type ResolvedOptions = Required<Omit<MembershipOptions, OptionalOptions>> & Pick<MembershipOptions, OptionalOptions>;

interface Row {
  record: MemberRecord;
  status: MemberStatus;
  /** performance.now() when last heard of, so wall-clock jumps do not age members. */
  heardAt: number;
  /** Highest seq the member itself authenticated (signed heartbeat or its own sync answer); -1 if none. */
  authenticatedSeq: number;
  /** `seq` of the newest record the member itself sent (heartbeat or its own sync answer); -1 if none. */
  ownRecordSeq: number;
  /** performance.now() when `record` was current at its source; service TTLs count from here. */
  recordAt: number;
  /** performance.now() when it last became suspect; news heard after this makes it alive again. */
  suspectedAt: number;
}

/** A service of this device; the TTL deadline is on performance.now() so clock jumps do not move it. */
interface OwnService {
  record: Omit<ServiceRecord, 'ttlMs'>;
  expiresAt?: number;
}

// One successful exchange gives a joiner the whole table, so a few in parallel are plenty.
const MAX_CONCURRENT_SYNCS = 4;
/**
 * How long members learned from table syncs wait to be relayed together: a sync brings many at
 * once, and the syncs of a device meeting many devices land close together.
 */
const RELAY_DELAY_MS = 20;
// Bytes of a relay message around its members: {"v":2,"relay":[...]}.
const RELAY_ENVELOPE_BYTES = 32;
// Slack per member in a sync message for the ageMs field and separators.
const SYNC_ENTRY_OVERHEAD_BYTES = 64;
const FALLBACK_SERVICE_HOST = '127.0.0.1';

/**
 * Membership and liveness over a started MeshHost: every node heartbeats on a gossipsub topic
 * (its whole record when that changed, else a small beat), keeps a table of the others with
 * alive/suspect/down status from the time since it last heard them, and exchanges tables with
 * each newly connected peer so a joiner sees everyone at once; members a sync brings are relayed
 * to the whole mesh at once. A beat naming a record this node lacks makes it ask the sender for
 * its table.
 *
 * Trust: heartbeats are signed by their sender (a heartbeat about another peer is rejected);
 * sync answers and relays carry third parties' records unsigned, so a member's own word (its
 * heartbeats and its own sync answers) always overrides relayed information.
 */
export class Membership extends TypedEventEmitter<MembershipEvents> {
  readonly #host: MeshHost;
  readonly #options: ResolvedOptions;
  readonly #labels: Record<string, string>;
  readonly #rows = new Map<string, Row>();
  readonly #exchange: TableExchange;
  readonly #services = new Map<string, OwnService>();
  #node: MeshNode | undefined;
  #self: MemberRecord | undefined;
  /** This node's last seq, shared by its records and beats. */
  #seq = 0;
  /** The next heartbeat sends the whole record (at start, and after a registration change). */
  #recordDue = true;
  #stats: MemberStats = { usageBytes: 0, load: 0 };
  /** Heartbeats decoded by the validator, so the message handler does not parse them again. */
  readonly #decoded = new WeakMap<Message, Heartbeat>();
  #heartbeatTimer: NodeJS.Timeout | undefined;
  #checkTimer: NodeJS.Timeout | undefined;
  #probeTimer: NodeJS.Timeout | undefined;
  /** Members still to probe this round, taken from the end. */
  #probeRound: string[] = [];
  /** Members with a probe under way. */
  readonly #probing = new Set<string>();
  #stopping = new AbortController();
  #sending = false;
  /** A heartbeat was asked for while one was being sent; send another right after. */
  #announceAgain = false;
  /** Members learned from table syncs and not yet relayed, and the timer that relays them. */
  readonly #toRelay = new Set<string>();
  #relayTimer: NodeJS.Timeout | undefined;
  readonly #counters: MembershipCounters = {
    probesAnswered: 0,
    probesUnanswered: 0,
    suspicionsSent: 0,
    suspicionsReceived: 0,
    heartbeatsRejected: 0,
    relaysSent: 0,
    relaysReceived: 0,
    beaconRecords: 0,
  };

  constructor(host: MeshHost, options: MembershipOptions = {}) {
    super();
    this.#host = host;
    this.#options = {
      name: hostname(),
      labels: {},
      version: '0.0.0',
      stats: () => ({ usageBytes: 0, load: 0 }),
      topic: MEMBERSHIP_TOPIC,
      heartbeatIntervalMs: 3_000,
      maxHeartbeatIntervalMs: 60_000,
      probeIntervalMs: 1_000,
      probeTimeoutMs: 1_500,
      suspicionMs: 4_000,
      suspectAfterMs: 90_000,
      dropAfterMs: 300_000,
      checkIntervalMs: 500,
      maxHeartbeatBytes: 8_192,
      maxMembers: 256,
      syncTimeoutMs: 5_000,
      log: silentLog,
      ...withoutUndefined(options),
    };
    const { name, gatewayUrl, apiUrl, serviceHost, suspectAfterMs, suspicionMs, dropAfterMs } = this.#options;
    checkName(name);
    if (serviceHost !== undefined) checkHost(serviceHost, 'serviceHost');
    if (gatewayUrl !== undefined) checkUrl(gatewayUrl, 'gatewayUrl');
    if (apiUrl !== undefined) checkUrl(apiUrl, 'apiUrl');
    this.#labels = checkLabels({ os: platform(), arch: arch(), hostname: hostname(), ...this.#options.labels });
    const positive = ['heartbeatIntervalMs', 'maxHeartbeatIntervalMs', 'probeIntervalMs', 'probeTimeoutMs', 'suspicionMs', 'suspectAfterMs', 'checkIntervalMs', 'syncTimeoutMs', 'maxHeartbeatBytes', 'maxMembers'] as const;
    for (const key of positive) {
      if (!(this.#options[key] > 0)) throw new RangeError(`Membership ${key} must be positive`);
    }
    // A silent member must go suspect and then down before it is forgotten.
    if (!(suspectAfterMs + suspicionMs < dropAfterMs)) {
      throw new RangeError('Membership needs suspectAfterMs + suspicionMs < dropAfterMs');
    }
    this.#exchange = new TableExchange({
      protocol: MEMBERSHIP_SYNC_PROTOCOL,
      maxBytes: () => this.#maxSyncBytes,
      timeoutMs: this.#options.syncTimeoutMs,
      maxConcurrent: MAX_CONCURRENT_SYNCS,
      table: () => this.#syncMessage(),
      merge: (bytes, from) => this.#mergeSync(bytes, from),
      name: 'membership sync',
      log: this.#options.log,
    });
  }

  get counters(): MembershipCounters {
    return { ...this.#counters };
  }

  /** Joins the topic, serves the sync protocol and exchanges tables with every connected peer. */
  async start(): Promise<void> {
    if (this.#node) return;
    const node = this.#host.node;
    const { topic, probeIntervalMs, checkIntervalMs } = this.#options;
    await this.#exchange.start(node);
    this.#node = node;
    this.#stopping = new AbortController();
    this.#self = this.#selfRecord(this.#nextSeq());
    this.#recordDue = true;
    node.services.pubsub.topicValidators.set(topic, this.#validate);
    node.services.pubsub.addEventListener('message', this.#onMessage);
    node.services.pubsub.addEventListener('subscription-change', this.#onSubscriptionChange);
    node.services.pubsub.subscribe(topic);
    node.addEventListener('peer:connect', this.#onConnect);
    node.addEventListener('peer:disconnect', this.#onDisconnect);
    this.#host.beacon?.addEventListener('record', this.#onBeaconRecord);
    this.#checkTimer = setInterval(() => this.#check(), checkIntervalMs);
    this.#probeTimer = setInterval(() => this.#probeNext(), probeIntervalMs);
    void this.#heartbeat();
    this.#scheduleHeartbeat();
    for (const peer of node.getPeers()) void this.#exchange.with(peer);
  }

  /** Stops heartbeating and leaves the topic; the table is kept as it was. */
  async stop(): Promise<void> {
    const node = this.#node;
    if (!node) return;
    this.#node = undefined;
    this.#stopping.abort(new Error('membership stopped'));
    clearTimeout(this.#heartbeatTimer);
    clearTimeout(this.#relayTimer);
    this.#relayTimer = undefined;
    this.#toRelay.clear();
    clearInterval(this.#checkTimer);
    clearInterval(this.#probeTimer);
    this.#probeRound = [];
    const { topic } = this.#options;
    node.removeEventListener('peer:connect', this.#onConnect);
    node.removeEventListener('peer:disconnect', this.#onDisconnect);
    this.#host.beacon?.removeEventListener('record', this.#onBeaconRecord);
    node.services.pubsub.removeEventListener('message', this.#onMessage);
    node.services.pubsub.removeEventListener('subscription-change', this.#onSubscriptionChange);
    if (node.status === 'started') node.services.pubsub.unsubscribe(topic);
    await this.#exchange.stop();
    node.services.pubsub.topicValidators.delete(topic);
  }

  /** The table, this node first, then by name. */
  list(): Member[] {
    const members = [...this.#rows.values()].map((row) => this.#member(row, false));
    members.sort((a, b) => a.name.localeCompare(b.name) || a.peerId.localeCompare(b.peerId));
    const self = this.#self;
    if (!self) return members;
    const now = performance.now();
    const row: Row = { record: self, status: 'alive', heardAt: now, authenticatedSeq: self.seq, ownRecordSeq: self.seq, recordAt: now, suspectedAt: 0 };
    return [this.#member(row, true), ...members];
  }

  /**
   * Registers (or replaces, by name) a service of this device and announces it at once.
   * Throws MembershipFormatError for a malformed registration and RangeError when this device
   * would have more than 64 services or its heartbeat would exceed maxHeartbeatBytes (checked
   * once started, as the addresses count too).
   */
  registerService(registration: ServiceRegistration): void {
    const { ttlMs, ...fields } = registration;
    const record = checkService({ ...fields, protocol: fields.protocol ?? 'tcp' }, `service ${JSON.stringify(registration.name)}`);
    if (ttlMs !== undefined && !(Number.isSafeInteger(ttlMs) && ttlMs > 0)) {
      throw new RangeError(`service ${JSON.stringify(record.name)}: ttlMs must be a positive integer`);
    }
    const previous = this.#services.get(record.name);
    if (!previous && this.#services.size >= MAX_SERVICES) {
      throw new RangeError(`service ${JSON.stringify(record.name)}: this device already has ${MAX_SERVICES} services`);
    }
    this.#services.set(record.name, { record, expiresAt: ttlMs === undefined ? undefined : performance.now() + ttlMs });
    if (this.#self) {
      const bytes = encodeHeartbeat(this.#selfRecord(this.#self.seq)).byteLength;
      if (bytes > this.#options.maxHeartbeatBytes) {
        if (previous) this.#services.set(record.name, previous);
        else this.#services.delete(record.name);
        throw new RangeError(
          `service ${JSON.stringify(record.name)}: the heartbeat would take ${bytes} bytes, more than maxHeartbeatBytes (${this.#options.maxHeartbeatBytes})`,
        );
      }
    }
    this.#announce();
  }

  /** Removes a service of this device and announces it at once; false if there was none by that name. */
  deregisterService(name: string): boolean {
    if (!this.#services.delete(name)) return false;
    this.#announce();
    return true;
  }

  /**
   * Every unexpired service instance on this device and on alive or suspect members, by name,
   * then device. A down member's services are left out (a suspect one's stay, marked suspect).
   */
  services(name?: string): ServiceInstance[] {
    const now = performance.now();
    const instances: ServiceInstance[] = [];
    const add = (record: MemberRecord, status: ServiceInstance['status'], service: Omit<ServiceRecord, 'ttlMs'>, expiresAt: number | undefined) => {
      if (name !== undefined && service.name !== name) return;
      if (expiresAt !== undefined && expiresAt <= now) return;
      const instance: ServiceInstance = {
        ...service,
        ...(service.meta && { meta: { ...service.meta } }),
        device: record.name,
        peerId: record.peerId,
        status,
        endpoint: service.url ?? `${service.protocol}://${endpointHost(record)}:${service.port}`,
      };
      if (expiresAt !== undefined) instance.expiresAt = Math.round(Date.now() + (expiresAt - now));
      instances.push(instance);
    };
    if (this.#self) {
      for (const own of this.#services.values()) add(this.#self, 'alive', own.record, own.expiresAt);
    }
    for (const row of this.#rows.values()) {
      if (row.status === 'down') continue;
      for (const { ttlMs, ...service } of row.record.services ?? []) {
        add(row.record, row.status, service, ttlMs === undefined ? undefined : row.recordAt + ttlMs);
      }
    }
    instances.sort((a, b) => a.name.localeCompare(b.name) || a.device.localeCompare(b.device) || a.peerId.localeCompare(b.peerId));
    return instances;
  }

  /** Sends this device's record now rather than at the next interval. */
  #announce(): void {
    if (!this.#self) return;
    this.#recordDue = true;
    this.#heartbeatNow();
  }

  /** Heartbeats now, or right after the one being sent. */
  #heartbeatNow(): void {
    if (this.#sending) this.#announceAgain = true;
    else void this.#heartbeat();
  }

  /** Seeded from the clock so a restarted node's heartbeats are newer than its earlier ones. */
  #nextSeq(): number {
    this.#seq = Math.max(this.#seq + 1, Date.now());
    return this.#seq;
  }

  /** This device's unexpired services with the time they have left; expired ones are forgotten. */
  #ownServiceRecords(): ServiceRecord[] {
    const now = performance.now();
    const records: ServiceRecord[] = [];
    for (const [name, { record, expiresAt }] of this.#services) {
      if (expiresAt === undefined) records.push(record);
      else if (expiresAt > now) records.push({ ...record, ttlMs: Math.ceil(expiresAt - now) });
      else this.#services.delete(name);
    }
    return records;
  }

  #selfRecord(seq: number): MemberRecord {
    const { name, gatewayUrl, apiUrl, serviceHost, version } = this.#options;
    const record: MemberRecord = {
      peerId: this.#host.peerId.toString(),
      name,
      addresses: this.#host.multiaddrs.slice(0, MAX_ADDRESSES).map(String),
      labels: this.#labels,
      version,
      ...this.#stats,
      seq,
      ts: Date.now(),
    };
    if (gatewayUrl !== undefined) record.gateway = gatewayUrl;
    if (apiUrl !== undefined) record.api = apiUrl;
    if (serviceHost !== undefined) record.serviceHost = serviceHost;
    return { ...record, ...servicesField(this.#ownServiceRecords()) };
  }

  async #heartbeat(): Promise<void> {
    const node = this.#node;
    if (!node || this.#sending) return;
    this.#sending = true;
    try {
      this.#stats = await this.#readStats();
      if (this.#node !== node) return;
      const previous = this.#self!;
      const current = this.#selfRecord(previous.seq);
      // Addresses can change under a running node, so the record is compared, not only flagged.
      const sendRecord = this.#recordDue || describes(current, false) !== describes(previous, false);
      this.#recordDue = false;
      const seq = this.#nextSeq();
      this.#self = sendRecord ? { ...current, seq } : current;
      const { usageBytes, load } = this.#stats;
      const bytes = sendRecord ? encodeHeartbeat(this.#self) : encodeBeat({ seq, recordSeq: current.seq, usageBytes, load });
      if (bytes.byteLength > this.#options.maxHeartbeatBytes) {
        this.#options.log.warn({ bytes: bytes.byteLength, max: this.#options.maxHeartbeatBytes }, 'heartbeat too large, not sent');
        return;
      }
      // The beacon answers queries with the latest record, so it takes every new one, delivered or not.
      if (sendRecord) void this.#host.beacon?.publish(bytes).catch((err: unknown) => this.#options.log.warn({ err }, 'record not sent to the beacon'));
      let delivered = false;
      try {
        delivered = await this.#publish(node, bytes);
      } finally {
        // A record nobody received goes out again with the next heartbeat.
        if (sendRecord && !delivered) this.#recordDue = true;
      }
    } catch (err) {
      this.#options.log.warn({ err }, 'heartbeat not sent');
    } finally {
      this.#sending = false;
      if (this.#announceAgain) {
        this.#announceAgain = false;
        void this.#heartbeat();
      }
    }
  }

  /** Arms the next heartbeat: the interval grows with the members alive, jittered so devices started together drift apart. */
  #scheduleHeartbeat(): void {
    const { heartbeatIntervalMs, maxHeartbeatIntervalMs } = this.#options;
    let alive = 1;
    for (const row of this.#rows.values()) if (row.status === 'alive') alive++;
    const intervalMs = Math.min(maxHeartbeatIntervalMs, heartbeatIntervalMs * alive) * (0.8 + 0.4 * Math.random());
    this.#heartbeatTimer = setTimeout(() => {
      void this.#heartbeat();
      this.#scheduleHeartbeat();
    }, intervalMs);
  }

  /**
   * Probes the next member of this round; a new round takes every member, shuffled. Down ones
   * too: an answer brings back a device whose link was cut, without waiting for mDNS.
   */
  #probeNext(): void {
    if (this.#probeRound.length === 0) {
      this.#probeRound = shuffle([...this.#rows.keys()]);
    }
    const peerId = this.#probeRound.pop();
    if (peerId !== undefined) void this.#probe(peerId);
  }

  /**
   * Asks the member for a sign of life. An answer is news of it; no answer makes an alive member
   * suspect here, and a suspicion message tells the others (and the member, which refutes it).
   */
  async #probe(peerId: string): Promise<void> {
    const node = this.#node;
    if (!node || !this.#rows.has(peerId) || this.#probing.has(peerId)) return;
    this.#probing.add(peerId);
    const startedAt = performance.now();
    try {
      const signal = AbortSignal.any([this.#stopping.signal, AbortSignal.timeout(this.#options.probeTimeoutMs)]);
      const answered = await this.#host.probe(peerIdFromString(peerId), signal);
      const row = this.#rows.get(peerId);
      if (this.#node !== node || !row) return;
      this.#counters[answered ? 'probesAnswered' : 'probesUnanswered']++;
      if (answered) {
        this.#heard(row, performance.now());
        return;
      }
      // Heard from some other way while the probe was out: not a sign of death.
      if (row.status !== 'alive' || row.heardAt > startedAt) return;
      this.#options.log.debug({ peer: peerId }, 'probe unanswered, member suspect');
      this.#suspect(row);
      if (await this.#publish(node, encodeSuspicion({ peerId, seq: row.authenticatedSeq }))) this.#counters.suspicionsSent++;
    } catch (err) {
      this.#options.log.debug({ peer: peerId, err }, 'suspicion not sent');
    } finally {
      this.#probing.delete(peerId);
    }
  }

  /**
   * Another member's probe went unanswered. About this node: refute it with a heartbeat now.
   * About a member this node heard from since: ignore it. Otherwise the member is suspect here
   * too, and this node probes it as well, so one member's bad link does not make it down.
   */
  #onSuspicion(suspicion: Suspicion): void {
    this.#counters.suspicionsReceived++;
    if (suspicion.peerId === this.#self?.peerId) {
      this.#options.log.debug({}, 'suspected by a member, refuting');
      this.#heartbeatNow();
      return;
    }
    const row = this.#rows.get(suspicion.peerId);
    if (!row || row.status !== 'alive' || row.authenticatedSeq > suspicion.seq) return;
    if (performance.now() - row.heardAt < this.#options.probeTimeoutMs) return;
    this.#suspect(row);
    void this.#probe(suspicion.peerId);
  }

  #suspect(row: Row): void {
    row.status = 'suspect';
    row.suspectedAt = performance.now();
    this.#emit(row);
  }

  /** News of a member `at` (performance.now()); news after it became suspect or down makes it alive. */
  #heard(row: Row, at: number): void {
    row.heardAt = Math.max(row.heardAt, at);
    if (row.status === 'alive' || row.heardAt <= row.suspectedAt) return;
    row.status = 'alive';
    this.#emit(row);
  }

  /** False when nobody is subscribed yet (the first node, or before subscriptions are exchanged), which is normal. */
  async #publish(node: MeshNode, bytes: Uint8Array, floodPublish?: boolean): Promise<boolean> {
    // The implementation takes per-message options that the exported interface leaves out.
    const pubsub = node.services.pubsub as GossipSub & { publish(topic: string, data: Uint8Array, opts?: { floodPublish?: boolean }): Promise<unknown> };
    try {
      await pubsub.publish(this.#options.topic, bytes, { floodPublish });
      return true;
    } catch (err) {
      if ((err as Error).message === 'PublishError.NoPeersSubscribedToTopic') return false;
      throw err;
    }
  }

  async #readStats(): Promise<MemberStats> {
    let timer: NodeJS.Timeout | undefined;
    const timeout = new Promise<never>((_, reject) => {
      timer = setTimeout(() => reject(new Error('stats callback timed out')), this.#options.heartbeatIntervalMs);
    });
    try {
      const stats = await Promise.race([this.#options.stats(), timeout]);
      if (!(Number.isSafeInteger(stats.usageBytes) && stats.usageBytes >= 0 && Number.isFinite(stats.load) && stats.load >= 0)) {
        throw new Error(`stats callback gave ${JSON.stringify(stats)}`);
      }
      return { usageBytes: stats.usageBytes, load: stats.load };
    } catch (err) {
      this.#options.log.warn({ err }, 'membership stats unavailable, sending the previous figures');
      return this.#stats;
    } finally {
      clearTimeout(timer);
    }
  }

  /** Gossipsub topic validator: a rejected message is neither delivered nor forwarded. */
  #validate = (_propagationSource: PeerId, message: Message): TopicValidatorResult => {
    const heartbeat = this.#authenticatedHeartbeat(message);
    if (!heartbeat) {
      this.#counters.heartbeatsRejected++;
      return TopicValidatorResult.Reject;
    }
    this.#decoded.set(message, heartbeat);
    if (heartbeat.suspicion || heartbeat.relay) return TopicValidatorResult.Accept;
    const row = message.type === 'signed' ? this.#rows.get(message.from.toString()) : undefined;
    const seq = heartbeat.record?.seq ?? heartbeat.beat!.seq;
    // Stale or replayed: drop quietly without penalising whoever forwarded it.
    if (row && seq <= row.authenticatedSeq) return TopicValidatorResult.Ignore;
    return TopicValidatorResult.Accept;
  };

  #onMessage = (evt: CustomEvent<Message>): void => {
    const message = evt.detail;
    if (message.topic !== this.#options.topic || message.type !== 'signed') return;
    const heartbeat = this.#decoded.get(message) ?? this.#authenticatedHeartbeat(message);
    if (heartbeat?.record) this.#merge(heartbeat.record, 0, true);
    else if (heartbeat?.beat) this.#onBeat(message.from, heartbeat.beat);
    else if (heartbeat?.relay) {
      this.#counters.relaysReceived++;
      this.#mergeMembers(heartbeat.relay, message.from.toString(), false);
    }
    // Only a member's word counts, so a peer outside the table cannot make members suspect.
    else if (heartbeat?.suspicion && this.#rows.has(message.from.toString())) this.#onSuspicion(heartbeat.suspicion);
  };

  /**
   * A record that reached nobody (no peer was on the topic yet, as at start) goes out as soon as
   * a peer joins the topic, not a heartbeat interval later: one message then tells the whole mesh,
   * where table exchanges would take a round per connection.
   */
  #onSubscriptionChange = (evt: CustomEvent<SubscriptionChangeData>): void => {
    if (!this.#recordDue) return;
    if (evt.detail.subscriptions.some(({ topic, subscribe }) => subscribe && topic === this.#options.topic)) this.#announce();
  };

  /**
   * A member's own record from the mDNS beacon: news of a member not in the table, or of a newer
   * record. The same record again is not a sign of life: every device answers every query with
   * it, and anyone on the LAN could replay it.
   */
  #onBeaconRecord = (evt: CustomEvent<BeaconRecord>): void => {
    const { from, payload } = evt.detail;
    const record = this.#ownHeartbeat(payload, from)?.record;
    if (!record) {
      this.#counters.heartbeatsRejected++;
      return;
    }
    const row = this.#rows.get(record.peerId);
    if (row && record.seq <= row.ownRecordSeq) return;
    this.#counters.beaconRecords++;
    this.#merge(record, 0, true);
  };

  /** The heartbeat in a signed message, if a record then only about its signer; undefined otherwise. */
  #authenticatedHeartbeat(message: Message): Heartbeat | undefined {
    return message.type === 'signed' ? this.#ownHeartbeat(message.data, message.from) : undefined;
  }

  /** The heartbeat in `bytes` that `from` signed, if a record then only about `from`; undefined (logged) otherwise. */
  #ownHeartbeat(bytes: Uint8Array, from: PeerId): Heartbeat | undefined {
    try {
      const heartbeat = decodeHeartbeat(bytes, this.#options.maxHeartbeatBytes);
      if (!heartbeat.record || heartbeat.record.peerId === from.toString()) return heartbeat;
      this.#options.log.warn({ from: from.toString(), claimed: heartbeat.record.peerId }, 'heartbeat claims another peer id');
    } catch (err) {
      this.#options.log.debug({ from: from.toString(), err }, 'malformed heartbeat');
    }
    return undefined;
  }

  /**
   * A member's beat: it is alive now, with these figures. A beat from a member not in the
   * table, or naming a record newer than the member's own word this node holds, makes this
   * node ask the member for its table (one exchange at a time; the next beat asks again).
   */
  #onBeat(from: PeerId, beat: Beat): void {
    const row = this.#rows.get(from.toString());
    if (!row || beat.recordSeq > row.ownRecordSeq || row.record.seq !== row.ownRecordSeq) void this.#exchange.with(from);
    if (!row || beat.seq <= row.authenticatedSeq) return;
    row.authenticatedSeq = beat.seq;
    // A beat changes only the figures, so only they need comparing.
    const changed = row.record.usageBytes !== beat.usageBytes || row.record.load !== beat.load;
    if (changed) row.record = { ...row.record, usageBytes: beat.usageBytes, load: beat.load };
    this.#heard(row, performance.now());
    if (changed) this.dispatchEvent(new CustomEvent('peer:updated', { detail: this.#member(row, false) }));
  }

  /**
   * Takes a record heard `ageMs` ago if it is newer than what the table holds. A member's own
   * (authenticated) word only has to beat its own earlier word, so relayed records can never
   * shut out its heartbeats. A member new to the table is relayed to the mesh if `passOn`.
   */
  #merge(record: MemberRecord, ageMs: number, authenticated: boolean, passOn = false): void {
    if (record.peerId === this.#self?.peerId) return;
    const heardAt = performance.now() - ageMs;
    const row = this.#rows.get(record.peerId);
    if (!row) {
      if (ageMs >= this.#options.dropAfterMs) return;
      if (this.#rows.size >= this.#options.maxMembers) {
        this.#options.log.warn({ peer: record.peerId, max: this.#options.maxMembers }, 'membership table full, member ignored');
        return;
      }
      const silent = ageMs >= this.#options.suspectAfterMs;
      const added: Row = {
        record,
        status: silent ? 'suspect' : 'alive',
        heardAt,
        authenticatedSeq: authenticated ? record.seq : -1,
        ownRecordSeq: authenticated ? record.seq : -1,
        recordAt: heardAt,
        suspectedAt: silent ? performance.now() : 0,
      };
      this.#rows.set(record.peerId, added);
      this.#emit(added);
      if (passOn && !silent) this.#queueRelay(record.peerId);
      return;
    }
    // Beats do not change record seqs, so the member's own word may repeat the seq of a record
    // relayed for it (and must then replace it: the relay may have lied).
    const newer = authenticated ? record.seq >= row.ownRecordSeq : record.seq > row.record.seq;
    if (!newer) return;
    const changed = describes(row.record, true) !== describes(record, true);
    row.record = record;
    row.recordAt = heardAt;
    if (authenticated) {
      row.ownRecordSeq = record.seq;
      row.authenticatedSeq = Math.max(row.authenticatedSeq, record.seq);
    }
    this.#heard(row, heardAt);
    if (changed) this.dispatchEvent(new CustomEvent('peer:updated', { detail: this.#member(row, false) }));
  }

  /**
   * Ages statuses: a silent member becomes suspect, a suspect one with no news for suspicionMs
   * down (and its connections are closed: without them a member that lost power leaves
   * half-open connections behind), a long-silent one is forgotten. Only news makes a member
   * alive again.
   */
  #check(): void {
    const now = performance.now();
    const { suspectAfterMs, suspicionMs, dropAfterMs } = this.#options;
    for (const [peerId, row] of this.#rows) {
      const age = now - row.heardAt;
      if (age >= dropAfterMs) {
        this.#rows.delete(peerId);
      } else if (row.status === 'alive' && age >= suspectAfterMs) {
        this.#suspect(row);
      } else if (row.status === 'suspect' && now - row.suspectedAt >= suspicionMs) {
        row.status = 'down';
        this.#emit(row);
        this.#node?.hangUp(peerIdFromString(peerId)).catch((err: unknown) => this.#options.log.debug({ peer: peerId, err }, 'hang-up failed'));
      }
    }
  }

  #emit(row: Row): void {
    this.dispatchEvent(new CustomEvent(`peer:${row.status}`, { detail: this.#member(row, false) }));
  }

  #member(row: Row, self: boolean): Member {
    const { ts: _sentAt, services: _services, ...record } = row.record;
    return {
      ...record,
      addresses: [...record.addresses],
      labels: { ...record.labels },
      status: row.status,
      lastSeen: Math.round(Date.now() - (performance.now() - row.heardAt)),
      self,
    };
  }

  // The last connection to a member closed: probe it now (a probe dials), not at its turn.
  #onDisconnect = (evt: CustomEvent<PeerId>): void => {
    void this.#probe(evt.detail.toString());
  };

  // A new connection is news of the peer; the table exchange brings its record.
  #onConnect = (evt: CustomEvent<PeerId>): void => {
    const row = this.#rows.get(evt.detail.toString());
    if (row) this.#heard(row, performance.now());
    void this.#exchange.with(evt.detail);
  };

  /** The table as a sync message: this node and every member with the age of its news. */
  #syncMessage(): Uint8Array {
    const now = performance.now();
    // This node's services with the time they have left now, not at the last heartbeat.
    const { services: _announced, ...self } = this.#self!;
    const members: SyncedMember[] = [{ ...self, ...servicesField(this.#ownServiceRecords()), ageMs: 0 }];
    for (const row of this.#rows.values()) {
      // A down member would come back alive at a receiver that has not heard of it.
      if (row.status !== 'down') members.push(synced(row, now));
    }
    return encodeSync(members);
  }

  #mergeSync(bytes: Uint8Array, remotePeer: PeerId): void {
    const { maxHeartbeatBytes, maxMembers } = this.#options;
    const members = decodeSync(bytes, { maxBytes: this.#maxSyncBytes, maxMembers: maxMembers + 1, maxHeartbeatBytes });
    this.#mergeMembers(members, remotePeer.toString(), true);
  }

  /** Members as `remote` sent them: its own entry is its word, the others hearsay; new ones are relayed if `passOn`. */
  #mergeMembers(members: SyncedMember[], remote: string, passOn: boolean): void {
    for (const { ageMs, ...record } of members) this.#merge(record, ageMs, record.peerId === remote, passOn);
  }

  /**
   * Passes a member learned from a table sync on to the whole mesh, soon. A sync happens once per
   * connection, so without this a device that met a newcomer early kept it to itself: starting
   * 16 devices at once, tables filled only as each pair connected, ~3 s after the last device
   * listened, and not one record came by gossip (it reached devices after their syncs had).
   * Members learned from relays are not relayed again: gossipsub forwards the relay itself.
   */
  #queueRelay(peerId: string): void {
    this.#toRelay.add(peerId);
    this.#relayTimer ??= setTimeout(() => {
      this.#relayTimer = undefined;
      void this.#relay();
    }, RELAY_DELAY_MS);
  }

  async #relay(): Promise<void> {
    const node = this.#node;
    if (!node) return;
    const now = performance.now();
    const members: SyncedMember[] = [];
    for (const peerId of this.#toRelay) {
      const row = this.#rows.get(peerId);
      if (row && row.status !== 'down') members.push(synced(row, now));
    }
    this.#toRelay.clear();
    for (const bytes of relayMessages(members, this.#options.maxHeartbeatBytes)) {
      try {
        // Flooded to every peer on the topic, not only to the few of its gossip mesh, which at a
        // start is still forming.
        if (await this.#publish(node, bytes, true)) this.#counters.relaysSent++;
      } catch (err) {
        this.#options.log.debug({ err }, 'membership relay not sent');
      }
    }
  }

  get #maxSyncBytes(): number {
    return (this.#options.maxMembers + 1) * (this.#options.maxHeartbeatBytes + SYNC_ENTRY_OVERHEAD_BYTES);
  }
}

/**
 * The announced information, for change detection: without seq, ts and service TTLs, which
 * change with every heartbeat, and with usage and load only if `withFigures` (beats carry them).
 */
function describes({ seq: _seq, ts: _ts, usageBytes, load, services, ...info }: MemberRecord, withFigures: boolean): string {
  return JSON.stringify({ ...info, services: services?.map(({ ttlMs: _ttlMs, ...service }) => service), ...(withFigures && { usageBytes, load }) });
}

/** The `services` field of a record: absent when there are none, which keeps heartbeats small. */
function servicesField(services: ServiceRecord[]): Pick<MemberRecord, 'services'> {
  return services.length > 0 ? { services } : {};
}

/** The host in a member's port-based service endpoints: its serviceHost, else its first non-loopback IPv4, else 127.0.0.1. */
function endpointHost(record: MemberRecord): string {
  if (record.serviceHost !== undefined) return record.serviceHost.includes(':') ? `[${record.serviceHost}]` : record.serviceHost;
  for (const address of record.addresses) {
    const ip4 = multiaddr(address).getComponents().find((component) => component.name === 'ip4')?.value;
    if (ip4 !== undefined && !ip4.startsWith('127.') && ip4 !== '0.0.0.0') return ip4;
  }
  return FALLBACK_SERVICE_HOST;
}

/** A member's row as a synced entry: its record with the age of this node's news of it. */
function synced(row: Row, now: number): SyncedMember {
  // Service TTLs are re-based on the moment ageMs refers to, so the receiver's deadlines match ours.
  const services = (row.record.services ?? []).flatMap((service) => {
    if (service.ttlMs === undefined) return [service];
    const ttlMs = Math.ceil(row.recordAt + service.ttlMs - row.heardAt);
    return ttlMs > 0 ? [{ ...service, ttlMs }] : [];
  });
  const { services: _services, ...record } = row.record;
  return { ...record, ...servicesField(services), ageMs: Math.round(now - row.heardAt) };
}

/** `members` in as few relay messages of at most `maxBytes` as fit; one too big alone is left out. */
function relayMessages(members: SyncedMember[], maxBytes: number): Uint8Array[] {
  const messages: Uint8Array[] = [];
  let batch: SyncedMember[] = [];
  let bytes = RELAY_ENVELOPE_BYTES;
  for (const member of members) {
    const size = Buffer.byteLength(JSON.stringify(member)) + 1;
    if (RELAY_ENVELOPE_BYTES + size > maxBytes) continue;
    if (bytes + size > maxBytes) {
      messages.push(encodeRelay(batch));
      [batch, bytes] = [[], RELAY_ENVELOPE_BYTES];
    }
    batch.push(member);
    bytes += size;
  }
  if (batch.length > 0) messages.push(encodeRelay(batch));
  return messages;
}
