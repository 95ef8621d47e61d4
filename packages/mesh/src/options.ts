import type { MeshLog } from './mesh-host.ts';

/** The default logger of the services that take one: silent. */
export const silentLog: MeshLog = { debug() {}, warn() {} };

/** `options` without its undefined entries, so spreading it over defaults keeps them. */
export function withoutUndefined<T extends object>(options: T): T {
  return Object.fromEntries(Object.entries(options).filter(([, value]) => value !== undefined)) as T;
}
