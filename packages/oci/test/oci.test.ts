import { test } from 'node:test';
import assert from 'node:assert/strict';
import {
  canonicalRepository,
  InvalidDigestError,
  InvalidManifestError,
  InvalidReferenceError,
  isValidName,
  isValidTag,
  parseDigest,
  parseManifest,
  parseReference,
  referencedBlobs,
  sha256Of,
} from '@shoal/oci';

const HEX64 = 'a'.repeat(64);

test('digests: sha256 and sha512 accepted, anything else rejected with a reason', () => {
  assert.equal(parseDigest(`sha256:${HEX64}`).hex, HEX64);
  assert.equal(parseDigest(`sha512:${'b'.repeat(128)}`).algorithm, 'sha512');
  for (const bad of ['sha256:abc', `md5:${HEX64}`, HEX64, `sha256:${HEX64.toUpperCase()}`, `sha512:${HEX64}`, '']) {
    assert.throws(() => parseDigest(bad), InvalidDigestError, bad);
  }
});

test('names and tags follow the distribution grammar', () => {
  for (const ok of ['a', 'library/busybox', 'a.b/c__d/e-f', 'x--y']) assert.ok(isValidName(ok), ok);
  for (const bad of ['A', '../x', 'a//b', '/a', 'a/', 'a..b', '-a', 'a_']) assert.ok(!isValidName(bad), bad);
  assert.ok(isValidTag('v1.0_rc-2'));
  assert.ok(!isValidTag('.hidden'));
  assert.ok(!isValidTag('x'.repeat(129)));
});

test('references split registry, name, tag and digest', () => {
  assert.deepEqual(parseReference('busybox'), { name: 'busybox' });
  assert.deepEqual(parseReference('127.0.0.1:5000/lib/app:1'), { registry: '127.0.0.1:5000', name: 'lib/app', tag: '1' });
  assert.deepEqual(parseReference('localhost/app'), { registry: 'localhost', name: 'app' });
  assert.deepEqual(parseReference(`ghcr.io/x/y@sha256:${HEX64}`), { registry: 'ghcr.io', name: 'x/y', digest: `sha256:${HEX64}` });
  assert.throws(() => parseReference('Bad/Name'), InvalidReferenceError);
  assert.throws(() => parseReference('app@sha256:zz'), InvalidReferenceError);
});

test('one-part Docker Hub names live under library/, other registries keep names as given', () => {
  assert.equal(canonicalRepository('docker.io', 'app'), 'docker.io/library/app');
  assert.equal(canonicalRepository('docker.io', 'lib/app'), 'docker.io/lib/app');
  assert.equal(canonicalRepository('ghcr.io', 'app'), 'ghcr.io/app');
});

test('manifest parsing keeps the exact bytes and lists what they reference', () => {
  const text = `{"schemaVersion":2,  "mediaType":"application/vnd.oci.image.manifest.v1+json",
    "config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:${HEX64}","size":2},
    "layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"sha256:${'c'.repeat(64)}","size":5}],
    "subject":{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:${'d'.repeat(64)}","size":9}}`;
  const bytes = Buffer.from(text);
  const m = parseManifest(bytes, 'application/vnd.oci.image.manifest.v1+json');
  assert.equal(m.bytes, bytes);
  assert.equal(m.digest, sha256Of(bytes));
  assert.equal(m.kind, 'manifest');
  assert.equal(m.subject?.digest, `sha256:${'d'.repeat(64)}`);
  assert.deepEqual(referencedBlobs(m).map((d) => d.size), [2, 5]);
});

test('malformed manifests are refused with a reason', () => {
  const bad = [
    'not json',
    '[]',
    '{"schemaVersion":1}',
    '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","layers":[]}',
    `{"schemaVersion":2,"config":{"mediaType":"x","digest":"sha256:zz","size":1},"layers":[]}`,
    `{"schemaVersion":2,"config":{"mediaType":"x","digest":"sha256:${HEX64}","size":-1},"layers":[]}`,
  ];
  for (const b of bad) assert.throws(() => parseManifest(Buffer.from(b)), InvalidManifestError, b);
  const docker = `{"schemaVersion":2,"mediaType":"application/vnd.docker.distribution.manifest.v2+json","config":{"mediaType":"x","digest":"sha256:${HEX64}","size":1},"layers":[]}`;
  assert.throws(() => parseManifest(Buffer.from(docker), 'application/vnd.oci.image.manifest.v1+json'), /does not match/);
});
