import type { FastifyReply, FastifyRequest } from 'fastify';
import { isManifestMediaType, isValidTag, parseManifest, referencedBlobs, type ParsedManifest } from '@shoal/oci';
import { readBoundedBody } from './body.ts';
import { OciError } from './errors.ts';
import { locationOf, requireDigest, type GatewayContext, type RequestTarget } from './context.ts';

/** A manifest reference: a digest (it contains ':') or a tag. */
type ManifestReference = { digest: string; tag?: undefined } | { tag: string; digest?: undefined };

function parseManifestReference(reference: string): ManifestReference {
  if (reference.includes(':')) return { digest: requireDigest(reference, 'reference') };
  if (!isValidTag(reference)) {
    throw new OciError(400, 'MANIFEST_INVALID', 'invalid tag', { tag: reference.slice(0, 200) });
  }
  return { tag: reference };
}

function manifestUnknown(target: RequestTarget, reference: string): OciError {
  return new OciError(404, 'MANIFEST_UNKNOWN', 'manifest unknown to registry', { name: target.name, reference });
}

/** GET or HEAD a manifest: the exact stored bytes, with the stored media type. */
export async function getManifest(
  ctx: GatewayContext,
  target: RequestTarget,
  reference: string,
  reply: FastifyReply,
  head: boolean,
) {
  const ref = parseManifestReference(reference);
  const manifest = await ctx.registry.getManifest(target.repository, ref.digest ?? ref.tag);
  if (!manifest) throw manifestUnknown(target, reference);
  reply.headers({
    'content-type': manifest.mediaType,
    'content-length': String(manifest.bytes.byteLength),
    'docker-content-digest': manifest.digest,
  });
  return head ? reply.send() : reply.send(manifest.bytes);
}

/**
 * PUT a manifest by tag or digest. The bytes are kept exactly as sent; everything the manifest
 * points at must already be in the registry.
 */
export async function putManifest(
  ctx: GatewayContext,
  target: RequestTarget,
  reference: string,
  request: FastifyRequest,
  reply: FastifyReply,
) {
  const ref = parseManifestReference(reference);
  if (ref.digest && !ref.digest.startsWith('sha256:')) {
    throw new OciError(400, 'DIGEST_INVALID', 'manifests are addressed by sha256 digests', { digest: ref.digest });
  }
  const bytes = await readBoundedBody(request.raw, ctx.maxManifestBytes);
  const manifest = parseManifest(bytes, request.headers['content-type']);
  if (ref.digest && ref.digest !== manifest.digest) {
    throw new OciError(400, 'DIGEST_INVALID', 'manifest digest does not match the reference', {
      expected: ref.digest,
      actual: manifest.digest,
    });
  }
  await checkReferencesExist(ctx, target, manifest);
  await ctx.registry.store.putManifest(target.repository, manifest, ref.tag);
  reply.code(201).headers({
    location: locationOf(target, `manifests/${manifest.digest}`),
    'docker-content-digest': manifest.digest,
  });
  if (manifest.subject) reply.header('oci-subject', manifest.subject.digest);
  return reply.send();
}

/** Config and layers must be stored blobs of the declared size; an index's children must be in this repository. */
async function checkReferencesExist(ctx: GatewayContext, target: RequestTarget, manifest: ParsedManifest): Promise<void> {
  const store = ctx.registry.store;
  for (const blob of referencedBlobs(manifest)) {
    const info = await store.statBlob(blob.digest);
    if (!info) {
      throw new OciError(400, 'MANIFEST_BLOB_UNKNOWN', 'manifest references a blob unknown to the registry', {
        digest: blob.digest,
      });
    }
    if (info.size !== blob.size) {
      throw new OciError(400, 'MANIFEST_INVALID', `descriptor size ${blob.size} does not match blob size ${info.size}`, {
        digest: blob.digest,
      });
    }
  }
  for (const child of manifest.manifests) {
    const present = isManifestMediaType(child.mediaType)
      ? await store.getManifest(target.repository, child.digest)
      : await store.statBlob(child.digest);
    if (!present) {
      throw new OciError(400, 'MANIFEST_BLOB_UNKNOWN', 'index references a manifest unknown to this repository', {
        digest: child.digest,
      });
    }
  }
}

/** DELETE by digest removes the manifest and its tags; DELETE by tag removes only the tag. */
export async function deleteManifest(ctx: GatewayContext, target: RequestTarget, reference: string, reply: FastifyReply) {
  const ref = parseManifestReference(reference);
  const store = ctx.registry.store;
  const removed =
    ref.tag === undefined
      ? await store.deleteManifest(target.repository, ref.digest)
      : await store.deleteTag(target.repository, ref.tag);
  if (!removed) throw manifestUnknown(target, reference);
  return reply.code(202).send();
}
