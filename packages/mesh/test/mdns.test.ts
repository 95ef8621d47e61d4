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
