import { test } from 'node:test';
import assert from 'node:assert/strict';
import type { Message } from '@libp2p/gossipsub';
import type { Stream } from '@libp2p/interface';
import {
  encodeBeat,
  encodeHeartbeat,
  encodeRelay,
  encodeSuspicion,
  encodeSync,
  MEMBERSHIP_SYNC_PROTOCOL,
  MEMBERSHIP_TOPIC,
  Membership,
  MeshHost,
  decodeHeartbeat,
  type MemberRecord,
  type MemberStatus,
} from '../src/index.ts';
import { allAlive, FAST, HEARTBEAT_NEVER, LOOPBACK, statusOf, stopDevice, TestMesh, waitFor, waitForSubscriptions, type Device } from './fixtures/membership-mesh.ts';

test('three devices see each other alive; a stopped one goes suspect, then down, then is dropped', async () => {
  const mesh = new TestMesh();
  try {
    let loadOfA = 0.5;
    const a = await mesh.device('a', { ...FAST, stats: () => ({ usageBytes: 1_000, load: loadOfA }) });
    const b = await mesh.device('b', FAST, [a]);
    const c = await mesh.device('c', FAST, [a, b]);
    const all = [a, b, c];
    await waitFor('all devices to see all alive', () => all.every((device) => allAlive(device, all)));

    const [self, ...others] = b.membership!.list();
    assert.equal(self.self, true);
    assert.equal(self.peerId, b.id);
    const seenA = others.find((member) => member.peerId === a.id)!;
    assert.equal(seenA.name, 'a');
    assert.equal(seenA.gateway, 'http://a.test:5000');
    assert.equal(seenA.api, 'http://a.test:5001');
    assert.equal(seenA.version, '1.2.3');
    assert.equal(seenA.usageBytes, 1_000);
    assert.equal(seenA.self, false);
    assert.deepEqual(Object.keys(seenA.labels).sort(), ['arch', 'hostname', 'os', 'role']);
    assert.equal(seenA.labels.role, 'test');
    assert.ok(seenA.addresses.includes(a.host.multiaddrs[0].toString()));

    const updated = new Promise<number>((resolve) => {
      b.membership!.addEventListener('peer:updated', (evt) => {
        if (evt.detail.peerId === a.id && evt.detail.load === 7) resolve(evt.detail.load);
      });
    });
    loadOfA = 7;
    assert.equal(await updated, 7);

    const transitions = new Map<Device, MemberStatus[]>([[a, []], [b, []]]);
    for (const [observer, seen] of transitions) {
      for (const status of ['alive', 'suspect', 'down'] as const) {
        observer.membership!.addEventListener(`peer:${status}`, (evt) => {
          if (evt.detail.peerId === c.id) seen.push(evt.detail.status);
        });
      }
    }
    await stopDevice(c);
    await waitFor('a and b to mark c down', () => statusOf(a, c) === 'down' && statusOf(b, c) === 'down');
    for (const [observer, seen] of transitions) {
      assert.deepEqual(seen.slice(-2), ['suspect', 'down'], `${observer === a ? 'a' : 'b'} saw ${seen}`);
      assert.ok(!seen.slice(0, -1).includes('down'), `down only at the end: ${seen}`);
    }
    await waitFor('a and b to see each other alive', () => statusOf(a, b) === 'alive' && statusOf(b, a) === 'alive');

    await waitFor('c to be dropped', () => statusOf(a, c) === undefined && statusOf(b, c) === undefined);
    assert.equal(a.membership!.list().length, 2);
  } finally {
    await mesh.stopAll();
  }
});

