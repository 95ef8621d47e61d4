import assert from 'node:assert/strict';
import { after, afterEach, before, describe, it } from 'node:test';
import { PrivatePodman } from './helpers/daemons.ts';
import { explainFailure } from './helpers/diagnostics.ts';
import { run } from './helpers/exec.ts';
import { BUSYBOX_PATH, buildTestImage, type TestImage } from './helpers/image.ts';
import { startShoalNode, type RunningShoalNode } from './helpers/node.ts';
import { prerequisiteGate } from './helpers/prerequisites.ts';
import { Scratch } from './helpers/scratch.ts';

const gate = prerequisiteGate({ commands: ['podman', 'runc', 'skopeo'], files: [BUSYBOX_PATH], root: true });

describe('podman pulls from a shoal node', gate.options, () => {
  let scratch: Scratch;
  let node: RunningShoalNode;
  let podman: PrivatePodman;
  let image: TestImage;
  let reference: string;

  before(async () => {
    gate.check();
    scratch = await Scratch.create();
    image = await buildTestImage({ dir: await scratch.dir('image'), randomLayerMiB: 2 });
    node = await startShoalNode({ dataDir: await scratch.dir('node') });
    podman = await PrivatePodman.create(await scratch.dir('podman'));
    reference = `${node.gatewayHost}/library/shoal-test:1`;
    await run('skopeo', ['copy', '--dest-tls-verify=false', image.ociReference, `docker://${reference}`]);
  });

  after(async () => {
    await node?.stop();
    await scratch?.remove();
  });

  afterEach((t) => explainFailure(t, () => ({ 'shoal node log': node?.logText(60) })));

  it('podman pull --tls-verify=false succeeds', async () => {
    await podman.podman(['pull', '--tls-verify=false', reference], { timeoutMs: 120_000 });
  });

  it('podman image inspect shows the pushed digest and layers', async () => {
    const { stdout } = await podman.podman(['image', 'inspect', reference]);
    const [inspected] = JSON.parse(stdout) as { Digest: string; RepoDigests: string[]; RootFS: { Layers: string[] } }[];
    assert.equal(inspected.Digest, image.manifest.digest);
    assert.ok(
      inspected.RepoDigests.includes(`${node.gatewayHost}/library/shoal-test@${image.manifest.digest}`),
      `RepoDigests: ${JSON.stringify(inspected.RepoDigests)}`,
    );
    assert.equal(inspected.RootFS.Layers.length, image.layers.length);
  });

  it('podman run of the pulled image prints its unique message', async () => {
    // Podman's default rlimits (nofile 1048576, nproc 4194304) exceed the hard limits of
    // sandboxed machines, where runc then fails "error setting rlimit type 7": ask for less.
    const limits = ['--ulimit', 'nofile=1024:1024', '--ulimit', 'nproc=1024:1024'];
    const { stdout } = await podman.podman(['run', '--rm', ...limits, '--network', 'none', reference], { timeoutMs: 120_000 });
    assert.equal(stdout.trim(), image.message);
  });
});
