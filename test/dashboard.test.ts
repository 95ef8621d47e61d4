import assert from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';
import { chromium, type Browser, type Page } from 'playwright-core';
import { sha256Of } from '@shoal/oci';
import { startShoalNode, type RunningShoalNode } from './helpers/node.ts';
import { prerequisiteGate } from './helpers/prerequisites.ts';
import { pushImage } from './helpers/push.ts';
import { Scratch } from './helpers/scratch.ts';

/** Debian's chromium (`.ci/run` installs it); playwright-core brings no browser of its own. */
const CHROMIUM = '/usr/bin/chromium';
const gate = prerequisiteGate({ files: [CHROMIUM] });
/** A label as a hostile peer might send it: the page must show it as text. */
const HOSTILE_LABEL = '<img src=x onerror="window.pwned=1">';

/** Sum of every sample of one metric in a Prometheus text exposition. */
function metricSum(text: string, name: string): number {
  let total = 0;
  for (const line of text.split('\n')) {
    const match = new RegExp(`^${name}(?:\\{[^}]*\\})? (\\S+)$`).exec(line);
    if (match) total += Number(match[1]);
  }
  return total;
}

describe('the dashboard in a real browser', gate.options, () => {
  let scratch: Scratch;
  let node: RunningShoalNode;
  let browser: Browser;
  let page: Page;
  let digest: string;

  before(async () => {
    gate.check();
    scratch = await Scratch.create();
    node = await startShoalNode({ dataDir: await scratch.dir('node'), name: 'dash-node', labels: [`note=${HOSTILE_LABEL}`] });
    const layer = Buffer.alloc(256 * 1024, 7);
    ({ digest } = await pushImage(node.gatewayUrl, 'lib/dash', '2.0', layer));
    // A pull, so bytes served to clients is more than the push's small answers.
    const blob = await fetch(`${node.gatewayUrl}/v2/lib/dash/blobs/${sha256Of(layer)}`);
    assert.equal((await blob.arrayBuffer()).byteLength, layer.length);
    browser = await chromium.launch({ executablePath: CHROMIUM, headless: true });
    page = await browser.newPage();
    await page.goto(`${node.apiUrl}/`);
  });

  after(async () => {
    await browser?.close();
    await node?.stop();
    await scratch?.remove();
  });

  it("shows the node's name, peer id and gateway", async () => {
    await page.locator('#node-name', { hasText: 'dash-node' }).waitFor({ timeout: 10_000 });
    const stats = (await node.apiJson<{ node: { peerId: string } }>('/api/stats')).node;
    assert.equal(await page.locator('#node-peer-id').textContent(), stats.peerId);
    assert.equal(await page.locator('#node-gateway').textContent(), node.gatewayUrl);
  });

  it('lists the pushed image with its tag, short digest and size', async () => {
    const row = page.locator('#images tbody tr', { hasText: 'docker.io/lib/dash' });
    await row.waitFor({ timeout: 10_000 });
    const cells = await row.locator('td').allTextContents();
    assert.deepEqual(cells.slice(0, 3), ['docker.io/lib/dash', '2.0', digest.slice(0, 'sha256:'.length + 12)]);
    assert.match(cells[3]!, /^\d+(\.\d)? KiB$/);
  });

  it('shows the same gateway counters as /metrics', async () => {
    // Gateway counts land as each response's connection is done with it, so poll until both settle.
    let last = '';
    for (const deadline = Date.now() + 15_000; ; ) {
      const metrics = await (await fetch(`${node.apiUrl}/metrics`)).text();
      const expected = [metricSum(metrics, 'shoal_gateway_requests_total'), metricSum(metrics, 'shoal_gateway_sent_bytes_total')];
      const shown = await Promise.all(['#stat-gateway-requests', '#stat-bytes-served'].map((id) => page.locator(id).getAttribute('data-value')));
      last = `page ${shown.join(', ')}, /metrics ${expected.join(', ')}`;
      if (shown.map(Number).join() === expected.join() && expected[0]! >= 4) break;
      assert.ok(Date.now() < deadline, `the dashboard never matched /metrics: ${last}`);
      await new Promise((r) => setTimeout(r, 500));
    }
    // The formatted figure is what a person reads: 4 requests at least (3 pushes and the pull).
    assert.match((await page.locator('#stat-gateway-requests').textContent()) ?? '', /^\d+$/);
    assert.match((await page.locator('#stat-bytes-served').textContent()) ?? '', /^\d+(\.\d)? KiB$/);
    // A lone node probes nobody: 0, with the membership detail in its title.
    assert.equal(await page.locator('#stat-probes-unanswered').textContent(), '0');
    assert.match((await page.locator('#stat-probes-unanswered').getAttribute('title')) ?? '', /^0 answered; suspicions sent 0, received 0; heartbeats rejected 0; relays sent 0, received 0; beacon records 0$/);
  });

  it("shows a peer's labels as text, never as markup", async () => {
    const selfRow = page.locator('#peers tbody tr', { hasText: 'dash-node' });
    await selfRow.waitFor({ timeout: 10_000 });
    assert.ok((await selfRow.textContent())!.includes(`note=${HOSTILE_LABEL}`));
    assert.equal(await page.locator('#peers img').count(), 0);
    assert.equal(await page.evaluate(() => (globalThis as { pwned?: number }).pwned), undefined);
  });
});
