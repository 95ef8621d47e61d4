import { test } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { createServer as createTcpServer, type Socket } from 'node:net';
import type { AddressInfo } from 'node:net';
import { MediaType, sha256Of } from '@shoal/oci';
import { parseChallenge, UpstreamClient, UpstreamError } from '@shoal/registry-gateway';
import {
  bufferBlob,
  digestOfStream,
  pushImage,
  startBasicAuthRegistry,
  startRegistry,
  startServer,
  startTokenServer,
  tempDir,
} from './upstream-fixtures.ts';

const TEST_TIMEOUT = { timeout: 120_000 };

function basic(user: string, password: string): string {
  return `Basic ${Buffer.from(`${user}:${password}`).toString('base64')}`;
}

test('manifests by tag and digest, blob HEAD and GET from the reference registry', TEST_TIMEOUT, async () => {
  const registry = await startRegistry();
  const client = new UpstreamClient({ url: registry.url });
  try {
    const layers = [bufferBlob(randomBytes(300_000)), bufferBlob(randomBytes(1000))];
    const image = await pushImage(registry.url, 'shoal/app', 'v1', layers);

    const byTag = await client.getManifest('shoal/app', 'v1');
    assert.ok(byTag);
    assert.deepEqual(byTag.bytes, image.manifest);
    assert.equal(byTag.digest, image.digest);
    assert.equal(byTag.mediaType, MediaType.OciManifest);
    assert.deepEqual(
      byTag.layers.map((l) => l.digest),
      layers.map((l) => l.digest),
    );
    const byDigest = await client.getManifest('shoal/app', image.digest);
    assert.deepEqual(byDigest?.bytes, image.manifest);

    assert.deepEqual(await client.statBlob('shoal/app', layers[0]!.digest), {
      digest: layers[0]!.digest,
      size: layers[0]!.size,
    });
    const blob = await client.getBlob('shoal/app', layers[0]!.digest);
    assert.equal(blob?.size, layers[0]!.size);
    assert.deepEqual(await digestOfStream(blob!.body), { digest: layers[0]!.digest, size: layers[0]!.size });

    const absent = sha256Of('absent');
    assert.equal(await client.getManifest('shoal/app', 'nope'), undefined);
    assert.equal(await client.getManifest('shoal/other', 'v1'), undefined);
    assert.equal(await client.getManifest('shoal/app', absent), undefined);
    assert.equal(await client.statBlob('shoal/app', absent), undefined);
    assert.equal(await client.getBlob('shoal/app', absent), undefined);
  } finally {
    await client.close();
    await registry.stop();
  }
});

test('basic auth from URL userinfo or options; bad or missing credentials are a 401 UpstreamError', TEST_TIMEOUT, async () => {
  const dir = await tempDir('shoal-upstream-basic-');
  const registry = await startBasicAuthRegistry(dir.path, 'edge', 's3cret:!');
  const clients: UpstreamClient[] = [];
  const client = (opts: ConstructorParameters<typeof UpstreamClient>[0]) => {
    const c = new UpstreamClient(opts);
    clients.push(c);
    return c;
  };
  try {
    const image = await pushImage(registry.url, 'team/app', 'v1', [bufferBlob(randomBytes(5000))], basic('edge', 's3cret:!'));
    const withUserinfo = client({ url: `http://edge:${encodeURIComponent('s3cret:!')}@${registry.host}` });
    assert.equal((await withUserinfo.getManifest('team/app', 'v1'))?.digest, image.digest);
    const withOptions = client({ url: registry.url, username: 'edge', password: 's3cret:!' });
    assert.equal((await withOptions.statBlob('team/app', image.layers[0]!.digest))?.size, 5000);

    const wrong = client({ url: registry.url, username: 'edge', password: 'wrong' });
    const refused = await wrong.getManifest('team/app', 'v1').then(
      () => assert.fail('a wrong password must not succeed'),
      (err: unknown) => err,
    );
    assert.ok(refused instanceof UpstreamError);
    assert.equal(refused.upstreamStatus, 401);
    assert.match(refused.message, /rejected the credentials/);

    await assert.rejects(client({ url: registry.url }).getManifest('team/app', 'v1'), (err: unknown) => {
      assert.ok(err instanceof UpstreamError);
      assert.equal(err.upstreamStatus, 401);
      assert.match(err.message, /requires credentials/);
      return true;
    });
  } finally {
    for (const c of clients) await c.close();
    await registry.stop();
    await dir.remove();
  }
});

