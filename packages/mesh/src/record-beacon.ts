import { createHmac, timingSafeEqual } from 'node:crypto';
import type { RemoteInfo } from 'node:dgram';
import { TypedEventEmitter, type PeerId, type PrivateKey } from '@libp2p/interface';
import { peerIdFromPublicKey } from '@libp2p/peer-id';
import { RecordEnvelope } from '@libp2p/peer-record';
import type { TxtAnswer } from 'dns-packet';
import multicastDns from 'multicast-dns';
import type { MeshLog } from './mesh-host.ts';
import { silentLog, withoutUndefined } from './options.ts';

export const DEFAULT_BEACON_SERVICE = '_shoal-record._udp.local';
/** The signed envelope's domain, so a beacon signature is good for nothing else. */
const ENVELOPE_DOMAIN = 'shoal-record-beacon';
const ENVELOPE_PAYLOAD_TYPE = Uint8Array.from([0x53, 0x48]);
const FORMAT_VERSION = 1;
const FLAG_KEYED = 1;
const MAC_BYTES = 32;
/** A TXT record's strings are at most 255 bytes each. */
const TXT_STRING_BYTES = 255;

export interface RecordBeaconOptions {
  /** Signs this device's payload. */
  privateKey: PrivateKey;
  /**
   * swarm.key bytes: beacons then carry an HMAC under the key, and only beacons with a good one
   * are taken, so devices of another swarm (or none) never show up. Default none (an open network:
   * only beacons without a key are taken).
   */
  swarmKey?: Uint8Array;
  /** mDNS name the beacons go under. Default `_shoal-record._udp.local`. */
  service?: string;
  /** Largest payload sent or taken; a bigger one is left to the other channels. Default 4 096 bytes. */
  maxPayloadBytes?: number;
  /**
   * Shortest time between two answers: queries that come closer are answered together, once
   * (every answer reaches every device). Default 100 ms.
   */
  minAnswerIntervalMs?: number;
  /** Default silent. */
  log?: MeshLog;
}

export interface BeaconRecord {
  /** The signer: the payload is its own word. */
  from: PeerId;
  payload: Uint8Array;
}

export interface RecordBeaconEvents {
  /** A payload signed by another device (and, with a swarm key, sealed under that key). */
  record: CustomEvent<BeaconRecord>;
}

/**
 * Each device's signed record, carried by multicast DNS: a device that starts sends its own and
 * asks for everyone's, and every device answers with its own. A LAN's devices thus know each
 * other's records as soon as they are up, before any libp2p connection, which on small busy
 * devices starting together comes seconds later. Payloads are opaque here: signed envelopes
 * (libp2p's, under a domain of their own), with an HMAC under the swarm key when there is one.
 */
export class RecordBeacon extends TypedEventEmitter<RecordBeaconEvents> {
  readonly #options: Required<Omit<RecordBeaconOptions, 'swarmKey'>> & Pick<RecordBeaconOptions, 'swarmKey'>;
  #mdns: multicastDns.MulticastDNS | undefined;
  #selfName = '';
  /** The sealed packet data of this device's payload, once there is one. */
  #sealed: Buffer[] | undefined;
  #lastAnswerAt = -Infinity;
  /** This device has asked for everyone's records since it started. */
  #asked = false;
  #answerTimer: NodeJS.Timeout | undefined;
  /** Bumped by every publish, so a seal that finishes after a newer one is dropped. */
  #version = 0;

