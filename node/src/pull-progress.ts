import type { PullEvent } from './puller.ts';
import { formatBytes, shortDigest } from './format.ts';

const BAR_WIDTH = 24;

/**
 * Draws a pull's progress: at a terminal one bar per blob, redrawn in place; elsewhere (logs,
 * CI) a line per blob when it finishes, so output stays readable.
 */
export class PullProgress {
  readonly #out: NodeJS.WriteStream;
  readonly #tty: boolean;
  readonly #rows = new Map<string, Extract<PullEvent, { type: 'progress' }>>();
  #drawn = 0;

  constructor(out: NodeJS.WriteStream) {
    this.#out = out;
    this.#tty = Boolean(out.isTTY);
  }

  update(event: PullEvent): void {
    switch (event.type) {
      case 'manifest':
        this.#write(`${event.repository}@${shortDigest(event.digest)}: ${event.blobs.length} blobs, ${formatBytes(event.blobs.reduce((n, b) => n + b.size, 0))}\n`);
        for (const b of event.blobs) this.#rows.set(b.digest, { type: 'progress', ...b, bytes: 0, rate: 0, sources: 0, done: false });
        this.#redraw();
        break;
      case 'progress':
        this.#rows.set(event.digest, event);
        if (this.#tty) this.#redraw();
        else if (event.done) this.#write(`${row(event)}\n`);
        break;
      case 'done':
        if (this.#tty) this.#redraw();
        this.#write(`pulled ${event.repository}@${shortDigest(event.digest)}: ${formatBytes(event.bytes)} in ${(event.ms / 1000).toFixed(1)} s\n`);
        break;
      case 'error':
        break;
    }
  }

  #redraw(): void {
    if (!this.#tty) return;
    if (this.#drawn > 0) this.#out.write(`\x1b[${this.#drawn}A`);
    for (const r of this.#rows.values()) this.#out.write(`\x1b[2K${row(r)}\n`);
    this.#drawn = this.#rows.size;
  }

  #write(text: string): void {
    this.#drawn = 0;
    this.#out.write(text);
  }
}

function row(r: Extract<PullEvent, { type: 'progress' }>): string {
  const fraction = r.size > 0 ? Math.min(1, r.bytes / r.size) : 1;
  const filled = Math.round(fraction * BAR_WIDTH);
  const bar = `[${'#'.repeat(filled)}${'.'.repeat(BAR_WIDTH - filled)}]`;
  const rate = r.done && r.rate === 0 ? 'already here' : `${formatBytes(r.rate)}/s`;
  const sources = r.sources > 0 ? `, ${r.sources} source${r.sources === 1 ? '' : 's'}` : '';
  return `${shortDigest(r.digest)} ${bar} ${formatBytes(r.bytes)}/${formatBytes(r.size)} ${rate}${sources}`;
}
