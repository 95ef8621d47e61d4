import Fastify, {
  type FastifyInstance,
  type FastifyReply,
  type FastifyRequest,
  type FastifyBaseLogger,
  type FastifyServerOptions,
  type HTTPMethods,
} from 'fastify';
import { canonicalRepository, isValidName, isValidRegistry } from '@shoal/oci';
import { AUTH_CHALLENGE, PushTokenAuth } from './auth.ts';
import { deleteBlob, getBlob, headBlob } from './blobs.ts';
import { queryParam, type GatewayContext, type RequestTarget } from './context.ts';
import { listCatalog, listReferrers, listTags } from './discovery.ts';
import { parseEndpoint, pathOf, type Endpoint } from './endpoints.ts';
import { errorBody, OciError, toOciError } from './errors.ts';
import { deleteManifest, getManifest, putManifest } from './manifests.ts';
import type { Registry } from './registry.ts';
import { cancelUpload, finishUpload, patchUpload, startUpload, uploadStatus } from './uploads.ts';

export interface GatewayOptions {
  registry: Registry;
  /** Namespace (upstream registry host) for requests without `?ns=`; default 'docker.io'. */
  defaultNamespace?: string;
  /**
   * When set, writes (POST/PATCH/PUT/DELETE) and `GET /v2/` need `Authorization: Bearer <token>`
   * or Basic with any user and `<token>` as password. Reads of content stay anonymous.
   */
  pushToken?: string;
  /** Largest manifest accepted, in bytes; default 4 MiB. Larger -> 413 SIZE_INVALID. */
  maxManifestBytes?: number;
  /** Told of every response once it ends, for metrics; the gateway itself keeps no counts. */
  observer?: GatewayObserver;
}

/** One answered gateway request, as a GatewayObserver sees it. */
export interface GatewayResponse {
  /** The endpoint; 'unknown' for a path that names none. */
  kind: Endpoint['kind'] | 'unknown';
  method: string;
  status: number;
  /**
   * Bytes written to the client's connection for this response, headers included; less than
   * the body's length when the client went away early.
   */
  bytes: number;
}

export interface GatewayObserver {
  onResponse(response: GatewayResponse): void;
}

export const DEFAULT_NAMESPACE = 'docker.io';
export const DEFAULT_MAX_MANIFEST_BYTES = 4 * 1024 * 1024;

const JSON_TYPE = 'application/json';
const WRITE_METHODS = new Set(['POST', 'PATCH', 'PUT', 'DELETE']);
const ALLOWED: Record<Endpoint['kind'] | 'session', readonly HTTPMethods[]> = {
  base: ['GET', 'HEAD'],
  catalog: ['GET', 'HEAD'],
  tags: ['GET', 'HEAD'],
  referrers: ['GET', 'HEAD'],
  manifest: ['GET', 'HEAD', 'PUT', 'DELETE'],
  blob: ['GET', 'HEAD', 'DELETE'],
  upload: ['POST'],
  session: ['GET', 'HEAD', 'PATCH', 'PUT', 'DELETE'],
};

/**
 * OCI Distribution v1.1.1 as an encapsulated fastify plugin. Every `/v2` request goes through
 * one wildcard route, because repository names contain '/' and the endpoint is recognised from
 * the raw path. Bodies are never parsed by fastify: blob bodies stream from `request.raw` into
 * the store, manifests are read raw with a size bound.
 */
