import assert from 'node:assert/strict';
import { after, afterEach, before, describe, it } from 'node:test';
import { PrivateDockerd } from './helpers/daemons.ts';
import { explainFailure } from './helpers/diagnostics.ts';
import { run } from './helpers/exec.ts';
import { BUSYBOX_PATH, buildTestImage, type TestImage } from './helpers/image.ts';
import { startShoalNode, type RunningShoalNode } from './helpers/node.ts';
import { prerequisiteGate } from './helpers/prerequisites.ts';
import { Scratch } from './helpers/scratch.ts';

const gate = prerequisiteGate({
  commands: ['dockerd', 'docker', 'containerd', 'containerd-shim-runc-v2', 'runc', 'skopeo'],
  files: [BUSYBOX_PATH],
  root: true,
});

const DIGEST_LINE = /digest: (sha256:[0-9a-f]{64}) size: \d+/;

describe('docker pushes to, pulls from and runs from a shoal node', gate.options, () => {
  let scratch: Scratch;
  let node: RunningShoalNode;
  let dockerd: PrivateDockerd;
  let image: TestImage;
  let reference: string;
  let pushedDigest: string;

  before(async () => {
    gate.check();
    scratch = await Scratch.create();
    image = await buildTestImage({ dir: await scratch.dir('image') });
    node = await startShoalNode({ dataDir: await scratch.dir('node') });
    dockerd = await PrivateDockerd.start(await scratch.dir('docker'));
    reference = `${node.gatewayHost}/app:1`;
    const archive = scratch.path('app.tar');
    await run('skopeo', ['copy', image.ociReference, `docker-archive:${archive}:app:1`]);
    await dockerd.docker(['load', '-i', archive]);
    await dockerd.docker(['tag', 'app:1', reference]);
  });

  after(async () => {
    await dockerd?.stop();
    await node?.stop();
    await scratch?.remove();
  });

  afterEach((t) => explainFailure(t, () => ({ 'shoal node log': node?.logText(60), dockerd: dockerd?.logText(30) })));

  it('docker push stores the image under the default namespace, one-part names under library/', async () => {
    const { stdout } = await dockerd.docker(['push', reference], { timeoutMs: 120_000 });
    const match = DIGEST_LINE.exec(stdout);
    assert.ok(match, `no digest line in docker push output:\n${stdout}`);
    pushedDigest = match[1];
    const images = await node.images();
    const stored = images.find((i) => i.repository === 'docker.io/library/app' && i.tag === '1');
    assert.ok(stored, `docker.io/library/app:1 not in /api/images: ${JSON.stringify(images)}`);
    assert.equal(stored.digest, pushedDigest);
    // Docker 20.10 converts the loaded image to a Docker schema 2 manifest on push.
    assert.equal(stored.mediaType, 'application/vnd.docker.distribution.manifest.v2+json');
  });

  it('docker pull fetches it back after docker rmi', async () => {
    await dockerd.docker(['rmi', reference, 'app:1']);
    await assert.rejects(dockerd.docker(['image', 'inspect', reference]), /No such image/);
    const { stdout } = await dockerd.docker(['pull', reference], { timeoutMs: 120_000 });
    assert.match(stdout, new RegExp(`Digest: ${pushedDigest}`));
    const inspected = await dockerd.docker(['image', 'inspect', '--format', '{{json .RepoDigests}}', reference]);
    assert.deepEqual(JSON.parse(inspected.stdout), [`${node.gatewayHost}/app@${pushedDigest}`]);
  });

  it('docker run of the pulled image prints its unique message', async () => {
    const { stdout } = await dockerd.docker(['run', '--rm', '--network', 'none', reference], { timeoutMs: 120_000 });
    assert.equal(stdout.trim(), image.message);
  });
});
