import assert from 'node:assert/strict';
import { after, afterEach, before, describe, it } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { explainFailure } from './helpers/diagnostics.ts';
import { run } from './helpers/exec.ts';
import { BUSYBOX_PATH, buildTestImage, layoutEntries, type TestImage } from './helpers/image.ts';
import { startShoalNode, type RunningShoalNode } from './helpers/node.ts';
import { prerequisiteGate } from './helpers/prerequisites.ts';
import { Scratch } from './helpers/scratch.ts';

const gate = prerequisiteGate({ commands: ['skopeo'], files: [BUSYBOX_PATH] });

/** Whether the node has logged a request matching `method` and `urlPattern`. */
function sawRequest(node: RunningShoalNode, method: string, urlPattern: RegExp): boolean {
  return node.logs().some((entry) => {
    const req = entry.req as { method?: string; url?: string } | undefined;
    return req?.method === method && urlPattern.test(req.url ?? '');
  });
}

async function waitForRequest(node: RunningShoalNode, method: string, urlPattern: RegExp, timeoutMs = 30_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (Date.now() < deadline) {
    if (sawRequest(node, method, urlPattern)) return;
    await sleep(5);
  }
  throw new Error(`no ${method} ${urlPattern} request within ${timeoutMs} ms`);
}

describe('a shoal node keeps its store across restarts and crashes', gate.options, () => {
  let scratch: Scratch;
  let dataDir: string;
  let node: RunningShoalNode | undefined;
  let small: TestImage;
  let large: TestImage;

  before(async () => {
    gate.check();
    scratch = await Scratch.create();
    dataDir = await scratch.dir('node');
    small = await buildTestImage({ dir: await scratch.dir('small') });
    large = await buildTestImage({ dir: await scratch.dir('large'), randomLayerMiB: 48 });
  });

  after(async () => {
    await node?.stop();
    await scratch?.remove();
  });

  afterEach((t) => explainFailure(t, () => ({ 'shoal node log': node?.logText(60) })));

  async function pullBack(image: TestImage, repository: string, out: string): Promise<void> {
    const dir = await scratch.dir(out);
    await run('skopeo', ['copy', '--src-tls-verify=false', '--preserve-digests', `docker://${node!.gatewayHost}/${repository}:1`, `oci:${dir}:1`], {
      timeoutMs: 120_000,
    });
    const [entry] = await layoutEntries(dir, '1');
    assert.equal(entry?.digest, image.manifest.digest);
  }

  it('stops cleanly on SIGTERM and serves the same image after a restart', async () => {
    node = await startShoalNode({ dataDir });
    await run('skopeo', ['copy', '--dest-tls-verify=false', small.ociReference, `docker://${node.gatewayHost}/library/small:1`]);
    const before = await node.images();
    assert.equal(await node.stop(), 0, 'SIGTERM did not exit 0');

    node = await startShoalNode({ dataDir });
    assert.deepEqual(await node.images(), before);
    await pullBack(small, 'library/small', 'small-after-restart');
  });

  it('survives kill -9 in the middle of an upload; the image can be pushed again', async () => {
    const pushing = run('skopeo', ['copy', '--dest-tls-verify=false', large.ociReference, `docker://${node!.gatewayHost}/library/large:1`], {
      timeoutMs: 120_000,
    }).catch(() => {}); // the connection dies with the node
    // skopeo streams each layer in a PATCH; the random layer is the one still in flight.
    await waitForRequest(node!, 'PATCH', /\/v2\/library\/large\/blobs\/uploads\//);
    await node!.kill9();
    await pushing;
    const manifestArrived = sawRequest(node!, 'PUT', /\/v2\/library\/large\/manifests\//);

    node = await startShoalNode({ dataDir });
    const images = await node.images();
    assert.ok(images.some((i) => i.repository === 'docker.io/library/small'), `lost the earlier image: ${JSON.stringify(images)}`);
    if (!manifestArrived) {
      assert.ok(!images.some((i) => i.repository === 'docker.io/library/large'), `a half-pushed image is listed: ${JSON.stringify(images)}`);
    }
    await pullBack(small, 'library/small', 'small-after-crash');

    await run('skopeo', ['copy', '--dest-tls-verify=false', large.ociReference, `docker://${node.gatewayHost}/library/large:1`], {
      timeoutMs: 120_000,
    });
    await pullBack(large, 'library/large', 'large-after-crash');
  });
});
