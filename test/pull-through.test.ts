import assert from 'node:assert/strict';
import { after, afterEach, before, describe, it } from 'node:test';
import { PrivateContainerd } from './helpers/daemons.ts';
import { explainFailure } from './helpers/diagnostics.ts';
import { startDockerRegistry, type DockerRegistry } from './helpers/docker-registry.ts';
import { run } from './helpers/exec.ts';
import { startFallbackUpstream, writeHostsToml, type FallbackUpstream } from './helpers/hosts-toml.ts';
import { BUSYBOX_PATH, buildTestImage, type TestImage } from './helpers/image.ts';
import { startShoalNode, type RunningShoalNode } from './helpers/node.ts';
import { prerequisiteGate } from './helpers/prerequisites.ts';
import { Scratch } from './helpers/scratch.ts';

const gate = prerequisiteGate({ commands: ['containerd', 'ctr', 'skopeo', 'docker-registry'], files: [BUSYBOX_PATH], root: true });

/**
 * The edge case Shoal exists for: containerd asks the local node (hosts.toml mirror), the node
 * pulls through from the upstream registry once, and keeps serving after the upstream is gone.
 */
describe('containerd pulls through a shoal node from an upstream registry', gate.options, () => {
  let scratch: Scratch;
  let upstream: DockerRegistry | undefined;
  let node: RunningShoalNode;
  let containerd: PrivateContainerd;
  let image: TestImage;
  let hostsDir: string;
  let fallback: FallbackUpstream;
  const reference = 'docker.io/library/shoal-test:1';

  before(async () => {
    gate.check();
    scratch = await Scratch.create();
    image = await buildTestImage({ dir: await scratch.dir('image'), randomLayerMiB: 8 });
    upstream = await startDockerRegistry();
    await run('skopeo', ['copy', '--dest-tls-verify=false', image.ociReference, `docker://${upstream.host}/library/shoal-test:1`]);
    node = await startShoalNode({ dataDir: await scratch.dir('node'), upstreams: { 'docker.io': upstream.url } });
    // containerd talks to the node only; a request reaching the fallback means the mirror missed.
    fallback = await startFallbackUpstream();
    hostsDir = await scratch.dir('hosts');
    await writeHostsToml(hostsDir, 'docker.io', fallback.url, node.gatewayUrl);
    containerd = await PrivateContainerd.start(await scratch.dir('containerd'));
  });

  after(async () => {
    await containerd?.stop();
    await node?.stop();
    await upstream?.stop();
    await fallback?.close();
    await scratch?.remove();
  });

  afterEach((t) =>
    explainFailure(t, () => ({
      'shoal node log': node?.logText(60),
      containerd: containerd?.logText(20),
      'fallback upstream requests': JSON.stringify(fallback?.requests),
    })),
  );

  it('the node starts empty', async () => {
    assert.deepEqual(await node.images(), []);
  });

  it('ctr images pull gets the upstream image through the node, which caches it', async () => {
    await containerd.ctr(['images', 'pull', '--hosts-dir', hostsDir, reference], { timeoutMs: 120_000 });
    const { stdout } = await containerd.ctr(['images', 'ls', '-q']);
    assert.ok(stdout.split('\n').includes(reference), stdout);
    const held = await node.images();
    const cached = held.find((i) => i.repository === 'docker.io/library/shoal-test' && i.tag === '1');
    assert.ok(cached, `the node did not keep the pulled image: ${JSON.stringify(held)}`);
    assert.equal(cached.digest, image.manifest.digest);
    assert.deepEqual(fallback.requests, [], 'containerd went past the mirror');
  });

  it('serves the image again after the upstream is gone', async () => {
    await upstream!.stop();
    upstream = undefined;
    await containerd.ctr(['images', 'rm', '--sync', reference]);
    await containerd.ctr(['images', 'pull', '--hosts-dir', hostsDir, reference], { timeoutMs: 120_000 });
    const manifest = await containerd.ctr(['content', 'get', image.manifest.digest]);
    assert.equal(manifest.stdout, image.manifestBytes.toString('utf8'));
    const { stdout } = await containerd.ctr(['content', 'ls', '-q']);
    for (const blob of image.layers) assert.ok(stdout.split('\n').includes(blob.digest), `containerd lacks ${blob.digest}`);
    assert.deepEqual(fallback.requests, [], 'containerd went past the mirror');
  });

  it('passes a miss on to the next host when the upstream is gone', async () => {
    await assert.rejects(
      containerd.ctr(['images', 'pull', '--hosts-dir', hostsDir, 'docker.io/library/never-pushed:1'], { timeoutMs: 60_000 }),
    );
    assert.ok(
      fallback.requests.some((r) => r.includes('/never-pushed/manifests/1')),
      'containerd never fell back: the node did not answer the miss',
    );
  });

  it('answers that miss with 404 or a gateway error (502/503/504), not 500', () => {
    const misses = node.requests().filter((r) => r.url.startsWith('/v2/library/never-pushed/manifests/1'));
    assert.ok(misses.length > 0, 'the gateway logged no request for the miss');
    for (const miss of misses) assert.ok([404, 502, 503, 504].includes(miss.statusCode!), `${miss.method} ${miss.url} -> ${miss.statusCode}`);
  });
});
