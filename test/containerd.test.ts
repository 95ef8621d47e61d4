import assert from 'node:assert/strict';
import { mkdir, writeFile } from 'node:fs/promises';
import { createServer, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import { join } from 'node:path';
import { after, afterEach, before, describe, it } from 'node:test';
import { PrivateContainerd } from './helpers/daemons.ts';
import { explainFailure } from './helpers/diagnostics.ts';
import { run } from './helpers/exec.ts';
import { BUSYBOX_PATH, buildTestImage, type TestImage } from './helpers/image.ts';
import { startShoalNode, type RunningShoalNode } from './helpers/node.ts';
import { prerequisiteGate } from './helpers/prerequisites.ts';
import { Scratch } from './helpers/scratch.ts';

const gate = prerequisiteGate({ commands: ['containerd', 'ctr', 'skopeo'], files: [BUSYBOX_PATH], root: true });

/**
 * Stands in for the real upstream in hosts.toml (`server = ...`): containerd falls back to it
 * when the mirror misses. It answers 404 and records what it was asked, so a test can tell
 * whether the mirror answered, and no request ever leaves loopback.
 */
async function startFallbackUpstream(): Promise<{ url: string; requests: string[]; server: Server }> {
  const requests: string[] = [];
  const server = createServer((req, res) => {
    requests.push(`${req.method} ${req.url}`);
    res.writeHead(404, { 'content-type': 'application/json' });
    res.end('{"errors":[{"code":"NAME_UNKNOWN","message":"fallback upstream has nothing"}]}');
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  return { url: `http://127.0.0.1:${(server.address() as AddressInfo).port}`, requests, server };
}

/** `<hostsDir>/<registry>/hosts.toml` naming the Shoal gateway as a pull+resolve mirror. */
async function writeHostsToml(hostsDir: string, registry: string, server: string, mirror: string): Promise<void> {
  await mkdir(join(hostsDir, registry), { recursive: true });
  await writeFile(
    join(hostsDir, registry, 'hosts.toml'),
    [`server = ${JSON.stringify(server)}`, '', `[host.${JSON.stringify(mirror)}]`, '  capabilities = ["pull", "resolve"]', ''].join('\n'),
  );
}

/** Request URLs the gateway logged that carry `ns=<namespace>`. */
function requestsWithNamespace(node: RunningShoalNode, namespace: string): string[] {
  const pattern = new RegExp(`[?&]ns=${namespace.replace(/\./g, '\\.')}(&|$)`);
  const urls: string[] = [];
  for (const entry of node.logs()) {
    const url = (entry.req as { url?: string } | undefined)?.url ?? (typeof entry.url === 'string' ? entry.url : undefined);
    if (url && pattern.test(url)) urls.push(url);
  }
  return urls;
}

describe('containerd pulls through a shoal node as a hosts.toml mirror', gate.options, () => {
  let scratch: Scratch;
  let node: RunningShoalNode;
  let containerd: PrivateContainerd;
  let fallback: Awaited<ReturnType<typeof startFallbackUpstream>>;
  let image: TestImage;
  let hostsDir: string;

  before(async () => {
    gate.check();
    scratch = await Scratch.create();
    image = await buildTestImage({ dir: await scratch.dir('image'), randomLayerMiB: 4 });
    node = await startShoalNode({ dataDir: await scratch.dir('node') });
    await run('skopeo', ['copy', '--dest-tls-verify=false', image.ociReference, `docker://${node.gatewayHost}/library/shoal-test:1`]);
    fallback = await startFallbackUpstream();
    hostsDir = await scratch.dir('hosts');
    for (const registry of ['docker.io', 'ghcr.io']) await writeHostsToml(hostsDir, registry, fallback.url, node.gatewayUrl);
    containerd = await PrivateContainerd.start(await scratch.dir('containerd'));
  });

  after(async () => {
    await containerd?.stop();
    fallback?.server.close();
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

  it('does not serve the docker.io image to a ghcr.io pull (namespaces are kept apart)', async () => {
    await assert.rejects(
      containerd.ctr(['images', 'pull', '--hosts-dir', hostsDir, 'ghcr.io/library/shoal-test:1'], { timeoutMs: 60_000 }),
      /not found|404/,
    );
    assert.ok(requestsWithNamespace(node, 'ghcr.io').length > 0, 'the gateway logged no request with ns=ghcr.io');
    assert.ok(
      fallback.requests.some((r) => r.includes('/library/shoal-test/manifests/1')),
      `containerd did not fall back to the upstream after the mirror missed: ${JSON.stringify(fallback.requests)}`,
    );
    const images = await node.images();
    assert.ok(!images.some((i) => i.repository.startsWith('ghcr.io/')), `a ghcr.io repository appeared: ${JSON.stringify(images)}`);
  });
});
