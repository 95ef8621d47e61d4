import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { FastifyInstance, FastifyServerOptions } from 'fastify';
import { FsContentStore } from '@shoal/store';
import { createGateway, LocalRegistry, type GatewayOptions, type Registry } from '@shoal/registry-gateway';

export interface RunningGateway {
  /** `http://127.0.0.1:<port>` */
  url: string;
  port: number;
  app: FastifyInstance;
  store: FsContentStore;
  /** The temp directory holding the store (`<dir>/data`) and whatever else a test puts beside it. */
  dir: string;
  close(): Promise<void>;
}

export interface HarnessOptions extends Omit<GatewayOptions, 'registry'> {
  logger?: FastifyServerOptions['logger'];
  /** Wraps the store's LocalRegistry, e.g. to inject faults. */
  registry?: (store: FsContentStore) => Registry;
}

/** Starts a real gateway on 127.0.0.1 (random port) over an FsContentStore in a fresh temp dir. */
export async function startGateway(opts: HarnessOptions = {}): Promise<RunningGateway> {
  const dir = await mkdtemp(join(tmpdir(), 'shoal-gateway-'));
  const store = await FsContentStore.open({ dir: join(dir, 'data') });
  const { registry: makeRegistry, ...gatewayOptions } = opts;
  const app = await createGateway({
    ...gatewayOptions,
    registry: makeRegistry ? makeRegistry(store) : new LocalRegistry(store),
  });
  await app.listen({ host: '127.0.0.1', port: 0 });
  const address = app.server.address();
  if (address === null || typeof address === 'string') throw new Error('gateway has no TCP address');
  return {
    url: `http://127.0.0.1:${address.port}`,
    port: address.port,
    app,
    store,
    dir,
    async close() {
      await app.close();
      await store.close();
      await rm(dir, { recursive: true, force: true });
    },
  };
}
