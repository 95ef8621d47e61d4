export * from './mesh-host.ts';
export * from './peer-key.ts';
export * from './swarm-key.ts';
export * from './membership.ts';
export * from './membership-codec.ts';
export * from './tag-record.ts';
export * from './tag-directory.ts';
export * from './shuffle.ts';
