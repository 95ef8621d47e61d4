import { test } from 'node:test';
import assert from 'node:assert/strict';
import { createHash, randomBytes } from 'node:crypto';
import { readdirSync } from 'node:fs';
import { readFile, writeFile } from 'node:fs/promises';
import { connect } from 'node:net';
import { join } from 'node:path';
import { PassThrough, Readable } from 'node:stream';
import { setTimeout as sleep } from 'node:timers/promises';
import { Client, request } from 'undici';
import { sha256Of } from '@shoal/oci';
import { LocalRegistry } from '@shoal/registry-gateway';
import { startGateway, type RunningGateway } from './gateway-harness.ts';

const OCI_MANIFEST = 'application/vnd.oci.image.manifest.v1+json';
const OCI_INDEX = 'application/vnd.oci.image.index.v1+json';
const DOCKER_MANIFEST = 'application/vnd.docker.distribution.manifest.v2+json';

interface Reply {
  status: number;
  headers: Record<string, string>;
  body: Buffer;
}

async function send(
  gw: RunningGateway,
  method: string,
  path: string,
  opts: { headers?: Record<string, string>; body?: Buffer | string | Readable } = {},
): Promise<Reply> {
  const res = await request(`${gw.url}${path}`, { method: method as 'GET', headers: opts.headers, body: opts.body });
  const body = Buffer.from(await res.body.arrayBuffer());
  const headers: Record<string, string> = {};
  for (const [k, v] of Object.entries(res.headers)) if (v !== undefined) headers[k] = Array.isArray(v) ? v.join(', ') : v;
  return { status: res.statusCode, headers, body };
}

function errorCode(reply: Reply): string | undefined {
  return (JSON.parse(reply.body.toString()) as { errors: { code: string }[] }).errors[0]?.code;
}

function assertError(reply: Reply, status: number, code: string): void {
  assert.equal(reply.status, status, reply.body.toString());
  assert.match(reply.headers['content-type'] ?? '', /^application\/json/);
  const parsed = JSON.parse(reply.body.toString()) as { errors: { code: string; message: string; detail: unknown }[] };
  assert.equal(parsed.errors[0]?.code, code);
  assert.equal(typeof parsed.errors[0]?.message, 'string');
  assert.ok('detail' in parsed.errors[0]!);
}

async function withGateway(
  opts: Parameters<typeof startGateway>[0],
  fn: (gw: RunningGateway) => Promise<void>,
): Promise<void> {
  const gw = await startGateway(opts);
  try {
    await fn(gw);
  } finally {
    await gw.close();
  }
}

async function pushBlob(gw: RunningGateway, name: string, bytes: Buffer, query = '', headers: Record<string, string> = {}) {
  const r = await send(gw, 'POST', `/v2/${name}/blobs/uploads/?digest=${sha256Of(bytes)}${query ? `&${query}` : ''}`, {
    headers: { 'content-type': 'application/octet-stream', ...headers },
    body: bytes,
  });
  assert.equal(r.status, 201, r.body.toString());
  return sha256Of(bytes);
}

/** Pushes a config and one layer, and returns manifest bytes naming them. */
async function imageManifest(gw: RunningGateway, name: string, query = '', extra: Record<string, unknown> = {}) {
  const config = Buffer.from(JSON.stringify({ os: 'linux', nonce: randomBytes(4).toString('hex') }));
  const layer = randomBytes(2000);
  await pushBlob(gw, name, config, query);
  await pushBlob(gw, name, layer, query);
  const manifest = Buffer.from(
    JSON.stringify({
      schemaVersion: 2,
      mediaType: OCI_MANIFEST,
      config: { mediaType: 'application/vnd.oci.image.config.v1+json', digest: sha256Of(config), size: config.length },
      layers: [{ mediaType: 'application/vnd.oci.image.layer.v1.tar', digest: sha256Of(layer), size: layer.length }],
      ...extra,
    }),
  );
  return { manifest, layer, config };
}

