// Helpers more than one benchmark uses.
import { execFileSync } from 'node:child_process';
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

/** The commit a benchmark measured, and the product files that differed from it. */
export interface CodeState {
  commit: string;
  modified: string[];
  /** sha256 of the product code's diff against HEAD (and the untracked files' names), to see edits made during the run. */
  diff?: string;
  /** Set at the end of the run when the product code differs from what it was at the start. */
  changedDuringRun?: string;
}

/** Where the product lives; results and docs written meanwhile (by this run or another) are not code. */
const PRODUCT_PATHS = ['packages', 'node', 'registry-gateway'];

/** The commit measured, and the product files that differed from it (others may edit the tree). */
export function describeCode(): CodeState {
  // Not trimmed: a porcelain line starts with a space when only the work tree differs.
  const git = (...args: string[]) => execFileSync('git', args, { cwd: new URL('../../', import.meta.url), encoding: 'utf8', maxBuffer: 64 << 20 });
  const status = git('status', '--porcelain', '--', ...PRODUCT_PATHS);
  const modified = status
    .split('\n')
    .filter(Boolean)
    .map((line) => line.slice(3));
  const diff = createHash('sha256')
    .update(git('diff', 'HEAD', '--', ...PRODUCT_PATHS))
    .update(status)
    .digest('hex');
  return { commit: git('rev-parse', '--short', 'HEAD').trim(), modified, diff };
}

/** `start` with a note when the product code at the end of the run is not what it was at the start. */
export function codeAtEnd(start: CodeState): CodeState {
  const end = describeCode();
  if (end.commit === start.commit && end.diff === start.diff) return start;
  const changed = end.commit !== start.commit ? `HEAD moved to ${end.commit}` : `the work tree changed (${end.modified.join(', ') || 'edits reverted'})`;
  return { ...start, changedDuringRun: changed };
}

/** The report's sentence on the code measured: its commit, uncommitted product changes, and changes during the run. */
export function codeSentence(code: CodeState): string {
  return (
    `Code: commit ${code.commit}${code.modified.length ? ` with uncommitted changes to ${code.modified.join(', ')}` : ', product code unmodified'}` +
    (code.changedDuringRun ? `; CAUTION: the product code changed during the run (${code.changedDuringRun}), so later trials may have run other code.` : '.')
  );
}
