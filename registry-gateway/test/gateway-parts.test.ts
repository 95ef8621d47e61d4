import { test } from 'node:test';
import assert from 'node:assert/strict';
import { PushTokenAuth } from '../src/auth.ts';
import { parseEndpoint } from '../src/endpoints.ts';
import { resolveRange } from '../src/range.ts';

test('byte ranges follow RFC 9110: clamp past the end, ignore what is malformed, refuse what is unsatisfiable', () => {
  const size = 1000;
  assert.deepEqual(resolveRange(undefined, size), { kind: 'whole' });
  assert.deepEqual(resolveRange('bytes=0-0', size), { kind: 'partial', start: 0, end: 0 });
  assert.deepEqual(resolveRange('bytes=500-1499', size), { kind: 'partial', start: 500, end: 999 });
  assert.deepEqual(resolveRange('bytes=500-', size), { kind: 'partial', start: 500, end: 999 });
  assert.deepEqual(resolveRange('bytes=-200', size), { kind: 'partial', start: 800, end: 999 });
  assert.deepEqual(resolveRange('bytes=-5000', size), { kind: 'partial', start: 0, end: 999 });
  assert.deepEqual(resolveRange('BYTES=1-2', size), { kind: 'partial', start: 1, end: 2 });
  assert.deepEqual(resolveRange('bytes=1000-', size), { kind: 'unsatisfiable' });
  assert.deepEqual(resolveRange('bytes=5000-10000', size), { kind: 'unsatisfiable' });
  assert.deepEqual(resolveRange('bytes=-0', size), { kind: 'unsatisfiable' });
  assert.deepEqual(resolveRange('bytes=0-', 0), { kind: 'unsatisfiable' });
  assert.deepEqual(resolveRange('bytes=-1', 0), { kind: 'unsatisfiable' });
  for (const ignored of ['bytes=5-2', 'bytes=-', 'bytes=0-1,5-6', 'items=0-1', 'bytes=a-b', 'bytes 0-1', '']) {
    assert.deepEqual(resolveRange(ignored, size), { kind: 'whole' }, ignored);
  }
});

test('the push token is accepted as Bearer or as a Basic password, and nothing else', () => {
  const auth = new PushTokenAuth('t0ken');
  const basic = (user: string, pass: string) => `Basic ${Buffer.from(`${user}:${pass}`).toString('base64')}`;
  assert.equal(auth.isAuthorized('Bearer t0ken'), true);
  assert.equal(auth.isAuthorized('bearer t0ken'), true);
  assert.equal(auth.isAuthorized(basic('anyone', 't0ken')), true);
  assert.equal(auth.isAuthorized(basic('', 't0ken')), true);
  assert.equal(auth.isAuthorized(undefined), false);
  assert.equal(auth.isAuthorized(''), false);
  assert.equal(auth.isAuthorized('Bearer t0ke'), false);
  assert.equal(auth.isAuthorized('Bearer t0kenX'), false);
  assert.equal(auth.isAuthorized('t0ken'), false);
  assert.equal(auth.isAuthorized(basic('t0ken', 'wrong')), false);
  assert.equal(auth.isAuthorized(`Basic ${Buffer.from('t0ken').toString('base64')}`), false);
  assert.equal(auth.isAuthorized('Digest t0ken'), false);
  assert.throws(() => new PushTokenAuth(''));
});

test('endpoints split names on the last marker, so names may contain the markers', () => {
  assert.deepEqual(parseEndpoint('/v2/'), { kind: 'base' });
  assert.deepEqual(parseEndpoint('/v2'), { kind: 'base' });
  assert.deepEqual(parseEndpoint('/v2/_catalog'), { kind: 'catalog' });
  assert.deepEqual(parseEndpoint('/v2/library/nginx/manifests/1.27'), {
    kind: 'manifest',
    name: 'library/nginx',
    reference: '1.27',
  });
  assert.deepEqual(parseEndpoint('/v2/a/manifests/b/manifests/latest'), {
    kind: 'manifest',
    name: 'a/manifests/b',
    reference: 'latest',
  });
  assert.deepEqual(parseEndpoint('/v2/a/blobs/uploads/'), { kind: 'upload', name: 'a', uploadId: '' });
  assert.deepEqual(parseEndpoint('/v2/a/blobs/uploads/abc-123'), { kind: 'upload', name: 'a', uploadId: 'abc-123' });
  assert.deepEqual(parseEndpoint('/v2/a/blobs/x/blobs/sha256:00'), { kind: 'blob', name: 'a/blobs/x', digest: 'sha256:00' });
  assert.deepEqual(parseEndpoint('/v2/x/tags/list/tags/list'), { kind: 'tags', name: 'x/tags/list' });
  assert.deepEqual(parseEndpoint('/v2/a/b/referrers/sha256:00'), { kind: 'referrers', name: 'a/b', digest: 'sha256:00' });
  // An encoded slash stays inside one segment instead of splitting the path.
  assert.deepEqual(parseEndpoint('/v2/a/manifests/..%2f..%2findex.json'), {
    kind: 'manifest',
    name: 'a',
    reference: '..%2f..%2findex.json',
  });
  for (const unknown of ['/v2/a/manifests/', '/v2/a/manifests/x/y', '/v2/a/unknown', '/v3/a/tags/list', '/v2/a/tags/list/']) {
    assert.equal(parseEndpoint(unknown), undefined, unknown);
  }
});