test('bearer tokens from the realm of a token-auth reference registry, cached per repository until expiry', TEST_TIMEOUT, async () => {
  const dir = await tempDir('shoal-upstream-token-');
  const tokens = await startTokenServer(dir.path, { service: 'shoal-test-registry' });
  const registry = await startRegistry({ auth: tokens.registryAuth });
  const client = new UpstreamClient({ url: registry.url });
  try {
    const push = (repo: string) => `Bearer ${tokens.issue([{ type: 'repository', name: repo, actions: ['pull', 'push'] }])}`;
    const app = await pushImage(registry.url, 'lib/app', 'v1', [bufferBlob(randomBytes(20_000))], push('lib/app'));
    const db = await pushImage(registry.url, 'lib/db', 'v1', [bufferBlob(randomBytes(100))], push('lib/db'));
    const tokenRequests = () => tokens.requests.filter((r) => r === 'GET /token').length;

    assert.equal((await client.getManifest('lib/app', 'v1'))?.digest, app.digest);
    assert.equal(tokenRequests(), 1);
    // The cached token serves every later request for the repository.
    assert.equal((await client.getManifest('lib/app', app.digest))?.digest, app.digest);
    assert.equal((await client.statBlob('lib/app', app.layers[0]!.digest))?.size, 20_000);
    const blob = await client.getBlob('lib/app', app.layers[0]!.digest);
    assert.equal((await digestOfStream(blob!.body)).digest, app.layers[0]!.digest);
    assert.equal(tokenRequests(), 1);

    // Another repository is another scope: its own token.
    assert.equal((await client.getManifest('lib/db', 'v1'))?.digest, db.digest);
    assert.equal(tokenRequests(), 2);

    // Concurrent requests that meet the challenge together share one token request.
    const fresh = new UpstreamClient({ url: registry.url });
    try {
      const all = await Promise.all([1, 2, 3, 4].map(() => fresh.getManifest('lib/app', 'v1')));
      assert.ok(all.every((m) => m?.digest === app.digest));
      assert.equal(tokenRequests(), 3);
    } finally {
      await fresh.close();
    }

    // A token is renewed once it expires (the client renews a little early).
    tokens.lifetimeSeconds = 1;
    const shortLived = new UpstreamClient({ url: registry.url });
    try {
      await shortLived.getManifest('lib/app', 'v1');
      assert.equal(tokenRequests(), 4);
      await new Promise((r) => setTimeout(r, 1100));
      await shortLived.getManifest('lib/app', 'v1');
      assert.equal(tokenRequests(), 5);
    } finally {
      await shortLived.close();
    }
  } finally {
    await client.close();
    await registry.stop();
    await tokens.stop();
    await dir.remove();
  }
});

test('a token realm that needs basic credentials gets them; without them the pull fails clearly', TEST_TIMEOUT, async () => {
  const dir = await tempDir('shoal-upstream-token-basic-');
  const tokens = await startTokenServer(dir.path, { service: 'svc', credentials: { user: 'robot', password: 'pw' } });
  const registry = await startRegistry({ auth: tokens.registryAuth });
  const withCredentials = new UpstreamClient({ url: registry.url, username: 'robot', password: 'pw' });
  const anonymous = new UpstreamClient({ url: registry.url });
  try {
    const image = await pushImage(registry.url, 'lib/app', 'v1', [bufferBlob(randomBytes(100))], `Bearer ${tokens.issue([
      { type: 'repository', name: 'lib/app', actions: ['pull', 'push'] },
    ])}`);
    assert.equal((await withCredentials.getManifest('lib/app', 'v1'))?.digest, image.digest);
    await assert.rejects(anonymous.getManifest('lib/app', 'v1'), (err: unknown) => {
      assert.ok(err instanceof UpstreamError);
      assert.equal(err.upstreamStatus, 401);
      assert.match(err.message, /token/);
      return true;
    });
  } finally {
    await withCredentials.close();
    await anonymous.close();
    await registry.stop();
    await tokens.stop();
    await dir.remove();
  }
});

test('manifest bytes that do not match the digest asked for, or the one announced, are refused', TEST_TIMEOUT, async () => {
  const real = Buffer.from(JSON.stringify({ schemaVersion: 2, mediaType: MediaType.OciIndex, manifests: [] }));
  const tampered = Buffer.from(JSON.stringify({ schemaVersion: 2, mediaType: MediaType.OciIndex, manifests: [], x: 1 }));
  const fake = await startServer((req, res) => {
    const announced = req.url!.endsWith('/honest') ? sha256Of(tampered) : sha256Of(real);
    res.writeHead(200, { 'content-type': MediaType.OciIndex, 'docker-content-digest': announced }).end(tampered);
  });
  const client = new UpstreamClient({ url: fake.url });
  try {
    await assert.rejects(client.getManifest('lib/app', sha256Of(real)), (err: unknown) => {
      assert.ok(err instanceof UpstreamError);
      assert.match(err.message, /expected sha256:/);
      return true;
    });
    await assert.rejects(client.getManifest('lib/app', 'latest'), UpstreamError);
    // A tag whose Docker-Content-Digest matches the bytes is accepted as sent.
    const honest = await client.getManifest('lib/app', 'honest');
    assert.deepEqual(honest?.bytes, tampered);
  } finally {
    await client.close();
    await fake.stop();
  }
});

