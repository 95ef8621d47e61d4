import { execFileSync } from 'node:child_process';
import { randomBytes, randomInt } from 'node:crypto';
import { readFileSync, writeFileSync } from 'node:fs';
import { run, type RunOptions, type RunResult } from './exec.ts';

/** What mesh tests need: root for namespaces, iproute2 to build them, curl to reach APIs inside them. */
export const NETNS_PREREQUISITES = { commands: ['ip', 'curl'], root: true };

const BRIDGE = 'br0';
// Every device's interface has the same name, inside its own namespace.
const DEVICE_INTERFACE = 'eth0';
const CLEANUP_SIGNALS = ['SIGINT', 'SIGTERM', 'SIGHUP'] as const;

export interface TestNetworkOptions {
  /** How many device namespaces to create up front; more can be added with addDevice(). Default 0. */
  devices?: number;
}

export interface TestDevice {
  /** The namespace name, for `ip netns exec`. */
  netns: string;
  /** The device's IPv4 address on the test bridge. */
  address: string;
}

/**
 * An isolated LAN for multi-process tests: one namespace holding a Linux bridge and one
 * namespace per device, each wired to the bridge by a veth pair, on a private /24 picked at
 * random. Nothing is added to the default namespace, so traffic between devices never leaves
 * these namespaces. Multicast is routed onto the bridge so mDNS works between devices.
 *
 * destroy() kills every process left in the namespaces and deletes them; it also runs on process
 * 'exit' and on SIGINT/SIGTERM/SIGHUP, so a crashed or interrupted test leaves nothing behind.
 */
