import { readFile } from 'node:fs/promises';
import { hostname } from 'node:os';
import { resolve } from 'node:path';
import { parse as parseYaml } from 'yaml';
import { isValidRegistry } from '@shoal/oci';
import type { ServiceRegistration } from '@shoal/mesh';
import { DEFAULT_CHUNK_SIZE } from '@shoal/store';
import { MAX_CHUNK_BYTES } from '@shoal/swarm';

/** Everything a node needs to run. Each field has a default, so an empty config runs. */
export interface NodeConfig {
  /** Device name shown to users and peers (default: the host name). */
  name: string;
  /** Where the content store and node state live (default: ./data). */
  dataDir: string;
  /** Registry gateway listen address (default 127.0.0.1:5000). */
  gateway: HostPort;
  /** Control API and dashboard listen address (default 127.0.0.1:7070). */
  api: HostPort;
  /** Registry namespace for requests without ?ns= (default docker.io). */
  defaultNamespace: string;
  /** Upstream registries for pull-through, by namespace: docker.io -> http://mirror:5000. */
  upstreams: Record<string, string>;
  /** When set, pushes and deletes need this token. */
  pushToken?: string;
  /** pino level (default info). */
  logLevel: string;
  /** libp2p listen multiaddrs (default /ip4/0.0.0.0/tcp/4001). */
  listen: string[];
  /** Peers to dial at start and keep connected, for networks without multicast (default none). */
  bootstrap: string[];
  /** Find devices on the LAN by mDNS (default true). */
  mdns: boolean;
  /** Path of the swarm key: only devices holding the same key can connect (default none: open). */
  swarmKey?: string;
  /** User labels shown to peers (os, arch and hostname are added by the node). */
  labels: Record<string, string>;
  /** Services this device offers, announced to the mesh at start (checked by the mesh). */
  services: ServiceRegistration[];
  /**
   * Where peers fetch chunks over plain HTTP (tickets handed out over libp2p; chunks verified by
   * hash), or false to move chunks only over encrypted libp2p streams (default 0.0.0.0, any port).
   */
  dataPlane: HostPort | false;
  /** Chunk size of the chunk indexes this device makes for blobs pushed or pulled through to it (default 1 MiB). */
  chunkSize: number;
  /**
   * Test-only fault switch (environment `SHOAL_FAULT_CORRUPT_CHUNKS=1`, never a flag or config
   * key): every chunk this node serves to peers is corrupted, to test that peers catch it.
   */
  faultCorruptChunks?: boolean;
}

export interface HostPort {
  host: string;
  port: number;
}

export const DEFAULT_CONFIG: Readonly<Omit<NodeConfig, 'name'>> = {
  dataDir: './data',
  gateway: { host: '127.0.0.1', port: 5000 },
  api: { host: '127.0.0.1', port: 7070 },
  defaultNamespace: 'docker.io',
  upstreams: {},
  logLevel: 'info',
  listen: ['/ip4/0.0.0.0/tcp/4001'],
  bootstrap: [],
  mdns: true,
  labels: {},
  services: [],
  dataPlane: { host: '0.0.0.0', port: 0 },
  chunkSize: DEFAULT_CHUNK_SIZE,
};

/** Chunks must fit a chunk frame; below 64 KiB the per-chunk costs swamp the transfer. */
const CHUNK_SIZE_RANGE = { min: 64 * 1024, max: MAX_CHUNK_BYTES };

export class ConfigError extends Error {
  override name = 'ConfigError';
}

/** The config as a file or flags spell it, before defaults are applied. */
export interface ConfigInput {
  name?: string;
  dataDir?: string;
  gateway?: string;
  api?: string;
  defaultNamespace?: string;
  upstreams?: Record<string, string> | string[];
  pushToken?: string;
  logLevel?: string;
  listen?: string[];
  bootstrap?: string[];
  mdns?: boolean;
  swarmKey?: string;
  labels?: Record<string, string> | string[];
  services?: ServiceRegistration[];
  /** HOST:PORT, or false. */
  dataPlane?: string | false;
  /** Bytes, or a size such as `4MiB` or `512KiB`. */
  chunkSize?: number | string;
}

/** Reads a YAML config file; unknown keys are an error so typos do not pass silently. */
export async function loadConfigFile(path: string): Promise<ConfigInput> {
  let doc: unknown;
  try {
    doc = parseYaml(await readFile(path, 'utf8'));
  } catch (err) {
    throw new ConfigError(`cannot read config ${path}: ${(err as Error).message}`);
  }
  if (doc === null || doc === undefined) return {};
  if (typeof doc !== 'object' || Array.isArray(doc)) throw new ConfigError(`${path}: top level must be a mapping`);
  const known = [
    'name', 'dataDir', 'gateway', 'api', 'defaultNamespace', 'upstreams', 'pushToken', 'logLevel',
    'listen', 'bootstrap', 'mdns', 'swarmKey', 'labels', 'services', 'dataPlane', 'chunkSize',
  ];
  for (const key of Object.keys(doc)) {
    if (!known.includes(key)) throw new ConfigError(`${path}: unknown key "${key}" (known: ${known.join(', ')})`);
  }
  return doc as ConfigInput;
}

