import type { Readable } from 'node:stream';
import { Agent, interceptors, request, type Dispatcher } from 'undici';
import {
  Digester,
  isDigest,
  isValidName,
  isValidTag,
  MANIFEST_MEDIA_TYPES,
  parseDigest,
  parseManifest,
  type ParsedManifest,
} from '@shoal/oci';
import type { BlobInfo } from '@shoal/store';

export interface UpstreamClientOptions {
  /** Base URL of the upstream registry, e.g. `http://127.0.0.1:5001`; may carry `user:pass@`. */
  url: string;
  /** Basic credentials, used for the registry and its token realm (override URL userinfo). */
  username?: string;
  password?: string;
  /** Limit for connecting and for response headers to arrive, in ms (default 10 000). */
  timeoutMs?: number;
  /** Longest silence between two pieces of a response body, in ms (default 60 000). */
  bodyTimeoutMs?: number;
}

/** A blob body from the upstream; `size` is its Content-Length when the upstream sent one. */
export interface UpstreamBlob {
  size: number | undefined;
  body: Readable;
}

/** The upstream failed: an unexpected status, bad content, a timeout or a network error. */
export class UpstreamError extends Error {
  override name = 'UpstreamError';
  /** The upstream's HTTP status, when it answered. */
  readonly upstreamStatus: number | undefined;
  /** What a gateway should answer with (fastify's default error handler reads this). */
  readonly statusCode = 502;
  constructor(message: string, upstreamStatus?: number, options?: ErrorOptions) {
    super(message, options);
    this.upstreamStatus = upstreamStatus;
  }
}

const DEFAULT_TIMEOUT_MS = 10_000;
const DEFAULT_BODY_TIMEOUT_MS = 60_000;
/** The spec asks registries to accept manifests of at least 4 MiB; refuse anything larger. */
const MAX_MANIFEST_BYTES = 4 * 1024 * 1024;
const MAX_TOKEN_RESPONSE_BYTES = 1024 * 1024;
const MAX_ERROR_BODY_BYTES = 4096;
/** The distribution token spec: a token without `expires_in` lasts 60 s. */
const DEFAULT_TOKEN_LIFETIME_S = 60;
const MAX_REDIRECTIONS = 5;

interface CachedToken {
  token: string;
  expiresAt: number;
}

interface Challenge {
  scheme: string;
  params: Record<string, string>;
}

/**
 * Speaks OCI Distribution (pull side) to one upstream registry. Names are upstream names
 * (`library/nginx`), not Shoal repository names. Authentication: basic credentials, and the
 * bearer-token flow (on a `Bearer` challenge, a token is fetched from the realm, cached per
 * repository until shortly before it expires, and the request is retried once). Redirects
 * (blob CDNs) are followed; undici drops the Authorization header when one leaves the origin.
 */
export class UpstreamClient {
  readonly origin: string;
  readonly #agent: Agent;
  readonly #dispatcher: Dispatcher;
  readonly #basic: string | undefined;
  readonly #tokens = new Map<string, CachedToken>();
  readonly #tokenRequests = new Map<string, Promise<string>>();

