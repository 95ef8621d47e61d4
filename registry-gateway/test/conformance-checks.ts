/**
 * OCI Distribution v1.1.1 conformance checks that run against any registry base URL over real
 * HTTP. The gateway's tests require every check to pass; pointed at another registry (e.g. the
 * reference docker-registry) it reports which checks that registry fails:
 *
 *   npx node registry-gateway/test/conformance-checks.ts http://127.0.0.1:5000
 */
import assert from 'node:assert/strict';
import { createHash, randomBytes } from 'node:crypto';
import { Readable } from 'node:stream';
import { Pool } from 'undici';

export type CheckCategory = 'pull' | 'push' | 'content discovery' | 'content management' | 'robustness';

export interface CheckResult {
  category: CheckCategory;
  name: string;
  ok: boolean;
  /** Why it failed. */
  detail?: string;
}

export interface ConformanceOptions {
  /** Headers sent with every request, e.g. an Authorization for a registry that needs one. */
  headers?: Record<string, string>;
  /** Repositories are created under `<prefix>/...`; default a fresh random prefix. */
  prefix?: string;
  /** Per-request timeout in ms; default 30 s. */
  timeoutMs?: number;
}

const OCI_MANIFEST = 'application/vnd.oci.image.manifest.v1+json';
const OCI_INDEX = 'application/vnd.oci.image.index.v1+json';
const OCI_CONFIG = 'application/vnd.oci.image.config.v1+json';
const OCI_LAYER = 'application/vnd.oci.image.layer.v1.tar';
const OCI_EMPTY = 'application/vnd.oci.empty.v1+json';
const SBOM_TYPE = 'application/vnd.example.sbom.v1+json';
const SIGNATURE_TYPE = 'application/vnd.example.signature.v1+json';
/** What containerd sends when resolving; some registries hide OCI manifests from clients that omit it. */
const MANIFEST_ACCEPT = [
  OCI_INDEX,
  OCI_MANIFEST,
  'application/vnd.docker.distribution.manifest.list.v2+json',
  'application/vnd.docker.distribution.manifest.v2+json',
].join(', ');

interface HttpReply {
  status: number;
  headers: Record<string, string>;
  body: Buffer;
}

interface SendOptions {
  headers?: Record<string, string>;
  body?: Buffer | Readable;
}

/** A thin HTTP client that sends paths exactly as written (no URL normalisation). */
class RegistryClient {
  readonly #pool: Pool;
  readonly #headers: Record<string, string>;
  readonly #base: URL;

  constructor(baseUrl: string, headers: Record<string, string>, timeoutMs: number) {
    this.#base = new URL(baseUrl);
    this.#pool = new Pool(this.#base.origin, { headersTimeout: timeoutMs, bodyTimeout: timeoutMs });
    this.#headers = headers;
  }

  async send(method: string, path: string, opts: SendOptions = {}): Promise<HttpReply> {
    const accept = path.includes('/manifests/') ? { accept: MANIFEST_ACCEPT } : {};
    const res = await this.#pool.request({
      method: method as 'GET',
      path,
      headers: { ...accept, ...this.#headers, ...opts.headers },
      body: opts.body ?? null,
    });
    const body = Buffer.from(await res.body.arrayBuffer());
    const headers: Record<string, string> = {};
    for (const [key, value] of Object.entries(res.headers)) {
      if (value !== undefined) headers[key] = Array.isArray(value) ? value.join(', ') : value;
    }
    return { status: res.statusCode, headers, body };
  }

  /** The path and query of a Location or Link target, which may be absolute or relative. */
  pathOf(location: string): URL {
    return new URL(location, this.#base);
  }

  close(): Promise<void> {
    return this.#pool.close();
  }
}

function sha256(data: Buffer | string): string {
  return `sha256:${createHash('sha256').update(data).digest('hex')}`;
}

function json(value: unknown): Buffer {
  return Buffer.from(JSON.stringify(value));
}

interface Descriptor {
  mediaType: string;
  digest: string;
  size: number;
}

function descriptorOf(mediaType: string, bytes: Buffer): Descriptor {
  return { mediaType, digest: sha256(bytes), size: bytes.byteLength };
}

/** An image: its config and layers as blobs, and the manifest bytes that name them. */
interface Image {
  config: Buffer;
  layers: Buffer[];
  manifest: Buffer;
  digest: string;
}

function makeImage(layerSizes: number[]): Image {
  const layers = layerSizes.map((size) => randomBytes(size));
  const config = json({
    architecture: 'amd64',
    os: 'linux',
    rootfs: { type: 'layers', diff_ids: layers.map((l) => sha256(l)) },
    nonce: randomBytes(8).toString('hex'),
  });
  const manifest = json({
    schemaVersion: 2,
    mediaType: OCI_MANIFEST,
    config: descriptorOf(OCI_CONFIG, config),
    layers: layers.map((l) => descriptorOf(OCI_LAYER, l)),
  });
  return { config, layers, manifest, digest: sha256(manifest) };
}

