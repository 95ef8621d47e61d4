import { test } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { buffer } from 'node:stream/consumers';
import { parseManifest, sha256Of } from '@shoal/oci';
import { LocalRegistry, type Registry } from '@shoal/registry-gateway';
import { SwarmRegistry, type Downloader, type TagLookup } from '@shoal/swarm';
import { withFixture, type Device, type Fixture } from './fixtures/devices.ts';

const REPO = 'docker.io/library/app';

/** An image manifest over a config and one layer, all put on `device` and announced. */
async function seedImage(f: Fixture, device: Device, layer: Buffer) {
  const config = Buffer.from('{"architecture":"amd64","os":"linux"}');
  const configDigest = await f.seed(device, config);
  const layerDigest = await f.seed(device, layer);
  const bytes = Buffer.from(
    JSON.stringify({
      schemaVersion: 2,
      mediaType: 'application/vnd.oci.image.manifest.v1+json',
      config: { mediaType: 'application/vnd.oci.image.config.v1+json', digest: configDigest, size: config.length },
      layers: [{ mediaType: 'application/vnd.oci.image.layer.v1.tar', digest: layerDigest, size: layer.length }],
    }),
  );
  const manifest = parseManifest(bytes);
  await device.store.putManifest(REPO, manifest, '1');
  await f.net.directory(device.name).announce(manifest.digest);
  return { manifest, layerDigest };
}

/** Publisher of the records tagTable makes: device a, which seedImage puts the images on. */
const PUBLISHER = 'a';

/** A tag table with these tags, whose records name the blobs in `named` and carry the manifests in `carried`. */
function tagTable(entries: Record<string, string>, named: string[] = [], carried: Buffer[] = []): TagLookup {
  return {
    get: (repository, tag) => {
      const digest = entries[`${repository}:${tag}`];
      const manifest = carried.find((bytes) => sha256Of(bytes) === digest)?.toString('base64');
      return digest ? { digest, mediaType: 'application/vnd.oci.image.manifest.v1+json', publisher: PUBLISHER, ...(manifest && { manifest }) } : undefined;
    },
    recordNaming: (blob) => (named.includes(blob) ? { publisher: PUBLISHER } : undefined),
  };
}

/** `downloader`, recording the blobs of the mesh fetches started through it. */
function countingFetches(downloader: Downloader): { downloader: Downloader; fetches: string[] } {
  const fetches: string[] = [];
  const counting = new Proxy(downloader, {
    get(target, property) {
      if (property === 'fetch') return (blob: string) => (fetches.push(blob), target.fetch(blob));
      const value = Reflect.get(target, property, target);
      return typeof value === 'function' ? value.bind(target) : value;
    },
  });
  return { downloader: counting, fetches };
}

test('a tag the mesh knows resolves on a device that never saw the image, and its layer streams from the mesh', () =>
  withFixture(async (f) => {
    const a = await f.device('a');
    const layer = randomBytes(300 * 1024);
    const { manifest, layerDigest } = await seedImage(f, a, layer);
    const d = await f.device('d');
    const registry = new SwarmRegistry({
      fallback: new LocalRegistry(d.store),
      downloader: d.downloader,
      tags: tagTable({ [`${REPO}:1`]: manifest.digest }),
    });
    const got = await registry.getManifest(REPO, '1');
    assert.equal(got?.digest, manifest.digest);
    assert.deepEqual(await d.store.tags(REPO), ['1'], 'stored with its tag');
    assert.deepEqual(await registry.statBlob(REPO, layerDigest), { digest: layerDigest, size: layer.length });
    const reader = await registry.readBlob(REPO, layerDigest, { start: 10, end: 99_999 });
    assert.ok((await buffer(reader!.stream)).equals(layer.subarray(10, 100_000)));
    assert.equal(await registry.getManifest(REPO, '2'), undefined, 'an unknown tag is a miss');
    assert.equal(await registry.readBlob(REPO, sha256Of('absent')), undefined, 'no holder falls back');
  }));

