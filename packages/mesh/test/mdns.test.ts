import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFile, spawnSync } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';

// The default network namespace's lo has no multicast, so the pair runs in a private one
// (unprivileged user + network namespace) whose lo is given multicast and a route for it.
const netnsSetup = 'ip link set lo up && ip link set lo multicast on && ip route add 224.0.0.0/4 dev lo';
const canUnshare = spawnSync('unshare', ['-rn', 'sh', '-c', netnsSetup]).status === 0;

/** Runs a fixture in a private network namespace and returns the JSON of its last line. */
async function inPrivateNetwork(fixtureName: string): Promise<unknown> {
  const fixture = fileURLToPath(new URL(`./fixtures/${fixtureName}`, import.meta.url));
  const { stdout } = await promisify(execFile)(
    'unshare',
    ['-rn', 'sh', '-c', `${netnsSetup} && exec "$0" "$1"`, process.execPath, fixture],
    { timeout: 15_000 },
  );
  return JSON.parse(stdout.trim().split('\n').at(-1)!);
}

test('two hosts on one LAN find and connect to each other by mDNS', { skip: !canUnshare && 'needs unshare -rn' }, async () => {
  assert.deepEqual(await inPrivateNetwork('mdns-pair.ts'), { connected: true, keptAlive: true });
});

test('a device found by mDNS before it accepts connections is dialled again', { skip: !canUnshare && 'needs unshare -rn' }, async () => {
  assert.deepEqual(await inPrivateNetwork('mdns-late-peer.ts'), { connected: true });
});

test('record beacons carry signed records between devices of one swarm only, and turn away forgeries', { skip: !canUnshare && 'needs unshare -rn' }, async () => {
  const seen = (await inPrivateNetwork('record-beacon.ts')) as {
    capturedForged: boolean;
    forgeries: { a: string[]; b: string[] };
    a: string[];
    b: string[];
    other: string[];
    open: string[];
  };
  assert.ok(seen.capturedForged, "the forger's own beacon went out");
  // b started after a published: it heard a from the answer to its start query, and a's next
  // record at once. The forger holds the swarm key, so its own record counts (as its own).
  assert.deepEqual(seen.b, ['a1 from a', 'a2 from a', 'forged from forger']);
  assert.deepEqual(seen.a, ['b1 from b', 'b2 from b', 'forged from forger']);
  // Another swarm's key, or none: nothing in either direction.
  assert.deepEqual(seen.other, []);
  assert.deepEqual(seen.open, []);
  // Each forgery was seen and turned away for its own reason (a skips those under its own name,
  // b those under b's).
  assert.deepEqual(seen.forgeries.a, ['Envelope signature is not valid for the given domain', 'bad swarm key HMAC', 'bad swarm key HMAC', 'not a record beacon frame']);
  assert.equal(seen.forgeries.b.length, 3);
  assert.match(seen.forgeries.b[2]!, /^signed by \S+, answered as \S+\._shoal-record\._udp\.local$/);
});

test('devices that never connect still know each other by the record beacon, and its repeats are no news', { skip: !canUnshare && 'needs unshare -rn' }, async () => {
  const seen = (await inPrivateNetwork('membership-beacon.ts')) as {
    aSeesB: boolean;
    bSeesA: boolean;
    connections: number;
    service: string[];
    settled: { a: number; b: number };
    after: { a: number; b: number };
    tables: Record<string, string[]>;
  };
  assert.ok(seen.aSeesB && seen.bSeesA, 'each alive in the other’s table');
  assert.equal(seen.connections, 0, 'no libp2p connection between them');
  // b's first record and then the one with its new service.
  assert.deepEqual(seen.service, ['web on b']);
  assert.ok(seen.settled.a >= 2 && seen.settled.b >= 1, `beacon records taken: ${JSON.stringify(seen.settled)}`);
  assert.deepEqual(seen.after, seen.settled, 'records answered again to a later query are not counted as news');
  assert.deepEqual(seen.tables, { a: ['a', 'b'], b: ['a', 'b'], other: ['other'] });
});
