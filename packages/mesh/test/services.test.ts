import { test } from 'node:test';
import assert from 'node:assert/strict';
import { encodeHeartbeat, MEMBERSHIP_TOPIC, MembershipFormatError, type MemberRecord, type ServiceInstance } from '../src/index.ts';
import { FAST, HEARTBEAT_NEVER, statusOf, stopDevice, TestMesh, waitFor, waitForSubscriptions, type Device } from './fixtures/membership-mesh.ts';

function instancesOf(observer: Device, name?: string): ServiceInstance[] {
  return observer.membership!.services(name);
}

function summary(instances: ServiceInstance[]): string[] {
  return instances.map((instance) => `${instance.name}@${instance.device}=${instance.endpoint}`);
}

test('a registered service is listed on every device at once, with its device, endpoint and meta; deregistering removes it everywhere', async () => {
  const mesh = new TestMesh();
  try {
    // No interval heartbeats: only the immediate announcement of a change can spread it.
    const a = await mesh.device('a', HEARTBEAT_NEVER);
    const b = await mesh.device('b', HEARTBEAT_NEVER, [a]);
    const c = await mesh.device('c', { ...HEARTBEAT_NEVER, serviceHost: 'c.lan' }, [a, b]);
    const all = [a, b, c];
    await waitForSubscriptions(all);

    a.membership!.registerService({ name: 'web', port: 8080, protocol: 'http', meta: { version: '2.1', zone: 'north' } });
    b.membership!.registerService({ name: 'db', url: 'tcp://db.internal:5432' });
    c.membership!.registerService({ name: 'web', port: 9090, protocol: 'http' });
    const expected = ['db@b=tcp://db.internal:5432', 'web@a=http://127.0.0.1:8080', 'web@c=http://c.lan:9090'];
    await waitFor('every device to list every service', () => all.every((device) => summary(instancesOf(device)).join() === expected.join()));

    for (const observer of all) {
      const [webOnA, webOnC] = instancesOf(observer, 'web');
      assert.deepEqual(webOnA, {
        name: 'web',
        port: 8080,
        protocol: 'http',
        meta: { version: '2.1', zone: 'north' },
        device: 'a',
        peerId: a.id,
        status: 'alive',
        endpoint: 'http://127.0.0.1:8080',
      });
      assert.equal(webOnC.peerId, c.id);
      const [db] = instancesOf(observer, 'db');
      assert.equal(db.protocol, 'tcp', 'tcp is the default protocol');
      assert.equal(db.url, 'tcp://db.internal:5432');
      assert.equal(db.port, undefined);
    }

    // Registering again under the same name replaces the entry.
    a.membership!.registerService({ name: 'web', port: 8081, protocol: 'http' });
    await waitFor('the new port everywhere', () => all.every((device) => instancesOf(device, 'web')[0]?.endpoint === 'http://127.0.0.1:8081'));
    assert.equal(instancesOf(b, 'web')[0].meta, undefined);

    assert.equal(a.membership!.deregisterService('web'), true);
    assert.equal(a.membership!.deregisterService('web'), false);
    const remaining = ['db@b=tcp://db.internal:5432', 'web@c=http://c.lan:9090'];
    await waitFor('web on a to vanish everywhere', () => all.every((device) => summary(instancesOf(device)).join() === remaining.join()));
  } finally {
    await mesh.stopAll();
  }
});

test('a TTL entry vanishes everywhere unless registered again in time', async () => {
  const mesh = new TestMesh();
  try {
    const a = await mesh.device('a', FAST);
    const b = await mesh.device('b', FAST, [a]);
    await waitForSubscriptions([a, b]);

    const ttlMs = 1_500;
    a.membership!.registerService({ name: 'lapsing', port: 7000, ttlMs });
    const renew = () => a.membership!.registerService({ name: 'renewed', port: 7001, ttlMs });
    renew();
    const renewal = setInterval(renew, 200);
    try {
      await waitFor('b to list both', () => instancesOf(b).length === 2);
      const [lapsing] = instancesOf(b, 'lapsing');
      assert.ok(lapsing.expiresAt !== undefined && lapsing.expiresAt > Date.now() - 100 && lapsing.expiresAt <= Date.now() + ttlMs + 100);
      await waitFor('the unrenewed entry to vanish on b', () => instancesOf(b, 'lapsing').length === 0);
      assert.deepEqual(instancesOf(a, 'lapsing'), [], 'and on a itself');
      assert.deepEqual(summary(instancesOf(b)), ['renewed@a=tcp://127.0.0.1:7001']);
    } finally {
      clearInterval(renewal);
    }
    await waitFor('the renewed entry to vanish once renewals stop', () => instancesOf(b).length === 0);
    assert.equal(statusOf(b, a), 'alive', 'a itself is still alive');
  } finally {
    await mesh.stopAll();
  }
});