test('a joining device gets the whole table from one peer by sync, before any heartbeat of the others', async () => {
  const mesh = new TestMesh();
  try {
    const [a, b, c] = await mesh.trio(HEARTBEAT_NEVER);

    // d bootstraps from a only. Its own pubsub listener runs before its Membership's, so it knows
    // whether a heartbeat from a peer arrived before that peer showed up alive.
    const d = await mesh.host([a]);
    const heardFrom = new Set<string>();
    d.host.node.services.pubsub.addEventListener('message', (evt: CustomEvent<Message>) => {
      if (evt.detail.type === 'signed') heardFrom.add(evt.detail.from.toString());
    });
    const aliveBeforeHeartbeat = new Map<string, boolean>();
    d.membership = new Membership(d.host, { name: 'd', ...HEARTBEAT_NEVER });
    d.membership.addEventListener('peer:alive', (evt) => aliveBeforeHeartbeat.set(evt.detail.peerId, !heardFrom.has(evt.detail.peerId)));
    await d.membership.start();

    await waitFor('d to see everyone alive', () => allAlive(d, [a, b, c, d]));
    assert.deepEqual(Object.fromEntries(aliveBeforeHeartbeat), { [a.id]: true, [b.id]: true, [c.id]: true });
    const seenC = d.membership.list().find((member) => member.peerId === c.id)!;
    assert.equal(seenC.name, 'c');
    assert.equal(seenC.gateway, 'http://c.test:5000');
    // The exchange goes both ways: a learned d from it too.
    await waitFor('a to see d', () => statusOf(a, d) === 'alive');
  } finally {
    await mesh.stopAll();
  }
});

test('a closed connection makes the member probed at once: gone, it is suspect and then down; still there, it stays alive', async () => {
  const mesh = new TestMesh();
  try {
    // No periodic probes: only the disconnect can start one.
    const [a, b, c] = await mesh.trio({ ...HEARTBEAT_NEVER, probeTimeoutMs: 500, suspicionMs: 1_000, checkIntervalMs: 50 });
    const seen: string[] = [];
    for (const status of ['alive', 'suspect', 'down'] as const) {
      a.membership!.addEventListener(`peer:${status}`, (evt) => seen.push(`${evt.detail.name}:${evt.detail.status}`));
    }
    // c hangs up on a but lives on: a's probe dials it again and finds it.
    await c.host.node.hangUp(a.host.peerId);
    await waitFor('a to reconnect to c', () => a.host.node.getConnections(c.host.peerId).length > 0);
    await stopDevice(b);
    await waitFor('a to mark b down', () => statusOf(a, b) === 'down');
    assert.deepEqual(seen, ['b:suspect', 'b:down']);
    assert.equal(statusOf(a, c), 'alive');
  } finally {
    await mesh.stopAll();
  }
});

test('a suspicion about a live member is refuted: it heartbeats at once and stays alive everywhere', async () => {
  const mesh = new TestMesh();
  try {
    const [a, b, c] = await mesh.trio({ ...HEARTBEAT_NEVER, probeTimeoutMs: 200, suspicionMs: 1_000, checkIntervalMs: 50 });
    await waitForSubscriptions([a, b, c]);
    const heardFromB: number[] = [];
    a.host.node.services.pubsub.addEventListener('message', (evt: CustomEvent<Message>) => {
      if (evt.detail.type === 'signed' && evt.detail.from.equals(b.host.peerId)) heardFromB.push(Date.now());
    });
    const seenAtC: MemberStatus[] = [];
    for (const status of ['alive', 'suspect', 'down'] as const) {
      c.membership!.addEventListener(`peer:${status}`, (evt) => {
        if (evt.detail.peerId === b.id) seenAtC.push(evt.detail.status);
      });
    }
    // Let c's news of b age past the probe timeout, then a (a member) says b did not answer.
    await new Promise((resolve) => setTimeout(resolve, 300));
    await a.host.node.services.pubsub.publish(MEMBERSHIP_TOPIC, encodeSuspicion({ peerId: b.id, seq: Number.MAX_SAFE_INTEGER }));
    // With heartbeats an hour apart, only the suspicion can make b send one now.
    await waitFor('b to refute the suspicion with a heartbeat', () => heardFromB.length > 0);
    await waitFor('c to suspect b and then see it alive again', () => seenAtC.join() === 'suspect,alive');
    await new Promise((resolve) => setTimeout(resolve, 1_500));
    assert.deepEqual(seenAtC, ['suspect', 'alive'], 'never down');
    assert.equal(statusOf(c, b), 'alive');
  } finally {
    await mesh.stopAll();
  }
});