export class TestNetwork {
  /** Unique per network: `shoal-<4 hex>`; namespaces are `<prefix>-br` and `<prefix>-<i>`. */
  readonly prefix: string;
  /** The first three octets of the test subnet, e.g. `10.77.42`. */
  readonly subnet: string;
  readonly devices: TestDevice[] = [];
  readonly #bridgeNetns: string;
  readonly #namespaces: string[] = [];
  /** The host's allowed congestion controls before setCongestionControl widened them, to restore. */
  #hostAllowedCongestionControl: string | undefined;
  #destroyed = false;
  readonly #onExit = () => this.#destroySync();
  // A signal skips 'exit' handlers: clean up, then die of the signal as if no handler were set.
  readonly #onSignal = (signal: NodeJS.Signals) => {
    this.destroy();
    if (process.listenerCount(signal) === 0) process.kill(process.pid, signal);
  };

  private constructor() {
    this.prefix = `shoal-${randomBytes(2).toString('hex')}`;
    // Each network is isolated in its own namespaces, so two runs picking the same subnet do not clash.
    this.subnet = `10.77.${randomInt(0, 256)}`;
    this.#bridgeNetns = `${this.prefix}-br`;
  }

  /** Builds the bridge namespace and `devices` device namespaces; on failure removes what it made. */
  static async create(options: TestNetworkOptions = {}): Promise<TestNetwork> {
    const network = new TestNetwork();
    process.once('exit', network.#onExit);
    for (const signal of CLEANUP_SIGNALS) process.once(signal, network.#onSignal);
    try {
      await network.#addNamespace(network.#bridgeNetns);
      await network.#ip(network.#bridgeNetns, ['link', 'add', BRIDGE, 'type', 'bridge']);
      await network.#ip(network.#bridgeNetns, ['link', 'set', BRIDGE, 'up']);
      for (let i = 0; i < (options.devices ?? 0); i++) await network.addDevice();
    } catch (error) {
      network.destroy();
      throw error;
    }
    return network;
  }

  /** Adds one device namespace on the bridge, with address `<subnet>.<index + 1>`. */
  async addDevice(): Promise<TestDevice> {
    const index = this.devices.length;
    if (index >= 250) throw new Error('a TestNetwork holds at most 250 devices');
    const netns = `${this.prefix}-${index}`;
    const address = `${this.subnet}.${index + 1}`;
    // Created in the bridge namespace, so no interface ever appears in the default namespace.
    const bridgePort = `port${index}`;
    const tempName = `dev${index}`;
    await this.#addNamespace(netns);
    await this.#ip(this.#bridgeNetns, ['link', 'add', bridgePort, 'type', 'veth', 'peer', 'name', tempName]);
    await this.#ip(this.#bridgeNetns, ['link', 'set', bridgePort, 'master', BRIDGE, 'up']);
    await this.#ip(this.#bridgeNetns, ['link', 'set', tempName, 'netns', netns, 'name', DEVICE_INTERFACE]);
    await this.#ip(netns, ['link', 'set', 'lo', 'multicast', 'on', 'up']);
    await this.#ip(netns, ['addr', 'add', `${address}/24`, 'dev', DEVICE_INTERFACE]);
    await this.#ip(netns, ['link', 'set', DEVICE_INTERFACE, 'multicast', 'on', 'up']);
    // Without a default route the kernel has no interface for multicast sends.
    await this.#ip(netns, ['route', 'add', '224.0.0.0/4', 'dev', DEVICE_INTERFACE]);
    const device = { netns, address };
    this.devices.push(device);
    return device;
  }

  /**
   * Caps what `device` sends onto the bridge at `rate` (tc syntax, e.g. `200mbit`), so transfers
   * take long enough to overlap or interrupt. With `to`, only what it
   * sends to that device is capped (a slow link between two devices; its other traffic, such as
   * its acknowledgements of downloads from elsewhere, is not held up behind it). Replaces any
   * earlier limit on `device`. Traffic a device sends to itself (its loopback) is never limited.
   */
  async limitRate(device: TestDevice, rate: string, to?: TestDevice): Promise<void> {
    const tc = (args: string[]) => run('tc', ['-n', device.netns, ...args]);
    await tc(['qdisc', 'del', 'dev', DEVICE_INTERFACE, 'root']).catch(() => {}); // no limit set yet
    if (!to) {
      await tc(['qdisc', 'add', 'dev', DEVICE_INTERFACE, 'root', ...tbf(rate)]);
      return;
    }
    // HTB sends what no filter classifies straight out, unlimited; the filter puts what goes to
    // `to` in the one rate-limited class.
    await tc(['qdisc', 'add', 'dev', DEVICE_INTERFACE, 'root', 'handle', '1:', 'htb']);
    await tc(['class', 'add', 'dev', DEVICE_INTERFACE, 'parent', '1:', 'classid', '1:1', 'htb', 'rate', rate, 'burst', '256kb']);
    await tc(['filter', 'add', 'dev', DEVICE_INTERFACE, 'parent', '1:', 'protocol', 'ip', 'prio', '1', 'u32', 'match', 'ip', 'dst', `${to.address}/32`, 'flowid', '1:1']);
  }

  /**
   * Shapes `device`'s link to `rate` in both directions, as a switch port of that speed would:
   * tbf on what it sends onto the bridge and on what the bridge sends it.
   */
  async shapeLink(device: TestDevice, rate: string): Promise<void> {
    await this.limitRate(device, rate);
    const bridgePort = `port${this.devices.indexOf(device)}`;
    await run('tc', ['-n', this.#bridgeNetns, 'qdisc', 'replace', 'dev', bridgePort, 'root', ...tbf(rate)]);
  }

  /**
   * Sets the TCP congestion control `device` uses (`cubic`, `bbr`, ...). A new namespace takes
   * the host's, which on a tuned host (such as a cloud VM running bbr) is not what the devices
   * being modelled run.
   */
  async setCongestionControl(device: TestDevice, algorithm: string): Promise<void> {
    this.#allowCongestionControl(algorithm);
    // /proc/sys/net shows the namespace of whoever opens it, so the write happens inside.
    await this.exec(device.netns, 'sh', ['-c', 'printf %s "$1" > /proc/sys/net/ipv4/tcp_congestion_control', 'sh', algorithm]);
  }

  /**
   * Cuts (or restores) `device`'s cable: its bridge port goes down, so nothing it sends arrives
   * and nothing reaches it, and no FIN or RST tells anyone, as when a device loses power.
   */
  async setLink(device: TestDevice, up: boolean): Promise<void> {
    await this.#ip(this.#bridgeNetns, ['link', 'set', `port${this.devices.indexOf(device)}`, up ? 'up' : 'down']);
  }

  /** Bytes `device`'s interface has sent onto the bridge and received from it so far (all traffic). */
  async interfaceBytes(device: TestDevice): Promise<{ sent: number; received: number }> {
    const dir = `/sys/class/net/${DEVICE_INTERFACE}/statistics`;
    const { stdout } = await this.exec(device.netns, 'cat', [`${dir}/tx_bytes`, `${dir}/rx_bytes`]);
    const [sent, received] = stdout.trim().split(/\s+/).map(Number);
    return { sent: sent!, received: received! };
  }

  /**
   * Bytes every device has sent onto the bridge and received from it so far, in device order, read
   * at once from the bridge ports' counters (one process for all devices, cheap enough to sample).
   */
  async portBytes(): Promise<{ sent: number; received: number }[]> {
    const { stdout } = await run('ip', ['-n', this.#bridgeNetns, '-s', '-j', 'link', 'show']);
    const links = JSON.parse(stdout) as { ifname: string; stats64: { rx: { bytes: number }; tx: { bytes: number } } }[];
    return this.devices.map((_, i) => {
      const port = links.find((link) => link.ifname === `port${i}`);
      if (!port) throw new Error(`no bridge port for device ${i}`);
      // What the port receives, the device sent.
      return { sent: port.stats64.rx.bytes, received: port.stats64.tx.bytes };
    });
  }

  /** Runs `cmd args` inside namespace `netns` to completion (see run()). */
  exec(netns: string, cmd: string, args: string[], options?: RunOptions): Promise<RunResult> {
    return run('ip', ['netns', 'exec', netns, cmd, ...args], options);
  }

  /** Kills every process still inside the namespaces and deletes them. Idempotent, synchronous. */
  destroy(): void {
    this.#destroySync();
    process.removeListener('exit', this.#onExit);
    for (const signal of CLEANUP_SIGNALS) process.removeListener(signal, this.#onSignal);
  }

  /**
   * A namespace other than the host's may only pick an algorithm the host lists as allowed (the
   * kernel refuses others with EPERM), and a host defaulting to bbr may allow only reno and bbr:
   * add `algorithm` to the host's list until destroy().
   */
  #allowCongestionControl(algorithm: string): void {
    const allowed = readFileSync(ALLOWED_CONGESTION_CONTROL, 'utf8').trim();
    if (allowed.split(/\s+/).includes(algorithm)) return;
    this.#hostAllowedCongestionControl ??= allowed;
    writeFileSync(ALLOWED_CONGESTION_CONTROL, `${allowed} ${algorithm}`);
  }

  async #addNamespace(name: string): Promise<void> {
    // Recorded only once made: a name that already exists belongs to someone else.
    await run('ip', ['netns', 'add', name]);
    this.#namespaces.push(name);
  }

  async #ip(netns: string, args: string[]): Promise<void> {
    await run('ip', ['-n', netns, ...args]);
  }

  // Synchronous so it can also run in a process 'exit' handler.
  #destroySync(): void {
    if (this.#destroyed) return;
    this.#destroyed = true;
    if (this.#hostAllowedCongestionControl !== undefined) {
      try {
        writeFileSync(ALLOWED_CONGESTION_CONTROL, this.#hostAllowedCongestionControl);
      } catch {
        // a host that let us widen the list lets us narrow it; nothing else to do if not
      }
    }
    for (const name of [...this.#namespaces].reverse()) {
      for (const pid of namespacePids(name)) {
        try {
          process.kill(pid, 'SIGKILL');
        } catch {
          // already gone
        }
      }
      try {
        // Deleting a device namespace also deletes its veth and so the bridge port.
        execFileSync('ip', ['netns', 'del', name], { stdio: 'ignore' });
      } catch {
        // never created, or already deleted
      }
    }
  }
}

const ALLOWED_CONGESTION_CONTROL = '/proc/sys/net/ipv4/tcp_allowed_congestion_control';

/** A token bucket at `rate` whose burst and queue suit rates from a few to a few hundred Mbit/s. */
function tbf(rate: string): string[] {
  return ['tbf', 'rate', rate, 'burst', '256kb', 'latency', '100ms'];
}

function namespacePids(netns: string): number[] {
  try {
    const out = execFileSync('ip', ['netns', 'pids', netns], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'ignore'] });
    return out.split(/\s+/).filter(Boolean).map(Number);
  } catch {
    return [];
  }
}

export interface NetnsResponse {
  status: number;
  body: string;
}

/**
 * GET `url` from inside namespace `netns` with curl (the test process itself stays in the
 * default namespace, which has no route to the devices). Rejects when curl cannot connect.
 */
export async function netnsGet(netns: string, url: string, timeoutMs = 5_000): Promise<NetnsResponse> {
  const seconds = String(Math.max(1, Math.ceil(timeoutMs / 1000)));
  const { stdout } = await run('ip', ['netns', 'exec', netns, 'curl', '-sS', '--max-time', seconds, '-w', '\n%{http_code}', url], {
    timeoutMs: timeoutMs + 2_000,
  });
  const split = stdout.lastIndexOf('\n');
  return { status: Number(stdout.slice(split + 1)), body: stdout.slice(0, split) };
}