  constructor(opts: UpstreamClientOptions) {
    const url = new URL(opts.url);
    if (url.protocol !== 'http:' && url.protocol !== 'https:') {
      throw new TypeError(`upstream URL must be http or https: ${url.protocol}`);
    }
    if (url.pathname !== '/' || url.search || url.hash) {
      throw new TypeError('upstream URL must be an origin without a path, e.g. http://127.0.0.1:5001');
    }
    this.origin = url.origin;
    const username = opts.username ?? decodeURIComponent(url.username);
    const password = opts.password ?? decodeURIComponent(url.password);
    if (username || password) this.#basic = `Basic ${Buffer.from(`${username}:${password}`).toString('base64')}`;
    const timeout = opts.timeoutMs ?? DEFAULT_TIMEOUT_MS;
    this.#agent = new Agent({
      connect: { timeout },
      headersTimeout: timeout,
      bodyTimeout: opts.bodyTimeoutMs ?? DEFAULT_BODY_TIMEOUT_MS,
    });
    this.#dispatcher = this.#agent.compose(interceptors.redirect({ maxRedirections: MAX_REDIRECTIONS }));
  }

  /**
   * Fetches a manifest by tag or digest, or undefined if the upstream has none. By digest the
   * bytes are verified against it; by tag they are checked against Docker-Content-Digest when
   * the upstream sends one.
   */
  async getManifest(name: string, reference: string): Promise<ParsedManifest | undefined> {
    checkName(name);
    if (!isValidTag(reference) && !isDigest(reference)) throw new TypeError(`invalid tag or digest "${reference}"`);
    const res = await this.#send(name, 'GET', `/v2/${name}/manifests/${reference}`, {
      accept: MANIFEST_MEDIA_TYPES.join(', '),
    });
    if (res.statusCode === 404) return discard(res);
    if (res.statusCode !== 200) throw await unexpected(res, `manifest ${name}:${reference}`);
    const bytes = await readLimited(res.body, MAX_MANIFEST_BYTES, `manifest ${name}:${reference}`);
    const expected = isDigest(reference) ? reference : header(res, 'docker-content-digest');
    if (expected !== undefined) {
      const actual = digestOf(bytes, expected);
      if (actual !== expected) {
        throw new UpstreamError(`upstream manifest ${name}:${reference} has digest ${actual}, expected ${expected}`);
      }
    }
    try {
      return parseManifest(bytes, header(res, 'content-type'));
    } catch (err) {
      throw new UpstreamError(`upstream sent an invalid manifest for ${name}:${reference}: ${(err as Error).message}`, 200, {
        cause: err,
      });
    }
  }

  /** The size of a blob, or undefined if the upstream has none. */
  async statBlob(name: string, digest: string): Promise<BlobInfo | undefined> {
    checkName(name);
    parseDigest(digest);
    const res = await this.#send(name, 'HEAD', `/v2/${name}/blobs/${digest}`, {});
    if (res.statusCode === 404) return discard(res);
    if (res.statusCode !== 200) throw await unexpected(res, `blob ${digest} in ${name}`);
    await res.body.dump();
    const size = contentLength(res);
    if (size === undefined) throw new UpstreamError(`upstream sent no Content-Length for blob ${digest}`, 200);
    return { digest, size };
  }

  /**
   * Opens a blob as a stream (never buffered), or undefined if the upstream has none. The caller
   * must consume or destroy `body`; its bytes are not verified here.
   */
  async getBlob(name: string, digest: string): Promise<UpstreamBlob | undefined> {
    checkName(name);
    parseDigest(digest);
    const res = await this.#send(name, 'GET', `/v2/${name}/blobs/${digest}`, {});
    if (res.statusCode === 404) return discard(res);
    if (res.statusCode !== 200) throw await unexpected(res, `blob ${digest} in ${name}`);
    return { size: contentLength(res), body: res.body };
  }

  async close(): Promise<void> {
    await this.#agent.close();
  }

  /** Sends a request with the best credentials known, answering one auth challenge. */
  async #send(
    name: string,
    method: 'GET' | 'HEAD',
    path: string,
    headers: Record<string, string>,
  ): Promise<Dispatcher.ResponseData> {
    const cached = this.#cachedToken(name);
    const first = await this.#request(method, path, withAuth(headers, cached ? `Bearer ${cached}` : this.#basic));
    if (first.statusCode !== 401) return first;
    const challenge = parseChallenge(first.headers['www-authenticate']);
    await first.body.dump();
    let authorization: string | undefined;
    let token: string | undefined;
    if (challenge?.scheme === 'bearer') {
      token = await this.#freshToken(name, challenge, cached);
      authorization = `Bearer ${token}`;
    } else if (challenge?.scheme === 'basic' && this.#basic && cached) {
      authorization = this.#basic;
    }
    if (!authorization) {
      const why = this.#basic ? 'rejected the credentials' : 'requires credentials';
      throw new UpstreamError(`upstream ${this.origin} ${why} for ${name}`, 401);
    }
    const second = await this.#request(method, path, withAuth(headers, authorization));
    if (second.statusCode === 401) {
      this.#forgetToken(name, token);
      await second.body.dump();
      throw new UpstreamError(`upstream ${this.origin} refused access to ${name} after authenticating`, 401);
    }
    return second;
  }

  async #request(method: 'GET' | 'HEAD', path: string, headers: Record<string, string>): Promise<Dispatcher.ResponseData> {
    try {
      return await this.#dispatcher.request({ origin: this.origin, path, method, headers });
    } catch (err) {
      throw new UpstreamError(`upstream ${this.origin} ${method} ${path} failed: ${(err as Error).message}`, undefined, {
        cause: err,
      });
    }
  }

  #cachedToken(name: string): string | undefined {
    const cached = this.#tokens.get(name);
    if (cached && cached.expiresAt > Date.now()) return cached.token;
    if (cached) this.#tokens.delete(name);
    return undefined;
  }

  /** A token other than the one just refused: one another request fetched meanwhile, or a new one. */
  #freshToken(name: string, challenge: Challenge, refused: string | undefined): Promise<string> {
    const current = this.#cachedToken(name);
    if (current !== undefined && current !== refused) return Promise.resolve(current);
    this.#forgetToken(name, refused);
    let pending = this.#tokenRequests.get(name);
    if (!pending) {
      pending = this.#fetchToken(name, challenge).finally(() => this.#tokenRequests.delete(name));
      this.#tokenRequests.set(name, pending);
    }
    return pending;
  }

  #forgetToken(name: string, token: string | undefined): void {
    if (token !== undefined && this.#tokens.get(name)?.token === token) this.#tokens.delete(name);
  }

  async #fetchToken(name: string, challenge: Challenge): Promise<string> {
    const { realm, service, scope } = challenge.params;
    if (!realm) throw new UpstreamError(`upstream ${this.origin} sent a Bearer challenge without a realm`, 401);
    let url: URL;
    try {
      url = new URL(realm);
    } catch {
      throw new UpstreamError(`upstream ${this.origin} sent an invalid token realm "${realm}"`, 401);
    }
    if (service) url.searchParams.set('service', service);
    url.searchParams.set('scope', scope ?? `repository:${name}:pull`);
    let res: Dispatcher.ResponseData;
    try {
      res = await request(url, { dispatcher: this.#dispatcher, headers: withAuth({}, this.#basic) });
    } catch (err) {
      throw new UpstreamError(`token request to ${url.origin} failed: ${(err as Error).message}`, undefined, { cause: err });
    }
    if (res.statusCode !== 200) throw await unexpected(res, `token for ${name} from ${url.origin}`);
    const body = await readLimited(res.body, MAX_TOKEN_RESPONSE_BYTES, 'token response');
    let parsed: { token?: unknown; access_token?: unknown; expires_in?: unknown };
    try {
      parsed = JSON.parse(body.toString('utf8'));
    } catch {
      throw new UpstreamError(`token response from ${url.origin} is not JSON`, 200);
    }
    const token = typeof parsed.token === 'string' ? parsed.token : parsed.access_token;
    if (typeof token !== 'string' || token === '') {
      throw new UpstreamError(`token response from ${url.origin} has no token`, 200);
    }
    const lifetime =
      typeof parsed.expires_in === 'number' && parsed.expires_in > 0 ? parsed.expires_in : DEFAULT_TOKEN_LIFETIME_S;
    // Renew a little early so a token does not expire between cache and upstream.
    this.#tokens.set(name, { token, expiresAt: Date.now() + lifetime * 900 });
    return token;
  }
}