function putManifest(gw: RunningGateway, name: string, ref: string, bytes: Buffer, mediaType = OCI_MANIFEST, query = '') {
  return send(gw, 'PUT', `/v2/${name}/manifests/${ref}${query}`, { headers: { 'content-type': mediaType }, body: bytes });
}

test('?ns= selects the namespace, so the same name in two registries never collides', () =>
  withGateway({}, async (gw) => {
    const hub = await imageManifest(gw, 'library/nginx', 'ns=docker.io');
    const ghcr = await imageManifest(gw, 'library/nginx', 'ns=ghcr.io');
    assert.equal((await putManifest(gw, 'library/nginx', '1', hub.manifest, OCI_MANIFEST, '?ns=docker.io')).status, 201);
    const put = await putManifest(gw, 'library/nginx', '1', ghcr.manifest, OCI_MANIFEST, '?ns=ghcr.io');
    assert.equal(put.status, 201);
    assert.equal(put.headers.location, `/v2/library/nginx/manifests/${sha256Of(ghcr.manifest)}?ns=ghcr.io`);

    const fromGhcr = await send(gw, 'GET', '/v2/library/nginx/manifests/1?ns=ghcr.io');
    assert.ok(fromGhcr.body.equals(ghcr.manifest));
    const fromHub = await send(gw, 'GET', '/v2/library/nginx/manifests/1?ns=docker.io');
    assert.ok(fromHub.body.equals(hub.manifest));
    // No ns: the default namespace, docker.io.
    const fromDefault = await send(gw, 'GET', '/v2/library/nginx/manifests/1');
    assert.ok(fromDefault.body.equals(hub.manifest));
    // The host is case-insensitive.
    assert.ok((await send(gw, 'GET', '/v2/library/nginx/manifests/1?ns=GHCR.io')).body.equals(ghcr.manifest));
    assert.equal((await send(gw, 'GET', '/v2/library/nginx/manifests/1?ns=quay.io')).status, 404);

    assert.deepEqual(await gw.store.repositories(), ['docker.io/library/nginx', 'ghcr.io/library/nginx']);
    const catalog = await send(gw, 'GET', '/v2/_catalog?ns=ghcr.io');
    assert.deepEqual(JSON.parse(catalog.body.toString()), { repositories: ['library/nginx'] });
    const tags = await send(gw, 'GET', '/v2/library/nginx/tags/list?ns=ghcr.io');
    assert.deepEqual(JSON.parse(tags.body.toString()), { name: 'library/nginx', tags: ['1'] });

    assertError(await send(gw, 'GET', '/v2/library/nginx/manifests/1?ns=bad%20host'), 400, 'NAME_INVALID');
    assertError(await send(gw, 'GET', '/v2/library/nginx/manifests/1?ns=a&ns=b'), 400, 'NAME_INVALID');
  }));

test('an upload Location keeps the namespace, and following it lands the blob there', () =>
  withGateway({ defaultNamespace: 'registry.local' }, async (gw) => {
    const start = await send(gw, 'POST', '/v2/app/blobs/uploads/?ns=ghcr.io');
    assert.equal(start.status, 202);
    assert.match(start.headers.location!, /^\/v2\/app\/blobs\/uploads\/[0-9a-f-]{36}\?ns=ghcr\.io$/);
    assert.equal(start.headers.range, '0-0');
    assert.equal(start.headers['docker-upload-uuid'], start.headers.location!.split('/').pop()!.split('?')[0]);
    assert.equal(start.headers['content-length'], '0');
    const blob = randomBytes(100);
    const put = await send(gw, 'PUT', `${start.headers.location}&digest=${sha256Of(blob)}`, { body: blob });
    assert.equal(put.status, 201);
    assert.equal(put.headers.location, `/v2/app/blobs/${sha256Of(blob)}?ns=ghcr.io`);
    assert.equal(put.headers['docker-content-digest'], sha256Of(blob));

    // Tags pagination links keep the namespace too.
    const { manifest } = await imageManifest(gw, 'app', 'ns=ghcr.io');
    for (const tag of ['a', 'b', 'c']) assert.equal((await putManifest(gw, 'app', tag, manifest, OCI_MANIFEST, '?ns=ghcr.io')).status, 201);
    const page = await send(gw, 'GET', '/v2/app/tags/list?n=2&ns=ghcr.io');
    assert.equal(page.headers.link, '</v2/app/tags/list?n=2&last=b&ns=ghcr.io>; rel="next"');
    assert.deepEqual(await gw.store.repositories(), ['ghcr.io/app']);
    assertError(await send(gw, 'GET', '/v2/app/tags/list'), 404, 'NAME_UNKNOWN');
  }));

