import { createHash, type Hash } from 'node:crypto';

/** Algorithms Shoal accepts, with the length of their hex encoding. */
const ALGORITHMS = { sha256: 64, sha512: 128 } as const;
export type DigestAlgorithm = keyof typeof ALGORITHMS;

/** A validated content digest such as `sha256:<64 hex>`. */
export interface Digest {
  readonly algorithm: DigestAlgorithm;
  readonly hex: string;
  /** The canonical `algorithm:hex` form. */
  readonly value: string;
}

export class InvalidDigestError extends Error {
  override name = 'InvalidDigestError';
}

/** Parses and validates a digest string; anything but lower-case sha256/sha512 hex is rejected. */
export function parseDigest(input: string): Digest {
  const colon = input.indexOf(':');
  if (colon < 0) throw new InvalidDigestError(`digest "${clip(input)}" has no algorithm prefix`);
  const algorithm = input.slice(0, colon);
  const hex = input.slice(colon + 1);
  if (!Object.hasOwn(ALGORITHMS, algorithm)) {
    throw new InvalidDigestError(`unsupported digest algorithm "${clip(algorithm)}" (sha256 or sha512 only)`);
  }
  const length = ALGORITHMS[algorithm as DigestAlgorithm];
  if (hex.length !== length || !/^[0-9a-f]+$/.test(hex)) {
    throw new InvalidDigestError(`${algorithm} digest must be ${length} lower-case hex characters`);
  }
  return { algorithm: algorithm as DigestAlgorithm, hex, value: input };
}

export function isDigest(input: string): boolean {
  try {
    parseDigest(input);
    return true;
  } catch {
    return false;
  }
}

/** sha256 digest of a buffer, as `sha256:<hex>`. */
export function sha256Of(data: Uint8Array | string): string {
  return `sha256:${createHash('sha256').update(data).digest('hex')}`;
}

/** Incremental digester for one algorithm. */
export class Digester {
  readonly algorithm: DigestAlgorithm;
  readonly #hash: Hash;
  #size = 0;

  constructor(algorithm: DigestAlgorithm = 'sha256', hash?: Hash) {
    this.algorithm = algorithm;
    this.#hash = hash ?? createHash(algorithm);
  }

  update(chunk: Uint8Array): void {
    this.#hash.update(chunk);
    this.#size += chunk.byteLength;
  }

  get size(): number {
    return this.#size;
  }

  /** Digest so far, without ending the running hash. */
  peek(): string {
    return `${this.algorithm}:${this.#hash.copy().digest('hex')}`;
  }

  /** An independent copy that continues from the same state. */
  copy(): Digester {
    const d = new Digester(this.algorithm, this.#hash.copy());
    d.#size = this.#size;
    return d;
  }
}

function clip(s: string): string {
  return s.length > 80 ? `${s.slice(0, 80)}...` : s;
}
