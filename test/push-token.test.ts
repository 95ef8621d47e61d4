import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { after, afterEach, before, describe, it } from 'node:test';
import { PrivateDockerd } from './helpers/daemons.ts';
import { explainFailure } from './helpers/diagnostics.ts';
import { run, runExpectingFailure } from './helpers/exec.ts';
import { BUSYBOX_PATH, buildTestImage, type TestImage } from './helpers/image.ts';
import { startShoalNode, type RunningShoalNode } from './helpers/node.ts';
import { prerequisiteGate } from './helpers/prerequisites.ts';
import { Scratch } from './helpers/scratch.ts';

const gate = prerequisiteGate({
  commands: ['dockerd', 'docker', 'containerd', 'containerd-shim-runc-v2', 'runc', 'skopeo'],
  files: [BUSYBOX_PATH],
  root: true,
});

describe('a shoal node with --push-token, used by skopeo and docker', gate.options, () => {
  const token = randomBytes(12).toString('hex');
  let scratch: Scratch;
  let node: RunningShoalNode;
  let dockerd: PrivateDockerd;
  let image: TestImage;

  before(async () => {
    gate.check();
    scratch = await Scratch.create();
    image = await buildTestImage({ dir: await scratch.dir('image') });
    node = await startShoalNode({ dataDir: await scratch.dir('node'), pushToken: token });
    dockerd = await PrivateDockerd.start(await scratch.dir('docker'));
  });

  after(async () => {
    await dockerd?.stop();
    await node?.stop();
    await scratch?.remove();
  });

  afterEach((t) => explainFailure(t, () => ({ 'shoal node log': node?.logText(40), dockerd: dockerd?.logText(15) })));

  it('refuses a skopeo push without credentials and stores nothing', async () => {
    const failure = await runExpectingFailure('skopeo', [
      'copy', '--dest-tls-verify=false', image.ociReference, `docker://${node.gatewayHost}/library/locked:1`,
    ]);
    assert.match(failure.stderr, /unauthorized|authentication required|401/i);
    assert.deepEqual(await node.images(), []);
  });

  it('refuses a skopeo push with a wrong token', async () => {
    const failure = await runExpectingFailure('skopeo', [
      'copy', '--dest-tls-verify=false', '--dest-creds', 'shoal:wrong-token', image.ociReference,
      `docker://${node.gatewayHost}/library/locked:1`,
    ]);
    assert.match(failure.stderr, /unauthorized|authentication required|401/i);
    assert.deepEqual(await node.images(), []);
  });

  it('accepts a skopeo push with the token as password', async () => {
    await run('skopeo', [
      'copy', '--dest-tls-verify=false', '--dest-creds', `shoal:${token}`, image.ociReference,
      `docker://${node.gatewayHost}/library/locked:1`,
    ]);
    const images = await node.images();
    assert.deepEqual(images.map((i) => [i.repository, i.tag, i.digest]), [['docker.io/library/locked', '1', image.manifest.digest]]);
  });

  it('still serves anonymous pulls to skopeo', async () => {
    const { stdout } = await run('skopeo', ['inspect', '--tls-verify=false', '--raw', `docker://${node.gatewayHost}/library/locked:1`]);
    assert.equal(stdout, image.manifestBytes.toString('utf8'));
    const out = await scratch.dir('pulled');
    await run('skopeo', ['copy', '--src-tls-verify=false', `docker://${node.gatewayHost}/library/locked:1`, `oci:${out}:1`]);
  });

  it('refuses docker push before docker login and accepts it after', async () => {
    const archive = scratch.path('app.tar');
    await run('skopeo', ['copy', image.ociReference, `docker-archive:${archive}:app:1`]);
    await dockerd.docker(['load', '-i', archive]);
    const reference = `${node.gatewayHost}/pushed-by-docker:1`;
    await dockerd.docker(['tag', 'app:1', reference]);
    const refused = await dockerd.docker(['push', reference], { timeoutMs: 120_000 }).then(
      () => undefined,
      (error: Error) => error,
    );
    assert.ok(refused, 'docker push without login succeeded');
    assert.match(refused.message, /unauthorized|no basic auth credentials|authentication required/i);
    assert.ok(!(await node.images()).some((i) => i.repository === 'docker.io/library/pushed-by-docker'));

    await dockerd.docker(['login', node.gatewayHost, '--username', 'shoal', '--password-stdin'], { input: token });
    await dockerd.docker(['push', reference], { timeoutMs: 120_000 });
    const images = await node.images();
    assert.ok(images.some((i) => i.repository === 'docker.io/library/pushed-by-docker' && i.tag === '1'), JSON.stringify(images));
  });

  it('docker pulls and runs it once logged in', async () => {
    const reference = `${node.gatewayHost}/pushed-by-docker:1`;
    await dockerd.docker(['rmi', reference, 'app:1']);
    await dockerd.docker(['pull', reference], { timeoutMs: 120_000 });
    const { stdout } = await dockerd.docker(['run', '--rm', '--network', 'none', reference], { timeoutMs: 120_000 });
    assert.equal(stdout.trim(), image.message);
  });
});
