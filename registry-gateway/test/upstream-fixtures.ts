// Test-side servers and content for the upstream pull-through tests: the reference registry
// (docker-registry v2.8) with basic or token auth, a token server, a counting proxy and a
// scriptable fake upstream. Everything listens on 127.0.0.1 only.
import { execFile } from 'node:child_process';
import { createHash, createPrivateKey, randomBytes, sign, X509Certificate, type KeyObject } from 'node:crypto';
import { createReadStream, createWriteStream } from 'node:fs';
import { mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { createServer, request as httpRequest, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import type { AddressInfo } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { Readable } from 'node:stream';
import { finished } from 'node:stream/promises';
import { promisify } from 'node:util';
import { request } from 'undici';
import { MediaType, sha256Of } from '@shoal/oci';
import { startDockerRegistry, type DockerRegistry } from '../../test/helpers/docker-registry.ts';

const exec = promisify(execFile);

export async function tempDir(prefix: string): Promise<{ path: string; remove(): Promise<void> }> {
  const path = await mkdtemp(join(tmpdir(), prefix));
  return { path, remove: () => rm(path, { recursive: true, force: true }) };
}

/** The reference registry, anonymous. */
export function startRegistry(config?: Record<string, unknown>): Promise<DockerRegistry> {
  return startDockerRegistry(config ? { config } : {});
}

/** The reference registry behind htpasswd basic auth for `user`/`password`. */
export async function startBasicAuthRegistry(
  dir: string,
  user: string,
  password: string,
): Promise<DockerRegistry> {
  let line: string;
  try {
    line = (await exec('htpasswd', ['-Bbn', user, password])).stdout.trim();
  } catch (err) {
    throw new Error(`htpasswd (apache2-utils) is needed to make a bcrypt password file: ${(err as Error).message}`);
  }
  const path = join(dir, 'htpasswd');
  await writeFile(path, `${line}\n`);
  return startRegistry({ auth: { htpasswd: { realm: 'basic-realm', path } } });
}

// ---------------------------------------------------------------------------------------------
// Pushing content

export interface BlobContent {
  digest: string;
  size: number;
  /** A fresh stream of the bytes for each call. */
  open(): Readable | Buffer;
}

export function bufferBlob(bytes: Buffer): BlobContent {
  return { digest: sha256Of(bytes), size: bytes.byteLength, open: () => bytes };
}

export interface FileBlob extends BlobContent {
  path: string;
}

/** A random blob written to a file (hashed on the way), so big blobs are never held in memory. */
export async function randomFileBlob(dir: string, size: number): Promise<FileBlob> {
  const path = join(dir, `blob-${randomBytes(6).toString('hex')}`);
  const hash = createHash('sha256');
  const out = createWriteStream(path);
  const piece = 1024 * 1024;
  for (let written = 0; written < size; written += piece) {
    const chunk = randomBytes(Math.min(piece, size - written));
    hash.update(chunk);
    if (!out.write(chunk)) await new Promise<void>((resolve) => out.once('drain', () => resolve()));
  }
  out.end();
  await finished(out);
  return { digest: `sha256:${hash.digest('hex')}`, size, path, open: () => createReadStream(path) };
}

export async function pushBlob(url: string, repo: string, blob: BlobContent, authorization?: string): Promise<void> {
  const auth = authorization ? { authorization } : {};
  const start = await request(`${url}/v2/${repo}/blobs/uploads/`, { method: 'POST', headers: auth });
  await start.body.dump();
  if (start.statusCode !== 202) throw new Error(`upload start answered ${start.statusCode}`);
  const location = new URL(String(start.headers.location), url);
  location.searchParams.set('digest', blob.digest);
  const put = await request(location, {
    method: 'PUT',
    headers: { ...auth, 'content-type': 'application/octet-stream', 'content-length': String(blob.size) },
    body: blob.open(),
  });
  const text = await put.body.text();
  if (put.statusCode !== 201) throw new Error(`upload of ${blob.digest} answered ${put.statusCode}: ${text}`);
}

export async function pushManifest(
  url: string,
  repo: string,
  reference: string,
  bytes: Buffer,
  mediaType: string,
  authorization?: string,
): Promise<void> {
  const res = await request(`${url}/v2/${repo}/manifests/${reference}`, {
    method: 'PUT',
    headers: { 'content-type': mediaType, ...(authorization ? { authorization } : {}) },
    body: bytes,
  });
  const text = await res.body.text();
  if (res.statusCode !== 201) throw new Error(`manifest push answered ${res.statusCode}: ${text}`);
}

export interface PushedImage {
  manifest: Buffer;
  digest: string;
  mediaType: string;
  config: BlobContent;
  layers: BlobContent[];
}

/** Pushes a config, the layers and an OCI image manifest tagged `tag`. */
export async function pushImage(
  url: string,
  repo: string,
  tag: string,
  layers: BlobContent[],
  authorization?: string,
): Promise<PushedImage> {
  const config = bufferBlob(Buffer.from(JSON.stringify({ architecture: 'amd64', os: 'linux', nonce: randomBytes(8).toString('hex') })));
  for (const blob of [config, ...layers]) await pushBlob(url, repo, blob, authorization);
  const manifest = Buffer.from(
    JSON.stringify({
      schemaVersion: 2,
      mediaType: MediaType.OciManifest,
      config: { mediaType: MediaType.OciConfig, digest: config.digest, size: config.size },
      layers: layers.map((l) => ({ mediaType: MediaType.OciLayerGzip, digest: l.digest, size: l.size })),
    }),
  );
  await pushManifest(url, repo, tag, manifest, MediaType.OciManifest, authorization);
  return { manifest, digest: sha256Of(manifest), mediaType: MediaType.OciManifest, config, layers };
}

// ---------------------------------------------------------------------------------------------
// Plain HTTP servers

export interface TestServer {
  url: string;
  /** `METHOD /path` of every request, without the query. */
  requests: string[];
  stop(): Promise<void>;
}

export async function startServer(handler: (req: IncomingMessage, res: ServerResponse) => void): Promise<TestServer> {
  const requests: string[] = [];
  const server = createServer((req, res) => {
    requests.push(`${req.method} ${new URL(req.url!, 'http://x').pathname}`);
    handler(req, res);
  });
  return listen(server, requests);
}

async function listen(server: Server, requests: string[]): Promise<TestServer> {
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const { port } = server.address() as AddressInfo;
  return {
    url: `http://127.0.0.1:${port}`,
    requests,
    async stop() {
      server.closeAllConnections();
      await new Promise<void>((resolve) => server.close(() => resolve()));
    },
  };
}

/** Forwards every request to `target` and records it, to count what reaches the upstream. */
export function startCountingProxy(target: string): Promise<TestServer> {
  const to = new URL(target);
  return startServer((req, res) => {
    const upstream = httpRequest(
      { host: to.hostname, port: to.port, method: req.method, path: req.url, headers: { ...req.headers, host: to.host } },
      (answer) => {
        res.writeHead(answer.statusCode!, answer.headers);
        answer.pipe(res);
      },
    );
    upstream.on('error', () => res.destroy());
    req.pipe(upstream);
  });
}

// ---------------------------------------------------------------------------------------------
// Bearer tokens as the reference registry (distribution v2.8, registry/auth/token) checks them:
// an RS256 JWT whose header carries the signing certificate in x5c, chained to rootcertbundle;
// iss = issuer, aud = service, exp/nbf, and access claims per repository.

export interface TokenServer extends TestServer {
  /** Registry `auth.token` config pointing at this server. */
  registryAuth: Record<string, unknown>;
  /** Signs a token directly, e.g. for test-side pushes. */
  issue(access: Array<{ type: string; name: string; actions: string[] }>): string;
  /** Token lifetime handed out from now on, in seconds. */
  lifetimeSeconds: number;
}

export async function startTokenServer(
  dir: string,
  opts: { service: string; credentials?: { user: string; password: string } },
): Promise<TokenServer> {
  const keyPath = join(dir, 'token.key');
  const certPath = join(dir, 'token.crt');
  try {
    await exec('openssl', [
      'req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-days', '2', '-subj', '/CN=shoal-test-token-issuer',
      '-keyout', keyPath, '-out', certPath,
    ]);
  } catch (err) {
    throw new Error(`openssl is needed to make the token signing certificate: ${(err as Error).message}`);
  }
  const key: KeyObject = createPrivateKey(await readFile(keyPath));
  const certDer = new X509Certificate(await readFile(certPath)).raw.toString('base64');
  const issuer = 'shoal-test-issuer';
  const state = { lifetimeSeconds: 300 };

  const issue = (access: Array<{ type: string; name: string; actions: string[] }>): string => {
    const now = Math.floor(Date.now() / 1000);
    const header = { typ: 'JWT', alg: 'RS256', x5c: [certDer] };
    const claims = {
      iss: issuer,
      sub: opts.credentials?.user ?? 'anonymous',
      aud: opts.service,
      exp: now + state.lifetimeSeconds,
      nbf: now - 10,
      iat: now,
      jti: randomBytes(8).toString('hex'),
      access,
    };
    const signed = `${b64url(JSON.stringify(header))}.${b64url(JSON.stringify(claims))}`;
    return `${signed}.${sign('sha256', Buffer.from(signed), key).toString('base64url')}`;
  };

  const server = await startServer((req, res) => {
    const url = new URL(req.url!, 'http://x');
    if (opts.credentials) {
      const expected = `Basic ${Buffer.from(`${opts.credentials.user}:${opts.credentials.password}`).toString('base64')}`;
      if (req.headers.authorization !== expected) {
        res.writeHead(401, { 'content-type': 'application/json' }).end('{"details":"bad credentials"}');
        return;
      }
    }
    if (url.searchParams.get('service') !== opts.service) {
      res.writeHead(400).end('{"details":"unknown service"}');
      return;
    }
    // Grant what is asked: `repository:<name>:<actions>` per scope parameter.
    const access = url.searchParams.getAll('scope').map((scope) => {
      const [type, ...rest] = scope.split(':');
      const actions = rest.pop()!.split(',');
      return { type: type!, name: rest.join(':'), actions };
    });
    const token = issue(access);
    res.writeHead(200, { 'content-type': 'application/json' }).end(
      JSON.stringify({ token, access_token: token, expires_in: state.lifetimeSeconds, issued_at: new Date().toISOString() }),
    );
  });

  return {
    ...server,
    registryAuth: {
      token: { realm: `${server.url}/token`, service: opts.service, issuer, rootcertbundle: certPath },
    },
    issue,
    get lifetimeSeconds() {
      return state.lifetimeSeconds;
    },
    set lifetimeSeconds(value: number) {
      state.lifetimeSeconds = value;
    },
  };
}

function b64url(text: string): string {
  return Buffer.from(text).toString('base64url');
}

/** Reads a stream to its end, hashing it; never holds more than one chunk. */
export async function digestOfStream(stream: Readable): Promise<{ digest: string; size: number }> {
  const hash = createHash('sha256');
  let size = 0;
  for await (const chunk of stream) {
    hash.update(chunk as Buffer);
    size += (chunk as Buffer).byteLength;
  }
  return { digest: `sha256:${hash.digest('hex')}`, size };
}

export async function readAll(stream: Readable): Promise<Buffer> {
  const parts: Buffer[] = [];
  for await (const chunk of stream) parts.push(chunk as Buffer);
  return Buffer.concat(parts);
}
