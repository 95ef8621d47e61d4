// Shared with the dashboard, which loads it in the browser.
export { formatAgo, formatBytes, shortDigest, shortPeerId } from '../dashboard/format.js';

/** A plain left-aligned text table, like the docker and kubectl CLIs print. */
export function formatTable(header: string[], rows: string[][]): string {
  const widths = header.map((h, i) => Math.max(h.length, ...rows.map((r) => r[i]!.length)));
  const line = (cells: string[]) =>
    cells
      .map((c, i) => (i === cells.length - 1 ? c : c.padEnd(widths[i]!)))
      .join('   ')
      .trimEnd();
  return [line(header), ...rows.map(line)].join('\n');
}

const SHORT_MEDIA_TYPES: Record<string, string> = {
  'application/vnd.oci.image.manifest.v1+json': 'oci manifest',
  'application/vnd.oci.image.index.v1+json': 'oci index',
  'application/vnd.docker.distribution.manifest.v2+json': 'docker manifest',
  'application/vnd.docker.distribution.manifest.list.v2+json': 'docker list',
};

export function shortMediaType(mediaType: string): string {
  return SHORT_MEDIA_TYPES[mediaType] ?? mediaType;
}

/** `k=v,k=v` for labels and metadata in a table cell. */
export function formatPairs(pairs: Record<string, string> | undefined): string {
  return Object.entries(pairs ?? {})
    .map(([k, v]) => `${k}=${v}`)
    .join(',');
}