test("a stopped device's services stay listed as suspect and vanish once it is down", async () => {
  const mesh = new TestMesh();
  try {
    const a = await mesh.device('a', FAST);
    const b = await mesh.device('b', FAST, [a]);
    a.membership!.registerService({ name: 'cache', port: 6379 });
    await waitFor('b to list the cache', () => instancesOf(b, 'cache').length === 1);

    await stopDevice(a);
    await waitFor('b to suspect a', () => statusOf(b, a) === 'suspect');
    const whileSuspect = instancesOf(b, 'cache');
    // The closed connection makes a suspect at once, so this runs long before a can be down.
    assert.deepEqual(whileSuspect.map((instance) => instance.status), ['suspect']);
    await waitFor('b to mark a down', () => statusOf(b, a) === 'down');
    assert.deepEqual(instancesOf(b), []);
  } finally {
    await mesh.stopAll();
  }
});

test('a joining device learns existing services by table sync, TTL deadlines included and expired entries not', async () => {
  const mesh = new TestMesh();
  try {
    const a = await mesh.device('a', HEARTBEAT_NEVER);
    const b = await mesh.device('b', HEARTBEAT_NEVER, [a]);
    await waitForSubscriptions([a, b]);
    a.membership!.registerService({ name: 'api', port: 3000, protocol: 'grpc', meta: { tier: 'gold' } });
    a.membership!.registerService({ name: 'lease', url: 'https://a.test/lease', ttlMs: 60_000 });
    b.membership!.registerService({ name: 'brief', port: 3001, ttlMs: 300 });
    await waitFor('a and b to list all services', () => instancesOf(a).length === 3 && instancesOf(b).length === 3);
    // The last heartbeat of b still carries 'brief'; the tables handed to joiners must not.
    await waitFor('brief to expire', () => instancesOf(a, 'brief').length === 0 && instancesOf(b, 'brief').length === 0);

    // Nobody heartbeats again: d hears of a only from b's relayed table, e from a's own (and of b the other way round).
    const d = await mesh.device('d', HEARTBEAT_NEVER, [b]);
    const e = await mesh.device('e', HEARTBEAT_NEVER, [a]);
    for (const joiner of [d, e]) {
      await waitFor('the joiners to list a’s services', () => statusOf(joiner, a) === 'alive' && instancesOf(joiner).length > 0);
      assert.deepEqual(summary(instancesOf(joiner)), ['api@a=grpc://127.0.0.1:3000', 'lease@a=https://a.test/lease']);
    }
    const [api, lease] = instancesOf(d);
    assert.equal(api.endpoint, 'grpc://127.0.0.1:3000');
    assert.equal(api.device, 'a');
    assert.deepEqual(api.meta, { tier: 'gold' });
    assert.equal(lease.endpoint, 'https://a.test/lease');
    // The deadline survives the relay: d's is a's own give or take the exchange and rounding.
    const deadlineOnA = instancesOf(a, 'lease')[0].expiresAt!;
    assert.ok(Math.abs(lease.expiresAt! - deadlineOnA) < 1_000, `${lease.expiresAt} vs ${deadlineOnA}`);
  } finally {
    await mesh.stopAll();
  }
});

