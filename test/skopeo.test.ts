import assert from 'node:assert/strict';
import { after, afterEach, before, describe, it } from 'node:test';
import { join } from 'node:path';
import { explainFailure } from './helpers/diagnostics.ts';
import { run } from './helpers/exec.ts';
import { BUSYBOX_PATH, buildTestImage, layoutEntries, readLayoutBlob, type TestImage } from './helpers/image.ts';
import { startShoalNode, type RunningShoalNode } from './helpers/node.ts';
import { prerequisiteGate } from './helpers/prerequisites.ts';
import { Scratch } from './helpers/scratch.ts';

const gate = prerequisiteGate({ commands: ['skopeo', 'umoci'], files: [BUSYBOX_PATH] });

describe('skopeo against a shoal node', gate.options, () => {
  let scratch: Scratch;
  let node: RunningShoalNode;
  let image: TestImage;
  let remote: string;

  before(async () => {
    gate.check();
    scratch = await Scratch.create();
    image = await buildTestImage({ dir: await scratch.dir('image') });
    node = await startShoalNode({ dataDir: await scratch.dir('node') });
    remote = `docker://${node.gatewayHost}/library/shoal-test:1`;
  });

  after(async () => {
    await node?.stop();
    await scratch?.remove();
  });

  afterEach((t) => explainFailure(t, () => ({ 'shoal node log': node?.logText(60) })));

  it('pushes an OCI image layout with skopeo copy', async () => {
    await run('skopeo', ['copy', '--dest-tls-verify=false', image.ociReference, remote]);
    const images = await node.images();
    const pushed = images.find((i) => i.repository === 'docker.io/library/shoal-test' && i.tag === '1');
    assert.ok(pushed, `docker.io/library/shoal-test:1 not in /api/images: ${JSON.stringify(images)}`);
    assert.equal(pushed.digest, image.manifest.digest);
    assert.equal(pushed.mediaType, image.manifest.mediaType);
  });

  it('pulls it back with the same manifest digest and blobs', async () => {
    const out = await scratch.dir('pulled');
    await run('skopeo', ['copy', '--src-tls-verify=false', '--preserve-digests', remote, `oci:${out}:1`]);
    const [entry] = await layoutEntries(out, '1');
    assert.ok(entry, 'pulled layout has no entry for tag 1');
    assert.equal(entry.digest, image.manifest.digest);
    assert.deepEqual(await readLayoutBlob(out, entry.digest), image.manifestBytes);
    for (const blob of [image.config, ...image.layers]) {
      const original = await readLayoutBlob(image.layoutDir, blob.digest);
      assert.deepEqual(await readLayoutBlob(out, blob.digest), original, `blob ${blob.digest} differs`);
    }
  });

  it('skopeo inspect --raw returns the exact pushed manifest bytes', async () => {
    const { stdout } = await run('skopeo', ['inspect', '--tls-verify=false', '--raw', remote]);
    assert.equal(stdout, image.manifestBytes.toString('utf8'));
  });

  it('skopeo inspect reports the digest the gateway serves', async () => {
    const { stdout } = await run('skopeo', ['inspect', '--tls-verify=false', remote]);
    const inspected = JSON.parse(stdout) as { Digest: string; Layers: string[] };
    assert.equal(inspected.Digest, image.manifest.digest);
    assert.deepEqual(inspected.Layers, image.layers.map((l) => l.digest));
  });

  it('lists the tag through the registry API', async () => {
    const { stdout } = await run('skopeo', ['list-tags', '--tls-verify=false', `docker://${node.gatewayHost}/library/shoal-test`]);
    assert.deepEqual((JSON.parse(stdout) as { Tags: string[] }).Tags, ['1']);
  });

  it("reads the node's store directory as an OCI layout with skopeo", async () => {
    const store = join(node.dataDir, 'oci');
    const out = await scratch.dir('from-store');
    await run('skopeo', ['copy', '--preserve-digests', `oci:${store}:docker.io/library/shoal-test:1`, `oci:${out}:x`]);
    const [entry] = await layoutEntries(out, 'x');
    assert.ok(entry, 'copied layout has no entry for tag x');
    assert.equal(entry.digest, image.manifest.digest);
  });

  it("lists the node's store tags with umoci", async () => {
    const { stdout } = await run('umoci', ['ls', '--layout', join(node.dataDir, 'oci')]);
    assert.deepEqual(stdout.split('\n').filter(Boolean), ['docker.io/library/shoal-test:1']);
  });
});
