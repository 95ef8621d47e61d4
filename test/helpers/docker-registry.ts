import { spawn, type ChildProcess } from 'node:child_process';
import { mkdir, mkdtemp, rm, writeFile } from 'node:fs/promises';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { stringify } from 'yaml';
import { netnsGet } from './netns.ts';

export interface DockerRegistryOptions {
  /** Extra top-level config merged in, e.g. `{ auth: { htpasswd: {...} } }`. */
  config?: Record<string, unknown>;
  /** Binary (default /usr/bin/docker-registry, the reference registry v2.8 from Debian). */
  binary?: string;
  /**
   * Run it inside this network namespace (`ip netns exec`), on that namespace's loopback: only
   * processes in the namespace reach it. Default the test's own namespace.
   */
  netns?: string;
  /** Address to listen on; default 127.0.0.1 (with `netns`, e.g. the device's address so other devices reach it). */
  host?: string;
}

export interface DockerRegistry {
  url: string;
  host: string;
  pid: number;
  rootDir: string;
  stop(): Promise<void>;
}

/** A free TCP port on loopback. */
export async function freePort(): Promise<number> {
  const server = createServer();
  await new Promise<void>((res) => server.listen(0, '127.0.0.1', res));
  const { port } = server.address() as { port: number };
  await new Promise<void>((res) => server.close(() => res()));
  return port;
}

/**
 * Starts the CNCF reference registry on loopback with filesystem storage in a temp dir, and
 * waits until `/v2/` answers (200, or 401 when auth is configured).
 */
export async function startDockerRegistry(opts: DockerRegistryOptions = {}): Promise<DockerRegistry> {
  const dir = await mkdtemp(join(tmpdir(), 'shoal-docker-registry-'));
  const rootDir = join(dir, 'storage');
  await mkdir(rootDir);
  // Free on the test's loopback; a namespace's own loopback has only what tests start there.
  const port = await freePort();
  const host = `${opts.host ?? '127.0.0.1'}:${port}`;
  const config = {
    version: 0.1,
    log: { level: 'warn', accesslog: { disabled: true } },
    storage: { filesystem: { rootdirectory: rootDir }, delete: { enabled: true } },
    http: { addr: host },
    ...opts.config,
  };
  const configPath = join(dir, 'config.yml');
  await writeFile(configPath, stringify(config));
  const binary = opts.binary ?? '/usr/bin/docker-registry';
  const [command, args] = opts.netns ? ['ip', ['netns', 'exec', opts.netns, binary, 'serve', configPath]] : [binary, ['serve', configPath]];
  const child = spawn(command, args, { stdio: ['ignore', 'ignore', 'pipe'] });
  let stderr = '';
  child.stderr!.on('data', (d) => (stderr = (stderr + d).slice(-4000)));
  const url = `http://${host}`;
  const { netns } = opts;
  const status = netns
    ? async (probe: string) => (await netnsGet(netns, probe, 1_000)).status
    : async (probe: string) => {
        const res = await fetch(probe);
        await res.body?.cancel();
        return res.status;
      };
  await waitUntilAnswering(`${url}/v2/`, child, () => stderr, status);
  return {
    url,
    host,
    pid: child.pid!,
    rootDir,
    async stop() {
      await stopProcess(child);
      await rm(dir, { recursive: true, force: true });
    },
  };
}

async function waitUntilAnswering(url: string, child: ChildProcess, stderr: () => string, status: (url: string) => Promise<number>): Promise<void> {
  const deadline = Date.now() + 15_000;
  while (Date.now() < deadline) {
    if (child.exitCode !== null) throw new Error(`docker-registry exited (${child.exitCode}): ${stderr()}`);
    try {
      const code = await status(url);
      if (code === 200 || code === 401) return;
    } catch {
      // not listening yet
    }
    await new Promise((r) => setTimeout(r, 50));
  }
  child.kill('SIGKILL');
  throw new Error(`docker-registry did not answer on ${url}: ${stderr()}`);
}

/** SIGTERM, then SIGKILL after a grace period; resolves when the process is gone. */
export async function stopProcess(child: ChildProcess, graceMs = 5000): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null) return;
  const exited = new Promise<void>((res) => child.once('exit', () => res()));
  child.kill('SIGTERM');
  const timer = setTimeout(() => child.kill('SIGKILL'), graceMs);
  await exited;
  clearTimeout(timer);
}