export async function registryGateway(app: FastifyInstance, opts: GatewayOptions): Promise<void> {
  const defaultNamespace = (opts.defaultNamespace ?? DEFAULT_NAMESPACE).toLowerCase();
  if (!isValidRegistry(defaultNamespace)) throw new Error(`invalid default namespace "${defaultNamespace}"`);
  const maxManifestBytes = opts.maxManifestBytes ?? DEFAULT_MAX_MANIFEST_BYTES;
  const ctx: GatewayContext = { registry: opts.registry, maxManifestBytes };
  const auth = opts.pushToken !== undefined ? new PushTokenAuth(opts.pushToken) : undefined;

  app.removeAllContentTypeParsers();
  app.addContentTypeParser('*', (_request, _payload, done) => done(null, undefined));

  app.addHook('onRequest', async (request, reply) => {
    reply.header('docker-distribution-api-version', 'registry/2.0');
    if (opts.observer) observe(request, reply, opts.observer);
  });

  app.setErrorHandler((err, request, reply) => {
    const oci = toOciError(err);
    if (!oci) {
      request.log.error({ err }, 'registry request failed');
      return reply.code(500).type(JSON_TYPE).send(errorBody('UNKNOWN', 'internal server error'));
    }
    return reply.code(oci.status).headers(oci.headers).type(JSON_TYPE).send(oci.body());
  });

  app.setNotFoundHandler((request, reply) =>
    reply
      .code(404)
      .type(JSON_TYPE)
      .send(errorBody('UNSUPPORTED', 'not an OCI distribution endpoint', { path: pathOf(request.url).slice(0, 200) })),
  );

  const handler = async (request: FastifyRequest, reply: FastifyReply) => {
    const endpoint = parseEndpoint(pathOf(request.url));
    if (auth && (WRITE_METHODS.has(request.method) || endpoint?.kind === 'base')) {
      if (!auth.isAuthorized(request.headers.authorization)) {
        throw new OciError(401, 'UNAUTHORIZED', 'authentication required', {}, { 'www-authenticate': AUTH_CHALLENGE });
      }
    }
    if (!endpoint) {
      throw new OciError(404, 'NAME_UNKNOWN', 'unknown endpoint', { path: pathOf(request.url).slice(0, 200) });
    }
    const method = request.method as HTTPMethods;
    const allowed = ALLOWED[endpoint.kind === 'upload' && endpoint.uploadId !== '' ? 'session' : endpoint.kind];
    if (!allowed.includes(method)) {
      throw new OciError(405, 'UNSUPPORTED', `${method} is not supported here`, {}, { allow: allowed.join(', ') });
    }
    const head = method === 'HEAD';

    switch (endpoint.kind) {
      case 'base':
        return reply.type(JSON_TYPE).send({});
      case 'catalog': {
        const ns = namespaceOf(request, defaultNamespace);
        return listCatalog(ctx, ns.namespace, ns.nsQuery, request, reply);
      }
    }
    const target = targetOf(endpoint.name, request, defaultNamespace);
    switch (endpoint.kind) {
      case 'tags':
        return listTags(ctx, target, request, reply);
      case 'referrers':
        return listReferrers(ctx, target, endpoint.digest, request, reply);
      case 'manifest':
        if (method === 'PUT') return putManifest(ctx, target, endpoint.reference, request, reply);
        if (method === 'DELETE') return deleteManifest(ctx, target, endpoint.reference, reply);
        return getManifest(ctx, target, endpoint.reference, reply, head);
      case 'blob':
        if (method === 'DELETE') return deleteBlob(ctx, endpoint.digest, reply);
        return head ? headBlob(ctx, target, endpoint.digest, reply) : getBlob(ctx, target, endpoint.digest, request, reply);
      case 'upload': {
        const id = endpoint.uploadId;
        if (id === '') return startUpload(ctx, target, request, reply);
        if (method === 'PATCH') return patchUpload(ctx, target, id, request, reply);
        if (method === 'PUT') return finishUpload(ctx, target, id, request, reply);
        if (method === 'DELETE') return cancelUpload(ctx, target, id, reply);
        return uploadStatus(ctx, target, id, reply);
      }
    }
  };

  const methods: HTTPMethods[] = ['GET', 'HEAD', 'POST', 'PUT', 'PATCH', 'DELETE'];
  app.route({ method: methods, url: '/v2', exposeHeadRoute: false, handler });
  app.route({ method: methods, url: '/v2/*', exposeHeadRoute: false, handler });
}

/**
 * Reports the response once its connection is done with it ('close' also fires when the client
 * aborts, where fastify's onResponse does not). Counting on the socket sees every byte, however
 * the reply was sent (hijacked blob senders included); clients do not pipeline requests, so
 * the socket carries only this response meanwhile.
 */
function observe(request: FastifyRequest, reply: FastifyReply, observer: GatewayObserver): void {
  const socket = request.raw.socket;
  const before = socket.bytesWritten;
  reply.raw.once('close', () =>
    observer.onResponse({
      kind: parseEndpoint(pathOf(request.url))?.kind ?? 'unknown',
      method: request.method,
      status: reply.raw.statusCode,
      bytes: socket.bytesWritten - before,
    }),
  );
}

/** The namespace a request chose with `?ns=` (what containerd appends), else the default. */
function namespaceOf(request: FastifyRequest, defaultNamespace: string): { namespace: string; nsQuery: string } {
  const ns = queryParam(request, 'ns', 'NAME_INVALID');
  if (ns === undefined) return { namespace: defaultNamespace, nsQuery: '' };
  const namespace = ns.toLowerCase();
  if (!isValidRegistry(namespace)) throw new OciError(400, 'NAME_INVALID', 'invalid namespace', { ns: ns.slice(0, 200) });
  return { namespace, nsQuery: `?ns=${encodeURIComponent(ns)}` };
}

function targetOf(name: string, request: FastifyRequest, defaultNamespace: string): RequestTarget {
  if (!isValidName(name)) throw new OciError(400, 'NAME_INVALID', 'invalid repository name', { name: name.slice(0, 300) });
  const { namespace, nsQuery } = namespaceOf(request, defaultNamespace);
  return { name, repository: canonicalRepository(namespace, name), nsQuery };
}

/** A standalone fastify server running only the gateway. */
export async function createGateway(
  opts: GatewayOptions & { logger?: FastifyServerOptions['logger']; loggerInstance?: FastifyBaseLogger },
): Promise<FastifyInstance> {
  const { logger = false, loggerInstance, ...gatewayOptions } = opts;
  const app = Fastify({
    // A pino instance (the daemon's) goes in loggerInstance; fastify 5 refuses it as logger.
    ...(loggerInstance ? { loggerInstance } : { logger }),
    // Stopping must not wait on keep-alive clients (kubelet keeps connections for minutes).
    forceCloseConnections: true,
    // Malformed URLs are answered by the router before any plugin runs; keep the OCI shape.
    frameworkErrors: (error, _request, reply) => {
      void (reply as FastifyReply).code(400).type(JSON_TYPE).send(errorBody('NAME_INVALID', error.message));
    },
  });
  await app.register(registryGateway, gatewayOptions);
  return app;
}
