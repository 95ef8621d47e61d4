import { spawn, type ChildProcess } from 'node:child_process';
import { once } from 'node:events';
import { readFileSync } from 'node:fs';
import { mkdtemp } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createInterface } from 'node:readline';
import { fileURLToPath } from 'node:url';
import { netnsGet, type NetnsResponse } from './netns.ts';

/** The repository root, from this file's place in test/helpers/. */
export const REPO_ROOT = fileURLToPath(new URL('../../', import.meta.url));
/** The `shoal` executable users run (node/bin/shoal.js); tests spawn it with process.execPath. */
export const SHOAL_BIN = join(REPO_ROOT, 'node', 'bin', 'shoal.js');
const SHEBANG_WORDS = readFileSync(SHOAL_BIN, 'utf8').split('\n', 1)[0]!.split(/\s+/);
/**
 * The Node flags and the environment (NAME=value) on node/bin/shoal.js's first line, which users
 * get through the executable; tests and benchmarks spawn process.execPath with the same ones.
 */
export const RUNTIME_FLAGS = SHEBANG_WORDS.filter((word) => word.startsWith('--'));
export const RUNTIME_ENV: Record<string, string> = Object.fromEntries(
  SHEBANG_WORDS.filter((word) => /^[A-Z_]+=/.test(word)).map((word) => [word.slice(0, word.indexOf('=')), word.slice(word.indexOf('=') + 1)]),
);
/** Log lines a RunningShoalNode keeps. */
export const MAX_LOG_LINES = 5000;

export interface ShoalNodeOptions {
  /** libp2p listen multiaddrs; default one random port on 127.0.0.1. */
  listen?: string[];
  /** --bootstrap multiaddrs. */
  bootstrap?: string[];
  /** --swarm-key file. */
  swarmKey?: string;
  /** --label KEY=VALUE entries. */
  labels?: string[];
  /** mDNS discovery; default off (the default namespace's lo has no multicast). */
  mdns?: boolean;
  /** A YAML config file passed with --config (the flags below still override it). */
  configFile?: string;
  /** Data directory; default a fresh temporary directory (the caller removes it). */
  dataDir?: string;
  name?: string;
  /** Pull-through upstreams: registry namespace -> URL. */
  upstreams?: Record<string, string>;
  defaultNamespace?: string;
  pushToken?: string;
  logLevel?: string;
  /** Milliseconds to wait for both "listening" lines; default 30 s. */
  startTimeoutMs?: number;
  /**
   * Run the node inside this network namespace (`ip netns exec`); the helper then reaches its
   * API with curl inside the namespace. Default the test's own namespace.
   */
  netns?: string;
  /** Gateway and control API host:port; default 127.0.0.1:0 each. */
  gateway?: string;
  api?: string;
  /** Extra flags for the node runtime itself, e.g. `--cpu-prof`. */
  runtimeFlags?: string[];
  /** --chunk-size, e.g. `4MiB`. */
  chunkSize?: string;
  /** Extra environment variables for the node (e.g. a test fault switch), on top of the test's own. */
  env?: NodeJS.ProcessEnv;
}

/** One pino line from the daemon (or a non-JSON line, kept as msg). */
export interface LogEntry {
  msg?: string;
  level?: number;
  [field: string]: unknown;
}

export interface RunningShoalNode {
  gatewayUrl: string;
  /** 127.0.0.1:PORT, as container clients write it in references. */
  gatewayHost: string;
  apiUrl: string;
  dataDir: string;
  pid: number;
  /** Every stdout line parsed so far (the last few thousand). */
  logs(): LogEntry[];
  /**
   * The first log line, already kept or still to come, that `matches`; rejects after
   * `timeoutMs`. Costs nothing while waiting, unlike polling the API from the device's
   * namespace (a process per poll).
   */
  logged(matches: (entry: LogEntry) => boolean, timeoutMs: number): Promise<LogEntry>;
  /** The gateway's requests so far, from its "incoming request"/"request completed" lines. */
  requests(): GatewayRequest[];
  /** The raw output (stdout and stderr), last `lines` lines, for failure messages. */
  logText(lines?: number): string;
  /** GET <api>/api/images. */
  images(): Promise<ImageRecord[]>;
  /** GET <api>/api/peers: the membership table, this node included. */
  peers(): Promise<PeerRecord[]>;
  /** GET <api><path>, parsed as JSON; rejects unless HTTP 200. */
  apiJson<T>(path: string): Promise<T>;
  /** SIGTERM and wait; SIGKILL if it does not exit in time. Resolves with the exit code. */
  stop(): Promise<number | null>;
  /** SIGKILL and wait, as a crash would. */
  kill9(): Promise<void>;
}

