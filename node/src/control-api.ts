import { Hono } from 'hono';
import type { Membership } from '@shoal/mesh';
import type { ContentStore } from '@shoal/store';

export interface ControlApiDeps {
  store: ContentStore;
  /** The membership service once it runs (it starts after the API, which it advertises). */
  membership: () => Membership | undefined;
  /** Static facts about this node, shown by /healthz. */
  node: { name: string; version: string };
}

/** The control API: small hono handlers over the node's parts. */
export function createControlApi(deps: ControlApiDeps): Hono {
  const app = new Hono();

  app.get('/healthz', (c) => c.json({ status: 'ok', name: deps.node.name, version: deps.node.version }));

  app.get('/api/images', async (c) => c.json(await deps.store.listImages()));

  app.get('/api/peers', (c) => c.json(deps.membership()?.list() ?? []));

  app.notFound((c) => c.json({ error: `no such endpoint: ${c.req.method} ${c.req.path}` }, 404));
  app.onError((err, c) => c.json({ error: err.message }, 500));
  return app;
}
