#!/usr/bin/env node
import { Command, Option } from 'commander';
import type { TaggedImage } from '@shoal/store';
import { ConfigError, loadConfigFile, resolveConfig, splitKeyValue, type ConfigInput } from './config.ts';
import { ShoalNode } from './daemon.ts';
import { generateSwarmKey, type Member, type ServiceInstance, type ServiceRegistration } from '@shoal/mesh';
import { formatAgo, formatBytes, formatPairs, formatTable, shortDigest, shortMediaType, shortPeerId } from './format.ts';
import { createLogger } from './logger.ts';
import { PullProgress } from './pull-progress.ts';
import type { PullEvent } from './puller.ts';
import type { TransferInfo } from '@shoal/swarm';
import { VERSION } from './version.ts';

const DEFAULT_API = process.env.SHOAL_API ?? 'http://127.0.0.1:7070';

const program = new Command('shoal')
  .description('Peer-to-peer container image distribution for edge networks')
  .version(VERSION);

program
  .command('node')
  .description('run a Shoal node in the foreground (registry gateway + control API)')
  .option('--config <file>', 'YAML config file')
  .option('--data-dir <dir>', 'content store and state directory (default ./data)')
  .option('--name <name>', 'device name (default: host name)')
  .option('--gateway <host:port>', 'registry gateway address (default 127.0.0.1:5000)')
  .option('--api <host:port>', 'control API address (default 127.0.0.1:7070)')
  .option('--upstream <registry=url>', 'pull-through upstream for a registry namespace (repeatable)', collect, [])
  .option('--default-namespace <registry>', 'namespace for requests without ?ns= (default docker.io)')
  .option('--push-token <token>', 'require this token for pushes and deletes')
  .option('--log-level <level>', 'trace, debug, info, warn, error (default info)')
  .option('--listen <multiaddr>', 'libp2p listen address (repeatable; default /ip4/0.0.0.0/tcp/4001)', collect, [])
  .option('--bootstrap <multiaddr>', 'peer to dial and keep connected, ending in /p2p/<id> (repeatable)', collect, [])
  .option('--no-mdns', 'do not discover devices (or send this one\'s record) by multicast DNS')
  .option('--swarm-key <file>', 'private network key (see shoal keygen): only devices with the same key connect')
  .option('--label <key=value>', 'label shown to other devices (repeatable)', collect, [])
  .option('--data-plane <host:port>', 'where peers fetch chunks over HTTP (default 0.0.0.0:0, any port)')
  .option('--no-data-plane', 'move chunks only over encrypted libp2p streams (slower, more CPU)')
  .option('--chunk-size <size>', 'chunk size for blobs pushed or pulled through here, e.g. 4MiB (default 1MiB)')
  .action(async (opts, command: Command) => {
    const fromFile: ConfigInput = opts.config ? await loadConfigFile(opts.config) : {};
    const config = resolveConfig(fromFile, {
      name: opts.name,
      dataDir: opts.dataDir,
      gateway: opts.gateway,
      api: opts.api,
      upstreams: opts.upstream,
      defaultNamespace: opts.defaultNamespace,
      pushToken: opts.pushToken,
      logLevel: opts.logLevel,
      listen: opts.listen,
      bootstrap: opts.bootstrap,
      // commander defaults --no-mdns to true; only a flag actually given may override the file.
      mdns: command.getOptionValueSource('mdns') === 'cli' ? opts.mdns : undefined,
      swarmKey: opts.swarmKey,
      labels: opts.label,
      // As with --no-mdns, only a flag actually given may override the file.
      dataPlane: command.getOptionValueSource('dataPlane') === 'cli' ? opts.dataPlane : undefined,
      chunkSize: opts.chunkSize,
    });
    const log = createLogger(config.logLevel, config.name);
    const node = new ShoalNode(config, log);
    let stopping = false;
    const shutdown = async (signal: string) => {
      if (stopping) return;
      stopping = true;
      log.info({ signal }, 'shutting down');
      try {
        await node.stop();
        process.exit(0);
      } catch (err) {
        log.error({ err }, 'unclean shutdown');
        process.exit(1);
      }
    };
    process.on('SIGINT', () => void shutdown('SIGINT'));
    process.on('SIGTERM', () => void shutdown('SIGTERM'));
    await node.start();
  });

