import assert from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';
import { join } from 'node:path';
import { run } from './helpers/exec.ts';
import { SHOAL_BIN, startShoalNode, type RunningShoalNode } from './helpers/node.ts';
import { Scratch } from './helpers/scratch.ts';

interface Peer {
  name: string;
  peerId: string;
  status: string;
  gateway?: string;
  labels: Record<string, string>;
}

const CLI = SHOAL_BIN;

async function peersOf(node: RunningShoalNode): Promise<Peer[]> {
  return (await (await fetch(`${node.apiUrl}/api/peers`)).json()) as Peer[];
}

async function until(what: string, check: () => Promise<boolean>, timeoutMs = 15_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!(await check())) {
    if (Date.now() > deadline) throw new Error(`timed out waiting until ${what}`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

function meshAddress(node: RunningShoalNode): string {
  const line = node.logs().find((e) => e.msg === 'mesh listening');
  const addresses = line?.addresses as string[] | undefined;
  assert.ok(addresses?.length, `no "mesh listening" line with addresses:\n${node.logText(20)}`);
  return addresses[0]!;
}

describe('two shoal nodes on loopback, joined by a bootstrap address', () => {
  let scratch: Scratch;
  let a: RunningShoalNode;
  let b: RunningShoalNode;

  before(async () => {
    scratch = await Scratch.create();
    const swarmKey = join(scratch.root, 'swarm.key');
    await run('sh', ['-c', `"${process.execPath}" "${CLI}" keygen > "${swarmKey}"`]);
    a = await startShoalNode({ dataDir: await scratch.dir('a'), name: 'device-a', swarmKey, labels: ['zone=north'] });
    b = await startShoalNode({ dataDir: await scratch.dir('b'), name: 'device-b', swarmKey, bootstrap: [meshAddress(a)] });
  });

  after(async () => {
    await b?.stop();
    await a?.stop();
    await scratch?.remove();
  });

  it('each lists both devices alive, with gateway and labels', async () => {
    for (const node of [a, b]) {
      await until('both alive', async () => (await peersOf(node)).filter((p) => p.status === 'alive').length === 2);
    }
    const seenByB = (await peersOf(b)).find((p) => p.name === 'device-a')!;
    assert.equal(seenByB.gateway, a.gatewayUrl);
    assert.equal(seenByB.labels.zone, 'north');
    assert.equal(seenByB.labels.os, 'linux');
  });

  it('shoal peers prints the table', async () => {
    const { stdout } = await run(process.execPath, [CLI, 'peers', '--api', b.apiUrl]);
    const lines = stdout.trim().split('\n');
    assert.match(lines[0]!, /^NAME\s+PEER ID\s+STATUS\s+LAST SEEN\s+GATEWAY\s+LABELS$/);
    assert.ok(lines.some((l) => /^device-a\s+12D3KooW\S+\s+alive\s/.test(l)), stdout);
    assert.ok(lines.some((l) => /^device-b\s+12D3KooW\S+\s+alive\s/.test(l)), stdout);
  });

  it('a service registered on one device is listed on the other, and gone once deregistered', async () => {
    const shoal = (args: string[]) => run(process.execPath, [CLI, ...args]);
    const registered = await shoal(['services', 'register', 'telemetry', '--port', '9100', '--protocol', 'http', '--meta', 'path=/metrics', '--api', a.apiUrl]);
    assert.match(registered.stdout, /^registered telemetry at http:\/\/\S+:9100$/m);
    await until('b lists the service', async () => (await shoal(['services', 'telemetry', '--api', b.apiUrl])).stdout.includes('device-a'));
    const table = (await shoal(['services', '--api', b.apiUrl])).stdout.split('\n');
    assert.match(table[0]!, /^NAME\s+DEVICE\s+ENDPOINT\s+PROTOCOL\s+STATUS\s+META$/);
    assert.ok(table.some((l) => /^telemetry\s+device-a\s+http:\/\/\S+:9100\s+http\s+alive\s+path=\/metrics$/.test(l)), table.join('\n'));
    const bad = await fetch(`${a.apiUrl}/api/services`, { method: 'POST', body: '{"name":"Bad Name","port":1}' });
    assert.equal(bad.status, 400);
    assert.match(((await bad.json()) as { error: string }).error, /name/);
    await shoal(['services', 'deregister', 'telemetry', '--api', a.apiUrl]);
    await until('the service is gone on b', async () => JSON.parse((await shoal(['services', '--json', '--api', b.apiUrl])).stdout).length === 0);
    assert.equal((await fetch(`${a.apiUrl}/api/services/telemetry`, { method: 'DELETE' })).status, 404);
  });

  it('a stopped device goes down on the other, and comes back with the same peer id', async () => {
    const before = (await peersOf(b)).find((p) => p.name === 'device-a')!.peerId;
    await a.stop();
    await until('device-a is down', async () => (await peersOf(b)).find((p) => p.name === 'device-a')?.status === 'down');
    a = await startShoalNode({ dataDir: join(scratch.root, 'a'), name: 'device-a', swarmKey: join(scratch.root, 'swarm.key'), bootstrap: [meshAddress(b)] });
    await until('device-a is alive again', async () => (await peersOf(b)).find((p) => p.name === 'device-a')?.status === 'alive');
    assert.equal((await peersOf(b)).find((p) => p.name === 'device-a')!.peerId, before);
  });
});