  constructor(options: RecordBeaconOptions) {
    super();
    this.#options = {
      service: DEFAULT_BEACON_SERVICE,
      maxPayloadBytes: 4_096,
      minAnswerIntervalMs: 100,
      log: silentLog,
      ...withoutUndefined(options),
    };
  }

  /** Opens the mDNS socket; the first publish then asks every device for its record. */
  start(): void {
    if (this.#mdns) return;
    const { service, privateKey, log } = this.#options;
    this.#selfName = `${peerIdFromPublicKey(privateKey.publicKey).toString()}.${service}`;
    const mdns = multicastDns();
    mdns.on('query', (query) => {
      if (query.questions.some((question) => question.name === service && question.type === 'PTR')) this.#answerSoon();
    });
    mdns.on('response', (response, rinfo) => void this.#onResponse(response.answers, rinfo));
    mdns.on('warning', (err: Error) => log.debug({ err }, 'record beacon mDNS warning'));
    mdns.on('error', (err: Error) => log.warn({ err }, 'record beacon mDNS error'));
    this.#mdns = mdns;
  }

  stop(): void {
    clearTimeout(this.#answerTimer);
    this.#answerTimer = undefined;
    this.#mdns?.destroy();
    this.#mdns = undefined;
    this.#sealed = undefined;
    this.#asked = false;
  }

  /**
   * Signs `payload` as this device's record, sends it at once and answers queries with it from
   * now on; the first also asks every device for its record (whoever listens for records is
   * ready for the answers by then). A payload over maxPayloadBytes is not sent, and queries go
   * unanswered until a smaller one.
   */
  async publish(payload: Uint8Array): Promise<void> {
    const version = ++this.#version;
    if (payload.byteLength > this.#options.maxPayloadBytes) {
      this.#sealed = undefined;
      this.#options.log.debug({ bytes: payload.byteLength }, 'record too large for the beacon');
      return;
    }
    const envelope = await RecordEnvelope.seal(
      { domain: ENVELOPE_DOMAIN, codec: ENVELOPE_PAYLOAD_TYPE, marshal: () => payload, equals: () => false },
      this.#options.privateKey,
    );
    const mdns = this.#mdns;
    if (version !== this.#version || !mdns) return;
    this.#sealed = txtStrings(this.#frame(envelope.marshal()));
    this.#answerSoon();
    if (!this.#asked) {
      this.#asked = true;
      mdns.query({ questions: [{ name: this.#options.service, type: 'PTR' }] });
    }
  }

  /** Answers now, or once minAnswerIntervalMs has passed since the last answer. */
  #answerSoon(): void {
    if (!this.#sealed || this.#answerTimer) return;
    const wait = this.#lastAnswerAt + this.#options.minAnswerIntervalMs - performance.now();
    if (wait <= 0) return this.#answer();
    this.#answerTimer = setTimeout(() => {
      this.#answerTimer = undefined;
      this.#answer();
    }, wait);
  }

  #answer(): void {
    const mdns = this.#mdns;
    if (!mdns || !this.#sealed) return;
    this.#lastAnswerAt = performance.now();
    mdns.respond({
      answers: [
        { name: this.#options.service, type: 'PTR', data: this.#selfName },
        { name: this.#selfName, type: 'TXT', data: this.#sealed },
      ],
    });
  }

  /** Version, flags, then the HMAC under the swarm key (keyed only), then the envelope. */
  #frame(envelope: Uint8Array): Buffer {
    const { swarmKey } = this.#options;
    const head = Buffer.from([FORMAT_VERSION, swarmKey ? FLAG_KEYED : 0]);
    return Buffer.concat(swarmKey ? [head, mac(swarmKey, envelope), envelope] : [head, envelope]);
  }

  async #onResponse(answers: ReadonlyArray<{ type: string; name: string }>, rinfo: RemoteInfo): Promise<void> {
    const suffix = `.${this.#options.service}`;
    for (const answer of answers) {
      if (answer.type !== 'TXT' || !answer.name.endsWith(suffix) || answer.name === this.#selfName) continue;
      try {
        const record = await this.#open(txtBytes((answer as TxtAnswer).data));
        if (`${record.from.toString()}${suffix}` !== answer.name) throw new Error(`signed by ${record.from.toString()}, answered as ${answer.name}`);
        this.dispatchEvent(new CustomEvent('record', { detail: record }));
      } catch (err) {
        this.#options.log.debug({ from: rinfo.address, name: answer.name, err }, 'record beacon answer rejected');
      }
    }
  }

  async #open(bytes: Buffer): Promise<BeaconRecord> {
    const { swarmKey, maxPayloadBytes } = this.#options;
    if (bytes.byteLength < 2 || bytes[0] !== FORMAT_VERSION) throw new Error('not a record beacon frame');
    const keyed = (bytes[1]! & FLAG_KEYED) !== 0;
    if (keyed !== Boolean(swarmKey)) throw new Error(keyed ? 'sealed under a swarm key' : 'not sealed under the swarm key');
    let envelopeBytes = bytes.subarray(2);
    if (swarmKey) {
      if (envelopeBytes.byteLength < MAC_BYTES || !timingSafeEqual(mac(swarmKey, envelopeBytes.subarray(MAC_BYTES)), envelopeBytes.subarray(0, MAC_BYTES))) {
        throw new Error('bad swarm key HMAC');
      }
      envelopeBytes = envelopeBytes.subarray(MAC_BYTES);
    }
    // The payload limit plus the envelope's key, signature and framing.
    if (envelopeBytes.byteLength > maxPayloadBytes + 256) throw new Error('record beacon frame too large');
    const envelope = await RecordEnvelope.openAndCertify(envelopeBytes, ENVELOPE_DOMAIN);
    if (!Buffer.from(envelope.payloadType).equals(ENVELOPE_PAYLOAD_TYPE)) throw new Error('not a record beacon payload');
    return { from: peerIdFromPublicKey(envelope.publicKey), payload: envelope.payload };
  }
}

function mac(swarmKey: Uint8Array, envelope: Uint8Array): Buffer {
  return createHmac('sha256', swarmKey).update(ENVELOPE_DOMAIN).update(envelope).digest();
}

function txtStrings(bytes: Buffer): Buffer[] {
  const strings: Buffer[] = [];
  for (let at = 0; at < bytes.byteLength; at += TXT_STRING_BYTES) strings.push(bytes.subarray(at, at + TXT_STRING_BYTES));
  return strings;
}

function txtBytes(data: TxtAnswer['data']): Buffer {
  const strings = Array.isArray(data) ? data : [data];
  return Buffer.concat(strings.map((piece) => (typeof piece === 'string' ? Buffer.from(piece) : piece)));
}
