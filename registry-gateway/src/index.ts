export * from './registry.ts';
export { createGateway, registryGateway, DEFAULT_MAX_MANIFEST_BYTES, DEFAULT_NAMESPACE, type GatewayObserver, type GatewayOptions, type GatewayResponse } from './gateway.ts';
export { errorBody, OciError, type OciErrorBody, type OciErrorCode } from './errors.ts';
export { UpstreamClient, UpstreamError, parseChallenge, type UpstreamBlob, type UpstreamClientOptions } from './upstream.ts';
export {
  MirroringRegistry,
  type MirroringRegistryEvents,
  type MirroringRegistryOptions,
  type PullThrough,
  type PullThroughComplete,
  type PullThroughFailure,
} from './mirroring-registry.ts';