test('an upstream that is down, silent or stalls fails with an UpstreamError instead of hanging', TEST_TIMEOUT, async () => {
  const closed = await startServer(() => {});
  await closed.stop();
  const down = new UpstreamClient({ url: closed.url });

  const sockets = new Set<Socket>();
  const silent = createTcpServer((socket) => sockets.add(socket));
  await new Promise<void>((resolve) => silent.listen(0, '127.0.0.1', resolve));
  const silentClient = new UpstreamClient({ url: `http://127.0.0.1:${(silent.address() as AddressInfo).port}`, timeoutMs: 300 });

  const stalling = await startServer((_req, res) => {
    res.writeHead(200, { 'content-length': '1000' });
    res.write(Buffer.alloc(10));
  });
  const stallingClient = new UpstreamClient({ url: stalling.url, bodyTimeoutMs: 300 });
  try {
    await assert.rejects(down.getManifest('lib/app', 'v1'), (err: unknown) => {
      assert.ok(err instanceof UpstreamError);
      assert.equal(err.upstreamStatus, undefined);
      assert.match(err.message, /ECONNREFUSED|connect/i);
      return true;
    });
    await assert.rejects(down.statBlob('lib/app', sha256Of('x')), UpstreamError);
    await assert.rejects(silentClient.getManifest('lib/app', 'v1'), (err: unknown) => {
      assert.ok(err instanceof UpstreamError);
      assert.match(err.message, /timeout/i);
      return true;
    });
    const blob = await stallingClient.getBlob('lib/app', sha256Of('x'));
    await assert.rejects(digestOfStream(blob!.body), /timeout/i);
  } finally {
    await down.close();
    await silentClient.close();
    await stallingClient.close();
    for (const s of sockets) s.destroy();
    await new Promise<void>((resolve) => silent.close(() => resolve()));
    await stalling.stop();
  }
});

test('other upstream statuses carry the status and the registry error code', TEST_TIMEOUT, async () => {
  const fake = await startServer((_req, res) => {
    res
      .writeHead(429, { 'content-type': 'application/json' })
      .end(JSON.stringify({ errors: [{ code: 'TOOMANYREQUESTS', message: 'slow down' }] }));
  });
  const client = new UpstreamClient({ url: fake.url });
  try {
    await assert.rejects(client.getBlob('lib/app', sha256Of('x')), (err: unknown) => {
      assert.ok(err instanceof UpstreamError);
      assert.equal(err.upstreamStatus, 429);
      assert.equal(err.statusCode, 502);
      assert.match(err.message, /429.*TOOMANYREQUESTS slow down/);
      return true;
    });
  } finally {
    await client.close();
    await fake.stop();
  }
});

test('a blob redirect to another origin is followed without the credentials', TEST_TIMEOUT, async () => {
  const bytes = randomBytes(70_000);
  let cdnAuthorization: string | undefined = 'not asked';
  const cdn = await startServer((req, res) => {
    cdnAuthorization = req.headers.authorization;
    res.writeHead(200, { 'content-length': String(bytes.byteLength) }).end(bytes);
  });
  const registry = await startServer((req, res) => {
    if (req.headers.authorization !== basic('u', 'p')) {
      res.writeHead(401, { 'www-authenticate': 'Basic realm="r"' }).end();
      return;
    }
    res.writeHead(307, { location: `${cdn.url}/cdn/blob?sig=1` }).end();
  });
  const client = new UpstreamClient({ url: registry.url, username: 'u', password: 'p' });
  try {
    const blob = await client.getBlob('lib/app', sha256Of(bytes));
    assert.deepEqual(await digestOfStream(blob!.body), { digest: sha256Of(bytes), size: bytes.byteLength });
    assert.equal(cdnAuthorization, undefined);
    assert.deepEqual(cdn.requests, ['GET /cdn/blob']);
  } finally {
    await client.close();
    await registry.stop();
    await cdn.stop();
  }
});

test('challenges are parsed with quoted commas; bad URLs and names are refused up front', async () => {
  assert.deepEqual(
    parseChallenge('Bearer realm="https://auth.example/token",service="registry.example",scope="repository:a/b:pull,push"'),
    {
      scheme: 'bearer',
      params: { realm: 'https://auth.example/token', service: 'registry.example', scope: 'repository:a/b:pull,push' },
    },
  );
  assert.deepEqual(parseChallenge('Basic realm=basic-realm'), { scheme: 'basic', params: { realm: 'basic-realm' } });
  assert.equal(parseChallenge(undefined), undefined);

  assert.throws(() => new UpstreamClient({ url: 'ftp://127.0.0.1:21' }), /http or https/);
  assert.throws(() => new UpstreamClient({ url: 'http://127.0.0.1:5000/prefix' }), /without a path/);
  const client = new UpstreamClient({ url: 'http://127.0.0.1:9' });
  try {
    await assert.rejects(client.getManifest('Bad/Name', 'v1'), /invalid repository name/);
    await assert.rejects(client.getManifest('lib/app', 'bad tag'), /invalid tag or digest/);
    await assert.rejects(client.getBlob('lib/app', 'sha256:short'), /digest/);
  } finally {
    await client.close();
  }
});