test('exact statuses: monolithic POST is 201, DELETE by tag removes only the tag, wrong methods are 405', () =>
  withGateway({}, async (gw) => {
    const blob = randomBytes(10);
    const mono = await send(gw, 'POST', `/v2/x/blobs/uploads/?digest=${sha256Of(blob)}`, { body: blob });
    assert.equal(mono.status, 201);
    assert.equal(mono.headers.location, `/v2/x/blobs/${sha256Of(blob)}`);
    assert.equal(mono.headers['docker-distribution-api-version'], 'registry/2.0');

    const { manifest } = await imageManifest(gw, 'x');
    await putManifest(gw, 'x', 'keep', manifest);
    await putManifest(gw, 'x', 'drop', manifest);
    assert.equal((await send(gw, 'DELETE', '/v2/x/manifests/drop')).status, 202);
    assert.deepEqual(JSON.parse((await send(gw, 'GET', '/v2/x/tags/list')).body.toString()).tags, ['keep']);
    assertError(await send(gw, 'DELETE', '/v2/x/manifests/drop'), 404, 'MANIFEST_UNKNOWN');

    const wrong = await send(gw, 'PATCH', '/v2/x/manifests/keep');
    assertError(wrong, 405, 'UNSUPPORTED');
    assert.equal(wrong.headers.allow, 'GET, HEAD, PUT, DELETE');
    assertError(await send(gw, 'GET', '/v2/x/blobs/uploads/'), 405, 'UNSUPPORTED');
    assertError(await send(gw, 'POST', '/v2/_catalog'), 405, 'UNSUPPORTED');
    assert.equal((await send(gw, 'HEAD', '/v2/x/tags/list')).status, 200);
  }));

test('Docker manifests keep their media type and bytes; HEAD tells containerd everything', () =>
  withGateway({}, async (gw) => {
    const config = Buffer.from('{"architecture":"arm64","os":"linux"}');
    await pushBlob(gw, 'docker/app', config);
    // Whitespace and key order are the client's; the digest covers exactly these bytes.
    const manifest = Buffer.from(
      `{\n   "schemaVersion": 2,\n   "mediaType": "${DOCKER_MANIFEST}",\n   "config": {"mediaType": "application/vnd.docker.container.image.v1+json", "size": ${config.length}, "digest": "${sha256Of(config)}"},\n   "layers": []\n}`,
    );
    assert.equal((await putManifest(gw, 'docker/app', 'v1', manifest, DOCKER_MANIFEST)).status, 201);
    const head = await send(gw, 'HEAD', '/v2/docker/app/manifests/v1');
    assert.equal(head.status, 200);
    assert.equal(head.headers['content-type'], DOCKER_MANIFEST);
    assert.equal(head.headers['content-length'], String(manifest.length));
    assert.equal(head.headers['docker-content-digest'], sha256Of(manifest));
    assert.equal(head.body.length, 0);
    const get = await send(gw, 'GET', `/v2/docker/app/manifests/${sha256Of(manifest)}`);
    assert.ok(get.body.equals(manifest));
  }));