/** Layers inputs (later wins: file, then flags) over the defaults and validates the result. */
export function resolveConfig(...inputs: ConfigInput[]): NodeConfig {
  const merged: ConfigInput = {};
  const upstreams: Record<string, string> = {};
  const labels: Record<string, string> = {};
  for (const input of inputs) {
    for (const [k, v] of Object.entries(input)) {
      if (v === undefined) continue;
      if (k === 'upstreams') Object.assign(upstreams, parseUpstreams(v as ConfigInput['upstreams']));
      else if (k === 'labels') Object.assign(labels, parseLabels(v as ConfigInput['labels']));
      // An empty list from a flag that was not given must not hide the file's list.
      else if (Array.isArray(v) && v.length === 0) continue;
      else (merged as Record<string, unknown>)[k] = v;
    }
  }
  const config: NodeConfig = {
    name: merged.name ?? hostname(),
    dataDir: resolve(merged.dataDir ?? DEFAULT_CONFIG.dataDir),
    gateway: merged.gateway ? parseHostPort(merged.gateway, 'gateway') : DEFAULT_CONFIG.gateway,
    api: merged.api ? parseHostPort(merged.api, 'api') : DEFAULT_CONFIG.api,
    defaultNamespace: merged.defaultNamespace ?? DEFAULT_CONFIG.defaultNamespace,
    upstreams,
    logLevel: merged.logLevel ?? DEFAULT_CONFIG.logLevel,
    listen: stringList(merged.listen, 'listen') ?? DEFAULT_CONFIG.listen,
    bootstrap: stringList(merged.bootstrap, 'bootstrap') ?? DEFAULT_CONFIG.bootstrap,
    mdns: merged.mdns ?? DEFAULT_CONFIG.mdns,
    labels,
    services: merged.services ?? [],
    dataPlane:
      merged.dataPlane === false ? false : merged.dataPlane ? parseHostPort(merged.dataPlane, 'dataPlane') : DEFAULT_CONFIG.dataPlane,
    chunkSize: merged.chunkSize === undefined ? DEFAULT_CONFIG.chunkSize : parseChunkSize(merged.chunkSize),
  };
  if (!Array.isArray(config.services)) throw new ConfigError('services must be a list of {name, port | url, protocol?, meta?}');
  if (merged.pushToken) config.pushToken = merged.pushToken;
  if (process.env.SHOAL_FAULT_CORRUPT_CHUNKS === '1') config.faultCorruptChunks = true;
  if (merged.swarmKey) config.swarmKey = resolve(merged.swarmKey);
  if (typeof config.mdns !== 'boolean') throw new ConfigError('mdns must be true or false');
  if (!isValidRegistry(config.defaultNamespace)) {
    throw new ConfigError(`default namespace "${config.defaultNamespace}" is not a registry host name`);
  }
  return config;
}

/** `host:port`, `[v6]:port` or `:port`. */
export function parseHostPort(value: string, what: string): HostPort {
  const m = /^(?:\[([0-9a-fA-F:.]+)\]|([^:[\]]*)):(\d{1,5})$/.exec(value);
  const port = m ? Number(m[3]) : NaN;
  if (!m || port > 65535) throw new ConfigError(`${what}: expected HOST:PORT, got "${value}"`);
  return { host: m[1] ?? (m[2] || '0.0.0.0'), port };
}

/** Bytes, or `<n>KiB` / `<n>MiB`, within CHUNK_SIZE_RANGE. */
export function parseChunkSize(value: number | string): number {
  const m = /^(\d+)\s*(KiB|MiB)?$/.exec(String(value).trim());
  const bytes = m ? Number(m[1]) * (m[2] === 'MiB' ? 2 ** 20 : m[2] === 'KiB' ? 1024 : 1) : NaN;
  if (!(bytes >= CHUNK_SIZE_RANGE.min && bytes <= CHUNK_SIZE_RANGE.max)) {
    throw new ConfigError(`chunkSize: expected bytes or a size like 4MiB, from 64KiB to ${CHUNK_SIZE_RANGE.max / 2 ** 20}MiB, got "${value}"`);
  }
  return bytes;
}

/** `key=value` as flags spell pairs; the value may itself contain `=`. */
export function splitKeyValue(spec: string, what: string, form = 'KEY=VALUE'): [string, string] {
  const eq = spec.indexOf('=');
  if (eq <= 0) throw new ConfigError(`${what}: expected ${form}, got "${spec}"`);
  return [spec.slice(0, eq), spec.slice(eq + 1)];
}

function parseUpstreams(value: ConfigInput['upstreams']): Record<string, string> {
  const entries = Array.isArray(value)
    ? value.map((spec) => splitKeyValue(spec, 'upstream', 'REGISTRY=URL'))
    : Object.entries(value ?? {});
  const out: Record<string, string> = {};
  for (const [registry, url] of entries) {
    if (!isValidRegistry(registry)) throw new ConfigError(`upstream: "${registry}" is not a registry host name`);
    let parsed: URL;
    try {
      parsed = new URL(url);
    } catch {
      throw new ConfigError(`upstream ${registry}: "${url}" is not a URL`);
    }
    if (parsed.protocol !== 'http:' && parsed.protocol !== 'https:') {
      throw new ConfigError(`upstream ${registry}: only http and https URLs are supported`);
    }
    out[registry] = url;
  }
  return out;
}

function stringList(value: unknown, what: string): string[] | undefined {
  if (value === undefined) return undefined;
  if (!Array.isArray(value) || !value.every((v) => typeof v === 'string')) {
    throw new ConfigError(`${what} must be a list of multiaddrs`);
  }
  return value;
}

const LABEL_KEY = /^[a-zA-Z0-9][a-zA-Z0-9._/-]{0,62}$/;

function parseLabels(value: ConfigInput['labels']): Record<string, string> {
  const entries = Array.isArray(value)
    ? value.map((spec) => splitKeyValue(spec, 'label'))
    : Object.entries(value ?? {}).map(([k, v]) => [k, String(v)] as const);
  for (const [key] of entries) {
    if (!LABEL_KEY.test(key)) throw new ConfigError(`label: "${key}" is not a valid label key`);
  }
  return Object.fromEntries(entries);
}

export function isLoopback(host: string): boolean {
  return host === 'localhost' || host === '::1' || host.startsWith('127.');
}
