import { readFile } from 'node:fs/promises';
import { generateKey } from '@libp2p/pnet';

// The go-ipfs/libp2p "swarm.key" format: a header line, an encoding line and 32 key bytes in hex.
const HEADER = '/key/swarm/psk/1.0.0/';
const ENCODING = '/base16/';
const KEY_HEX = /^[0-9a-fA-F]{64}$/;
const SWARM_KEY_LENGTH = HEADER.length + 1 + ENCODING.length + 1 + 64;

export class SwarmKeyFormatError extends Error {
  override name = 'SwarmKeyFormatError';
}

/** A fresh random swarm key as swarm.key text (`/key/swarm/psk/1.0.0/\n/base16/\n<64 hex>`). */
export function generateSwarmKey(): string {
  const bytes = new Uint8Array(SWARM_KEY_LENGTH);
  generateKey(bytes);
  return new TextDecoder().decode(bytes);
}

/**
 * Validates swarm.key text and returns it in the canonical form @libp2p/pnet reads
 * (LF line ends, lower-case hex). @libp2p/pnet itself ignores the header and encoding lines,
 * so a wrong file would otherwise only show up as peers that silently cannot connect.
 * `source` names the key in error messages (e.g. its path).
 */
export function parseSwarmKey(text: string, source = 'swarm key'): Uint8Array {
  const lines = text.split(/\r?\n/);
  while (lines.length > 3 && lines.at(-1) === '') lines.pop();
  const fail = (problem: string) => {
    throw new SwarmKeyFormatError(
      `${source}: ${problem}; expected "${HEADER}", "${ENCODING}" and 64 hex digits on three lines`,
    );
  };
  if (lines.length !== 3) fail(`has ${lines.length} lines`);
  const [header, encoding, keyHex] = lines.map((line) => line.trim());
  if (header !== HEADER) fail(`first line is ${JSON.stringify(header)}`);
  if (encoding !== ENCODING) fail(`encoding line is ${JSON.stringify(encoding)} (only base16 is supported)`);
  if (!KEY_HEX.test(keyHex)) fail(`key line is not 64 hex digits (${keyHex.length} characters)`);
  return new TextEncoder().encode(`${HEADER}\n${ENCODING}\n${keyHex.toLowerCase()}`);
}

/** Reads and validates a swarm.key file; see parseSwarmKey. */
export async function loadSwarmKey(path: string): Promise<Uint8Array> {
  return parseSwarmKey(await readFile(path, 'utf8'), path);
}