function checkName(name: string): void {
  if (!isValidName(name)) throw new TypeError(`invalid repository name "${name}"`);
}

function withAuth(headers: Record<string, string>, authorization: string | undefined): Record<string, string> {
  return authorization ? { ...headers, authorization } : headers;
}

/** Parses the first challenge of a WWW-Authenticate header: `Bearer realm="..",service="..",scope=".."`. */
export function parseChallenge(value: string | string[] | undefined): Challenge | undefined {
  const text = Array.isArray(value) ? value[0] : value;
  const match = text?.match(/^\s*([A-Za-z]+)\s*(.*)$/);
  if (!match) return undefined;
  const params: Record<string, string> = {};
  for (const [, key, quoted, bare] of match[2]!.matchAll(/([A-Za-z_]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^,\s]*))/g)) {
    params[key!.toLowerCase()] = quoted !== undefined ? quoted.replace(/\\(.)/g, '$1') : bare!;
  }
  return { scheme: match[1]!.toLowerCase(), params };
}

function digestOf(bytes: Buffer, like: string): string {
  let algorithm;
  try {
    algorithm = parseDigest(like).algorithm;
  } catch (err) {
    throw new UpstreamError(`upstream sent an invalid digest: ${(err as Error).message}`, 200, { cause: err });
  }
  const digester = new Digester(algorithm);
  digester.update(bytes);
  return digester.peek();
}

function header(res: Dispatcher.ResponseData, name: string): string | undefined {
  const value = res.headers[name];
  return Array.isArray(value) ? value[0] : value;
}

function contentLength(res: Dispatcher.ResponseData): number | undefined {
  const value = header(res, 'content-length');
  if (value === undefined || !/^\d+$/.test(value)) return undefined;
  return Number(value);
}

async function discard(res: Dispatcher.ResponseData): Promise<undefined> {
  await res.body.dump();
  return undefined;
}

/** An UpstreamError for an unexpected status, with the registry's error code when it sent one. */
async function unexpected(res: Dispatcher.ResponseData, what: string): Promise<UpstreamError> {
  let detail = '';
  try {
    const body = await readLimited(res.body, MAX_ERROR_BODY_BYTES, 'error body');
    const first = JSON.parse(body.toString('utf8'))?.errors?.[0];
    if (first?.code) detail = `: ${first.code}${first.message ? ` ${first.message}` : ''}`;
  } catch {
    // No readable error document: the status says enough.
  }
  return new UpstreamError(`upstream answered ${res.statusCode} for ${what}${detail}`, res.statusCode);
}

/** Reads a small body whole, refusing more than `limit` bytes. */
async function readLimited(body: Readable, limit: number, what: string): Promise<Buffer> {
  const parts: Buffer[] = [];
  let size = 0;
  try {
    for await (const chunk of body) {
      size += (chunk as Buffer).byteLength;
      if (size > limit) {
        body.destroy();
        throw new UpstreamError(`upstream ${what} exceeds ${limit} bytes`);
      }
      parts.push(chunk as Buffer);
    }
  } catch (err) {
    if (err instanceof UpstreamError) throw err;
    throw new UpstreamError(`reading upstream ${what} failed: ${(err as Error).message}`, undefined, { cause: err });
  }
  return Buffer.concat(parts);
}
