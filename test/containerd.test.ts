import assert from 'node:assert/strict';
import { after, afterEach, before, describe, it } from 'node:test';
import { PrivateContainerd } from './helpers/daemons.ts';
import { explainFailure } from './helpers/diagnostics.ts';
import { run } from './helpers/exec.ts';
import { startFallbackUpstream, writeHostsToml, type FallbackUpstream } from './helpers/hosts-toml.ts';
import { BUSYBOX_PATH, buildTestImage, type TestImage } from './helpers/image.ts';
import { startShoalNode, type GatewayRequest, type RunningShoalNode } from './helpers/node.ts';
import { prerequisiteGate } from './helpers/prerequisites.ts';
import { Scratch } from './helpers/scratch.ts';

const gate = prerequisiteGate({ commands: ['containerd', 'ctr', 'skopeo'], files: [BUSYBOX_PATH], root: true });

/** The gateway's requests whose query carries `ns=<namespace>`. */
function requestsWithNamespace(node: RunningShoalNode, namespace: string): GatewayRequest[] {
  return node.requests().filter((r) => new URL(r.url, 'http://gateway').searchParams.get('ns') === namespace);
}

describe('containerd pulls through a shoal node as a hosts.toml mirror', gate.options, () => {
  let scratch: Scratch;
  let node: RunningShoalNode;
  let containerd: PrivateContainerd;
  let fallback: FallbackUpstream;
  let image: TestImage;
  let multi: TestImage;
  let hostsDir: string;

  before(async () => {
    gate.check();
    scratch = await Scratch.create();
    image = await buildTestImage({ dir: await scratch.dir('image'), randomLayerMiB: 4 });
    node = await startShoalNode({ dataDir: await scratch.dir('node') });
    await run('skopeo', ['copy', '--dest-tls-verify=false', image.ociReference, `docker://${node.gatewayHost}/library/shoal-test:1`]);
    multi = await buildTestImage({ dir: await scratch.dir('multi'), asIndex: true });
    await run('skopeo', ['copy', '--all', '--dest-tls-verify=false', multi.ociReference, `docker://${node.gatewayHost}/library/shoal-multi:1`]);
    fallback = await startFallbackUpstream();
    hostsDir = await scratch.dir('hosts');
    for (const registry of ['docker.io', 'ghcr.io']) await writeHostsToml(hostsDir, registry, fallback.url, node.gatewayUrl);
    containerd = await PrivateContainerd.start(await scratch.dir('containerd'));
  });

  after(async () => {
    await containerd?.stop();
    await fallback?.close();
    await node?.stop();
    await scratch?.remove();
  });

  afterEach((t) =>
    explainFailure(t, () => ({
      'shoal node log': node?.logText(60),
      'containerd log': containerd?.logText(30),
      'fallback upstream requests': JSON.stringify(fallback?.requests),
    })),
  );

  it('ctr images pull resolves and fetches docker.io/library/shoal-test:1 from the mirror', async () => {
    await containerd.ctr(['images', 'pull', '--hosts-dir', hostsDir, 'docker.io/library/shoal-test:1'], { timeoutMs: 120_000 });
    assert.deepEqual(fallback.requests, [], 'containerd fell back to the upstream: the mirror did not answer');
    const namespaced = requestsWithNamespace(node, 'docker.io');
    assert.ok(namespaced.length > 0, 'the gateway logged no request with ns=docker.io');
  });

  it('ctr images ls shows the pushed manifest digest', async () => {
    const { stdout } = await containerd.ctr(['images', 'ls']);
    const row = stdout.split('\n').find((line) => line.startsWith('docker.io/library/shoal-test:1 '));
    assert.ok(row, `image not listed:\n${stdout}`);
    assert.equal(row.split(/\s+/)[2], image.manifest.digest);
  });

  it('containerd holds the exact manifest and layer bytes', async () => {
    const manifest = await containerd.ctr(['content', 'get', image.manifest.digest]);
    assert.equal(manifest.stdout, image.manifestBytes.toString('utf8'));
    const { stdout } = await containerd.ctr(['content', 'ls', '-q']);
    const held = new Set(stdout.split('\n').filter(Boolean));
    for (const blob of [image.config, ...image.layers]) assert.ok(held.has(blob.digest), `containerd lacks ${blob.digest}`);
  });

  it('ctr content fetch by digest fetches every blob again through the mirror', async () => {
    await containerd.ctr(['images', 'rm', '--sync', 'docker.io/library/shoal-test:1']);
    await assert.rejects(containerd.ctr(['content', 'get', image.manifest.digest]), /not found/, 'content was not collected');
    const byDigest = `docker.io/library/shoal-test@${image.manifest.digest}`;
    await containerd.ctr(['content', 'fetch', '--hosts-dir', hostsDir, byDigest], { timeoutMs: 120_000 });
    const { stdout } = await containerd.ctr(['content', 'ls', '-q']);
    const held = new Set(stdout.split('\n').filter(Boolean));
    for (const blob of [image.manifest, image.config, ...image.layers]) assert.ok(held.has(blob.digest), `containerd lacks ${blob.digest}`);
    assert.deepEqual(fallback.requests, [], 'containerd fell back to the upstream for a digest reference');
  });

  it('pulls an image index and picks the platform manifest from it', async () => {
    await containerd.ctr(['images', 'pull', '--hosts-dir', hostsDir, 'docker.io/library/shoal-multi:1'], { timeoutMs: 120_000 });
    const { stdout } = await containerd.ctr(['images', 'ls']);
    const row = stdout.split('\n').find((line) => line.startsWith('docker.io/library/shoal-multi:1 '));
    assert.ok(row, `image not listed:\n${stdout}`);
    const [, mediaType, digest] = row.split(/\s+/);
    assert.equal(mediaType, multi.index!.mediaType);
    assert.equal(digest, multi.index!.digest);
    const held = await containerd.ctr(['content', 'get', multi.manifest.digest]);
    assert.equal(held.stdout, multi.manifestBytes.toString('utf8'));
    assert.deepEqual(fallback.requests, [], 'containerd fell back to the upstream for the index');
  });

  it('does not serve the docker.io image to a ghcr.io pull (namespaces are kept apart)', async () => {
    await assert.rejects(
      containerd.ctr(['images', 'pull', '--hosts-dir', hostsDir, 'ghcr.io/library/shoal-test:1'], { timeoutMs: 60_000 }),
      /not found|404/,
    );
    const ghcr = requestsWithNamespace(node, 'ghcr.io');
    assert.ok(ghcr.length > 0, 'the gateway logged no request with ns=ghcr.io');
    for (const request of ghcr) assert.equal(request.statusCode, 404, `${request.method} ${request.url}`);
    assert.ok(
      fallback.requests.some((r) => r.includes('/library/shoal-test/manifests/1')),
      `containerd did not fall back to the upstream after the mirror missed: ${JSON.stringify(fallback.requests)}`,
    );
    const images = await node.images();
    assert.ok(!images.some((i) => i.repository.startsWith('ghcr.io/')), `a ghcr.io repository appeared: ${JSON.stringify(images)}`);
  });
});
