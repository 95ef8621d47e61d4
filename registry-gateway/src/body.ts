import type { IncomingMessage } from 'node:http';
import { OciError } from './errors.ts';

/** Whether the request announces a body (a non-zero length, or chunked transfer). */
export function hasBody(req: IncomingMessage): boolean {
  const length = req.headers['content-length'];
  return req.headers['transfer-encoding'] !== undefined || (length !== undefined && length !== '0');
}

/** The declared Content-Length, or undefined when absent; a malformed value is a 400. */
export function declaredLength(req: IncomingMessage): number | undefined {
  const value = req.headers['content-length'];
  if (value === undefined) return undefined;
  if (!/^\d+$/.test(value)) throw new OciError(400, 'SIZE_INVALID', 'malformed Content-Length');
  return Number(value);
}

/**
 * Reads a small body (a manifest) into memory, refusing more than `limit` bytes with 413.
 * On overflow the rest is left unread: Node drains it after the response, so the 413 still
 * reaches the client instead of a reset connection.
 */
export function readBoundedBody(req: IncomingMessage, limit: number): Promise<Buffer> {
  const tooLarge = () => new OciError(413, 'SIZE_INVALID', `body exceeds the limit of ${limit} bytes`, { limit });
  if ((declaredLength(req) ?? 0) > limit) return Promise.reject(tooLarge());
  return new Promise((resolve, reject) => {
    const parts: Buffer[] = [];
    let total = 0;
    const cleanup = () => {
      req.off('data', onData);
      req.off('end', onEnd);
      req.off('error', onError);
      req.off('close', onClose);
    };
    const onData = (chunk: Buffer) => {
      total += chunk.byteLength;
      if (total <= limit) {
        parts.push(chunk);
        return;
      }
      cleanup();
      reject(tooLarge());
    };
    const onEnd = () => {
      cleanup();
      resolve(Buffer.concat(parts, total));
    };
    const onError = (err: Error) => {
      cleanup();
      reject(new OciError(400, 'MANIFEST_INVALID', `request body failed: ${err.message}`));
    };
    const onClose = () => onError(new Error('client closed the connection'));
    req.on('data', onData);
    req.on('end', onEnd);
    req.on('error', onError);
    req.on('close', onClose);
  });
}