test('forged, malformed and oversized heartbeats are rejected and the device keeps working', async () => {
  const mesh = new TestMesh();
  try {
    const slowDown = { ...FAST, suspectAfterMs: 5_000, suspicionMs: 5_000, dropAfterMs: 20_000 };
    const a = await mesh.device('a', slowDown);
    const b = await mesh.device('b', slowDown, [a]);
    await waitFor('a and b to see each other', () => allAlive(a, [a, b]) && allAlive(b, [a, b]));

    // The forger runs no Membership: it publishes raw payloads, signed with its own key.
    const forger = await mesh.host([a]);
    const pubsub = forger.host.node.services.pubsub;
    pubsub.subscribe(MEMBERSHIP_TOPIC);
    await waitFor('the forger and a to exchange subscriptions', () =>
      pubsub.getSubscribers(MEMBERSHIP_TOPIC).some((id) => id.toString() === a.id) &&
      a.host.node.services.pubsub.getSubscribers(MEMBERSHIP_TOPIC).some((id) => id.toString() === forger.id),
    );
    const names = new Set<string>();
    a.membership!.addEventListener('peer:updated', (evt) => names.add(evt.detail.name));
    a.membership!.addEventListener('peer:alive', (evt) => names.add(evt.detail.name));

    const record = (peerId: string, fields: Partial<MemberRecord> = {}): MemberRecord => ({
      peerId,
      name: 'forged',
      addresses: [],
      labels: {},
      version: '6.6.6',
      usageBytes: 0,
      load: 0,
      seq: Number.MAX_SAFE_INTEGER,
      ts: Date.now(),
      ...fields,
    });
    const hugeLabels = Object.fromEntries(Array.from({ length: 32 }, (_, i) => [`label${i}`, 'x'.repeat(250)]));
    const text = (value: string) => new TextEncoder().encode(value);
    const rejectedBefore = a.membership!.counters.heartbeatsRejected;
    const payloads = [
      encodeHeartbeat(record(b.id)), // claims to be b
      text('not json'),
      text('{"v":1,"peerId":"x"'),
      text(JSON.stringify({ v: 1, ...record(forger.id), name: 42 })),
      text(JSON.stringify({ v: 1, ...record(forger.id) })), // the format before beats
      text(JSON.stringify({ v: 2, beat: { seq: 1, recordSeq: 1, usageBytes: -1, load: 0 } })),
      text(JSON.stringify({ v: 2, beat: { seq: 1, recordSeq: 'x', usageBytes: 0, load: 0 } })),
      text(JSON.stringify({ v: 2, beat: [1, 1, 0, 0] })),
      text(JSON.stringify({ v: 2, suspicion: { peerId: 'not-a-peer-id', seq: 1 } })),
      text(JSON.stringify({ v: 2, suspicion: { peerId: b.id, seq: -1 } })),
      text(JSON.stringify({ v: 2, relay: { peerId: b.id } })),
      text(JSON.stringify({ v: 2, relay: [{ ...record(b.id), ageMs: -5 }] })),
      text(JSON.stringify({ v: 2, relay: [record(b.id)] })), // no ageMs
      encodeHeartbeat(record(forger.id, { labels: hugeLabels })), // schema-valid but over 8 KiB
      new Uint8Array([0xff, 0xfe, 0x00]),
    ];
    const suspected: string[] = [];
    a.membership!.addEventListener('peer:suspect', (evt) => suspected.push(evt.detail.name));
    for (const payload of payloads) await pubsub.publish(MEMBERSHIP_TOPIC, payload);
    await waitFor('a to reject every bad heartbeat', () => a.membership!.counters.heartbeatsRejected - rejectedBefore === payloads.length);
    // Well-formed, but from outside the table: a does not take a stranger's word about b.
    await pubsub.publish(MEMBERSHIP_TOPIC, encodeSuspicion({ peerId: b.id, seq: Number.MAX_SAFE_INTEGER }));

    // A well-formed heartbeat about the forger itself is accepted: the validator is not just saying no.
    await pubsub.publish(MEMBERSHIP_TOPIC, encodeHeartbeat(record(forger.id, { name: 'honest-forger' })));
    await waitFor('a to accept the forger describing itself', () => statusOf(a, forger) === 'alive');
    assert.deepEqual([...names], ['honest-forger']);

    // b's real heartbeats still arrive (a hears it later than the forgery) and b is still b.
    const lastSeenB = () => a.membership!.list().find((member) => member.peerId === b.id)!.lastSeen;
    const heardAfterForgery = Date.now();
    await waitFor('a to hear b again', () => lastSeenB() > heardAfterForgery);
    const seenB = a.membership!.list().find((member) => member.peerId === b.id)!;
    assert.equal(seenB.name, 'b');
    assert.equal(seenB.status, 'alive');
    assert.deepEqual(suspected, []);
    assert.equal(a.membership!.counters.heartbeatsRejected - rejectedBefore, payloads.length);

    // So is a relay of a member a has not heard of, taken as hearsay (its own word would override it).
    const ghost = (await mesh.host()).id;
    await pubsub.publish(MEMBERSHIP_TOPIC, encodeRelay([{ ...record(ghost, { name: 'ghost', seq: 1 }), ageMs: 10 }]));
    await waitFor('a to take the relayed member', () => a.membership!.list().some((member) => member.peerId === ghost));
    assert.deepEqual([...names], ['honest-forger', 'ghost']);
  } finally {
    await mesh.stopAll();
  }
});

