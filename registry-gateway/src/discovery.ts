import type { FastifyReply, FastifyRequest } from 'fastify';
import { MediaType } from '@shoal/oci';
import { OciError } from './errors.ts';
import { queryParam, requireDigest, type GatewayContext, type RequestTarget } from './context.ts';

interface Page {
  items: string[];
  /** The `last` value of the next page, when there is one. */
  next?: string;
}

interface PageRequest {
  n?: number;
  last?: string;
}

/** The `n` and `last` parameters of tags/list and _catalog; a bad `n` is a 400. */
function pageRequest(request: FastifyRequest): PageRequest {
  const n = queryParam(request, 'n', 'UNSUPPORTED');
  const last = queryParam(request, 'last', 'UNSUPPORTED');
  if (n !== undefined && !/^\d{1,9}$/.test(n)) {
    throw new OciError(400, 'UNSUPPORTED', 'n must be a non-negative integer', { n: n.slice(0, 20) });
  }
  return { n: n === undefined ? undefined : Number(n), last };
}

/** One page of a sorted list: the entries after `last`, at most `n` of them. */
function paginate(sorted: string[], { n, last }: PageRequest): Page {
  const after = last ? sorted.filter((item) => item > last) : sorted;
  if (n === undefined) return { items: after };
  const items = after.slice(0, n);
  return n > 0 && after.length > n ? { items, next: items[items.length - 1] } : { items };
}

function linkHeader(path: string, n: number, next: string, nsParam: string): string {
  return `<${path}?n=${n}&last=${encodeURIComponent(next)}${nsParam}>; rel="next"`;
}

/** GET /v2/<name>/tags/list[?n=&last=] */
export async function listTags(ctx: GatewayContext, target: RequestTarget, request: FastifyRequest, reply: FastifyReply) {
  const wanted = pageRequest(request);
  const tags = await ctx.registry.store.tags(target.repository);
  if (!tags) throw new OciError(404, 'NAME_UNKNOWN', 'repository name not known to registry', { name: target.name });
  const page = paginate(tags, wanted);
  if (page.next !== undefined) {
    reply.header('link', linkHeader(`/v2/${target.name}/tags/list`, wanted.n!, page.next, target.nsQuery.replace('?', '&')));
  }
  return reply.type('application/json').send({ name: target.name, tags: page.items });
}

/** GET /v2/_catalog[?n=&last=]: the repositories of one namespace, named as clients name them. */
export async function listCatalog(ctx: GatewayContext, namespace: string, nsQuery: string, request: FastifyRequest, reply: FastifyReply) {
  const wanted = pageRequest(request);
  const prefix = `${namespace}/`;
  const names = (await ctx.registry.store.repositories())
    .filter((repository) => repository.startsWith(prefix))
    .map((repository) => repository.slice(prefix.length));
  const page = paginate(names, wanted);
  if (page.next !== undefined) reply.header('link', linkHeader('/v2/_catalog', wanted.n!, page.next, nsQuery.replace('?', '&')));
  return reply.type('application/json').send({ repositories: page.items });
}

/** GET /v2/<name>/referrers/<digest>[?artifactType=]: always an OCI index, empty when nothing refers. */
export async function listReferrers(
  ctx: GatewayContext,
  target: RequestTarget,
  digestParam: string,
  request: FastifyRequest,
  reply: FastifyReply,
) {
  const digest = requireDigest(digestParam);
  const artifactType = queryParam(request, 'artifactType', 'UNSUPPORTED');
  let manifests = await ctx.registry.store.referrers(target.repository, digest);
  if (artifactType !== undefined) {
    manifests = manifests.filter((m) => m.artifactType === artifactType);
    reply.header('oci-filters-applied', 'artifactType');
  }
  return reply
    .type(MediaType.OciIndex)
    .send(JSON.stringify({ schemaVersion: 2, mediaType: MediaType.OciIndex, manifests }));
}