export interface GatewayRequest {
  method: string;
  url: string;
  /** Undefined while the response is not finished (or was never logged). */
  statusCode?: number;
}

/** Joins fastify's request and response log lines by reqId. */
function gatewayRequests(entries: LogEntry[]): GatewayRequest[] {
  const byId = new Map<unknown, GatewayRequest>();
  for (const entry of entries) {
    const req = entry.req as { method?: string; url?: string } | undefined;
    const res = entry.res as { statusCode?: number } | undefined;
    if (req?.method && req.url !== undefined) byId.set(entry.reqId, { method: req.method, url: req.url });
    else if (res?.statusCode !== undefined) {
      const request = byId.get(entry.reqId);
      if (request) request.statusCode = res.statusCode;
    }
  }
  return [...byId.values()];
}

export interface ImageRecord {
  repository: string;
  tag: string;
  digest: string;
  size: number;
  mediaType: string;
}

export interface PeerRecord {
  name: string;
  peerId: string;
  status: 'alive' | 'suspect' | 'down';
  lastSeen: number;
  addresses: string[];
  gateway?: string;
  labels: Record<string, string>;
  [field: string]: unknown;
}

function parseLine(line: string): LogEntry {
  try {
    const parsed = JSON.parse(line) as unknown;
    if (parsed && typeof parsed === 'object') return parsed as LogEntry;
  } catch {
    // not JSON: keep the text
  }
  return { msg: line };
}

async function waitForExit(child: ChildProcess, timeoutMs: number): Promise<boolean> {
  if (child.exitCode !== null || child.signalCode !== null) return true;
  const timer = new Promise<false>((resolve) => setTimeout(() => resolve(false), timeoutMs).unref());
  return Promise.race([once(child, 'exit').then(() => true), timer]);
}

/**
 * Starts `shoal node` as a real process on random loopback ports and resolves once both the
 * gateway and the control API say they listen. The caller must stop() it (in an after hook).
 */