function expectStatus(reply: HttpReply, ...wanted: number[]): void {
  if (!wanted.includes(reply.status)) {
    const snippet = reply.body.toString('utf8', 0, Math.min(reply.body.byteLength, 200)).replace(/\s+/g, ' ');
    assert.fail(`status ${reply.status}, wanted ${wanted.join(' or ')}${snippet ? `: ${snippet}` : ''}`);
  }
}

/** The reply is an OCI error body whose first code is one of `codes`. */
function expectErrorCode(reply: HttpReply, ...codes: string[]): void {
  let parsed: { errors?: { code?: unknown; message?: unknown }[] };
  try {
    parsed = JSON.parse(reply.body.toString('utf8'));
  } catch {
    assert.fail(`status ${reply.status} without a JSON error body`);
  }
  const code = parsed.errors?.[0]?.code;
  assert.ok(typeof code === 'string', 'error body has no errors[0].code');
  assert.ok(codes.includes(code), `error code ${code}, wanted ${codes.join(' or ')}`);
}

function expectError(reply: HttpReply, status: number | number[], ...codes: string[]): void {
  expectStatus(reply, ...(Array.isArray(status) ? status : [status]));
  expectErrorCode(reply, ...codes);
}

/** The target of `Link: <...>; rel="next"`, if any. */
function nextLink(reply: HttpReply): string | undefined {
  return /<([^>]+)>\s*;\s*rel="?next"?/.exec(reply.headers.link ?? '')?.[1];
}

function randomDigest(): string {
  return sha256(randomBytes(32));
}

interface Check {
  category: CheckCategory;
  name: string;
  run(): Promise<void>;
}

/** Runs every check against `baseUrl` and reports each one's outcome; never throws for a failing registry. */
export async function runConformance(baseUrl: string, opts: ConformanceOptions = {}): Promise<CheckResult[]> {
  const client = new RegistryClient(baseUrl, opts.headers ?? {}, opts.timeoutMs ?? 30_000);
  try {
    const checks = buildChecks(client, opts.prefix ?? `conformance-${randomBytes(4).toString('hex')}`);
    const results: CheckResult[] = [];
    for (const check of checks) {
      try {
        await check.run();
        results.push({ category: check.category, name: check.name, ok: true });
      } catch (err) {
        results.push({ category: check.category, name: check.name, ok: false, detail: (err as Error).message });
      }
    }
    return results;
  } finally {
    await client.close();
  }
}

