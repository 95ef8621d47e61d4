import { test } from 'node:test';
import assert from 'node:assert/strict';
import { runConformance, type CheckResult } from './conformance-checks.ts';
import { startGateway } from './gateway-harness.ts';

function failures(results: CheckResult[]): string[] {
  return results.filter((r) => !r.ok).map((r) => `[${r.category}] ${r.name}: ${r.detail}`);
}

test('the gateway passes every OCI conformance check over real HTTP', async () => {
  const gateway = await startGateway();
  try {
    const results = await runConformance(gateway.url);
    const categories = new Set(results.map((r) => r.category));
    for (const category of ['pull', 'push', 'content discovery', 'content management', 'robustness']) {
      assert.ok(categories.has(category as CheckResult['category']), `no ${category} checks ran`);
    }
    assert.deepEqual(failures(results), []);
    // Everything the checks pushed went through the default namespace.
    const repositories = await gateway.store.repositories();
    assert.ok(repositories.length > 0 && repositories.every((r) => r.startsWith('docker.io/conformance-')), repositories.join());
  } finally {
    await gateway.close();
  }
});

test('the checks still pass with a push token when the client presents it', async () => {
  const gateway = await startGateway({ pushToken: 's3cret' });
  try {
    const results = await runConformance(gateway.url, { headers: { authorization: 'Bearer s3cret' } });
    assert.deepEqual(failures(results), []);
  } finally {
    await gateway.close();
  }
});

test('the checks detect a registry that breaks the spec', async () => {
  // Without the token every write is refused, so the push-dependent checks must fail.
  const gateway = await startGateway({ pushToken: 's3cret' });
  try {
    const results = await runConformance(gateway.url);
    const failed = failures(results);
    assert.ok(failed.some((f) => f.includes('[push] POST /blobs/uploads/ -> 202')), failed.join('\n'));
    assert.ok(failed.some((f) => f.includes('[pull] GET blob returns its bytes')), failed.join('\n'));
  } finally {
    await gateway.close();
  }
});