export async function startShoalNode(options: ShoalNodeOptions = {}): Promise<RunningShoalNode> {
  const dataDir = options.dataDir ?? (await mkdtemp(join(tmpdir(), 'shoal-node-')));
  // The same runtime flags as node/bin/shoal.js, so tests and benchmarks see the daemon users run.
  const args = [...RUNTIME_FLAGS, ...(options.runtimeFlags ?? []), SHOAL_BIN, 'node', '--data-dir', dataDir];
  args.push('--gateway', options.gateway ?? '127.0.0.1:0', '--api', options.api ?? '127.0.0.1:0');
  // Tests on one host: no fixed port 4001, no multicast on the default namespace's loopback.
  for (const addr of options.listen ?? ['/ip4/127.0.0.1/tcp/0']) args.push('--listen', addr);
  if (!(options.mdns ?? false)) args.push('--no-mdns');
  for (const addr of options.bootstrap ?? []) args.push('--bootstrap', addr);
  if (options.swarmKey) args.push('--swarm-key', options.swarmKey);
  for (const label of options.labels ?? []) args.push('--label', label);
  if (options.configFile) args.push('--config', options.configFile);
  if (options.name) args.push('--name', options.name);
  for (const [namespace, url] of Object.entries(options.upstreams ?? {})) args.push('--upstream', `${namespace}=${url}`);
  if (options.defaultNamespace) args.push('--default-namespace', options.defaultNamespace);
  if (options.pushToken) args.push('--push-token', options.pushToken);
  if (options.logLevel) args.push('--log-level', options.logLevel);
  if (options.chunkSize) args.push('--chunk-size', options.chunkSize);

  // process.execPath is Node 24 when the test runs under `npx node --test`. `ip netns exec`
  // execs the command in place, so the child's pid is the node's and signals reach it.
  const { netns } = options;
  const [command, commandArgs] = netns ? ['ip', ['netns', 'exec', netns, process.execPath, ...args]] : [process.execPath, args];
  const env = { ...process.env, ...RUNTIME_ENV, ...options.env };
  const child = spawn(command, commandArgs, { cwd: REPO_ROOT, env, stdio: ['ignore', 'pipe', 'pipe'] });
  const entries: LogEntry[] = [];
  const watchers = new Set<(entry: LogEntry) => void>();
  const rawLines: string[] = [];
  const keep = (line: string) => {
    rawLines.push(line);
    if (rawLines.length > MAX_LOG_LINES) rawLines.shift();
  };
  const logText = (lines = 200) => rawLines.slice(-lines).join('\n');

  let gatewayUrl: string | undefined;
  let apiUrl: string | undefined;
  let onListening: () => void = () => {};
  const bothListening = new Promise<void>((resolve) => (onListening = resolve));

  createInterface({ input: child.stdout! }).on('line', (line) => {
    keep(line);
    const entry = parseLine(line);
    entries.push(entry);
    if (entries.length > MAX_LOG_LINES) entries.shift();
    for (const watch of watchers) watch(entry);
    if (entry.msg === 'gateway listening' && typeof entry.url === 'string') gatewayUrl = entry.url;
    if (entry.msg === 'control API listening' && typeof entry.url === 'string') apiUrl = entry.url;
    if (gatewayUrl && apiUrl) onListening();
  });
  createInterface({ input: child.stderr! }).on('line', (line) => keep(`[stderr] ${line}`));

  const exited = once(child, 'exit').then(([code, signal]) => {
    throw new Error(`shoal node exited before listening (code ${code}, signal ${signal}):\n${logText()}`);
  });
  const timeoutMs = options.startTimeoutMs ?? 30_000;
  let timer: NodeJS.Timeout | undefined;
  const timedOut = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`shoal node did not listen within ${timeoutMs} ms:\n${logText()}`)), timeoutMs);
  });
  try {
    await Promise.race([bothListening, exited, timedOut]);
  } catch (error) {
    child.kill('SIGKILL');
    throw error;
  } finally {
    clearTimeout(timer);
    exited.catch(() => {}); // the race is over; a later exit is expected
  }

  const apiGet = async (path: string): Promise<NetnsResponse> => {
    const url = new URL(path, apiUrl).toString();
    if (netns) return netnsGet(netns, url);
    const response = await fetch(url);
    return { status: response.status, body: await response.text() };
  };
  const apiJson = async <T>(path: string): Promise<T> => {
    const response = await apiGet(path);
    if (response.status !== 200) throw new Error(`GET ${path}: HTTP ${response.status} ${response.body}`);
    return JSON.parse(response.body) as T;
  };

  // The contract: once listening, the control API reports healthy.
  const health = await apiGet('/healthz').catch((error: Error) => error);
  if (health instanceof Error || health.status !== 200) {
    child.kill('SIGKILL');
    const got = health instanceof Error ? health.message : `HTTP ${health.status}`;
    throw new Error(`GET ${apiUrl}/healthz after start: ${got}\n${logText()}`);
  }

  const gateway = new URL(gatewayUrl!);
  return {
    gatewayUrl: gatewayUrl!,
    gatewayHost: gateway.host,
    apiUrl: apiUrl!,
    dataDir,
    pid: child.pid!,
    logs: () => [...entries],
    logged: (matches, timeoutMs) => {
      const seen = entries.find(matches);
      if (seen) return Promise.resolve(seen);
      return new Promise<LogEntry>((resolve, reject) => {
        const done = () => (clearTimeout(timer), watchers.delete(watch));
        const watch = (entry: LogEntry) => {
          if (matches(entry)) (done(), resolve(entry));
        };
        const timer = setTimeout(() => (done(), reject(new Error(`no matching log line within ${timeoutMs} ms:\n${logText(30)}`))), timeoutMs);
        watchers.add(watch);
      });
    },
    requests: () => gatewayRequests(entries),
    logText,
    images: () => apiJson<ImageRecord[]>('/api/images'),
    peers: () => apiJson<PeerRecord[]>('/api/peers'),
    apiJson,
    async stop() {
      if (child.exitCode === null && child.signalCode === null) child.kill('SIGTERM');
      if (!(await waitForExit(child, 10_000))) {
        child.kill('SIGKILL');
        await waitForExit(child, 5_000);
        throw new Error(`shoal node did not stop within 10 s of SIGTERM:\n${logText(50)}`);
      }
      return child.exitCode;
    },
    async kill9() {
      child.kill('SIGKILL');
      await waitForExit(child, 5_000);
    },
  };
}
