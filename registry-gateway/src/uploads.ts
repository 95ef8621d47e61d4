import type { FastifyReply, FastifyRequest } from 'fastify';
import type { IncomingMessage } from 'node:http';
import { isValidName } from '@shoal/oci';
import { UploadBusyError, type BlobWriter } from '@shoal/store';
import { declaredLength, hasBody } from './body.ts';
import { OciError } from './errors.ts';
import { locationOf, queryParam, requireDigest, type GatewayContext, type RequestTarget } from './context.ts';

// The store hands out UUIDs; anything else cannot name an upload.
const UPLOAD_ID = /^[A-Za-z0-9_-]{1,128}$/;

/** POST .../blobs/uploads/: a cross-repository mount, a monolithic upload, or a new session. */
export async function startUpload(ctx: GatewayContext, target: RequestTarget, request: FastifyRequest, reply: FastifyReply) {
  const store = ctx.registry.store;
  const mount = queryParam(request, 'mount', 'DIGEST_INVALID');
  if (mount !== undefined) {
    const digest = requireDigest(mount, 'mount');
    const from = queryParam(request, 'from', 'NAME_INVALID');
    if (from !== undefined && !isValidName(from)) throw new OciError(400, 'NAME_INVALID', 'invalid "from" repository name');
    // Blobs are shared by every repository, so a blob the store holds can always be mounted.
    if (await store.statBlob(digest)) return blobCreated(target, digest, reply);
  }
  const monolithicDigest = queryParam(request, 'digest', 'DIGEST_INVALID');
  if (mount === undefined && monolithicDigest !== undefined) {
    const digest = requireDigest(monolithicDigest);
    await interruptible(request.raw, () => store.putBlob(digest, hasBody(request.raw) ? request.raw : []));
    return blobCreated(target, digest, reply);
  }
  const writer = await store.createWriter();
  return uploadAccepted(target, writer, reply.code(202));
}

/** PATCH <location>: appends one chunk (Docker streams the whole blob without Content-Range). */
export async function patchUpload(
  ctx: GatewayContext,
  target: RequestTarget,
  uploadId: string,
  request: FastifyRequest,
  reply: FastifyReply,
) {
  const writer = requireWriter(ctx, target, uploadId);
  checkContentRange(target, writer, request.raw);
  if (hasBody(request.raw)) await appendBody(ctx, writer, request.raw);
  return uploadAccepted(target, writer, reply.code(202));
}

/** PUT <location>?digest=: appends an optional last chunk, verifies and commits. */
export async function finishUpload(
  ctx: GatewayContext,
  target: RequestTarget,
  uploadId: string,
  request: FastifyRequest,
  reply: FastifyReply,
) {
  const digest = requireDigest(queryParam(request, 'digest', 'DIGEST_INVALID'));
  const writer = requireWriter(ctx, target, uploadId);
  checkContentRange(target, writer, request.raw);
  if (hasBody(request.raw)) await appendBody(ctx, writer, request.raw);
  // A digest mismatch discards the upload and surfaces as 400 DIGEST_INVALID.
  await writer.commit(digest);
  return blobCreated(target, digest, reply);
}

/** GET <location>: how far the upload has come. */
export function uploadStatus(ctx: GatewayContext, target: RequestTarget, uploadId: string, reply: FastifyReply) {
  return uploadAccepted(target, requireWriter(ctx, target, uploadId), reply.code(204));
}

/** DELETE <location>: cancels the upload and drops its bytes. */
export async function cancelUpload(ctx: GatewayContext, target: RequestTarget, uploadId: string, reply: FastifyReply) {
  await requireWriter(ctx, target, uploadId).abort();
  return reply.code(204).send();
}

function requireWriter(ctx: GatewayContext, target: RequestTarget, uploadId: string): BlobWriter {
  const writer = UPLOAD_ID.test(uploadId) ? ctx.registry.store.getWriter(uploadId) : undefined;
  if (!writer) throw uploadUnknown(target, uploadId);
  return writer;
}

function uploadUnknown(target: RequestTarget, uploadId: string): OciError {
  return new OciError(404, 'BLOB_UPLOAD_UNKNOWN', 'blob upload unknown to registry', {
    name: target.name,
    upload: uploadId.slice(0, 128),
  });
}

/** The inclusive range of bytes received so far, as the spec writes it ("0-0" when empty). */
function receivedRange(writer: BlobWriter): string {
  return `0-${Math.max(writer.size - 1, 0)}`;
}

function uploadAccepted(target: RequestTarget, writer: BlobWriter, reply: FastifyReply) {
  return reply
    .headers({
      location: locationOf(target, `blobs/uploads/${writer.id}`),
      range: receivedRange(writer),
      'docker-upload-uuid': writer.id,
    })
    .send();
}

function blobCreated(target: RequestTarget, digest: string, reply: FastifyReply) {
  return reply
    .code(201)
    .headers({ location: locationOf(target, `blobs/${digest}`), 'docker-content-digest': digest })
    .send();
}

const CONTENT_RANGE = /^(?:bytes[ =])?(\d+)-(\d+)(?:\/(?:\d+|\*))?$/i;

/**
 * A chunk that says where it starts must start where the upload ends (else 416), and a
 * declared length must agree with its range.
 */
function checkContentRange(target: RequestTarget, writer: BlobWriter, req: IncomingMessage): void {
  const header = req.headers['content-range'];
  if (header === undefined) return;
  const match = CONTENT_RANGE.exec(header.trim());
  if (!match) throw new OciError(400, 'BLOB_UPLOAD_INVALID', 'malformed Content-Range', { contentRange: header.slice(0, 100) });
  const start = Number(match[1]);
  const end = Number(match[2]);
  if (end < start) throw new OciError(400, 'BLOB_UPLOAD_INVALID', 'Content-Range ends before it starts');
  if (start !== writer.size) {
    throw new OciError(
      416,
      'BLOB_UPLOAD_INVALID',
      `chunk starts at ${start} but the upload has ${writer.size} bytes`,
      { expectedStart: writer.size },
      { location: locationOf(target, `blobs/uploads/${writer.id}`), range: receivedRange(writer) },
    );
  }
  const length = declaredLength(req);
  if (length !== undefined && length !== end - start + 1) {
    throw new OciError(400, 'BLOB_UPLOAD_INVALID', `Content-Length ${length} does not match Content-Range ${start}-${end}`);
  }
}

/** Streams the request body into the upload; a client that breaks off leaves it at its old size. */
async function appendBody(ctx: GatewayContext, writer: BlobWriter, req: IncomingMessage): Promise<void> {
  const cancelled = () => ctx.registry.store.getWriter(writer.id) !== writer;
  try {
    await interruptible(req, () => writer.append(req));
  } catch (err) {
    if (cancelled()) throw new OciError(404, 'BLOB_UPLOAD_UNKNOWN', 'blob upload was cancelled', { upload: writer.id });
    throw err;
  }
  // A concurrent DELETE may have cancelled the upload while the body streamed in.
  if (cancelled()) throw new OciError(404, 'BLOB_UPLOAD_UNKNOWN', 'blob upload was cancelled', { upload: writer.id });
}

/** Runs a body-consuming write; if it failed because the client broke off, that is a 400. */
async function interruptible<T>(req: IncomingMessage, write: () => Promise<T>): Promise<T> {
  try {
    return await write();
  } catch (err) {
    if (!req.complete && !(err instanceof UploadBusyError)) {
      throw new OciError(400, 'BLOB_UPLOAD_INVALID', 'request body ended early');
    }
    throw err;
  }
}
