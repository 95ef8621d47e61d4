import { mkdir, mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

/** One temporary directory per test file; named subdirectories inside; removed as a whole. */
export class Scratch {
  readonly root: string;

  private constructor(root: string) {
    this.root = root;
  }

  static async create(prefix = 'shoal-e2e-'): Promise<Scratch> {
    return new Scratch(await mkdtemp(join(tmpdir(), prefix)));
  }

  /** A path under the scratch root; the directory is created unless `create` is false. */
  async dir(name: string, create = true): Promise<string> {
    const path = join(this.root, name);
    if (create) await mkdir(path, { recursive: true });
    return path;
  }

  path(name: string): string {
    return join(this.root, name);
  }

  async remove(): Promise<void> {
    // Daemons may leave read-only or busy files behind; retry a few times.
    await rm(this.root, { recursive: true, force: true, maxRetries: 5, retryDelay: 200 });
  }
}
