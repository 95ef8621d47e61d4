import { Hono } from 'hono';
import { MembershipFormatError, type Membership, type ServiceRegistration } from '@shoal/mesh';
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
