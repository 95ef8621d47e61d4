#!/usr/bin/env node
import { Command, Option } from 'commander';
import type { TaggedImage } from '@shoal/store';
import { ConfigError, loadConfigFile, resolveConfig, type ConfigInput } from './config.ts';
import { ShoalNode } from './daemon.ts';
import { formatBytes, formatTable, shortDigest, shortMediaType } from './format.ts';
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
  .action(async (opts) => {
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
