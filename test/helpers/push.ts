import assert from 'node:assert/strict';
import { sha256Of } from '@shoal/oci';

export interface PushedImage {
  /** The manifest's digest. */
  digest: string;
  config: Buffer;
  layer: Buffer;
}

/**
 * Pushes a small image (config + one layer + manifest) with plain HTTP, as any client would.
 * `layer` defaults to a few bytes; pass a bigger one to move real traffic.
 */
export async function pushImage(gateway: string, name: string, tag: string, layer = Buffer.from('not really a tarball, but a blob all the same')): Promise<PushedImage> {
  const config = Buffer.from('{"architecture":"amd64","os":"linux"}');
  for (const blob of [config, layer]) {
    const res = await fetch(`${gateway}/v2/${name}/blobs/uploads/?digest=${sha256Of(blob)}`, { method: 'POST', body: blob });
    assert.equal(res.status, 201, await res.text());
  }
  const manifest = Buffer.from(
    JSON.stringify({
      schemaVersion: 2,
      mediaType: 'application/vnd.oci.image.manifest.v1+json',
      config: { mediaType: 'application/vnd.oci.image.config.v1+json', digest: sha256Of(config), size: config.length },
      layers: [{ mediaType: 'application/vnd.oci.image.layer.v1.tar', digest: sha256Of(layer), size: layer.length }],
    }),
  );
  const res = await fetch(`${gateway}/v2/${name}/manifests/${tag}`, {
    method: 'PUT',
    headers: { 'content-type': 'application/vnd.oci.image.manifest.v1+json' },
    body: manifest,
  });
  assert.equal(res.status, 201, await res.text());
  return { digest: sha256Of(manifest), config, layer };
}
