// Formatting shared by the `shoal` CLI (node/src/format.ts re-exports it) and the dashboard,
// which loads it as is: plain JavaScript, typed by JSDoc, so the browser needs no build step.

/**
 * Human-readable byte counts (base 1024, as `docker images` reads).
 * @param {number} n
 * @returns {string}
 */
export function formatBytes(n) {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let v = n;
  let i = 0;
  while (v >= 1024 && i < units.length - 1) {
    v /= 1024;
    i++;
  }
  return i === 0 ? `${n} B` : `${v.toFixed(v < 10 ? 1 : 0)} ${units[i]}`;
}

/**
 * `now`, `3s ago`, `4m ago`, `2h ago`.
 * @param {number} ms
 * @returns {string}
 */
export function formatAgo(ms) {
  if (ms < 1000) return 'now';
  const s = Math.round(ms / 1000);
  if (s < 120) return `${s}s ago`;
  if (s < 7200) return `${Math.round(s / 60)}m ago`;
  return `${Math.round(s / 3600)}h ago`;
}

/**
 * `sha256:` and the first 12 hex digits.
 * @param {string} digest
 * @returns {string}
 */
export function shortDigest(digest) {
  return digest.slice(0, digest.indexOf(':') + 13);
}

/**
 * `12D3KooW…abcdef`: enough to tell peers apart in a table.
 * @param {string} peerId
 * @returns {string}
 */
export function shortPeerId(peerId) {
  return peerId.length > 16 ? `${peerId.slice(0, 8)}…${peerId.slice(-6)}` : peerId;
}