test('malformed service data in a heartbeat is rejected by the validator; well-formed services are accepted', async () => {
  const mesh = new TestMesh();
  try {
    const a = await mesh.device('a', { ...FAST, suspectAfterMs: 5_000, suspicionMs: 5_000, dropAfterMs: 20_000 });
    const forger = await mesh.host([a]);
    const pubsub = forger.host.node.services.pubsub;
    pubsub.subscribe(MEMBERSHIP_TOPIC);
    await waitForSubscriptions([a, forger]);

    let seq = 1;
    const heartbeat = (services: unknown): Uint8Array => {
      const record: MemberRecord = { peerId: forger.id, name: 'forger', addresses: [], labels: {}, version: '1', usageBytes: 0, load: 0, seq: seq++, ts: Date.now() };
      return encodeHeartbeat({ ...record, services } as MemberRecord);
    };
    const web = { name: 'web', port: 80, protocol: 'http' };
    const badServices = [
      'not an array',
      [{ ...web, name: 'Web' }],
      [{ ...web, name: '' }],
      [{ ...web, name: 'x'.repeat(64) }],
      [{ ...web, port: 70_000 }],
      [{ ...web, port: 80.5 }],
      [{ name: 'web', protocol: 'http' }], // neither port nor url
      [{ ...web, url: 'http://x.test/' }], // both
      [{ name: 'web', protocol: 'http', url: 'ftp://x.test/' }],
      [{ ...web, protocol: 'HTTP' }],
      [{ name: 'web', port: 80 }], // protocol missing on the wire
      [{ ...web, meta: Object.fromEntries(Array.from({ length: 17 }, (_, i) => [`k${i}`, 'v'])) }],
      [{ ...web, meta: { key: 42 } }],
      [{ ...web, ttlMs: 0 }],
      [{ ...web, ttlMs: -5 }],
      [web, web], // the same name twice
      Array.from({ length: 65 }, (_, i) => ({ ...web, name: `s${i}` })),
    ];
    const rejectedBefore = a.membership!.counters.heartbeatsRejected;
    for (const services of badServices) await pubsub.publish(MEMBERSHIP_TOPIC, heartbeat(services));
    await waitFor('a to reject every bad heartbeat', () => a.membership!.counters.heartbeatsRejected - rejectedBefore === badServices.length);
    assert.equal(statusOf(a, forger), undefined, 'the forger never made it into the table');

    await pubsub.publish(MEMBERSHIP_TOPIC, heartbeat([{ ...web, meta: { ok: 'yes' }, extra: 'dropped' }]));
    await waitFor('a to list the well-formed service', () => instancesOf(a, 'web').length === 1);
    assert.deepEqual(instancesOf(a, 'web')[0], {
      name: 'web',
      port: 80,
      protocol: 'http',
      meta: { ok: 'yes' },
      device: 'forger',
      peerId: forger.id,
      status: 'alive',
      endpoint: 'http://127.0.0.1:80',
    });
    assert.equal(a.membership!.counters.heartbeatsRejected - rejectedBefore, badServices.length);
  } finally {
    await mesh.stopAll();
  }
});

test('registerService refuses bad registrations and sets that would not fit a heartbeat, and keeps what it had', async () => {
  const mesh = new TestMesh();
  try {
    const a = await mesh.device('a', HEARTBEAT_NEVER);
    const membership = a.membership!;
    assert.throws(() => membership.registerService({ name: 'Bad Name', port: 1 }), MembershipFormatError);
    assert.throws(() => membership.registerService({ name: 'web' }), /needs either port or url/);
    assert.throws(() => membership.registerService({ name: 'web', url: 'ftp://x.test/' }), /not an http\(s\) or tcp URL/);
    assert.throws(() => membership.registerService({ name: 'web', port: 80, ttlMs: 0 }), /ttlMs must be a positive integer/);

    // Each of these is valid alone (16 keys of 250 characters), but two do not fit in 8 KiB.
    const meta = Object.fromEntries(Array.from({ length: 16 }, (_, i) => [`key${i}`, 'v'.repeat(250)]));
    membership.registerService({ name: 'first', port: 1, meta: { small: 'yes' } });
    membership.registerService({ name: 'big', port: 2, meta });
    assert.throws(() => membership.registerService({ name: 'bigger', port: 3, meta }), /heartbeat would take \d+ bytes, more than maxHeartbeatBytes \(8192\)/);
    assert.throws(() => membership.registerService({ name: 'first', port: 4, meta }), /maxHeartbeatBytes/);
    assert.deepEqual(summary(membership.services()), ['big@a=tcp://127.0.0.1:2', 'first@a=tcp://127.0.0.1:1'], 'the failed registrations changed nothing');
    assert.deepEqual(membership.services('first')[0].meta, { small: 'yes' });
    assert.equal(membership.deregisterService('big'), true);

    for (let i = 1; i < 64; i++) membership.registerService({ name: `s${i}`, port: 1000 + i });
    assert.throws(() => membership.registerService({ name: 'one-more', port: 5 }), /already has 64 services/);
    membership.registerService({ name: 's1', port: 5 }); // replacing is still fine
    assert.equal(membership.services().length, 64);
  } finally {
    await mesh.stopAll();
  }
});
