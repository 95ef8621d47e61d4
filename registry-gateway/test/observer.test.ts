import { test } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { setTimeout as sleep } from 'node:timers/promises';
import { sha256Of } from '@shoal/oci';
import type { GatewayResponse } from '@shoal/registry-gateway';
import { startGateway } from './gateway-harness.ts';

test('the observer hears of every response: its endpoint, method, status and the bytes sent', async () => {
  const seen: GatewayResponse[] = [];
  const gw = await startGateway({ observer: { onResponse: (r) => seen.push(r) } });
  try {
    const blob = randomBytes(3 * 1024 * 1024 + 17);
    const digest = sha256Of(blob);
    assert.equal((await fetch(`${gw.url}/v2/lib/app/blobs/uploads/?digest=${digest}`, { method: 'POST', body: blob })).status, 201);
    const got = await fetch(`${gw.url}/v2/lib/app/blobs/${digest}`);
    assert.equal(Buffer.from(await got.arrayBuffer()).length, blob.length);
    assert.equal((await fetch(`${gw.url}/v2/lib/app/manifests/missing`, { method: 'HEAD' })).status, 404);
    assert.equal((await fetch(`${gw.url}/elsewhere`)).status, 404);
    // 'close' comes after the client has read the body.
    for (let i = 0; seen.length < 4 && i < 100; i++) await sleep(10);

    const [upload, blobGet, manifestHead, unknown] = seen;
    assert.deepEqual({ ...upload, bytes: 0 }, { kind: 'upload', method: 'POST', status: 201, bytes: 0 });
    assert.deepEqual({ ...blobGet, bytes: 0 }, { kind: 'blob', method: 'GET', status: 200, bytes: 0 });
    // The body and its headers, nothing of the other responses on the same connection.
    assert.ok(blobGet!.bytes > blob.length && blobGet!.bytes < blob.length + 1024, `blob GET counted ${blobGet!.bytes} bytes`);
    assert.ok(upload!.bytes > 0 && upload!.bytes < 1024, `upload counted ${upload!.bytes} bytes`);
    assert.deepEqual({ ...manifestHead, bytes: 0 }, { kind: 'manifest', method: 'HEAD', status: 404, bytes: 0 });
    assert.deepEqual({ ...unknown, bytes: 0 }, { kind: 'unknown', method: 'GET', status: 404, bytes: 0 });
    assert.equal(seen.length, 4);
  } finally {
    await gw.close();
  }
});

test('every response is logged once, a blob sent from its file and one the client left early included', async () => {
  const lines: { reqId?: string; msg?: string; req?: { url?: string } }[] = [];
  const gw = await startGateway({ logger: { level: 'info', stream: { write: (line: string) => void lines.push(JSON.parse(line)) } } });
  try {
    const blob = randomBytes(8 * 1024 * 1024);
    const digest = sha256Of(blob);
    assert.equal((await fetch(`${gw.url}/v2/lib/app/blobs/uploads/?digest=${digest}`, { method: 'POST', body: blob })).status, 201);
    assert.equal(Buffer.from(await (await fetch(`${gw.url}/v2/lib/app/blobs/${digest}`)).arrayBuffer()).length, blob.length);
    const abort = new AbortController();
    const left = await fetch(`${gw.url}/v2/lib/app/blobs/${digest}`, { signal: abort.signal });
    await left.body!.getReader().read();
    abort.abort();
    const blobRequests = () => lines.filter((l) => l.msg === 'incoming request' && l.req?.url?.includes('/blobs/sha256:')).map((l) => l.reqId);
    const completions = (reqId: string | undefined) => lines.filter((l) => l.reqId === reqId && l.msg === 'request completed').length;
    for (let i = 0; completions(blobRequests()[1]) === 0 && i < 100; i++) await sleep(10);
    await sleep(50);
    assert.equal(blobRequests().length, 2);
    assert.deepEqual(blobRequests().map(completions), [1, 1]);
  } finally {
    await gw.close();
  }
});
