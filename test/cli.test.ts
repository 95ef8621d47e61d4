import assert from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';
import { writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { CommandError, run } from './helpers/exec.ts';
import { REPO_ROOT, SHOAL_BIN, startShoalNode, type RunningShoalNode } from './helpers/node.ts';
import { pushImage } from './helpers/push.ts';
import { Scratch } from './helpers/scratch.ts';

const CLI = SHOAL_BIN;
const shoal = (args: string[]) => run(process.execPath, [CLI, ...args], { cwd: REPO_ROOT });

describe('shoal node --config and shoal images', () => {
  let scratch: Scratch;
  let node: RunningShoalNode;
  let digest: string;

  before(async () => {
    scratch = await Scratch.create();
    const configFile = join(scratch.root, 'shoal.yaml');
    await writeFile(
      configFile,
      'name: edge-07\ndefaultNamespace: registry.lan:5000\nservices:\n  - { name: web, port: 8080, protocol: http, meta: { tier: front } }\n',
    );
    node = await startShoalNode({ dataDir: await scratch.dir('node'), configFile });
    ({ digest } = await pushImage(node.gatewayUrl, 'lib/app', '1.2'));
  });

  after(async () => {
    await node?.stop();
    await scratch?.remove();
  });

  it('takes the name and default namespace from the config file', async () => {
    const health = (await (await fetch(`${node.apiUrl}/healthz`)).json()) as { name: string; status: string };
    assert.deepEqual([health.status, health.name], ['ok', 'edge-07']);
    const images = await node.images();
    assert.deepEqual(
      images.map((i) => [i.repository, i.tag, i.digest]),
      [['registry.lan:5000/lib/app', '1.2', digest]],
    );
  });

  it('announces the services listed in the config file', async () => {
    const services = (await (await fetch(`${node.apiUrl}/api/services`)).json()) as { name: string; device: string; endpoint: string; meta: object }[];
    assert.equal(services.length, 1);
    assert.deepEqual([services[0]!.name, services[0]!.device, services[0]!.meta], ['web', 'edge-07', { tier: 'front' }]);
    assert.match(services[0]!.endpoint, /^http:\/\/[\d.]+:8080$/);
  });

  it('shoal images prints a table, and JSON with --json', async () => {
    const table = (await shoal(['images', '--api', node.apiUrl])).stdout.split('\n');
    assert.match(table[0]!, /^REPOSITORY\s+TAG\s+DIGEST\s+SIZE\s+TYPE$/);
    assert.match(table[1]!, new RegExp(`^registry\\.lan:5000/lib/app\\s+1\\.2\\s+${digest.slice(0, 19)}\\s+\\d+ B\\s+oci manifest$`));
    const json = JSON.parse((await shoal(['images', '--api', node.apiUrl, '--json'])).stdout) as { digest: string; size: number }[];
    assert.equal(json[0]!.digest, digest);
    assert.ok(json[0]!.size > 0);
  });

  it('says clearly when no node answers, and exits 2', async () => {
    const err = await shoal(['images', '--api', 'http://127.0.0.1:9']).then(
      () => assert.fail('shoal images succeeded without a node'),
      (e: unknown) => e as CommandError,
    );
    assert.equal(err.exitCode, 2);
    assert.match(err.stderr, /cannot reach the Shoal node at http:\/\/127\.0\.0\.1:9/);
  });

  it('refuses a config file with an unknown key, and exits 2', async () => {
    const bad = join(scratch.root, 'bad.yaml');
    await writeFile(bad, 'gatway: 127.0.0.1:5000\n');
    const err = await shoal(['node', '--config', bad]).then(
      () => assert.fail('shoal node started with a bad config'),
      (e: unknown) => e as CommandError,
    );
    assert.equal(err.exitCode, 2);
    assert.match(err.stderr, /unknown key "gatway"/);
  });
});
