import type { FastifyReply, FastifyRequest } from 'fastify';
import { MediaType } from '@shoal/oci';
import { OciError } from './errors.ts';
import { queryParam, requireDigest, type GatewayContext, type RequestTarget } from './context.ts';

interface Page {
  items: string[];
  /** The `last` value of the next page, when there is one. */
  next?: string;
}

/** `n` and `last` pagination over a sorted list, as tags/list and _catalog use it. */
function paginate(sorted: string[], request: FastifyRequest): { page: Page; n?: number } {
  const nParam = queryParam(request, 'n', 'UNSUPPORTED');
  const last = queryParam(request, 'last', 'UNSUPPORTED');
  if (nParam !== undefined && !/^\d{1,9}$/.test(nParam)) {
    throw new OciError(400, 'UNSUPPORTED', 'n must be a non-negative integer', { n: nParam.slice(0, 20) });
  }
  const after = last ? sorted.filter((item) => item > last) : sorted;
  if (nParam === undefined) return { page: { items: after } };
  const n = Number(nParam);
  const items = after.slice(0, n);
  const page: Page = { items };
  if (n > 0 && after.length > n) page.next = items[items.length - 1];
  return { page, n };
}

function linkHeader(path: string, n: number, next: string, nsParam: string): string {
  return `<${path}?n=${n}&last=${encodeURIComponent(next)}${nsParam}>; rel="next"`;
}

/** GET /v2/<name>/tags/list[?n=&last=] */
export async function listTags(ctx: GatewayContext, target: RequestTarget, request: FastifyRequest, reply: FastifyReply) {
  const tags = await ctx.registry.store.tags(target.repository);
  if (!tags) throw new OciError(404, 'NAME_UNKNOWN', 'repository name not known to registry', { name: target.name });
  const { page, n } = paginate(tags, request);
  if (page.next !== undefined) {
    reply.header('link', linkHeader(`/v2/${target.name}/tags/list`, n!, page.next, target.nsQuery.replace('?', '&')));
  }
  return reply.type('application/json').send({ name: target.name, tags: page.items });
}

/** GET /v2/_catalog[?n=&last=]: the repositories of one namespace, named as clients name them. */
export async function listCatalog(ctx: GatewayContext, namespace: string, nsQuery: string, request: FastifyRequest, reply: FastifyReply) {
  const prefix = `${namespace}/`;
  const names = (await ctx.registry.store.repositories())
    .filter((repository) => repository.startsWith(prefix))
    .map((repository) => repository.slice(prefix.length));
  const { page, n } = paginate(names, request);
  if (page.next !== undefined) reply.header('link', linkHeader('/v2/_catalog', n!, page.next, nsQuery.replace('?', '&')));
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
