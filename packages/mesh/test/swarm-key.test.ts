import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { generateSwarmKey, loadSwarmKey, parseSwarmKey, SwarmKeyFormatError } from '../src/index.ts';

const HEX = 'a'.repeat(32) + '0123456789abcdef'.repeat(2);

test('generateSwarmKey gives the standard swarm.key text with a fresh 32-byte key', () => {
  const first = generateSwarmKey();
  const second = generateSwarmKey();
  assert.match(first, /^\/key\/swarm\/psk\/1\.0\.0\/\n\/base16\/\n[0-9a-f]{64}$/);
  assert.notEqual(first, second);
  assert.equal(new TextDecoder().decode(parseSwarmKey(first)), first);
});

test('parseSwarmKey accepts CRLF, a trailing newline and upper-case hex, returning the canonical form', () => {
  const parsed = parseSwarmKey(`/key/swarm/psk/1.0.0/\r\n/base16/\r\n${HEX.toUpperCase()}\r\n`);
  assert.equal(new TextDecoder().decode(parsed), `/key/swarm/psk/1.0.0/\n/base16/\n${HEX}`);
});

test('parseSwarmKey rejects malformed keys with a clear error', () => {
  const cases: [string, RegExp][] = [
    ['', /has 1 lines/],
    [`/key/swarm/psk/2.0.0/\n/base16/\n${HEX}`, /first line is "\/key\/swarm\/psk\/2\.0\.0\/"/],
    [`/key/swarm/psk/1.0.0/\n/base64/\n${HEX}`, /only base16 is supported/],
    [`/key/swarm/psk/1.0.0/\n/base16/\n${HEX.slice(2)}`, /not 64 hex digits \(62 characters\)/],
    [`/key/swarm/psk/1.0.0/\n/base16/\n${HEX.slice(1)}g`, /not 64 hex digits/],
    [`/key/swarm/psk/1.0.0/\n/base16/\n${HEX}\nextra`, /has 4 lines/],
  ];
  for (const [text, message] of cases) {
    assert.throws(() => parseSwarmKey(text), (err: Error) => err instanceof SwarmKeyFormatError && message.test(err.message));
  }
});

test('loadSwarmKey names the file in its error', async () => {
  const dir = await mkdtemp(join(tmpdir(), 'shoal-swarm-key-'));
  try {
    const good = join(dir, 'swarm.key');
    const text = generateSwarmKey();
    await writeFile(good, text + '\n');
    assert.equal(new TextDecoder().decode(await loadSwarmKey(good)), text);

    const bad = join(dir, 'bad.key');
    await writeFile(bad, 'not a key');
    await assert.rejects(loadSwarmKey(bad), (err: Error) => err instanceof SwarmKeyFormatError && err.message.startsWith(`${bad}:`));
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
});
