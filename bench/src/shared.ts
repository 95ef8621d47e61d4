// Helpers more than one benchmark uses.
import { createHash, randomFillSync } from 'node:crypto';
import { createWriteStream, readFileSync } from 'node:fs';
import { once } from 'node:events';
import { mkdir, writeFile } from 'node:fs/promises';
import { join } from 'node:path';

/** Writes `size` random (incompressible) bytes to `path`; resolves with their sha256 digest. */
export async function writeRandomFile(path: string, size: number): Promise<string> {
  const out = createWriteStream(path);
  const hash = createHash('sha256');
  const buf = Buffer.alloc(2 ** 20);
  for (let written = 0; written < size; written += buf.length) {
    const chunk = buf.subarray(0, Math.min(buf.length, size - written));
    randomFillSync(chunk);
    hash.update(chunk);
    if (!out.write(chunk)) await once(out, 'drain');
  }
  out.end();
  await once(out, 'finish');
  return `sha256:${hash.digest('hex')}`;
}

export function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  const mid = Math.floor(s.length / 2);
  return s.length % 2 ? s[mid]! : (s[mid - 1]! + s[mid]!) / 2;
}

/** [busy, total] jiffies over all CPUs, from the first line of /proc/stat. */
export function cpuJiffies(): [number, number] {
  const fields = readFileSync('/proc/stat', 'utf8').split('\n')[0]!.trim().split(/\s+/).slice(1).map(Number);
  const total = fields.reduce((a, b) => a + b, 0);
  const idle = fields[3]! + (fields[4] ?? 0); // idle + iowait
  return [total - idle, total];
}

/** Whole-machine CPU busy % between two cpuJiffies() readings. */
export function busyPercent(before: [number, number], after: [number, number]): number {
  return (100 * (after[0] - before[0])) / (after[1] - before[1]);
}

/** Writes a benchmark's result files (name -> contents) into `dir`, creating it first. */
export async function writeResults(dir: string, files: Record<string, string>): Promise<void> {
  await mkdir(dir, { recursive: true });
  for (const [name, contents] of Object.entries(files)) await writeFile(join(dir, name), contents);
}