test('a manifest carried in its tag record is served as is: no holder is asked, none need answer', () =>
  withFixture(async (f) => {
    const a = await f.device('a');
    const { manifest, layerDigest } = await seedImage(f, a, randomBytes(10 * 1024));
    const d = await f.device('d');
    const { downloader, fetches } = countingFetches(d.downloader);
    const registry = new SwarmRegistry({ fallback: new LocalRegistry(d.store), downloader, tags: tagTable({ [`${REPO}:1`]: manifest.digest }, [], [manifest.bytes]), retryDelayMs: 100 });
    f.net.setFault('a', 'fail');
    const got = await registry.getManifest(REPO, '1');
    assert.equal(got?.digest, manifest.digest);
    assert.ok(got?.bytes.equals(manifest.bytes));
    assert.deepEqual(fetches, [], 'the mesh was not asked for the manifest');
    assert.deepEqual(await d.store.tags(REPO), ['1'], 'stored with its tag');
    assert.equal((await registry.getManifest(REPO, manifest.digest))?.digest, manifest.digest, 'then by digest, from the store');
    // What it references counts as named, as for a fetched manifest: asked again while the holder fails.
    setTimeout(() => f.net.setFault('a', 'none'), 50);
    assert.deepEqual(await registry.statBlob(REPO, layerDigest), { digest: layerDigest, size: 10 * 1024 });
    assert.ok(fetches.length > 1, `the layer was asked ${fetches.length} time(s)`);
  }));

test('a newer mesh record for a tag wins over the tag a device already holds', () =>
  withFixture(async (f) => {
    const a = await f.device('a');
    const d = await f.device('d');
    const old = await seedImage(f, d, randomBytes(1000));
    const fresh = await seedImage(f, a, randomBytes(2000));
    const registry = new SwarmRegistry({
      fallback: new LocalRegistry(d.store),
      downloader: d.downloader,
      tags: tagTable({ [`${REPO}:1`]: fresh.manifest.digest }),
    });
    assert.notEqual(old.manifest.digest, fresh.manifest.digest);
    assert.equal((await registry.getManifest(REPO, '1'))?.digest, fresh.manifest.digest);
    assert.equal((await d.store.getManifest(REPO, '1'))?.digest, fresh.manifest.digest);
  }));

test('a manifest a tag record names is asked of the mesh again while its holder fails, before the fallback', () =>
  withFixture(async (f) => {
    const a = await f.device('a');
    const { manifest } = await seedImage(f, a, randomBytes(10 * 1024));
    const d = await f.device('d');
    const registry = new SwarmRegistry({
      fallback: new LocalRegistry(d.store),
      downloader: d.downloader,
      tags: tagTable({ [`${REPO}:1`]: manifest.digest }),
      retryDelayMs: 100,
    });
    // The holder fails (a loaded device timing out) for the first attempt, then answers.
    f.net.setFault('a', 'fail');
    setTimeout(() => f.net.setFault('a', 'none'), 50);
    assert.equal((await registry.getManifest(REPO, '1'))?.digest, manifest.digest);
    // Holders that never answer (a, and d, which now holds it too): the tag misses after every attempt, as before.
    f.net.setFault('a', 'fail');
    f.net.setFault('d', 'fail');
    const other = await f.device('e');
    const failing = new SwarmRegistry({ fallback: new LocalRegistry(other.store), downloader: other.downloader, tags: tagTable({ [`${REPO}:1`]: manifest.digest }), retryDelayMs: 10 });
    assert.equal(await failing.getManifest(REPO, '1'), undefined);
  }));

test('a blob a tag record names is asked of the mesh again while its holder fails; another is asked once', () =>
  withFixture(async (f) => {
    const a = await f.device('a');
    const { manifest, layerDigest } = await seedImage(f, a, randomBytes(10 * 1024));
    const d = await f.device('d');
    const { downloader, fetches } = countingFetches(d.downloader);
    const registry = (named: string[]) =>
      new SwarmRegistry({ fallback: new LocalRegistry(d.store), downloader, tags: tagTable({ [`${REPO}:1`]: manifest.digest }, named), retryDelayMs: 100 });

    f.net.setFault('a', 'fail');
    assert.equal(await registry([]).statBlob(REPO, layerDigest), undefined);
    assert.equal(fetches.length, 1, 'a blob no record names is asked once');

    // The holder fails (a loaded device timing out) for the first attempt, then answers.
    fetches.length = 0;
    setTimeout(() => f.net.setFault('a', 'none'), 50);
    assert.deepEqual(await registry([layerDigest]).statBlob(REPO, layerDigest), { digest: layerDigest, size: 10 * 1024 });
    assert.ok(fetches.length > 1, `a named blob was asked ${fetches.length} time(s)`);
  }));