test('manifest validation: sizes must match, index children must be in the repository, digests must agree', () =>
  withGateway({}, async (gw) => {
    const { manifest, layer } = await imageManifest(gw, 'v/app');
    const wrongSize = Buffer.from(manifest.toString().replace(`"size":${layer.length}`, `"size":${layer.length + 1}`));
    assertError(await putManifest(gw, 'v/app', 'bad-size', wrongSize), 400, 'MANIFEST_INVALID');
    assertError(await putManifest(gw, 'v/app', 'typed', manifest, OCI_INDEX), 400, 'MANIFEST_INVALID');
    assertError(await putManifest(gw, 'v/app', 'x', Buffer.from('[1,2]')), 400, 'MANIFEST_INVALID');
    assertError(await putManifest(gw, 'v/app', 'x', Buffer.from('{"schemaVersion":1}')), 400, 'MANIFEST_INVALID');
    assertError(await putManifest(gw, 'v/app', 'x', Buffer.alloc(0)), 400, 'MANIFEST_INVALID');
    assertError(await putManifest(gw, 'v/app', `sha512:${'a'.repeat(128)}`, manifest), 400, 'DIGEST_INVALID');
    assertError(await putManifest(gw, 'v/app', 'bad..tag!', manifest), 400, 'MANIFEST_INVALID');

    // A child pushed to another repository does not satisfy this repository's index.
    assert.equal((await putManifest(gw, 'other/app', 'v1', manifest)).status, 201);
    const index = Buffer.from(
      JSON.stringify({
        schemaVersion: 2,
        mediaType: OCI_INDEX,
        manifests: [{ mediaType: OCI_MANIFEST, digest: sha256Of(manifest), size: manifest.length }],
      }),
    );
    assertError(await putManifest(gw, 'v/app', 'multi', index, OCI_INDEX), 400, 'MANIFEST_BLOB_UNKNOWN');
    assert.equal((await putManifest(gw, 'other/app', 'multi', index, OCI_INDEX)).status, 201);
    assert.equal(await gw.store.tags('docker.io/v/app'), undefined);
  }));

test('maxManifestBytes bounds manifests exactly, with or without a Content-Length', () =>
  withGateway({ maxManifestBytes: 2048 }, async (gw) => {
    const base = (await imageManifest(gw, 'big')).manifest.toString();
    const padTo = (size: number) => {
      const without = base.replace(/}$/, ',"annotations":{"pad":""}}');
      return Buffer.from(without.replace('"pad":""', `"pad":"${'p'.repeat(size - without.length)}"`));
    };
    const exact = padTo(2048);
    const over = padTo(2049);
    assert.equal(exact.length, 2048);
    assert.equal((await putManifest(gw, 'big', 'exact', exact)).status, 201);
    assertError(await putManifest(gw, 'big', 'over', over), 413, 'SIZE_INVALID');
    // Chunked transfer: no Content-Length to refuse up front, so the bound applies while reading.
    assertError(await putManifest(gw, 'big', 'over', Readable.from([over.subarray(0, 1000), over.subarray(1000)]) as never), 413, 'SIZE_INVALID');
    const huge = await putManifest(gw, 'big', 'huge', Buffer.alloc(8 * 1024 * 1024, 0x20));
    assertError(huge, 413, 'SIZE_INVALID');
    assert.deepEqual(await gw.store.tags('docker.io/library/big'), ['exact']);
    // The connection stays usable after a refused body.
    assert.equal((await send(gw, 'GET', '/v2/big/manifests/exact')).status, 200);
  }));

