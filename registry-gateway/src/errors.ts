import { InvalidDigestError, InvalidManifestError } from '@shoal/oci';
import { DigestMismatchError, RangeNotSatisfiableError, UploadBusyError } from '@shoal/store';

/** Error codes of the OCI Distribution Spec v1.1.1, plus UNKNOWN for our own failures. */
export type OciErrorCode =
  | 'BLOB_UNKNOWN'
  | 'BLOB_UPLOAD_INVALID'
  | 'BLOB_UPLOAD_UNKNOWN'
  | 'DIGEST_INVALID'
  | 'MANIFEST_BLOB_UNKNOWN'
  | 'MANIFEST_INVALID'
  | 'MANIFEST_UNKNOWN'
  | 'NAME_INVALID'
  | 'NAME_UNKNOWN'
  | 'SIZE_INVALID'
  | 'UNAUTHORIZED'
  | 'DENIED'
  | 'UNSUPPORTED'
  | 'TOOMANYREQUESTS'
  | 'UNKNOWN';

export interface OciErrorBody {
  errors: { code: OciErrorCode; message: string; detail: unknown }[];
}

/** An error that carries its HTTP answer: status, OCI code, and any extra headers. */
export class OciError extends Error {
  override name = 'OciError';
  readonly status: number;
  readonly code: OciErrorCode;
  readonly detail: unknown;
  readonly headers: Record<string, string>;

  constructor(status: number, code: OciErrorCode, message: string, detail: unknown = {}, headers: Record<string, string> = {}) {
    super(message);
    this.status = status;
    this.code = code;
    this.detail = detail;
    this.headers = headers;
  }

  body(): OciErrorBody {
    return errorBody(this.code, this.message, this.detail);
  }
}

export function errorBody(code: OciErrorCode, message: string, detail: unknown = {}): OciErrorBody {
  return { errors: [{ code, message, detail }] };
}

/** Status codes fastify itself raises, as the OCI code a registry client understands. */
const CODE_FOR_STATUS: Record<number, OciErrorCode> = {
  401: 'UNAUTHORIZED',
  403: 'DENIED',
  404: 'NAME_UNKNOWN',
  413: 'SIZE_INVALID',
  429: 'TOOMANYREQUESTS',
};

/**
 * Turns anything thrown while serving a request into an OciError, or undefined when it is a
 * genuine server fault (a 500 whose details stay in the log).
 */
export function toOciError(err: unknown): OciError | undefined {
  if (err instanceof OciError) return err;
  if (err instanceof DigestMismatchError) {
    return new OciError(400, 'DIGEST_INVALID', 'content does not match the digest', { expected: err.expected, actual: err.actual });
  }
  if (err instanceof InvalidDigestError) return new OciError(400, 'DIGEST_INVALID', err.message);
  if (err instanceof InvalidManifestError) return new OciError(400, 'MANIFEST_INVALID', err.message);
  if (err instanceof RangeNotSatisfiableError) return rangeNotSatisfiable(err.size);
  if (err instanceof UploadBusyError) return new OciError(416, 'BLOB_UPLOAD_INVALID', err.message);
  const status = (err as { statusCode?: unknown })?.statusCode;
  if (typeof status === 'number' && status >= 400 && status < 500) {
    return new OciError(status, CODE_FOR_STATUS[status] ?? 'UNSUPPORTED', (err as Error).message);
  }
  // An upstream that failed (unreachable, timed out, answered 5xx): say so, so clients such as
  // containerd move on to their next host knowing it is not this node's fault.
  if (status === 502 || status === 503 || status === 504) return new OciError(status, 'UNKNOWN', (err as Error).message);
  return undefined;
}

export function rangeNotSatisfiable(size: number): OciError {
  return new OciError(416, 'UNSUPPORTED', 'requested range not satisfiable', { size }, { 'content-range': `bytes */${size}` });
}