test('where an upstream could serve it, content no record names is searched for at most upstreamAfterMs', () =>
  withFixture(async (f) => {
    // a holds the layer but answers each query 400 ms late, as a device starved of CPU does.
    const a = await f.device('a', { delayMs: 400 });
    const layer = randomBytes(10 * 1024);
    const layerDigest = await f.seed(a, layer);
    const d = await f.device('d');
    const asked: string[] = [];
    // An upstream, as MirroringRegistry is to the gateway: it would serve any blob.
    const upstream = (pullsThrough: boolean): Registry => ({
      store: d.store,
      getManifest: async () => undefined,
      statBlob: async (_repository, digest) => (asked.push(digest), { digest, size: layer.length }),
      readBlob: async () => undefined,
      pullsThrough: () => pullsThrough,
    });
    const registry = (fallback: Registry, named: string[] = []) =>
      new SwarmRegistry({ fallback, downloader: d.downloader, tags: tagTable({}, named), upstreamAfterMs: 100 });

    assert.deepEqual(await registry(upstream(true)).statBlob(REPO, layerDigest), { digest: layerDigest, size: layer.length });
    assert.deepEqual(asked, [layerDigest], 'the upstream was asked once the search ran out of time');
    assert.equal(d.downloader.get(layerDigest), undefined, 'and no mesh transfer was left running');
    assert.equal(await d.store.statBlob(layerDigest), undefined);

    // Named by a record, it is the mesh's to give: searched in full.
    asked.length = 0;
    const named = await registry(upstream(true), [layerDigest]).statBlob(REPO, layerDigest);
    assert.deepEqual(named, { digest: layerDigest, size: layer.length });
    assert.deepEqual(asked, []);
    await d.downloader.get(layerDigest)?.done;
    // Without an upstream there is nothing to turn to: searched in full too.
    const e = await f.device('e');
    const local = new SwarmRegistry({ fallback: new LocalRegistry(e.store), downloader: e.downloader, tags: tagTable({}), upstreamAfterMs: 100 });
    assert.deepEqual(await local.statBlob(REPO, layerDigest), { digest: layerDigest, size: layer.length });
  }));

test('a named blob nobody holds yet is fetched as soon as a holder is gossiped, not after the retry delay', () =>
  withFixture(async (f) => {
    const a = await f.device('a');
    const d = await f.device('d');
    const layer = randomBytes(10 * 1024);
    const layerDigest = sha256Of(layer);
    const registry = new SwarmRegistry({ fallback: new LocalRegistry(d.store), downloader: d.downloader, tags: tagTable({}, [layerDigest]), retryDelayMs: 60_000 });
    // a gets the layer (and announces it) once d's first search has come up empty.
    const firstSearch = new Promise<void>((resolve) => d.downloader.addEventListener('transfer:failed', () => resolve(), { once: true }));
    void firstSearch.then(() => f.seed(a, layer));
    const guard = new Promise<'waited'>((resolve) => setTimeout(() => resolve('waited'), 10_000).unref());
    const got = await Promise.race([registry.statBlob(REPO, layerDigest), guard]);
    assert.deepEqual(got, { digest: layerDigest, size: layer.length }, 'the gossip cut the 60 s wait short');
  }));

test('a named blob is first asked of its record\'s publisher (and holders gossip names), then of the whole mesh', () =>
  withFixture(async (f) => {
    await f.device('a');
    const d = await f.device('d');
    const blob = sha256Of('nobody has this yet');
    const { directory } = d.downloader.options;
    const searches: (string[] | undefined)[] = [];
    const findHolders = directory.findHolders.bind(directory);
    directory.findHolders = (digest, signal, likely) => (searches.push(likely), findHolders(digest, signal, likely));
    const registry = new SwarmRegistry({ fallback: new LocalRegistry(d.store), downloader: d.downloader, tags: tagTable({}, [blob]), retryDelayMs: 10 });
    assert.equal(await registry.statBlob(REPO, blob), undefined);
    assert.deepEqual(searches, [[PUBLISHER], undefined, undefined]);
  }));

test('what a manifest named by a record references is asked again too, though the record gives it no chunk index', () =>
  withFixture(async (f) => {
    // The publisher was still pulling the image through when it made the record: the record
    // names the manifest, and no chunk index for the layer.
    const a = await f.device('a');
    const { manifest, layerDigest } = await seedImage(f, a, randomBytes(10 * 1024));
    const d = await f.device('d');
    const registry = new SwarmRegistry({ fallback: new LocalRegistry(d.store), downloader: d.downloader, tags: tagTable({ [`${REPO}:1`]: manifest.digest }), retryDelayMs: 100 });
    assert.equal((await registry.getManifest(REPO, '1'))?.digest, manifest.digest);
    f.net.setFault('a', 'fail');
    setTimeout(() => f.net.setFault('a', 'none'), 50);
    assert.deepEqual(await registry.statBlob(REPO, layerDigest), { digest: layerDigest, size: 10 * 1024 });
  }));