program
  .command('images')
  .description('list the images this node holds')
  .addOption(apiOption())
  .option('--json', 'print JSON')
  .action(async (opts) => {
    const images = (await getJson(opts.api, '/api/images')) as TaggedImage[];
    printList(images, opts.json, 'no images', ['REPOSITORY', 'TAG', 'DIGEST', 'SIZE', 'TYPE'], (i) => [
      i.repository,
      i.tag,
      shortDigest(i.digest),
      formatBytes(i.size),
      shortMediaType(i.mediaType),
    ]);
  });

program
  .command('pull')
  .description('prefetch an image into this node from the mesh (or its upstream), with progress')
  .argument('<image>', 'name[:tag|@digest], e.g. library/app:1 or ghcr.io/org/app:2')
  .addOption(apiOption())
  .action(async (image: string, opts) => {
    const progress = new PullProgress(process.stdout);
    for await (const event of streamJson(opts.api, '/api/pull', { image })) {
      const e = event as PullEvent;
      if (e.type === 'error') throw new CliError(`pull ${image}: ${e.message}`);
      progress.update(e);
    }
  });

program
  .command('transfers')
  .description('list the mesh transfers under way on this node')
  .addOption(apiOption())
  .option('--json', 'print JSON')
  .action(async (opts) => {
    const transfers = (await getJson(opts.api, '/api/transfers')) as TransferInfo[];
    printList(transfers, opts.json, 'no transfers', ['BLOB', 'STATE', 'CHUNKS', 'SIZE', 'RATE', 'SOURCES'], (t) => [
      shortDigest(t.blob),
      t.state,
      `${t.chunksHeld}/${t.chunks}`,
      formatBytes(t.size),
      `${formatBytes(t.rate)}/s`,
      String(Object.keys(t.sources).length),
    ]);
  });

program
  .command('keygen')
  .description('print a new swarm key; give every device the same file with --swarm-key')
  .action(() => {
    process.stdout.write(generateSwarmKey());
  });

program
  .command('peers')
  .description('list the devices in the mesh, as this node sees them')
  .addOption(apiOption())
  .option('--json', 'print JSON')
  .action(async (opts) => {
    const peers = (await getJson(opts.api, '/api/peers')) as Member[];
    printList(peers, opts.json, 'no peers (is the mesh running?)', ['NAME', 'PEER ID', 'STATUS', 'LAST SEEN', 'GATEWAY', 'LABELS'], (p) => [
      p.name,
      shortPeerId(p.peerId),
      p.status,
      formatAgo(Date.now() - p.lastSeen),
      p.gateway ?? '-',
      formatPairs(p.labels),
    ]);
  });

const services = program
  .command('services')
  .description('list the services running on devices across the mesh (optionally one by name)')
  .argument('[name]', 'only instances of this service')
  .addOption(apiOption())
  .option('--json', 'print JSON')
  .action(async (name: string | undefined, opts) => {
    const query = name ? `?name=${encodeURIComponent(name)}` : '';
    const instances = (await getJson(opts.api, `/api/services${query}`)) as ServiceInstance[];
    const empty = name ? `no instances of ${name}` : 'no services';
    printList(instances, opts.json, empty, ['NAME', 'DEVICE', 'ENDPOINT', 'PROTOCOL', 'STATUS', 'META'], (i) => [
      i.name,
      i.device,
      i.endpoint,
      i.protocol ?? 'tcp',
      i.status,
      formatPairs(i.meta),
    ]);
  });

