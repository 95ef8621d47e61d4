import { readFileSync } from 'node:fs';
import { Hono, type Context } from 'hono';
import { stream } from 'hono/streaming';
import type { TransferInfo } from '@shoal/swarm';
import type { PullEvent } from './puller.ts';
import { MembershipFormatError, type Membership, type ServiceRegistration, type TagRecord } from '@shoal/mesh';
import type { ContentStore } from '@shoal/store';
import { NodeMetrics } from './metrics.ts';
import type { NodeStats } from './stats.ts';

export interface ControlApiDeps {
  store: ContentStore;
  /** The membership service once it runs (it starts after the API, which it advertises). */
  membership: () => Membership | undefined;
  /** Live mesh transfers. */
  transfers: () => TransferInfo[];
  /** The mesh-wide tag table. */
  tags: () => TagRecord[];
  /** The figures a user watches, for /api/stats and /metrics. */
  stats: () => Promise<NodeStats>;
  /** Prefetches an image, yielding progress. */
  pull: (image: string) => AsyncGenerator<PullEvent>;
  /** Static facts about this node, shown by /healthz. */
  node: { name: string; version: string };
}

/** The dashboard: one page, its script and its style, shipped in node/dashboard (no build step). */
const DASHBOARD = Object.fromEntries(
  (['index.html', 'dashboard.js', 'format.js', 'dashboard.css'] as const).map((file) => [file, readFileSync(new URL(`../dashboard/${file}`, import.meta.url), 'utf8')]),
) as Record<'index.html' | 'dashboard.js' | 'format.js' | 'dashboard.css', string>;

/** The control API: small hono handlers over the node's parts. */
export function createControlApi(deps: ControlApiDeps): Hono {
  const app = new Hono();

  // The page loads only its own script and style: no inline code for a peer's string to become.
  const page = (c: Context) => c.html(DASHBOARD['index.html'], 200, { 'content-security-policy': "default-src 'self'" });
  app.get('/', page);
  app.get('/dashboard', page);
  for (const script of ['dashboard.js', 'format.js'] as const) {
    app.get(`/${script}`, (c) => c.body(DASHBOARD[script], 200, { 'content-type': 'text/javascript; charset=utf-8' }));
  }
  app.get('/dashboard.css', (c) => c.body(DASHBOARD['dashboard.css'], 200, { 'content-type': 'text/css; charset=utf-8' }));

  app.get('/healthz', (c) => c.json({ status: 'ok', name: deps.node.name, version: deps.node.version }));

  app.get('/api/images', async (c) => c.json(await deps.store.listImages()));

  app.get('/api/stats', async (c) => c.json(await deps.stats()));

  const metrics = new NodeMetrics(deps.stats);
  app.get('/metrics', async (c) => c.body(await metrics.text(), 200, { 'content-type': metrics.contentType }));

  app.get('/api/transfers', (c) => c.json(deps.transfers()));

  app.get('/api/tags', (c) => c.json(deps.tags()));

  // Progress as NDJSON lines, so `shoal pull` can draw bars while the pull runs.
  app.post('/api/pull', async (c) => {
    const body = (await c.req.json().catch(() => undefined)) as { image?: unknown } | undefined;
    if (typeof body?.image !== 'string' || body.image === '') return c.json({ error: 'expected {"image": "name[:tag|@digest]"}' }, 400);
    const image = body.image;
    c.header('Content-Type', 'application/x-ndjson');
    return stream(c, async (out) => {
      try {
        for await (const event of deps.pull(image)) await out.write(`${JSON.stringify(event)}\n`);
      } catch (err) {
        await out.write(`${JSON.stringify({ type: 'error', message: (err as Error).message } satisfies PullEvent)}\n`);
      }
    });
  });

  app.get('/api/peers', (c) => c.json(deps.membership()?.list() ?? []));

  app.get('/api/services', (c) => c.json(deps.membership()?.services(c.req.query('name') || undefined) ?? []));

  app.post('/api/services', async (c) => {
    const membership = deps.membership();
    if (!membership) return c.json({ error: 'the mesh is not running yet' }, 503);
    const body: unknown = await c.req.json().catch(() => undefined);
    if (typeof body !== 'object' || body === null || Array.isArray(body)) {
      return c.json({ error: 'expected a JSON object: {name, port | url, protocol?, meta?, ttlMs?}' }, 400);
    }
    try {
      membership.registerService(body as ServiceRegistration);
    } catch (err) {
      if (err instanceof MembershipFormatError || err instanceof RangeError) return c.json({ error: err.message }, 400);
      throw err;
    }
    const self = membership.list().find((m) => m.self)?.peerId;
    const mine = membership.services((body as ServiceRegistration).name).filter((s) => s.peerId === self);
    return c.json(mine, 201);
  });

  app.delete('/api/services/:name', (c) => {
    const membership = deps.membership();
    if (!membership) return c.json({ error: 'the mesh is not running yet' }, 503);
    return membership.deregisterService(c.req.param('name')) ? c.body(null, 204) : c.json({ error: 'no such service on this device' }, 404);
  });

  app.notFound((c) => c.json({ error: `no such endpoint: ${c.req.method} ${c.req.path}` }, 404));
  app.onError((err, c) => c.json({ error: err.message }, 500));
  return app;
}
