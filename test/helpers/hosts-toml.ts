import { mkdir, writeFile } from 'node:fs/promises';
import { createServer, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import { join } from 'node:path';

export interface FallbackUpstream {
  url: string;
  /** `METHOD /path?query` of every request it received. */
  requests: string[];
  close(): Promise<void>;
}

/**
 * Stands in for the real upstream in hosts.toml (`server = ...`): containerd falls back to it
 * when the mirror misses. It answers 404 and records what it was asked, so a test can tell
 * whether the mirror answered, and no request ever leaves loopback.
 */
export async function startFallbackUpstream(): Promise<FallbackUpstream> {
  const requests: string[] = [];
  const server: Server = createServer((req, res) => {
    requests.push(`${req.method} ${req.url}`);
    res.writeHead(404, { 'content-type': 'application/json' });
    res.end('{"errors":[{"code":"NAME_UNKNOWN","message":"fallback upstream has nothing"}]}');
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  return {
    url: `http://127.0.0.1:${(server.address() as AddressInfo).port}`,
    requests,
    close: () => new Promise<void>((resolve) => server.close(() => resolve())),
  };
}

/** Writes `<hostsDir>/<registry>/hosts.toml` naming `mirror` as a pull+resolve mirror before `server`. */
export async function writeHostsToml(hostsDir: string, registry: string, server: string, mirror: string): Promise<void> {
  await mkdir(join(hostsDir, registry), { recursive: true });
  await writeFile(
    join(hostsDir, registry, 'hosts.toml'),
    [`server = ${JSON.stringify(server)}`, '', `[host.${JSON.stringify(mirror)}]`, '  capabilities = ["pull", "resolve"]', ''].join('\n'),
  );
}
