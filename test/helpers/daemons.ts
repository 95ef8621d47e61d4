import { spawn, type ChildProcess } from 'node:child_process';
import { once } from 'node:events';
import { mkdir, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { createInterface } from 'node:readline';
import { setTimeout as sleep } from 'node:timers/promises';
import { run, type RunOptions, type RunResult } from './exec.ts';

const MAX_LOG_LINES = 2000;

/** A background process whose output is kept (bounded) for failure messages. */
class SupervisedProcess {
  readonly child: ChildProcess;
  readonly #lines: string[] = [];

  constructor(command: string, args: string[], env: NodeJS.ProcessEnv = process.env) {
    this.child = spawn(command, args, { stdio: ['ignore', 'pipe', 'pipe'], env });
    for (const stream of [this.child.stdout!, this.child.stderr!]) {
      createInterface({ input: stream }).on('line', (line) => {
        this.#lines.push(line);
        if (this.#lines.length > MAX_LOG_LINES) this.#lines.shift();
      });
    }
    this.child.on('error', (error) => this.#lines.push(`spawn error: ${error.message}`));
  }

  get running(): boolean {
    return this.child.exitCode === null && this.child.signalCode === null;
  }

  logText(lines = 80): string {
    return this.#lines.slice(-lines).join('\n');
  }

  /** SIGTERM, then SIGKILL after `graceMs`. */
  async stop(graceMs = 15_000): Promise<void> {
    if (!this.running) return;
    const exited = once(this.child, 'exit');
    this.child.kill('SIGTERM');
    const timer = sleep(graceMs, undefined, { ref: false }).then(() => 'timeout' as const);
    if ((await Promise.race([exited, timer])) === 'timeout') {
      this.child.kill('SIGKILL');
      await exited;
    }
  }
}

/** `command args`, run inside network namespace `netns` when given (`ip netns exec` execs in place, so signals reach it). */
function inNetns(netns: string | undefined, command: string, args: string[]): [string, string[]] {
  return netns ? ['ip', ['netns', 'exec', netns, command, ...args]] : [command, args];
}

/** Polls `probe` until it succeeds; fails with the daemon's log if it exits or times out. */
async function waitUntilReady(daemon: SupervisedProcess, what: string, probe: () => Promise<unknown>, timeoutMs = 30_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  let lastError: unknown;
  while (Date.now() < deadline) {
    if (!daemon.running) throw new Error(`${what} exited during start-up:\n${daemon.logText()}`);
    try {
      await probe();
      return;
    } catch (error) {
      lastError = error;
    }
    await sleep(200);
  }
  await daemon.stop(2_000);
  throw new Error(`${what} not ready within ${timeoutMs} ms (${(lastError as Error)?.message}):\n${daemon.logText()}`);
}

/**
 * A private containerd: its own root, state, sockets and config, the CRI plugin off, so it
 * never touches /run/containerd/containerd.sock or /var/lib/containerd.
 */
export class PrivateContainerd {
  readonly socket: string;
  readonly root: string;
  readonly #daemon: SupervisedProcess;
  readonly #netns: string | undefined;

  private constructor(socket: string, root: string, daemon: SupervisedProcess, netns: string | undefined) {
    this.socket = socket;
    this.root = root;
    this.#daemon = daemon;
    this.#netns = netns;
  }

  /**
   * Starts containerd with everything under `dir` and waits until `ctr version` answers. With
   * `netns`, containerd and every ctr command run inside that network namespace (ctr 1.6
   * fetches images itself, so it must reach the registry from there too).
   */
  static async start(dir: string, options: { netns?: string } = {}): Promise<PrivateContainerd> {
    const root = join(dir, 'root');
    const state = join(dir, 'state');
    await mkdir(root, { recursive: true });
    await mkdir(state, { recursive: true });
    const socket = join(dir, 'containerd.sock');
    const config = join(dir, 'config.toml');
    await writeFile(
      config,
      [
        'version = 2',
        `root = ${JSON.stringify(root)}`,
        `state = ${JSON.stringify(state)}`,
        'disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper"]',
        '[grpc]',
        `  address = ${JSON.stringify(socket)}`,
        '[ttrpc]',
        `  address = ${JSON.stringify(`${socket}.ttrpc`)}`,
        '[debug]',
        '  address = ""',
        '[metrics]',
        '  address = ""',
        '[plugins."io.containerd.internal.v1.opt"]',
        `  path = ${JSON.stringify(join(root, 'opt'))}`,
        '',
      ].join('\n'),
    );
    const [command, args] = inNetns(options.netns, 'containerd', ['--config', config, '--log-level', 'info']);
    const daemon = new SupervisedProcess(command, args);
    const containerd = new PrivateContainerd(socket, root, daemon, options.netns);
    await waitUntilReady(daemon, 'containerd', () => containerd.ctr(['version'], { timeoutMs: 5_000 }));
    return containerd;
  }

  /** Runs `ctr --address <socket> ...args`. */
  ctr(args: string[], options: RunOptions = {}): Promise<RunResult> {
    return run(...inNetns(this.#netns, 'ctr', ['--address', this.socket, ...args]), options);
  }

  logText(lines?: number): string {
    return this.#daemon.logText(lines);
  }

  stop(): Promise<void> {
    return this.#daemon.stop();
  }
}

/**
 * A private dockerd on vfs storage with no iptables or bridge, using its own containerd (so it
 * never adopts a system one), data root, exec root, pidfile, socket and config file. The
 * docker CLI gets its own config directory too.
 */
export class PrivateDockerd {
  readonly host: string;
  readonly containerd: PrivateContainerd;
  readonly #daemon: SupervisedProcess;
  readonly #cliEnv: NodeJS.ProcessEnv;

  private constructor(host: string, containerd: PrivateContainerd, daemon: SupervisedProcess, cliEnv: NodeJS.ProcessEnv) {
    this.host = host;
    this.containerd = containerd;
    this.#daemon = daemon;
    this.#cliEnv = cliEnv;
  }

  static async start(dir: string): Promise<PrivateDockerd> {
    const containerd = await PrivateContainerd.start(join(dir, 'containerd'));
    try {
      const dataRoot = join(dir, 'data');
      const execRoot = join(dir, 'exec');
      const cliConfig = join(dir, 'cli');
      for (const d of [dataRoot, execRoot, cliConfig]) await mkdir(d, { recursive: true });
      const daemonConfig = join(dir, 'daemon.json');
      // The trust key would otherwise go to /etc/docker/key.json.
      await writeFile(daemonConfig, JSON.stringify({ 'deprecated-key-path': join(dir, 'key.json') }));
      const host = `unix://${join(dir, 'docker.sock')}`;
      const daemon = new SupervisedProcess('dockerd', [
        '--config-file', daemonConfig,
        '--containerd', containerd.socket,
        '--storage-driver=vfs',
        '--iptables=false',
        '--ip-masq=false',
        '--bridge=none',
        '--userland-proxy=false',
        '--data-root', dataRoot,
        '--exec-root', execRoot,
        '--pidfile', join(dir, 'docker.pid'),
        '--host', host,
      ]);
      const cliEnv = { ...process.env, DOCKER_CONFIG: cliConfig, DOCKER_HOST: host };
      const dockerd = new PrivateDockerd(host, containerd, daemon, cliEnv);
      await waitUntilReady(dockerd.#daemon, 'dockerd', () => dockerd.docker(['version'], { timeoutMs: 5_000 }));
      return dockerd;
    } catch (error) {
      await containerd.stop();
      throw error;
    }
  }

  /** Runs the docker CLI against this daemon. */
  docker(args: string[], options: RunOptions = {}): Promise<RunResult> {
    return run('docker', args, { ...options, env: { ...this.#cliEnv, ...options.env } });
  }

  logText(lines?: number): string {
    return `--- dockerd ---\n${this.#daemon.logText(lines)}\n--- its containerd ---\n${this.containerd.logText(lines)}`;
  }

  async stop(): Promise<void> {
    await this.#daemon.stop();
    await this.containerd.stop();
  }
}

/** Podman with a private root, run root and tmpdir on vfs; no daemon to start or stop. */
export class PrivatePodman {
  readonly #globalArgs: string[];

  private constructor(globalArgs: string[]) {
    this.#globalArgs = globalArgs;
  }

  static async create(dir: string): Promise<PrivatePodman> {
    const root = join(dir, 'root');
    const runRoot = join(dir, 'runroot');
    const tmp = join(dir, 'tmp');
    for (const d of [root, runRoot, tmp]) await mkdir(d, { recursive: true });
    return new PrivatePodman([
      '--root', root,
      '--runroot', runRoot,
      '--tmpdir', tmp,
      '--storage-driver', 'vfs',
      '--events-backend', 'none',
      '--cgroup-manager', 'cgroupfs',
    ]);
  }

  podman(args: string[], options: RunOptions = {}): Promise<RunResult> {
    return run('podman', [...this.#globalArgs, ...args], options);
  }
}