test('a member one device learns by sync is relayed at once to devices that never met it', async () => {
  const mesh = new TestMesh();
  try {
    const b = await mesh.device('b', HEARTBEAT_NEVER);
    const c = await mesh.device('c', HEARTBEAT_NEVER, [b]);
    await waitFor('b and c to see each other', () => allAlive(b, [b, c]) && allAlive(c, [b, c]));
    await waitForSubscriptions([b, c]);
    const relayedToC: string[][] = [];
    c.host.node.services.pubsub.addEventListener('message', (evt: CustomEvent<Message>) => {
      const message = evt.detail;
      if (message.type !== 'signed' || message.from.toString() !== b.id) return;
      const { relay } = decodeHeartbeat(message.data, 8_192);
      if (relay) relayedToC.push(relay.map((member) => member.peerId));
    });

    // a knows only b: b learns a by their sync, and only b's relay can tell c (nobody heartbeats).
    const a = await mesh.device('a', HEARTBEAT_NEVER, [b]);
    // (b may have relayed c itself before: it learned c by sync too.)
    await waitFor('c to see a alive and b to relay it', () => statusOf(c, a) === 'alive' && relayedToC.some((ids) => ids.includes(a.id)));
    const seenA = c.membership!.list().find((member) => member.peerId === a.id)!;
    assert.equal(seenA.gateway, 'http://a.test:5000');
    assert.ok(b.membership!.counters.relaysSent >= 1 && c.membership!.counters.relaysReceived >= 1);
  } finally {
    await mesh.stopAll();
  }
});

test('a malformed sync answer closes that stream only; the table takes nothing from it', async () => {
  const mesh = new TestMesh();
  try {
    const syncFailures: { peer: string; err: Error }[] = [];
    const log = {
      debug(obj: object, msg: string) {
        if (msg === 'membership sync failed') syncFailures.push(obj as { peer: string; err: Error });
      },
      warn() {},
    };
    const a = await mesh.device('a', { ...HEARTBEAT_NEVER, log });
    // A peer that speaks the sync protocol but answers with one good and one bad member.
    const liar = await mesh.host();
    const phantom = await mesh.host();
    const good = { peerId: phantom.id, name: 'phantom', addresses: [], labels: {}, version: '1', usageBytes: 0, load: 0, seq: 1, ts: 1, ageMs: 0 };
    await liar.host.node.handle(MEMBERSHIP_SYNC_PROTOCOL, async (stream: Stream) => {
      for await (const _chunk of stream); // read the request to its end
      stream.send(encodeSync([good, { ...good, peerId: liar.id, load: -1 }]));
      await stream.close();
    });
    await liar.host.node.dial(a.host.multiaddrs[0]);

    await waitFor('a to give up on the answer', () => syncFailures.length > 0);
    assert.equal(syncFailures[0].peer, liar.id);
    assert.match(syncFailures[0].err.message, /members\[1\]\.load is not a non-negative number/);
    assert.equal(a.host.node.getConnections(liar.host.peerId).length, 1, 'the connection survives');
    assert.deepEqual(a.membership!.list().map((member) => member.name), ['a']);

    // a still exchanges tables with an honest newcomer.
    const b = await mesh.device('b', HEARTBEAT_NEVER, [a]);
    await waitFor('a and b to exchange tables', () => allAlive(a, [a, b]) && allAlive(b, [a, b]));
  } finally {
    await mesh.stopAll();
  }
});

