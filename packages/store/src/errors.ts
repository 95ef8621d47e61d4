export class DigestMismatchError extends Error {
  override name = 'DigestMismatchError';
  readonly expected: string;
  readonly actual: string;
  constructor(expected: string, actual: string) {
    super(`content digest ${actual} does not match ${expected}`);
    this.expected = expected;
    this.actual = actual;
  }
}

export class UploadBusyError extends Error {
  override name = 'UploadBusyError';
  constructor() {
    super('another request is writing to this upload');
  }
}

export class RangeNotSatisfiableError extends Error {
  override name = 'RangeNotSatisfiableError';
  readonly size: number;
  constructor(size: number) {
    super(`range not satisfiable for a blob of ${size} bytes`);
    this.size = size;
  }
}

/** A chunk's bytes do not hash to what the chunk index says. */
export class ChunkMismatchError extends Error {
  override name = 'ChunkMismatchError';
  readonly blob: string;
  readonly index: number;
  constructor(blob: string, index: number) {
    super(`chunk ${index} of ${blob} does not match its chunk index`);
    this.blob = blob;
    this.index = index;
  }
}