function buildChecks(client: RegistryClient, prefix: string): Check[] {
  const repo = (suffix: string) => `${prefix}/${suffix}`;

  /** POST, then PUT the whole blob to the Location: the flow every registry supports. */
  async function pushBlob(name: string, bytes: Buffer): Promise<string> {
    const start = await client.send('POST', `/v2/${name}/blobs/uploads/`);
    expectStatus(start, 202);
    const url = client.pathOf(start.headers.location!);
    url.searchParams.set('digest', sha256(bytes));
    const put = await client.send('PUT', url.pathname + url.search, {
      headers: { 'content-type': 'application/octet-stream', 'content-length': String(bytes.byteLength) },
      body: bytes,
    });
    expectStatus(put, 201);
    return sha256(bytes);
  }

  function putManifest(name: string, reference: string, bytes: Buffer, mediaType = OCI_MANIFEST): Promise<HttpReply> {
    return client.send('PUT', `/v2/${name}/manifests/${reference}`, {
      headers: { 'content-type': mediaType },
      body: bytes,
    });
  }

  async function pushImage(name: string, image: Image, ...tags: string[]): Promise<void> {
    for (const blob of [image.config, ...image.layers]) await pushBlob(name, blob);
    for (const tag of tags.length ? tags : [image.digest]) expectStatus(await putManifest(name, tag, image.manifest), 201);
  }

  /** Starts an upload session and returns its Location as a URL. */
  async function startUpload(name: string): Promise<URL> {
    const start = await client.send('POST', `/v2/${name}/blobs/uploads/`);
    expectStatus(start, 202);
    assert.ok(start.headers.location, 'no Location');
    return client.pathOf(start.headers.location);
  }

  function patchChunk(location: URL, chunk: Buffer, start: number): Promise<HttpReply> {
    return client.send('PATCH', location.pathname + location.search, {
      headers: {
        'content-type': 'application/octet-stream',
        'content-length': String(chunk.byteLength),
        'content-range': `${start}-${start + chunk.byteLength - 1}`,
      },
      body: chunk,
    });
  }

  function withDigest(location: URL, digest: string): string {
    const url = new URL(location);
    url.searchParams.set('digest', digest);
    return url.pathname + url.search;
  }

  const once = <T>(make: () => Promise<T>): (() => Promise<T>) => {
    let promise: Promise<T> | undefined;
    return () => (promise ??= make());
  };

  // The image the pull checks read: two layers, one large enough for meaningful ranges.
  const pullRepo = repo('pull');
  const pullImage = once(async () => {
    const image = makeImage([70_000, 1_500]);
    await pushImage(pullRepo, image, 'v1');
    return image;
  });

  // A subject image with two artifacts referring to it.
  const referrersRepo = repo('referrers');
  const referrers = once(async () => {
    const subject = makeImage([256]);
    await pushImage(referrersRepo, subject, 'subject');
    const empty = Buffer.from('{}');
    await pushBlob(referrersRepo, empty);
    const artifact = (artifactType: string) =>
      json({
        schemaVersion: 2,
        mediaType: OCI_MANIFEST,
        artifactType,
        config: descriptorOf(OCI_EMPTY, empty),
        layers: [descriptorOf(OCI_EMPTY, empty)],
        subject: descriptorOf(OCI_MANIFEST, subject.manifest),
        annotations: { 'org.example.kind': artifactType },
      });
    const sbom = artifact(SBOM_TYPE);
    const signature = artifact(SIGNATURE_TYPE);
    const sbomPut = await putManifest(referrersRepo, sha256(sbom), sbom);
    expectStatus(sbomPut, 201);
    expectStatus(await putManifest(referrersRepo, sha256(signature), signature), 201);
    return { subject, sbom: sha256(sbom), signature: sha256(signature), sbomPut };
  });

  const tagsRepo = repo('tags');
  const tagNames = ['alpha', 'beta', 'delta', 'epsilon', 'gamma'];
  const taggedImage = once(async () => {
    const image = makeImage([128]);
    await pushImage(tagsRepo, image, ...tagNames);
    return image;
  });

  const checks: Check[] = [];
  const check = (category: CheckCategory, name: string, run: () => Promise<void>) => checks.push({ category, name, run });

  // --- pull -------------------------------------------------------------------------------
  check('pull', 'GET /v2/ answers 200', async () => {
    expectStatus(await client.send('GET', '/v2/'), 200);
  });

  check('pull', 'HEAD manifest by tag: Docker-Content-Digest, Content-Length, Content-Type, no body', async () => {
    const image = await pullImage();
    const r = await client.send('HEAD', `/v2/${pullRepo}/manifests/v1`);
    expectStatus(r, 200);
    assert.equal(r.headers['docker-content-digest'], image.digest);
    assert.equal(r.headers['content-length'], String(image.manifest.byteLength));
    assert.equal(r.headers['content-type'], OCI_MANIFEST);
    assert.equal(r.body.byteLength, 0);
  });

  check('pull', 'GET manifest by tag returns the exact pushed bytes', async () => {
    const image = await pullImage();
    const r = await client.send('GET', `/v2/${pullRepo}/manifests/v1`);
    expectStatus(r, 200);
    assert.ok(r.body.equals(image.manifest), 'manifest bytes differ');
    assert.equal(r.headers['docker-content-digest'], image.digest);
    assert.equal(r.headers['content-type'], OCI_MANIFEST);
  });

  check('pull', 'GET manifest by digest', async () => {
    const image = await pullImage();
    const r = await client.send('GET', `/v2/${pullRepo}/manifests/${image.digest}`);
    expectStatus(r, 200);
    assert.ok(r.body.equals(image.manifest), 'manifest bytes differ');
  });

  check('pull', 'HEAD blob: Content-Length and Docker-Content-Digest, no body', async () => {
    const layer = (await pullImage()).layers[0]!;
    const r = await client.send('HEAD', `/v2/${pullRepo}/blobs/${sha256(layer)}`);
    expectStatus(r, 200);
    assert.equal(r.headers['content-length'], String(layer.byteLength));
    assert.equal(r.headers['docker-content-digest'], sha256(layer));
    assert.equal(r.body.byteLength, 0);
  });

  check('pull', 'GET blob returns its bytes', async () => {
    const layer = (await pullImage()).layers[0]!;
    const r = await client.send('GET', `/v2/${pullRepo}/blobs/${sha256(layer)}`);
    expectStatus(r, 200);
    assert.ok(r.body.equals(layer), 'blob bytes differ');
    assert.equal(r.headers['content-length'], String(layer.byteLength));
  });

  const rangeCheck = (header: string, start: (size: number) => number, end: (size: number) => number) =>
    check('pull', `GET blob with Range: ${header} -> 206 and the exact slice`, async () => {
      const layer = (await pullImage()).layers[0]!;
      const size = layer.byteLength;
      const r = await client.send('GET', `/v2/${pullRepo}/blobs/${sha256(layer)}`, { headers: { range: header } });
      expectStatus(r, 206);
      assert.equal(r.headers['content-range'], `bytes ${start(size)}-${end(size)}/${size}`);
      assert.equal(r.headers['content-length'], String(end(size) - start(size) + 1));
      assert.ok(r.body.equals(layer.subarray(start(size), end(size) + 1)), 'range bytes differ');
    });
  rangeCheck('bytes=500-1499', () => 500, () => 1499);
  rangeCheck('bytes=60000-', () => 60_000, (size) => size - 1);
  rangeCheck('bytes=-500', (size) => size - 500, (size) => size - 1);

  check('pull', 'GET blob with a Range past its end -> 416 with Content-Range bytes */size', async () => {
    const layer = (await pullImage()).layers[1]!;
    const r = await client.send('GET', `/v2/${pullRepo}/blobs/${sha256(layer)}`, {
      headers: { range: 'bytes=5000-10000' },
    });
    expectStatus(r, 416);
    assert.equal(r.headers['content-range'], `bytes */${layer.byteLength}`);
  });

  check('pull', 'GET unknown manifest -> 404 MANIFEST_UNKNOWN', async () => {
    await pullImage();
    expectError(await client.send('GET', `/v2/${pullRepo}/manifests/missing`), 404, 'MANIFEST_UNKNOWN');
    expectError(await client.send('GET', `/v2/${pullRepo}/manifests/${randomDigest()}`), 404, 'MANIFEST_UNKNOWN');
  });

  check('pull', 'HEAD unknown manifest -> 404 without a body', async () => {
    await pullImage();
    const r = await client.send('HEAD', `/v2/${pullRepo}/manifests/missing`);
    expectStatus(r, 404);
    assert.equal(r.body.byteLength, 0);
  });

  check('pull', 'GET unknown blob -> 404 BLOB_UNKNOWN', async () => {
    await pullImage();
    expectError(await client.send('GET', `/v2/${pullRepo}/blobs/${randomDigest()}`), 404, 'BLOB_UNKNOWN');
  });

  check('pull', 'a layer digest is not a manifest, while a manifest digest is also a blob', async () => {
    const image = await pullImage();
    expectStatus(await client.send('GET', `/v2/${pullRepo}/manifests/${sha256(image.layers[1]!)}`), 404);
    const blob = await client.send('GET', `/v2/${pullRepo}/blobs/${image.digest}`);
    expectStatus(blob, 200);
    assert.ok(blob.body.equals(image.manifest), 'manifest blob bytes differ');
  });

  // --- push -------------------------------------------------------------------------------
  const pushRepo = repo('push');

  check('push', 'POST /blobs/uploads/ -> 202 with Location', async () => {
    const r = await client.send('POST', `/v2/${pushRepo}/blobs/uploads/`);
    expectStatus(r, 202);
    assert.ok(r.headers.location, 'no Location');
  });

  check('push', 'monolithic POST ?digest= with the body -> 201 (or 202 and the POST-PUT flow)', async () => {
    const blob = randomBytes(3000);
    const r = await client.send('POST', `/v2/${pushRepo}/blobs/uploads/?digest=${sha256(blob)}`, {
      headers: { 'content-type': 'application/octet-stream', 'content-length': String(blob.byteLength) },
      body: blob,
    });
    expectStatus(r, 201, 202);
    assert.ok(r.headers.location, 'no Location');
    if (r.status === 202) {
      // The spec lets a registry without single-POST uploads answer as a plain POST.
      const put = await client.send('PUT', withDigest(client.pathOf(r.headers.location), sha256(blob)), {
        headers: { 'content-type': 'application/octet-stream', 'content-length': String(blob.byteLength) },
        body: blob,
      });
      expectStatus(put, 201);
    }
    const back = await client.send('GET', `/v2/${pushRepo}/blobs/${sha256(blob)}`);
    expectStatus(back, 200);
    assert.ok(back.body.equals(blob), 'blob bytes differ');
  });

  check('push', 'POST then PUT ?digest= with the whole body -> 201, Location and Docker-Content-Digest', async () => {
    const blob = randomBytes(4096);
    const location = await startUpload(pushRepo);
    const r = await client.send('PUT', withDigest(location, sha256(blob)), {
      headers: { 'content-type': 'application/octet-stream', 'content-length': String(blob.byteLength) },
      body: blob,
    });
    expectStatus(r, 201);
    assert.ok(r.headers.location, 'no Location');
    assert.equal(r.headers['docker-content-digest'], sha256(blob));
    expectStatus(await client.send('HEAD', `/v2/${pushRepo}/blobs/${sha256(blob)}`), 200);
  });

  check('push', 'chunked upload in order: PATCH with Content-Range -> 202 + Range, then PUT -> 201', async () => {
    const blob = randomBytes(10_000);
    let location = await startUpload(pushRepo);
    const first = await patchChunk(location, blob.subarray(0, 6000), 0);
    expectStatus(first, 202);
    assert.equal(first.headers.range, '0-5999');
    location = client.pathOf(first.headers.location!);
    const second = await patchChunk(location, blob.subarray(6000), 6000);
    expectStatus(second, 202);
    assert.equal(second.headers.range, '0-9999');
    location = client.pathOf(second.headers.location!);
    expectStatus(await client.send('PUT', withDigest(location, sha256(blob))), 201);
    const back = await client.send('GET', `/v2/${pushRepo}/blobs/${sha256(blob)}`);
    expectStatus(back, 200);
    assert.ok(back.body.equals(blob), 'blob bytes differ');
  });

  check('push', 'streamed PATCH without Content-Range (as Docker sends), then PUT -> 201', async () => {
    const blob = randomBytes(50_000);
    const location = await startUpload(pushRepo);
    const patch = await client.send('PATCH', location.pathname + location.search, {
      headers: { 'content-type': 'application/octet-stream' },
      body: Readable.from([blob.subarray(0, 20_000), blob.subarray(20_000)]),
    });
    expectStatus(patch, 202);
    assert.equal(patch.headers.range, '0-49999');
    const next = client.pathOf(patch.headers.location!);
    expectStatus(await client.send('PUT', withDigest(next, sha256(blob))), 201);
  });

  check('push', 'chunk out of order -> 416', async () => {
    const blob = randomBytes(2000);
    const location = await startUpload(pushRepo);
    const first = await patchChunk(location, blob.subarray(0, 1000), 0);
    expectStatus(first, 202);
    const skipped = await patchChunk(client.pathOf(first.headers.location!), blob.subarray(1500), 1500);
    expectStatus(skipped, 416);
  });

  check('push', 'upload status: GET <location> -> 204 with Range', async () => {
    const location = await startUpload(pushRepo);
    const first = await patchChunk(location, randomBytes(1234), 0);
    expectStatus(first, 202);
    const next = client.pathOf(first.headers.location!);
    const status = await client.send('GET', next.pathname + next.search);
    expectStatus(status, 204);
    assert.equal(status.headers.range, '0-1233');
  });

  check('push', 'cancel: DELETE <location> -> 204, then the upload is 404 BLOB_UPLOAD_UNKNOWN', async () => {
    const location = await startUpload(pushRepo);
    expectStatus(await client.send('DELETE', location.pathname + location.search), 204);
    expectError(await client.send('GET', location.pathname + location.search), 404, 'BLOB_UPLOAD_UNKNOWN');
  });

  check('push', 'PATCH and PUT to an unknown upload -> 404 BLOB_UPLOAD_UNKNOWN', async () => {
    const bogus = `/v2/${pushRepo}/blobs/uploads/00000000-0000-4000-8000-000000000000`;
    expectError(await client.send('GET', bogus), 404, 'BLOB_UPLOAD_UNKNOWN');
    const chunk = Buffer.from('data');
    expectError(
      await client.send('PATCH', bogus, { headers: { 'content-type': 'application/octet-stream' }, body: chunk }),
      404,
      'BLOB_UPLOAD_UNKNOWN',
    );
    expectError(await client.send('PUT', `${bogus}?digest=${sha256(chunk)}`), 404, 'BLOB_UPLOAD_UNKNOWN');
  });

  check('push', 'PUT with the wrong digest -> 400 DIGEST_INVALID and nothing is stored', async () => {
    const blob = randomBytes(2048);
    const wrong = randomDigest();
    const location = await startUpload(pushRepo);
    const r = await client.send('PUT', withDigest(location, wrong), {
      headers: { 'content-type': 'application/octet-stream', 'content-length': String(blob.byteLength) },
      body: blob,
    });
    expectError(r, 400, 'DIGEST_INVALID');
    expectStatus(await client.send('HEAD', `/v2/${pushRepo}/blobs/${wrong}`), 404);
    expectStatus(await client.send('HEAD', `/v2/${pushRepo}/blobs/${sha256(blob)}`), 404);
  });

  check('push', 'PUT with a malformed digest -> 400 DIGEST_INVALID', async () => {
    const location = await startUpload(pushRepo);
    expectError(await client.send('PUT', withDigest(location, 'sha256:not-hex')), 400, 'DIGEST_INVALID');
  });

  check('push', 'a zero-byte blob round-trips', async () => {
    const empty = Buffer.alloc(0);
    await pushBlob(pushRepo, empty);
    const r = await client.send('GET', `/v2/${pushRepo}/blobs/${sha256(empty)}`);
    expectStatus(r, 200);
    assert.equal(r.body.byteLength, 0);
  });

  check('push', 'mount of an existing blob from another repository -> 201', async () => {
    const blob = randomBytes(1000);
    await pushBlob(repo('mount-source'), blob);
    const target = repo('mount-target');
    const r = await client.send('POST', `/v2/${target}/blobs/uploads/?mount=${sha256(blob)}&from=${repo('mount-source')}`);
    expectStatus(r, 201);
    assert.equal(r.headers['docker-content-digest'], sha256(blob));
    expectStatus(await client.send('HEAD', `/v2/${target}/blobs/${sha256(blob)}`), 200);
  });

  check('push', 'mount of a missing blob falls back to an upload -> 202', async () => {
    const r = await client.send('POST', `/v2/${repo('mount-target')}/blobs/uploads/?mount=${randomDigest()}&from=${pullRepo}`);
    expectStatus(r, 202);
    assert.ok(r.headers.location, 'no Location');
  });

  check('push', 'PUT manifest by tag -> 201 with Location and Docker-Content-Digest', async () => {
    const image = makeImage([100]);
    for (const blob of [image.config, ...image.layers]) await pushBlob(pushRepo, blob);
    const r = await putManifest(pushRepo, 'tagged', image.manifest);
    expectStatus(r, 201);
    assert.ok(r.headers.location, 'no Location');
    assert.equal(r.headers['docker-content-digest'], image.digest);
  });

  check('push', 'PUT manifest by digest -> 201', async () => {
    const image = makeImage([100]);
    for (const blob of [image.config, ...image.layers]) await pushBlob(pushRepo, blob);
    expectStatus(await putManifest(pushRepo, image.digest, image.manifest), 201);
    expectStatus(await client.send('HEAD', `/v2/${pushRepo}/manifests/${image.digest}`), 200);
  });

  check('push', 'PUT manifest under a digest that is not its own -> 400 DIGEST_INVALID', async () => {
    const image = makeImage([100]);
    for (const blob of [image.config, ...image.layers]) await pushBlob(pushRepo, blob);
    expectError(await putManifest(pushRepo, randomDigest(), image.manifest), 400, 'DIGEST_INVALID');
  });

  check('push', 'PUT manifest naming an unknown blob -> 400 MANIFEST_BLOB_UNKNOWN', async () => {
    const image = makeImage([100]);
    await pushBlob(pushRepo, image.config);
    expectError(await putManifest(pushRepo, 'missing-layer', image.manifest), 400, 'MANIFEST_BLOB_UNKNOWN');
  });

  check('push', 'PUT index naming an unknown manifest -> 400', async () => {
    const index = json({
      schemaVersion: 2,
      mediaType: OCI_INDEX,
      manifests: [{ mediaType: OCI_MANIFEST, digest: randomDigest(), size: 500 }],
    });
    expectError(await putManifest(pushRepo, 'bad-index', index, OCI_INDEX), 400, 'MANIFEST_BLOB_UNKNOWN', 'MANIFEST_UNKNOWN');
  });

  check('push', 'PUT index of pushed manifests -> 201 and served with the index media type', async () => {
    const image = makeImage([64]);
    await pushImage(pushRepo, image);
    const index = json({
      schemaVersion: 2,
      mediaType: OCI_INDEX,
      manifests: [{ ...descriptorOf(OCI_MANIFEST, image.manifest), platform: { architecture: 'amd64', os: 'linux' } }],
    });
    expectStatus(await putManifest(pushRepo, 'multi', index, OCI_INDEX), 201);
    const r = await client.send('HEAD', `/v2/${pushRepo}/manifests/multi`);
    expectStatus(r, 200);
    assert.equal(r.headers['content-type'], OCI_INDEX);
    assert.equal(r.headers['docker-content-digest'], sha256(index));
  });

  check('push', 'PUT manifest that is not valid JSON -> 400 MANIFEST_INVALID', async () => {
    expectError(await putManifest(pushRepo, 'garbage', Buffer.from('{"schemaVersion": 2, ')), 400, 'MANIFEST_INVALID');
  });

  check('push', 'PUT manifest larger than 4 MiB -> 413', async () => {
    const big = json({
      schemaVersion: 2,
      mediaType: OCI_MANIFEST,
      config: { mediaType: OCI_CONFIG, digest: randomDigest(), size: 2 },
      layers: [],
      annotations: { padding: 'x'.repeat(5 * 1024 * 1024) },
    });
    expectStatus(await putManifest(pushRepo, 'huge', big), 413);
  });

  check('push', 'PUT manifest with a subject -> 201 with OCI-Subject', async () => {
    const { subject, sbomPut } = await referrers();
    assert.equal(sbomPut.headers['oci-subject'], subject.digest);
  });

  // --- content discovery -----------------------------------------------------------------
  check('content discovery', 'tags/list lists every tag', async () => {
    await taggedImage();
    const r = await client.send('GET', `/v2/${tagsRepo}/tags/list`);
    expectStatus(r, 200);
    const listed = JSON.parse(r.body.toString()) as { name: string; tags: string[] };
    assert.equal(listed.name, tagsRepo);
    assert.deepEqual([...listed.tags].sort(), tagNames);
  });

  check('content discovery', 'tags/list?n= pages in lexical order with Link rel="next" until the end', async () => {
    await taggedImage();
    const seen: string[] = [];
    let path: string | undefined = `/v2/${tagsRepo}/tags/list?n=2`;
    for (let page = 0; path !== undefined; page++) {
      assert.ok(page < tagNames.length, 'pagination does not end');
      const r = await client.send('GET', path);
      expectStatus(r, 200);
      const tags = (JSON.parse(r.body.toString()) as { tags: string[] }).tags;
      assert.ok(tags.length <= 2, `page of ${tags.length} tags for n=2`);
      seen.push(...tags);
      const next = nextLink(r);
      path = next === undefined ? undefined : client.pathOf(next).pathname + client.pathOf(next).search;
    }
    assert.deepEqual(seen, tagNames);
  });

  check('content discovery', 'tags/list?last= lists the tags after it', async () => {
    await taggedImage();
    const r = await client.send('GET', `/v2/${tagsRepo}/tags/list?n=10&last=delta`);
    expectStatus(r, 200);
    assert.deepEqual((JSON.parse(r.body.toString()) as { tags: string[] }).tags, ['epsilon', 'gamma']);
  });

  check('content discovery', 'tags/list of an unknown repository -> 404 NAME_UNKNOWN', async () => {
    expectError(await client.send('GET', `/v2/${repo('never-pushed')}/tags/list`), 404, 'NAME_UNKNOWN');
  });

  check('content discovery', '_catalog lists pushed repositories', async () => {
    await pullImage();
    await taggedImage();
    const found = new Set<string>();
    let path: string | undefined = '/v2/_catalog?n=100';
    for (let page = 0; path !== undefined && page < 100; page++) {
      const r = await client.send('GET', path);
      expectStatus(r, 200);
      for (const name of (JSON.parse(r.body.toString()) as { repositories: string[] }).repositories) found.add(name);
      const next = nextLink(r);
      path = next === undefined ? undefined : client.pathOf(next).pathname + client.pathOf(next).search;
    }
    assert.ok(found.has(pullRepo) && found.has(tagsRepo), 'pushed repositories missing from the catalog');
  });

  check('content discovery', '_catalog?n=1 pages with Link rel="next"', async () => {
    await pullImage();
    await taggedImage();
    const r = await client.send('GET', '/v2/_catalog?n=1');
    expectStatus(r, 200);
    const first = (JSON.parse(r.body.toString()) as { repositories: string[] }).repositories;
    assert.equal(first.length, 1);
    const next = nextLink(r);
    assert.ok(next, 'no Link rel="next"');
    const url = client.pathOf(next);
    const second = await client.send('GET', url.pathname + url.search);
    expectStatus(second, 200);
    const names = (JSON.parse(second.body.toString()) as { repositories: string[] }).repositories;
    assert.ok(names.length >= 1 && names[0]! > first[0]!, 'second page does not continue after the first');
  });

  check('content discovery', 'referrers lists manifests with that subject as an OCI index', async () => {
    const { subject, sbom, signature } = await referrers();
    const r = await client.send('GET', `/v2/${referrersRepo}/referrers/${subject.digest}`);
    expectStatus(r, 200);
    assert.equal(r.headers['content-type']?.split(';')[0], OCI_INDEX);
    const index = JSON.parse(r.body.toString()) as { schemaVersion: number; manifests: { digest: string; artifactType?: string }[] };
    assert.equal(index.schemaVersion, 2);
    const byDigest = new Map(index.manifests.map((m) => [m.digest, m]));
    assert.equal(byDigest.size, 2);
    assert.equal(byDigest.get(sbom)?.artifactType, SBOM_TYPE);
    assert.equal(byDigest.get(signature)?.artifactType, SIGNATURE_TYPE);
  });

  check('content discovery', 'referrers?artifactType= filters and sets OCI-Filters-Applied', async () => {
    const { subject, sbom } = await referrers();
    const r = await client.send(
      'GET',
      `/v2/${referrersRepo}/referrers/${subject.digest}?artifactType=${encodeURIComponent(SBOM_TYPE)}`,
    );
    expectStatus(r, 200);
    assert.equal(r.headers['oci-filters-applied'], 'artifactType');
    const index = JSON.parse(r.body.toString()) as { manifests: { digest: string }[] };
    assert.deepEqual(index.manifests.map((m) => m.digest), [sbom]);
  });

  check('content discovery', 'referrers of a digest nothing refers to -> 200 with an empty index', async () => {
    await referrers();
    const r = await client.send('GET', `/v2/${referrersRepo}/referrers/${randomDigest()}`);
    expectStatus(r, 200);
    assert.deepEqual((JSON.parse(r.body.toString()) as { manifests: unknown[] }).manifests, []);
  });

  check('content discovery', 'referrers with a malformed digest -> 400', async () => {
    expectStatus(await client.send('GET', `/v2/${referrersRepo}/referrers/sha256:nothex`), 400);
  });

  // --- content management ----------------------------------------------------------------
  const manageRepo = repo('manage');
  const managedImage = once(async () => {
    const image = makeImage([300]);
    await pushImage(manageRepo, image, 'keep', 'drop');
    return image;
  });

  check('content management', 'DELETE manifest by tag -> 202 and only the tag is gone (400/405 if unsupported)', async () => {
    const image = await managedImage();
    const r = await client.send('DELETE', `/v2/${manageRepo}/manifests/drop`);
    expectStatus(r, 202, 400, 405);
    if (r.status !== 202) return; // the spec allows a registry to refuse tag deletion
    expectStatus(await client.send('GET', `/v2/${manageRepo}/manifests/drop`), 404);
    expectStatus(await client.send('HEAD', `/v2/${manageRepo}/manifests/keep`), 200);
    expectStatus(await client.send('HEAD', `/v2/${manageRepo}/manifests/${image.digest}`), 200);
  });

  check('content management', 'DELETE manifest by digest -> 202, then 404', async () => {
    const image = await managedImage();
    expectStatus(await client.send('DELETE', `/v2/${manageRepo}/manifests/${image.digest}`), 202);
    expectError(await client.send('GET', `/v2/${manageRepo}/manifests/${image.digest}`), 404, 'MANIFEST_UNKNOWN');
  });

  check('content management', 'DELETE unknown manifest -> 404 MANIFEST_UNKNOWN', async () => {
    await managedImage();
    expectError(await client.send('DELETE', `/v2/${manageRepo}/manifests/${randomDigest()}`), 404, 'MANIFEST_UNKNOWN');
  });

  check('content management', 'DELETE blob -> 202, then 404', async () => {
    const digest = await pushBlob(manageRepo, randomBytes(512));
    expectStatus(await client.send('DELETE', `/v2/${manageRepo}/blobs/${digest}`), 202);
    expectStatus(await client.send('HEAD', `/v2/${manageRepo}/blobs/${digest}`), 404);
  });

  check('content management', 'DELETE unknown blob -> 404 BLOB_UNKNOWN', async () => {
    await managedImage();
    expectError(await client.send('DELETE', `/v2/${manageRepo}/blobs/${randomDigest()}`), 404, 'BLOB_UNKNOWN');
  });

  // --- robustness -------------------------------------------------------------------------
  check('robustness', 'invalid repository names -> 400 NAME_INVALID or 404 NAME_UNKNOWN, with an OCI error body', async () => {
    for (const name of ['UPPER/case', 'a//b', '-lead', `${'x'.repeat(300)}`]) {
      expectError(await client.send('GET', `/v2/${name}/tags/list`), [400, 404], 'NAME_INVALID', 'NAME_UNKNOWN');
    }
  });

  check('robustness', 'malformed digests -> 400 DIGEST_INVALID or 404, with an OCI error body', async () => {
    for (const digest of ['sha256:abc', 'md5:d41d8cd98f00b204e9800998ecf8427e', `sha256:${'G'.repeat(64)}`, 'sha256:']) {
      expectError(
        await client.send('GET', `/v2/${pullRepo}/blobs/${digest}`),
        [400, 404],
        'DIGEST_INVALID',
        'BLOB_UNKNOWN',
        'NAME_UNKNOWN',
      );
    }
  });

  check('robustness', 'unknown endpoints under /v2 -> 404 with an OCI error body', async () => {
    for (const path of [`/v2/${pullRepo}/unknown/thing`, `/v2/${pullRepo}/manifests/`]) {
      const r = await client.send('GET', path);
      expectStatus(r, 404);
      expectErrorCode(r, 'NAME_UNKNOWN', 'UNSUPPORTED', 'MANIFEST_UNKNOWN', 'BLOB_UNKNOWN');
    }
  });

  check('robustness', 'malformed names, tags and digests never cause a 5xx', async () => {
    const paths = [
      `/v2/${pullRepo}/manifests/${'t'.repeat(300)}`,
      `/v2/${pullRepo}/manifests/-bad`,
      `/v2/${pullRepo}/manifests/sha256:`,
      `/v2/${pullRepo}/manifests/sha999:abc`,
      `/v2/${pullRepo}/manifests/a:b:c`,
      `/v2/${pullRepo}/blobs/uploads/not-an-upload-id`,
      `/v2/${pullRepo}/blobs/uploads/%00`,
      `/v2/${pullRepo}/referrers/latest`,
      `/v2/${pullRepo}/tags/list?n=-1`,
      `/v2/${pullRepo}/tags/list?n=abc`,
      `/v2/_catalog?n=notanumber`,
      `/v2/${pullRepo}%00/manifests/v1`,
      `/v2/${pullRepo}/manifests/v1%20x`,
    ];
    const failures: string[] = [];
    for (const path of paths) {
      for (const method of ['GET', 'HEAD', 'DELETE']) {
        const r = await client.send(method, path);
        if (r.status >= 500) failures.push(`${method} ${path} -> ${r.status}`);
      }
    }
    assert.deepEqual(failures, []);
  });

  check('robustness', 'path traversal attempts -> 400 or 404', async () => {
    const image = await pullImage();
    const paths = [
      '/v2/../../../../etc/passwd/manifests/latest',
      '/v2/%2e%2e/%2e%2e/etc/manifests/latest',
      `/v2/${pullRepo}/..%2f..%2f..%2fetc/manifests/latest`,
      `/v2/${pullRepo}/blobs/sha256:..%2f..%2f..%2fetc%2fpasswd`,
      `/v2/${pullRepo}/blobs/..%2F..%2Fblobs%2Fsha256%2F${image.digest.slice(7)}`,
      `/v2/${pullRepo}/manifests/..%2f..%2findex.json`,
      `/v2/${pullRepo}/blobs/uploads/..%2f..%2foci%2findex.json`,
      `/v2/${pullRepo}%2f..%2f..%2fsecret/tags/list`,
      `/v2/./${pullRepo}/manifests/v1`,
    ];
    const failures: string[] = [];
    for (const path of paths) {
      const r = await client.send('GET', path);
      if (r.status !== 400 && r.status !== 404) failures.push(`${path} -> ${r.status}`);
    }
    assert.deepEqual(failures, []);
  });

  return checks;
}

if (import.meta.main) {
  const baseUrl = process.argv[2];
  if (!baseUrl) {
    console.error('usage: node conformance-checks.ts <registry base URL>');
    process.exit(2);
  }
  const results = await runConformance(baseUrl);
  for (const r of results) console.log(`${r.ok ? 'pass' : 'FAIL'}  [${r.category}] ${r.name}${r.detail ? `\n      ${r.detail}` : ''}`);
  const failed = results.filter((r) => !r.ok).length;
  console.log(`\n${results.length - failed}/${results.length} checks passed, ${failed} failed`);
}