test('a beat from an unknown member, or naming a newer record than the device holds, makes the device ask the member', async () => {
  const mesh = new TestMesh();
  try {
    const a = await mesh.device('a', FAST);
    // The beater runs no Membership: it answers the sync protocol with its own record and
    // publishes beats only, so a can learn its record from nowhere but that answer.
    const beater = await mesh.host([a]);
    const own = (name: string, seq: number): MemberRecord =>
      ({ peerId: beater.id, name, addresses: [], labels: {}, version: '1', usageBytes: 0, load: 0, seq, ts: Date.now() });
    let record = own('beater', 10);
    let asked = 0;
    const pubsub = beater.host.node.services.pubsub;
    pubsub.subscribe(MEMBERSHIP_TOPIC);
    await waitFor('the beater and a to exchange subscriptions', () =>
      pubsub.getSubscribers(MEMBERSHIP_TOPIC).some((id) => id.toString() === a.id) &&
      a.host.node.services.pubsub.getSubscribers(MEMBERSHIP_TOPIC).some((id) => id.toString() === beater.id),
    );
    // Only now does the beater answer the sync protocol: a's exchange on connect found nothing.
    await beater.host.node.handle(MEMBERSHIP_SYNC_PROTOCOL, async (stream: Stream) => {
      asked++;
      for await (const _chunk of stream); // read the request to its end
      stream.send(encodeSync([{ ...record, ageMs: 0 }]));
      await stream.close();
    });
    const member = () => a.membership!.list().find((m) => m.peerId === beater.id);
    assert.equal(member(), undefined);
    await pubsub.publish(MEMBERSHIP_TOPIC, encodeBeat({ seq: 50, recordSeq: 10, usageBytes: 0, load: 0 }));
    await waitFor('a to ask the unknown beater for its record', () => member()?.name === 'beater');
    assert.equal(asked, 1);

    let seq = 100;
    await pubsub.publish(MEMBERSHIP_TOPIC, encodeBeat({ seq: seq++, recordSeq: 10, usageBytes: 7, load: 0.25 }));
    await waitFor('a to take the figures of the beat', () => member()?.usageBytes === 7 && member()?.load === 0.25);
    assert.equal(asked, 1, 'a beat naming the record a holds asks nothing');

    // The record changed, and its heartbeat never reached a: the next beat names it.
    record = own('renamed', 200);
    await pubsub.publish(MEMBERSHIP_TOPIC, encodeBeat({ seq: 201, recordSeq: 200, usageBytes: 8, load: 0 }));
    await waitFor('a to ask the beater and take its new record', () => member()?.name === 'renamed');
    assert.equal(member()!.seq, 200);
    assert.equal(asked, 2);

    // A replayed beat changes nothing.
    await pubsub.publish(MEMBERSHIP_TOPIC, encodeBeat({ seq: 150, recordSeq: 10, usageBytes: 99, load: 0 }));
    await pubsub.publish(MEMBERSHIP_TOPIC, encodeBeat({ seq: 202, recordSeq: 200, usageBytes: 9, load: 0 }));
    await waitFor('a to take the newer beat', () => member()?.usageBytes === 9);
    assert.equal(member()!.name, 'renamed');
  } finally {
    await mesh.stopAll();
  }
});

test('Membership refuses inconsistent options', () => {
  const host = new MeshHost({ listen: LOOPBACK, mdns: false });
  assert.throws(() => new Membership(host, { suspectAfterMs: 5_000, suspicionMs: 1_000, dropAfterMs: 6_000 }), /suspectAfterMs \+ suspicionMs < dropAfterMs/);
  assert.throws(() => new Membership(host, { probeTimeoutMs: 0 }), /probeTimeoutMs must be positive/);
  assert.throws(() => new Membership(host, { gatewayUrl: 'ftp://x' }), /gatewayUrl is not an http\(s\) URL/);
  assert.throws(() => new Membership(host, { labels: { '': 'x' } }), /key of 0 characters/);
  assert.throws(() => new Membership(host, { heartbeatIntervalMs: 0 }), /heartbeatIntervalMs must be positive/);
});
