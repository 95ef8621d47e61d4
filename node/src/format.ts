/** Human-readable byte counts (base 1024, as `docker images` reads). */
export function formatBytes(n: number): string {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let v = n;
  let i = 0;
  while (v >= 1024 && i < units.length - 1) {
    v /= 1024;
    i++;
  }
  return i === 0 ? `${n} B` : `${v.toFixed(v < 10 ? 1 : 0)} ${units[i]}`;
}

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

export function shortDigest(digest: string): string {
  return digest.slice(0, digest.indexOf(':') + 13);
}

/** `12D3KooW…abcdef`: enough to tell peers apart in a table. */
export function shortPeerId(peerId: string): string {
  return peerId.length > 16 ? `${peerId.slice(0, 8)}…${peerId.slice(-6)}` : peerId;
}

/** `now`, `3s ago`, `4m ago`, `2h ago`. */
export function formatAgo(ms: number): string {
  if (ms < 1000) return 'now';
  const s = Math.round(ms / 1000);
  if (s < 120) return `${s}s ago`;
  if (s < 7200) return `${Math.round(s / 60)}m ago`;
  return `${Math.round(s / 3600)}h ago`;
}

/** `k=v,k=v` for labels and metadata in a table cell. */
export function formatPairs(pairs: Record<string, string> | undefined): string {
  return Object.entries(pairs ?? {})
    .map(([k, v]) => `${k}=${v}`)
    .join(',');
}
