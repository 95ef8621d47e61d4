import type { FastifyRequest } from 'fastify';
import { parseDigest } from '@shoal/oci';
import { OciError, type OciErrorCode } from './errors.ts';
import type { Registry } from './registry.ts';

/** What every route handler needs from the gateway's configuration. */
export interface GatewayContext {
  registry: Registry;
  maxManifestBytes: number;
}

/** The repository a request addresses. */
export interface RequestTarget {
  /** The name as the client wrote it, e.g. `library/nginx`. */
  name: string;
  /** The store's repository key, `<namespace>/<name>`, e.g. `docker.io/library/nginx`. */
  repository: string;
  /** `?ns=<namespace>` when the client chose the namespace, so Locations we hand out keep it. */
  nsQuery: string;
}

/** A path under this repository, with the client's namespace choice carried along. */
export function locationOf(target: RequestTarget, path: string): string {
  return `/v2/${target.name}/${path}${target.nsQuery}`;
}

/** A single-valued query parameter; repeating it is a 400 with `code`. */
export function queryParam(request: FastifyRequest, key: string, code: OciErrorCode): string | undefined {
  const value = (request.query as Record<string, string | string[] | undefined>)[key];
  if (Array.isArray(value)) throw new OciError(400, code, `query parameter "${key}" given more than once`);
  return value;
}

/** A canonical digest, or a 400 DIGEST_INVALID naming what was wrong. */
export function requireDigest(value: string | undefined, what = 'digest'): string {
  if (value === undefined || value === '') throw new OciError(400, 'DIGEST_INVALID', `${what} is required`);
  try {
    return parseDigest(value).value;
  } catch (err) {
    throw new OciError(400, 'DIGEST_INVALID', `${what}: ${(err as Error).message}`, { digest: value.slice(0, 200) });
  }
}