services
  .command('register')
  .description('announce a service this device runs')
  .argument('<name>', 'service name')
  .option('--port <port>', 'port on this device', Number)
  .option('--url <url>', 'full URL instead of a port')
  .option('--protocol <protocol>', 'protocol, e.g. http, grpc, tcp (default tcp)')
  .option('--meta <key=value>', 'metadata (repeatable)', collect, [])
  .option('--ttl <seconds>', 'expire unless registered again within this time', Number)
  // --api belongs to `services`, which commander lets parse it anywhere on the line.
  .action(async (name: string, opts, command: Command) => {
    const { api } = command.parent!.opts<{ api: string }>();
    const registration: ServiceRegistration = { name, meta: Object.fromEntries((opts.meta as string[]).map((m) => splitKeyValue(m, 'meta'))) };
    if (opts.port !== undefined) registration.port = opts.port;
    if (opts.url !== undefined) registration.url = opts.url;
    if (opts.protocol !== undefined) registration.protocol = opts.protocol;
    if (opts.ttl !== undefined) registration.ttlMs = Math.round(opts.ttl * 1000);
    const [instance] = (await sendJson(api, 'POST', '/api/services', registration)) as ServiceInstance[];
    print(`registered ${name} at ${instance?.endpoint ?? '?'}`);
  });

services
  .command('deregister')
  .description('withdraw a service this device announced')
  .argument('<name>', 'service name')
  .action(async (name: string, _opts, command: Command) => {
    await sendJson(command.parent!.opts<{ api: string }>().api, 'DELETE', `/api/services/${encodeURIComponent(name)}`);
    print(`deregistered ${name}`);
  });

function apiOption(): Option {
  return new Option('--api <url>', 'control API of the node').default(DEFAULT_API);
}

/** A list command's output: JSON with --json, a sentence when empty, else a table. */
function printList<T>(items: T[], json: boolean | undefined, empty: string, header: string[], row: (item: T) => string[]): void {
  if (json) return print(JSON.stringify(items, null, 2));
  print(items.length === 0 ? empty : formatTable(header, items.map(row)));
}

function collect(value: string, previous: string[]): string[] {
  return [...previous, value];
}

function print(text: string): void {
  process.stdout.write(`${text}\n`);
}

function getJson(api: string, path: string): Promise<unknown> {
  return sendJson(api, 'GET', path);
}

/** Calls the control API; any failure becomes a CliError a person can act on. */
async function sendJson(api: string, method: string, path: string, body?: unknown): Promise<unknown> {
  const url = new URL(path, api);
  const res = await request(api, url, method, body);
  const text = await res.text();
  if (!res.ok) {
    let message = text;
    try {
      message = (JSON.parse(text) as { error?: string }).error ?? text;
    } catch {
      // not JSON: show it as it is
    }
    throw new CliError(`${method} ${url.pathname}: ${message} (HTTP ${res.status})`);
  }
  return text ? JSON.parse(text) : undefined;
}

/** One control API request; an unreachable node becomes a CliError a person can act on. */
async function request(api: string, url: URL, method: string, body?: unknown): Promise<Response> {
  try {
    return await fetch(url, {
      method,
      ...(body === undefined ? {} : { headers: { 'content-type': 'application/json' }, body: JSON.stringify(body) }),
    });
  } catch (err) {
    throw new CliError(`cannot reach the Shoal node at ${api} (${(err as Error & { cause?: Error }).cause?.message ?? (err as Error).message}); is \`shoal node\` running? (--api URL)`);
  }
}

/** POSTs `body` and yields each NDJSON line of the answer as it arrives. */
async function* streamJson(api: string, path: string, body: unknown): AsyncGenerator<unknown> {
  const url = new URL(path, api);
  const res = await request(api, url, 'POST', body);
  if (!res.ok || !res.body) throw new CliError(`POST ${url.pathname}: ${await res.text()} (HTTP ${res.status})`);
  let pending = '';
  for await (const piece of res.body.pipeThrough(new TextDecoderStream())) {
    pending += piece;
    let newline: number;
    while ((newline = pending.indexOf('\n')) >= 0) {
      const line = pending.slice(0, newline);
      pending = pending.slice(newline + 1);
      if (line.trim()) yield JSON.parse(line);
    }
  }
}

class CliError extends Error {}

program.parseAsync().catch((err: unknown) => {
  if (err instanceof ConfigError || err instanceof CliError) {
    process.stderr.write(`shoal: ${err.message}\n`);
    process.exit(2);
  }
  process.stderr.write(`shoal: ${(err as Error).stack ?? err}\n`);
  process.exit(1);
});
