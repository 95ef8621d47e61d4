import type { OutgoingHttpHeaders } from 'node:http';
import type { Writable } from 'node:stream';
import type { FastifyReply, FastifyRequest } from 'fastify';
import { OciError, rangeNotSatisfiable } from './errors.ts';
import { requireDigest, type GatewayContext, type RequestTarget } from './context.ts';
import { resolveRange } from './range.ts';

function blobUnknown(digest: string): OciError {
  return new OciError(404, 'BLOB_UNKNOWN', 'blob unknown to registry', { digest });
}

/** HEAD a blob: its length and digest, no body. */
export async function headBlob(ctx: GatewayContext, target: RequestTarget, digestParam: string, reply: FastifyReply) {
  const digest = requireDigest(digestParam);
  const info = await ctx.registry.statBlob(target.repository, digest);
  if (!info) throw blobUnknown(digest);
  return reply
    .headers({
      'content-type': 'application/octet-stream',
      'content-length': String(info.size),
      'docker-content-digest': digest,
      'accept-ranges': 'bytes',
    })
    .send();
}

/** GET a blob, streamed from the registry; a single byte range gives 206. */
export async function getBlob(
  ctx: GatewayContext,
  target: RequestTarget,
  digestParam: string,
  request: FastifyRequest,
  reply: FastifyReply,
) {
  const digest = requireDigest(digestParam);
  const rangeHeader = request.headers.range;
  let range: { start: number; end: number } | undefined;
  if (rangeHeader !== undefined) {
    const info = await ctx.registry.statBlob(target.repository, digest);
    if (!info) throw blobUnknown(digest);
    const wanted = resolveRange(rangeHeader, info.size);
    if (wanted.kind === 'unsatisfiable') throw rangeNotSatisfiable(info.size);
    if (wanted.kind === 'partial') range = { start: wanted.start, end: wanted.end };
  }
  const blob = await ctx.registry.readBlob(target.repository, digest, range);
  if (!blob) throw blobUnknown(digest);
  reply.headers({
    'content-type': 'application/octet-stream',
    'docker-content-digest': digest,
    'accept-ranges': 'bytes',
  });
  if (range) {
    reply
      .code(206)
      .header('content-range', `bytes ${range.start}-${range.end}/${blob.info.size}`)
      .header('content-length', String(range.end - range.start + 1));
  } else {
    reply.header('content-length', String(blob.info.size));
  }
  if (blob.sendTo) return sendHijacked(reply, request, blob.sendTo.bind(blob));
  // fastify destroys the stream (closing the file) when the client goes away early.
  return reply.send(blob.stream);
}

/**
 * Serves a blob through its pooled sender, writing the prepared headers on the raw response.
 * fastify logs a hijacked reply once the response finishes; one that ended early never does,
 * so that one is logged here.
 */
async function sendHijacked(reply: FastifyReply, request: FastifyRequest, sendTo: (out: Writable) => Promise<void>) {
  reply.hijack();
  const res = reply.raw;
  res.writeHead(reply.statusCode, reply.getHeaders() as OutgoingHttpHeaders);
  try {
    await sendTo(res);
    res.end();
  } catch (err) {
    res.destroy();
    request.log.debug({ err }, 'blob send ended early');
    request.log.info({ res: { statusCode: reply.statusCode }, responseTime: reply.elapsedTime }, 'request completed');
  }
  return reply;
}

export async function deleteBlob(ctx: GatewayContext, digestParam: string, reply: FastifyReply) {
  const digest = requireDigest(digestParam);
  if (!(await ctx.registry.store.deleteBlob(digest))) throw blobUnknown(digest);
  return reply.code(202).send();
}
