import assert from 'node:assert/strict';
import { setTimeout as sleep } from 'node:timers/promises';
import type { TestDevice, TestNetwork } from './netns.ts';
import { startShoalNode, type RunningShoalNode, type ShoalNodeOptions } from './node.ts';
import type { Scratch } from './scratch.ts';

/** The daemon's default mesh port; every device has its own namespace, so all can use it. */
export const MESH_PORT = 4001;
const POLL_MS = 500;

/** The peer id the node logged in its "mesh listening" line. */
export function meshPeerId(node: RunningShoalNode): string {
  const line = node.logs().find((entry) => entry.msg === 'mesh listening');
  assert.ok(typeof line?.peerId === 'string', `no "mesh listening" line with a peerId:\n${node.logText(30)}`);
  return line.peerId;
}

/**
 * Polls until `problem()` returns undefined; fails with the last problem after `timeoutMs`.
 * `problem` describes what is still wrong, so a failure says what was seen.
 */
export async function eventually(
  what: string,
  timeoutMs: number,
  problem: () => Promise<string | undefined>,
  pollMs = POLL_MS,
): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  let last: string | undefined = 'never checked';
  while (Date.now() < deadline) {
    last = await problem().catch((error: Error) => `error: ${error.message}`);
    if (last === undefined) return;
    await sleep(pollMs);
  }
  assert.fail(`${what} within ${timeoutMs} ms; last seen: ${last}`);
}

/** Waits until `node` holds the mesh-wide tag record of `repository:tag` naming `digest`; `who` names it in a failure. */
export async function waitForTagRecord(
  node: RunningShoalNode,
  who: string,
  record: { repository: string; tag: string; digest: string },
  timeoutMs: number,
  pollMs?: number,
): Promise<void> {
  const { repository, tag, digest } = record;
  await eventually(`${who} knows ${repository}:${tag}`, timeoutMs, async () => {
    const tags = await node.apiJson<{ repository: string; tag: string; digest: string }[]>('/api/tags');
    const known = tags.find((t) => t.repository === repository && t.tag === tag);
    return known?.digest === digest ? undefined : `its tags: ${JSON.stringify(tags.map((t) => `${t.repository}:${t.tag}`))}`;
  }, pollMs);
}

/** `shoal node` processes, one per device namespace of a TestNetwork, by device index. */
export class Devices {
  readonly nodes: (RunningShoalNode | undefined)[] = [];
  readonly #network: TestNetwork;
  readonly #scratch: Scratch;

  constructor(network: TestNetwork, scratch: Scratch) {
    this.#network = network;
    this.#scratch = scratch;
  }

  /**
   * Starts `shoal node` inside device `index`'s namespace, on the device's address and the
   * default mesh port; its data dir is stable per index, so a restart keeps its store and peer
   * id. `options` override those defaults.
   */
  async start(index: number, options: ShoalNodeOptions = {}): Promise<RunningShoalNode> {
    const device: TestDevice = this.#network.devices[index]!;
    const node = await startShoalNode({
      netns: device.netns,
      name: `device-${index}`,
      dataDir: await this.dataDir(index),
      gateway: `${device.address}:0`,
      api: `${device.address}:0`,
      listen: [`/ip4/0.0.0.0/tcp/${MESH_PORT}`],
      labels: [`device=${index}`],
      ...options,
    });
    this.nodes[index] = node;
    return node;
  }

  dataDir(index: number): Promise<string> {
    return this.#scratch.dir(`${this.#network.prefix}-${index}`);
  }

  running(): RunningShoalNode[] {
    return this.nodes.filter((node) => node !== undefined);
  }

  logs(lines = 40): Record<string, string | undefined> {
    return Object.fromEntries(this.nodes.map((node, i) => [`device-${i} log`, node?.logText(lines)]));
  }

  async killAll(): Promise<void> {
    await Promise.all(this.running().map((node) => node.kill9()));
  }
}