test('blob reads: ranges, HEAD, sha512 blobs, and bad digests', () =>
  withGateway({}, async (gw) => {
    const blob = randomBytes(1000);
    const digest = await pushBlob(gw, 'r', blob);
    const get = (range?: string) => send(gw, 'GET', `/v2/r/blobs/${digest}`, range ? { headers: { range } } : {});

    const first = await get('bytes=0-0');
    assert.equal(first.status, 206);
    assert.equal(first.headers['content-range'], 'bytes 0-0/1000');
    assert.ok(first.body.equals(blob.subarray(0, 1)));
    const clamped = await get('bytes=900-5000');
    assert.equal(clamped.headers['content-range'], 'bytes 900-999/1000');
    assert.equal(clamped.body.length, 100);
    for (const ignored of ['bytes=0-1,5-6', 'bytes=9-2', 'lines=1-2']) {
      const whole = await get(ignored);
      assert.equal(whole.status, 200, ignored);
      assert.ok(whole.body.equals(blob));
    }
    const unsatisfiable = await get('bytes=-0');
    assert.equal(unsatisfiable.status, 416);
    assert.equal(unsatisfiable.headers['content-range'], 'bytes */1000');
    const head = await send(gw, 'HEAD', `/v2/r/blobs/${digest}`, { headers: { range: 'bytes=0-9' } });
    assert.equal(head.status, 200);
    assert.equal(head.headers['content-length'], '1000');
    assert.equal(head.headers['accept-ranges'], 'bytes');
    assert.equal(head.headers['content-type'], 'application/octet-stream');

    const sha512 = `sha512:${createHash('sha512').update(blob).digest('hex')}`;
    const start = await send(gw, 'POST', '/v2/r/blobs/uploads/');
    assert.equal((await send(gw, 'PUT', `${start.headers.location}?digest=${sha512}`, { body: blob })).status, 201);
    assert.ok((await send(gw, 'GET', `/v2/r/blobs/${sha512}`)).body.equals(blob));

    assertError(await send(gw, 'GET', '/v2/r/blobs/md5:d41d8cd98f00b204e9800998ecf8427e'), 400, 'DIGEST_INVALID');
    assertError(await send(gw, 'GET', `/v2/r/blobs/${digest.toUpperCase()}`), 400, 'DIGEST_INVALID');
    const missing = await send(gw, 'HEAD', `/v2/r/blobs/${sha256Of('nope')}`);
    assert.equal(missing.status, 404);
    assert.equal(missing.body.length, 0);
    assertError(await send(gw, 'POST', `/v2/r/blobs/uploads/?mount=sha256:short&from=x`), 400, 'DIGEST_INVALID');
    assertError(await send(gw, 'POST', `/v2/r/blobs/uploads/?mount=${digest}&from=Bad..Name`), 400, 'NAME_INVALID');
  }));

test('chunk headers are checked: malformed or inconsistent Content-Range is refused without writing', () =>
  withGateway({}, async (gw) => {
    const start = await send(gw, 'POST', '/v2/c/blobs/uploads/');
    const location = start.headers.location!;
    const patch = (headers: Record<string, string>, body: Buffer) => send(gw, 'PATCH', location, { headers, body });
    assertError(await patch({ 'content-range': 'garbage' }, Buffer.from('abc')), 400, 'BLOB_UPLOAD_INVALID');
    assertError(await patch({ 'content-range': '0-9' }, Buffer.from('abc')), 400, 'BLOB_UPLOAD_INVALID');
    assertError(await patch({ 'content-range': '5-2' }, Buffer.from('abc')), 400, 'BLOB_UPLOAD_INVALID');
    const late = await patch({ 'content-range': '3-5' }, Buffer.from('abc'));
    assertError(late, 416, 'BLOB_UPLOAD_INVALID');
    assert.equal(late.headers.range, '0-0');
    assert.equal((await patch({ 'content-range': 'bytes 0-2/*' }, Buffer.from('abc'))).headers.range, '0-2');
    const status = await send(gw, 'GET', location);
    assert.equal(status.status, 204);
    assert.equal(status.headers.range, '0-2');
    // The final chunk may ride on the PUT.
    const done = await send(gw, 'PUT', `${location}?digest=${sha256Of('abcdef')}`, {
      headers: { 'content-range': '3-5' },
      body: Buffer.from('def'),
    });
    assert.equal(done.status, 201);
    assert.equal((await send(gw, 'GET', `/v2/c/blobs/${sha256Of('abcdef')}`)).body.toString(), 'abcdef');
    assertError(await send(gw, 'GET', location), 404, 'BLOB_UPLOAD_UNKNOWN');
  }));

