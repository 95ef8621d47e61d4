export * from './types.ts';
export * from './downloader.ts';
export * from './transfer.ts';
export * from './store-source.ts';
export * from './memory.ts';
export * from './mesh-directory.ts';
export * from './swarm-registry.ts';
export * from './publisher.ts';
export {
  CHUNK_PROTOCOL,
  ChunkBusyError,
  ChunkPeerError,
  ChunkProtocolError,
  ChunkStallError,
  chunkLength,
  MAX_CHUNK_BYTES,
  MAX_HEADER_FRAME_BYTES,
  MAX_RANGE_BYTES,
  MAX_REQUEST_FRAME_BYTES,
  type ChunkRequest,
} from './chunk-protocol.ts';
export * from './chunk-server.ts';
export * from './libp2p-transport.ts';
export * from './data-plane.ts';
export * from './data-plane-client.ts';
export * from './upload-ledger.ts';
