#!/usr/bin/env node
import { Command, Option } from 'commander';
import type { TaggedImage } from '@shoal/store';
import { ConfigError, loadConfigFile, resolveConfig, type ConfigInput } from './config.ts';
import { ShoalNode } from './daemon.ts';
import { generateSwarmKey, type Member } from '@shoal/mesh';
import { formatAgo, formatBytes, formatTable, shortDigest, shortMediaType, shortPeerId } from './format.ts';
import { createLogger } from './logger.ts';
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
  .option('--no-mdns', 'do not discover devices by multicast DNS')
  .option('--swarm-key <file>', 'private network key (see shoal keygen): only devices with the same key connect')
  .option('--label <key=value>', 'label shown to other devices (repeatable)', collect, [])
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
  .addOption(new Option('--api <url>', 'control API of the node').default(DEFAULT_API))
  .option('--json', 'print JSON')
  .action(async (opts) => {
    const images = (await getJson(opts.api, '/api/images')) as TaggedImage[];
    if (opts.json) return print(JSON.stringify(images, null, 2));
    if (images.length === 0) return print('no images');
    print(
      formatTable(
        ['REPOSITORY', 'TAG', 'DIGEST', 'SIZE', 'TYPE'],
        images.map((i) => [i.repository, i.tag, shortDigest(i.digest), formatBytes(i.size), shortMediaType(i.mediaType)]),
      ),
    );
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
  .addOption(new Option('--api <url>', 'control API of the node').default(DEFAULT_API))
  .option('--json', 'print JSON')
  .action(async (opts) => {
    const peers = (await getJson(opts.api, '/api/peers')) as Member[];
    if (opts.json) return print(JSON.stringify(peers, null, 2));
    if (peers.length === 0) return print('no peers (is the mesh running?)');
    print(
      formatTable(
        ['NAME', 'PEER ID', 'STATUS', 'LAST SEEN', 'GATEWAY', 'LABELS'],
        peers.map((p) => [
          p.name,
          shortPeerId(p.peerId),
          p.status,
          formatAgo(Date.now() - p.lastSeen),
          p.gateway ?? '-',
          Object.entries(p.labels ?? {})
            .map(([k, v]) => `${k}=${v}`)
            .join(','),
        ]),
      ),
    );
  });

function collect(value: string, previous: string[]): string[] {
  return [...previous, value];
}

function print(text: string): void {
  process.stdout.write(`${text}\n`);
}

async function getJson(api: string, path: string): Promise<unknown> {
  const url = new URL(path, api);
  let res: Response;
  try {
    res = await fetch(url);
  } catch (err) {
    throw new CliError(`cannot reach the Shoal node at ${api} (${(err as Error & { cause?: Error }).cause?.message ?? (err as Error).message}); is \`shoal node\` running? (--api URL)`);
  }
  if (!res.ok) throw new CliError(`${url}: HTTP ${res.status} ${await res.text()}`);
  return res.json();
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