test('a second writer on a busy upload gets 416, and the first write is unharmed', () =>
  withGateway({}, async (gw) => {
    const start = await send(gw, 'POST', '/v2/busy/blobs/uploads/');
    const location = start.headers.location!;
    const slowBody = new PassThrough();
    const slow = send(gw, 'PATCH', location, { body: slowBody });
    slowBody.write(Buffer.alloc(1000, 1));
    // Wait until the server is mid-append (it counts bytes as they stream in).
    for (let i = 0; (await send(gw, 'GET', location)).headers.range !== '0-999'; i++) {
      assert.ok(i < 500, 'the first chunk never arrived');
      await sleep(10);
    }
    assertError(await send(gw, 'PATCH', location, { body: Buffer.from('intruder') }), 416, 'BLOB_UPLOAD_INVALID');
    assertError(await send(gw, 'PUT', `${location}?digest=${sha256Of('x')}`), 416, 'BLOB_UPLOAD_INVALID');
    slowBody.end(Buffer.alloc(24, 2));
    const first = await slow;
    assert.equal(first.status, 202);
    assert.equal(first.headers.range, '0-1023');
    const expected = Buffer.concat([Buffer.alloc(1000, 1), Buffer.alloc(24, 2)]);
    assert.equal((await send(gw, 'PUT', `${location}?digest=${sha256Of(expected)}`)).status, 201);
  }));

/** Sends a request head and part of its body over a raw socket, waits for `ready`, then drops the connection. */
async function abortMidBody(gw: RunningGateway, head: string, partial: Buffer, ready: () => Promise<void>): Promise<void> {
  const socket = connect(gw.port, '127.0.0.1');
  socket.on('error', () => {});
  await new Promise<void>((resolve) => socket.once('connect', resolve));
  socket.write(head);
  socket.write(partial);
  await ready();
  socket.destroy();
}

test('a client that aborts mid-PATCH leaves the upload at its last good size, ready to continue', () =>
  withGateway({}, async (gw) => {
    const blob = randomBytes(300_000);
    const start = await send(gw, 'POST', '/v2/abort/blobs/uploads/');
    const location = start.headers.location!;
    assert.equal((await send(gw, 'PATCH', location, { headers: { 'content-range': '0-99999' }, body: blob.subarray(0, 100_000) })).status, 202);

    const garbage = randomBytes(50_000);
    await abortMidBody(
      gw,
      `PATCH ${location} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/octet-stream\r\nContent-Length: 200000\r\n\r\n`,
      garbage,
      async () => {
        // Drop the connection only once the server is visibly part way through the body.
        for (let i = 0; (await send(gw, 'GET', location)).headers.range !== '0-149999'; i++) {
          assert.ok(i < 500, 'the partial body never arrived');
          await sleep(10);
        }
      },
    );
    // The half-sent chunk is rolled back; resume from byte 100000 once the server has noticed.
    let resumed: Reply;
    for (let i = 0; ; i++) {
      resumed = await send(gw, 'PATCH', location, { headers: { 'content-range': '100000-299999' }, body: blob.subarray(100_000) });
      if (resumed.status !== 416) break;
      assert.ok(i < 500, 'the aborted chunk was never rolled back');
      await sleep(10);
    }
    assert.equal(resumed.status, 202, resumed.body.toString());
    assert.equal(resumed.headers.range, '0-299999');
    assert.equal((await send(gw, 'PUT', `${location}?digest=${sha256Of(blob)}`)).status, 201);
    assert.ok((await send(gw, 'GET', `/v2/abort/blobs/${sha256Of(blob)}`)).body.equals(blob));
    assert.deepEqual(await gw.store.pendingUploadFiles(), []);
  }));

test('a client that aborts a monolithic upload leaves nothing behind', () =>
  withGateway({}, async (gw) => {
    const blob = randomBytes(200_000);
    const digest = sha256Of(blob);
    await abortMidBody(
      gw,
      `POST /v2/mono/blobs/uploads/?digest=${digest} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: ${blob.length}\r\n\r\n`,
      blob.subarray(0, 120_000),
      async () => {
        for (let i = 0; (await gw.store.pendingUploadFiles()).length === 0; i++) {
          assert.ok(i < 500, 'the upload never started');
          await sleep(10);
        }
      },
    );
    for (let i = 0; (await gw.store.pendingUploadFiles()).length > 0; i++) {
      assert.ok(i < 500, 'the aborted upload left its temp file');
      await sleep(10);
    }
    assertError(await send(gw, 'GET', `/v2/mono/blobs/${digest}`), 404, 'BLOB_UNKNOWN');
    // The same upload done properly still works.
    await pushBlob(gw, 'mono', blob);
  }));

