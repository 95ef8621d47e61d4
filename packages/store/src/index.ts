export * from './types.ts';
export * from './errors.ts';
export * from './chunk-index.ts';
export * from './catalog.ts';
export { FsContentStore, type FsContentStoreOptions } from './fs-store.ts';
export * from './chunk-bitmap.ts';
export { chunkSpan, type PartialBlob } from './partial-blob.ts';
export { sendRange, type PositionalRead } from './file-sender.ts';
