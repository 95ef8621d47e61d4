export * from './registry.ts';
export { UpstreamClient, UpstreamError, parseChallenge, type UpstreamBlob, type UpstreamClientOptions } from './upstream.ts';
