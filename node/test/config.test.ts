import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { ConfigError, DEFAULT_CONFIG, isLoopback, loadConfigFile, parseHostPort, resolveConfig } from '../src/config.ts';

test('an empty config runs on the documented defaults', () => {
  const c = resolveConfig({});
  assert.deepEqual(c.gateway, DEFAULT_CONFIG.gateway);
  assert.deepEqual(c.api, DEFAULT_CONFIG.api);
  assert.equal(c.defaultNamespace, 'docker.io');
  assert.ok(c.dataDir.endsWith('/data'));
});

test('flags override the file; upstreams merge', async () => {
  const dir = await mkdtemp(join(tmpdir(), 'shoal-config-'));
  const file = join(dir, 'shoal.yaml');
  await writeFile(file, 'name: edge-1\ngateway: 0.0.0.0:5000\nupstreams:\n  docker.io: http://127.0.0.1:5001\n');
  const c = resolveConfig(await loadConfigFile(file), { gateway: '127.0.0.1:6000', upstreams: ['ghcr.io=http://127.0.0.1:5002'] });
  assert.equal(c.name, 'edge-1');
  assert.deepEqual(c.gateway, { host: '127.0.0.1', port: 6000 });
  assert.deepEqual(c.upstreams, { 'docker.io': 'http://127.0.0.1:5001', 'ghcr.io': 'http://127.0.0.1:5002' });
});

test('bad config is a clear error', async () => {
  const dir = await mkdtemp(join(tmpdir(), 'shoal-config-'));
  const file = join(dir, 'bad.yaml');
  await writeFile(file, 'gatway: 1.2.3.4:5\n');
  await assert.rejects(loadConfigFile(file), /unknown key "gatway"/);
  assert.throws(() => parseHostPort('nope', 'gateway'), ConfigError);
  assert.throws(() => resolveConfig({ upstreams: ['docker.io'] }), /REGISTRY=URL/);
  assert.throws(() => resolveConfig({ upstreams: ['docker.io=ftp://x'] }), /http and https/);
  assert.deepEqual(parseHostPort('[::1]:80', 'api'), { host: '::1', port: 80 });
  assert.deepEqual(parseHostPort(':80', 'api'), { host: '0.0.0.0', port: 80 });
});

test('the example device config in examples/ is valid', async () => {
  const c = resolveConfig(await loadConfigFile(new URL('../../examples/shoal.yaml', import.meta.url).pathname));
  assert.equal(c.name, 'edge-07');
  assert.equal(c.dataDir, '/var/lib/shoal');
  assert.deepEqual(c.upstreams, { 'docker.io': 'http://registry.lan:5000' });
});

test('only loopback gateways go without the push-token warning', () => {
  for (const host of ['127.0.0.1', '127.3.2.1', '::1', 'localhost']) assert.ok(isLoopback(host), host);
  for (const host of ['0.0.0.0', '::', '10.0.0.5', 'edge.lan']) assert.ok(!isLoopback(host), host);
});

test('mesh settings: lists from flags replace the file, labels merge, mdns only when given', () => {
  const file = { listen: ['/ip4/0.0.0.0/tcp/4002'], bootstrap: ['/ip4/10.0.0.1/tcp/4001/p2p/x'], mdns: false, labels: { zone: 'a' } };
  const c = resolveConfig(file, { listen: [], bootstrap: [], labels: ['rack=7'], mdns: undefined });
  assert.deepEqual(c.listen, ['/ip4/0.0.0.0/tcp/4002']);
  assert.deepEqual(c.bootstrap, file.bootstrap);
  assert.equal(c.mdns, false);
  assert.deepEqual(c.labels, { zone: 'a', rack: '7' });
  assert.deepEqual(resolveConfig({}).listen, ['/ip4/0.0.0.0/tcp/4001']);
  assert.equal(resolveConfig({}).mdns, true);
  assert.throws(() => resolveConfig({ labels: ['nokey'] }), /KEY=VALUE/);
  assert.throws(() => resolveConfig({ labels: ['bad key=1'] }), /not a valid label key/);
  assert.throws(() => resolveConfig({ mdns: 'yes' as never }), /mdns must be true or false/);
});

test('the data plane listens on any port by default, can be placed, and can be switched off', async () => {
  assert.deepEqual(resolveConfig({}).dataPlane, { host: '0.0.0.0', port: 0 });
  assert.deepEqual(resolveConfig({ dataPlane: '10.0.0.5:4002' }).dataPlane, { host: '10.0.0.5', port: 4002 });
  const dir = await mkdtemp(join(tmpdir(), 'shoal-config-'));
  const file = join(dir, 'shoal.yaml');
  await writeFile(file, 'dataPlane: false\n');
  assert.equal(resolveConfig(await loadConfigFile(file)).dataPlane, false);
  assert.throws(() => resolveConfig({ dataPlane: 'nowhere' }), ConfigError);
});

test('the chunk size defaults to 1 MiB and takes bytes or KiB/MiB sizes within a chunk frame', async () => {
  assert.equal(resolveConfig({}).chunkSize, 1024 * 1024);
  assert.equal(resolveConfig({ chunkSize: '4MiB' }).chunkSize, 4 * 1024 * 1024);
  assert.equal(resolveConfig({ chunkSize: '256KiB' }).chunkSize, 256 * 1024);
  assert.equal(resolveConfig({ chunkSize: 2_097_152 }).chunkSize, 2_097_152);
  const dir = await mkdtemp(join(tmpdir(), 'shoal-config-'));
  const file = join(dir, 'shoal.yaml');
  await writeFile(file, 'chunkSize: 8MiB\n');
  assert.equal(resolveConfig(await loadConfigFile(file)).chunkSize, 8 * 1024 * 1024);
  for (const bad of ['1KiB', '32MiB', '4 GB', 'big', 0]) assert.throws(() => resolveConfig({ chunkSize: bad }), /chunkSize/);
});