test('clients that hang up mid-download leak no file descriptors and break nothing', () =>
  withGateway({}, async (gw) => {
    const blob = randomBytes(8 * 1024 * 1024);
    const digest = await pushBlob(gw, 'dl', blob);
    const openFds = () => readdirSync('/proc/self/fd').length;
    assert.ok((await send(gw, 'GET', `/v2/dl/blobs/${digest}`)).body.equals(blob));
    const before = openFds();
    for (let i = 0; i < 12; i++) {
      const client = new Client(gw.url);
      const res = await client.request({
        method: 'GET',
        path: `/v2/dl/blobs/${digest}`,
        headers: i % 2 ? { range: 'bytes=1000-' } : {},
      });
      for await (const _chunk of res.body) break; // read a little, then walk away
      await client.destroy();
    }
    for (let i = 0; openFds() > before; i++) {
      assert.ok(i < 500, `file descriptors leaked: ${openFds()} open, ${before} before`);
      await sleep(10);
    }
    assert.ok((await send(gw, 'GET', `/v2/dl/blobs/${digest}`)).body.equals(blob));
  }));

test('with a push token, writes need it (Bearer or Basic password), reads stay anonymous', () =>
  withGateway({ pushToken: 'letmein' }, async (gw) => {
    const bearer = { authorization: 'Bearer letmein' };
    const basic = { authorization: `Basic ${Buffer.from('docker:letmein').toString('base64')}` };
    const refused = async (reply: Promise<Reply>) => {
      const r = await reply;
      assertError(r, 401, 'UNAUTHORIZED');
      assert.equal(r.headers['www-authenticate'], 'Basic realm="shoal"');
    };
    // docker login pings /v2/ and only sends credentials after a challenge.
    await refused(send(gw, 'GET', '/v2/'));
    await refused(send(gw, 'GET', '/v2/', { headers: { authorization: 'Bearer nope' } }));
    assert.equal((await send(gw, 'GET', '/v2/', { headers: basic })).status, 200);

    const blob = randomBytes(64);
    await refused(send(gw, 'POST', `/v2/sec/blobs/uploads/?digest=${sha256Of(blob)}`, { body: blob }));
    await refused(send(gw, 'POST', '/v2/sec/blobs/uploads/', { headers: { authorization: 'Bearer letmeout' } }));
    await refused(send(gw, 'POST', '/v2/sec/blobs/uploads/', { headers: { authorization: `Basic ${Buffer.from('docker:nope').toString('base64')}` } }));
    assert.equal(await gw.store.statBlob(sha256Of(blob)), undefined);

    await pushBlob(gw, 'sec', blob, '', basic);
    const start = await send(gw, 'POST', '/v2/sec/blobs/uploads/', { headers: bearer });
    assert.equal(start.status, 202);
    await refused(send(gw, 'PATCH', start.headers.location!, { body: Buffer.from('x') }));
    await refused(send(gw, 'PUT', `${start.headers.location}?digest=${sha256Of('')}`));
    await refused(send(gw, 'DELETE', start.headers.location!));
    await refused(send(gw, 'DELETE', `/v2/sec/blobs/${sha256Of(blob)}`));
    await refused(send(gw, 'PUT', '/v2/sec/manifests/v1', { body: Buffer.from('{}') }));
    // Unknown paths do not let an anonymous writer probe anything either.
    await refused(send(gw, 'POST', '/v2/sec/whatever'));

    assert.equal((await send(gw, 'GET', `/v2/sec/blobs/${sha256Of(blob)}`)).status, 200);
    assert.equal((await send(gw, 'HEAD', `/v2/sec/blobs/${sha256Of(blob)}`)).status, 200);
    assert.equal((await send(gw, 'GET', start.headers.location!)).status, 204);
    assert.equal((await send(gw, 'DELETE', `/v2/sec/blobs/${sha256Of(blob)}`, { headers: bearer })).status, 202);
  }));

