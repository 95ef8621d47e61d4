/** One OCI Distribution endpoint, recognised from a request path under `/v2`. */
export type Endpoint =
  | { kind: 'base' }
  | { kind: 'catalog' }
  | { kind: 'tags'; name: string }
  | { kind: 'manifest'; name: string; reference: string }
  | { kind: 'blob'; name: string; digest: string }
  /** `uploadId` is '' for the collection (`POST .../blobs/uploads/`). */
  | { kind: 'upload'; name: string; uploadId: string }
  | { kind: 'referrers'; name: string; digest: string };

// Names contain '/', so each pattern anchors at the end and the greedy name takes the last
// possible split; what follows the marker never contains '/'.
const PATTERNS: [RegExp, (m: RegExpExecArray) => Endpoint][] = [
  [/^\/v2\/(.+)\/tags\/list$/, (m) => ({ kind: 'tags', name: m[1]! })],
  [/^\/v2\/(.+)\/manifests\/([^/]+)$/, (m) => ({ kind: 'manifest', name: m[1]!, reference: m[2]! })],
  [/^\/v2\/(.+)\/blobs\/uploads\/([^/]*)$/, (m) => ({ kind: 'upload', name: m[1]!, uploadId: m[2]! })],
  [/^\/v2\/(.+)\/blobs\/([^/]+)$/, (m) => ({ kind: 'blob', name: m[1]!, digest: m[2]! })],
  [/^\/v2\/(.+)\/referrers\/([^/]+)$/, (m) => ({ kind: 'referrers', name: m[1]!, digest: m[2]! })],
];

/**
 * Recognises the endpoint of a raw (still percent-encoded) request path. Working on the raw
 * path means an encoded '/' or '.' never becomes a separator: it stays a '%' that no name,
 * tag or digest may contain, so validation refuses it.
 */
export function parseEndpoint(rawPath: string): Endpoint | undefined {
  if (rawPath === '/v2' || rawPath === '/v2/') return { kind: 'base' };
  if (rawPath === '/v2/_catalog') return { kind: 'catalog' };
  for (const [pattern, build] of PATTERNS) {
    const match = pattern.exec(rawPath);
    if (match) return build(match);
  }
  return undefined;
}

/** The path of a request URL, without the query. */
export function pathOf(url: string): string {
  const q = url.indexOf('?');
  return q < 0 ? url : url.slice(0, q);
}
