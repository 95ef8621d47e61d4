import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, rm } from 'node:fs/promises';
import { connect, type Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { Message } from '@libp2p/gossipsub';
import { KEEP_ALIVE } from '@libp2p/interface';
import { CID } from 'multiformats/cid';
import * as raw from 'multiformats/codecs/raw';
import { sha256 } from 'multiformats/hashes/sha2';
import { MeshHost, generateSwarmKey, loadOrCreatePeerKey, parseSwarmKey, type MeshHostOptions } from '../src/index.ts';
import { waitFor } from './fixtures/membership-mesh.ts';

// mDNS stays off: the default network namespace's lo has no multicast.
const LOOPBACK = ['/ip4/127.0.0.1/tcp/0'];
// A handshake through mismatched pnet keys is garbage to the other side: depending on the random
// bytes it fails at once or stalls until libp2p's dial timeout (5 s). Either way it must fail.
const rejectedDial = () => ({ signal: AbortSignal.timeout(1_000) });

describe('MeshHost over TCP on 127.0.0.1', () => {
  const swarmKey = parseSwarmKey(generateSwarmKey());
  const hosts: MeshHost[] = [];
  let dataDir: string;
  let seed: MeshHost;
  let joiner: MeshHost;

  async function startHost(options: MeshHostOptions): Promise<MeshHost> {
    const host = new MeshHost({ listen: LOOPBACK, mdns: false, ...options });
    hosts.push(host);
    await host.start();
    return host;
  }

  before(async () => {
    dataDir = await mkdtemp(join(tmpdir(), 'shoal-mesh-'));
    seed = await startHost({ swarmKey, privateKey: await loadOrCreatePeerKey(join(dataDir, 'seed')) });
    joiner = await startHost({ swarmKey, bootstrap: [seed.multiaddrs[0].toString()] });
  });

  after(async () => {
    await Promise.all(hosts.map((host) => host.stop()));
    await rm(dataDir, { recursive: true, force: true });
  });

  test('a host with the same swarm key connects via bootstrap, keeps the peer alive and pings it', async () => {
    assert.equal(joiner.node.getConnections(seed.peerId).length, 1);
    await waitFor('the seed to see the joiner', () => seed.node.getConnections(joiner.peerId).length > 0);
    const peer = await joiner.node.peerStore.get(seed.peerId);
    assert.ok(peer.tags.has(KEEP_ALIVE));

    const rtt = await joiner.node.services.ping.ping(seed.peerId);
    assert.ok(Number.isFinite(rtt) && rtt >= 0);
    await seed.node.services.ping.ping(joiner.peerId);
  });

  test('a host with a different swarm key cannot connect', async () => {
    const outsider = await startHost({ swarmKey: parseSwarmKey(generateSwarmKey()) });
    await assert.rejects(outsider.node.dial(seed.multiaddrs[0], rejectedDial()));
    await waitFor('no connection between outsider and seed', () =>
      outsider.node.getConnections(seed.peerId).length === 0 && seed.node.getConnections(outsider.peerId).length === 0,
    );
    // The seed's own dial the other way round fails too.
    await assert.rejects(seed.node.dial(outsider.multiaddrs[0], rejectedDial()));
    assert.equal(seed.node.getConnections(outsider.peerId).length, 0);
  });

  test('a host without a swarm key cannot join a private network but can join an open one', async () => {
    const open = await startHost({});
    await assert.rejects(open.node.dial(seed.multiaddrs[0], rejectedDial()));
    assert.equal(open.node.getConnections(seed.peerId).length, 0);

    const otherOpen = await startHost({ bootstrap: [open.multiaddrs[0].toString()] });
    assert.equal(otherOpen.node.getConnections(open.peerId).length, 1);
  });

  test('gossipsub carries a signed message once subscriptions are exchanged', async () => {
    const topic = 'shoal/test/hello';
    seed.node.services.pubsub.subscribe(topic);
    joiner.node.services.pubsub.subscribe(topic);
    // A publish before the peers know each other's subscriptions reaches nobody.
    await waitFor('subscriptions to be exchanged', () =>
      seed.node.services.pubsub.getSubscribers(topic).some((id) => id.equals(joiner.peerId)) &&
      joiner.node.services.pubsub.getSubscribers(topic).some((id) => id.equals(seed.peerId)),
    );
    const received = new Promise<Message>((resolve) => {
      joiner.node.services.pubsub.addEventListener('message', (evt) => {
        if (evt.detail.topic === topic) resolve(evt.detail);
      });
    });
    const result = await seed.node.services.pubsub.publish(topic, new TextEncoder().encode('hello mesh'));
    assert.ok(result.recipients.some((id) => id.equals(joiner.peerId)));
    const message = await received;
    assert.equal(new TextDecoder().decode(message.data), 'hello mesh');
    assert.equal(message.type, 'signed');
    assert.ok(message.type === 'signed' && message.from.equals(seed.peerId));
  });

  test('the LAN DHT finds a provider announced by the other host', async () => {
    // Only works because the DHT keeps private (here loopback) addresses and runs in server mode.
    // provide() right after connecting can reach nobody: wait until each routing table holds the
    // other peer (kad-dht's public type hides the table, hence the cast).
    const routingTableSize = (host: MeshHost) =>
      (host.node.services.dht as unknown as { routingTable: { size: number } }).routingTable.size;
    await waitFor('the DHT routing tables to fill', () => routingTableSize(seed) > 0 && routingTableSize(joiner) > 0);
    const cid = CID.createV1(raw.code, await sha256.digest(new TextEncoder().encode('a blob')));
    await seed.node.contentRouting.provide(cid, { signal: AbortSignal.timeout(5_000) });
    let provider;
    for await (const found of joiner.node.contentRouting.findProviders(cid, { signal: AbortSignal.timeout(5_000) })) {
      provider = found;
      break; // the iterator only ends when the whole query finishes
    }
    assert.ok(provider, 'no provider found');
    assert.ok(provider.id.equals(seed.peerId));
    const [seedAddr] = seed.node.getMultiaddrs().map((addr) => addr.toString());
    assert.ok(provider.multiaddrs.some((addr) => seedAddr === `${addr}/p2p/${seed.peerId}`));
  });

  test('a host accepts a dial while more inbound handshakes are pending than libp2p allows by default', async () => {
    // Sockets that never handshake stay pending until libp2p's inbound upgrade timeout (10 s),
    // like the dials of devices that start together and are too busy to answer at once.
    const components = seed.multiaddrs[0].getComponents();
    const host = components.find((component) => component.name === 'ip4')!.value!;
    const port = Number(components.find((component) => component.name === 'tcp')!.value);
    const stalled = await Promise.all(
      Array.from({ length: 12 }, () => new Promise<Socket>((resolve, reject) => {
        const socket = connect(port, host, () => resolve(socket));
        socket.on('error', reject);
      })),
    );
    try {
      const late = await startHost({ swarmKey });
      await late.node.dial(seed.multiaddrs[0], { signal: AbortSignal.timeout(5_000) });
      assert.equal(late.node.getConnections(seed.peerId).length, 1);
    } finally {
      for (const socket of stalled) socket.destroy();
    }
  });

  test('a host restarted with the same data dir keeps its peer id and is reachable again', async () => {
    const before = seed.peerId;
    await seed.stop();
    assert.throws(() => seed.node, /not started/);
    seed = await startHost({ swarmKey, privateKey: await loadOrCreatePeerKey(join(dataDir, 'seed')) });
    assert.ok(seed.peerId.equals(before));
    // The port is new (tcp/0), so dial the address the restarted seed listens on now.
    await joiner.node.dial(seed.multiaddrs[0]);
    assert.ok(joiner.node.getConnections(seed.peerId).length > 0);
  });
});

test('bootstrap addresses must name the peer', () => {
  assert.throws(() => new MeshHost({ bootstrap: ['/ip4/127.0.0.1/tcp/4001'] }), /lacks \/p2p\/<peer id>/);
  assert.throws(() => new MeshHost({ bootstrap: ['not-a-multiaddr'] }), /is not a multiaddr/);
});
