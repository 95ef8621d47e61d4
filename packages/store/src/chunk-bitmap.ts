/** Which chunks of a blob a device holds: one bit per chunk, chunk 0 in the high bit of byte 0. */
export class ChunkBitmap {
  readonly length: number;
  readonly #bits: Uint8Array;
  #count = 0;

  constructor(length: number, bits?: Uint8Array) {
    if (!Number.isInteger(length) || length < 0) throw new RangeError(`bad chunk count ${length}`);
    this.length = length;
    const bytes = Math.ceil(length / 8);
    if (bits && bits.byteLength !== bytes) throw new RangeError(`bitmap of ${bits.byteLength} bytes for ${length} chunks`);
    this.#bits = bits ? Uint8Array.from(bits) : new Uint8Array(bytes);
    // Bits past `length` must be zero, or two bitmaps of one state would differ on the wire.
    if (length % 8 !== 0 && bytes > 0 && (this.#bits[bytes - 1]! & (0xff >> length % 8)) !== 0) {
      throw new RangeError('bitmap has bits past its last chunk');
    }
    for (let i = 0; i < length; i++) if (this.has(i)) this.#count++;
  }

  static full(length: number): ChunkBitmap {
    const bitmap = new ChunkBitmap(length);
    for (let i = 0; i < length; i++) bitmap.set(i);
    return bitmap;
  }

  /** Chunks held. */
  get count(): number {
    return this.#count;
  }

  get complete(): boolean {
    return this.#count === this.length;
  }

  has(index: number): boolean {
    if (index < 0 || index >= this.length) return false;
    return (this.#bits[index >> 3]! & (0x80 >> (index & 7))) !== 0;
  }

  set(index: number): void {
    if (!Number.isInteger(index) || index < 0 || index >= this.length) throw new RangeError(`chunk ${index} out of range`);
    if (this.has(index)) return;
    this.#bits[index >> 3]! |= 0x80 >> (index & 7);
    this.#count++;
  }

  clear(index: number): void {
    if (!this.has(index)) return;
    this.#bits[index >> 3]! &= ~(0x80 >> (index & 7));
    this.#count--;
  }

  /** A copy of the bits, for the wire or the disk. */
  toBytes(): Uint8Array {
    return Uint8Array.from(this.#bits);
  }

  clone(): ChunkBitmap {
    return new ChunkBitmap(this.length, this.#bits);
  }
}