test('whatever the client sends, errors keep the OCI shape and never become a 500', () =>
  withGateway({}, async (gw) => {
    assertError(await send(gw, 'GET', '/v2/%zz/manifests/x'), 400, 'NAME_INVALID');
    assertError(await send(gw, 'GET', '/not/v2'), 404, 'UNSUPPORTED');
    assertError(await send(gw, 'GET', '/v2/a/unknown'), 404, 'NAME_UNKNOWN');
    assertError(await send(gw, 'GET', '/v2/a/tags/list?n=-3'), 400, 'UNSUPPORTED');
    assertError(await send(gw, 'GET', `/v2/${'a'.repeat(256)}/tags/list`), 400, 'NAME_INVALID');
    const badType = await send(gw, 'PUT', '/v2/a/manifests/x', { headers: { 'content-type': '/' }, body: '{}' });
    assert.ok(badType.status >= 400 && badType.status < 500, String(badType.status));
    assert.ok(errorCode(badType));
    const badLength = await send(gw, 'PUT', '/v2/a/manifests/x', { headers: { 'content-type': 'application/json' }, body: 'x'.repeat(10) });
    assertError(badLength, 400, 'MANIFEST_INVALID');
    const head = await send(gw, 'HEAD', '/v2/a/manifests/-bad');
    assert.equal(head.status, 400);
    assert.equal(head.body.length, 0);
  }));

test('path traversal never reaches files outside the store', () =>
  withGateway({}, async (gw) => {
    const secret = Buffer.from('do not serve me');
    await writeFile(join(gw.dir, 'secret'), secret);
    const hex = sha256Of(secret).slice('sha256:'.length);
    const paths = [
      `/v2/..%2f..%2f..%2fsecret/tags/list`,
      `/v2/a/blobs/sha256:..%2f..%2f..%2fsecret`,
      `/v2/a/blobs/..%2F..%2F..%2Fsecret`,
      `/v2/a/manifests/..%2f..%2f..%2fsecret`,
      `/v2/a/blobs/uploads/..%2f..%2f..%2fsecret`,
      `/v2/a/blobs/uploads/..`,
      `/v2/a/blobs/sha256:${hex}`,
    ];
    for (const path of paths) {
      for (const method of ['GET', 'PATCH', 'PUT', 'DELETE']) {
        const client = new Client(gw.url);
        const res = await client.request({ method: method as 'GET', path, body: method === 'PATCH' ? 'overwrite' : null });
        const body = Buffer.from(await res.body.arrayBuffer());
        await client.close();
        assert.ok([400, 404, 405].includes(res.statusCode), `${method} ${path} -> ${res.statusCode}`);
        assert.ok(!body.includes(secret), `${method} ${path} leaked the file`);
      }
    }
    assert.ok((await readFile(join(gw.dir, 'secret'))).equals(secret));
  }));

test('an unexpected failure is a logged 500 that reveals nothing to the client', async () => {
  const logLines: string[] = [];
  await withGateway(
    {
      logger: { level: 'error', stream: { write: (line: string) => void logLines.push(line) } },
      registry: (store) => {
        const local = new LocalRegistry(store);
        return {
          store,
          getManifest: () => Promise.reject(new Error('disk on fire')),
          statBlob: (repository, digest) => local.statBlob(repository, digest),
          readBlob: (repository, digest, range) => local.readBlob(repository, digest, range),
        };
      },
    },
    async (gw) => {
      const r = await send(gw, 'GET', '/v2/a/manifests/latest');
      assertError(r, 500, 'UNKNOWN');
      assert.ok(!r.body.toString().includes('disk on fire'));
      const logged = logLines.join('\n');
      assert.match(logged, /disk on fire/);
      assert.match(logged, /"stack":"Error: disk on fire\\n\s+at /);
      // The gateway keeps serving.
      assert.equal((await send(gw, 'GET', '/v2/')).status, 200);
    },
  );
});
