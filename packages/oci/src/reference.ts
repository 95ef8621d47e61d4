import { parseDigest } from './digest.ts';

// Grammar from the OCI Distribution Spec v1.1.1.
const NAME_COMPONENT = '[a-z0-9]+(?:(?:\\.|_|__|-+)[a-z0-9]+)*';
const NAME_RE = new RegExp(`^${NAME_COMPONENT}(?:/${NAME_COMPONENT})*$`);
const TAG_RE = /^[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}$/;
// A registry host: a DNS name or IPv4 with an optional port, or a bracketed IPv6 literal.
const REGISTRY_RE = /^(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)*|\[[0-9a-fA-F:.]+\])(?::[0-9]{1,5})?$/;

/** Names longer than this are refused (the reference registry uses the same bound). */
export const MAX_NAME_LENGTH = 255;

export class InvalidReferenceError extends Error {
  override name = 'InvalidReferenceError';
}

export function isValidName(name: string): boolean {
  return name.length <= MAX_NAME_LENGTH && NAME_RE.test(name);
}

export function isValidTag(tag: string): boolean {
  return TAG_RE.test(tag);
}

export function isValidRegistry(registry: string): boolean {
  return registry.length <= 255 && REGISTRY_RE.test(registry);
}

/** `[registry/]name[:tag][@digest]`, as users type it. */
export interface ImageReference {
  registry?: string;
  name: string;
  tag?: string;
  digest?: string;
}

/**
 * Parses an image reference. The first path component is taken as a registry when it
 * contains a dot or colon or is `localhost` (the rule Docker and containerd use).
 */
export function parseReference(input: string): ImageReference {
  let rest = input;
  let digest: string | undefined;
  const at = rest.indexOf('@');
  if (at >= 0) {
    digest = parseDigestForReference(rest.slice(at + 1));
    rest = rest.slice(0, at);
  }
  let registry: string | undefined;
  const slash = rest.indexOf('/');
  if (slash > 0) {
    const first = rest.slice(0, slash);
    if (first.includes('.') || first.includes(':') || first === 'localhost' || first.startsWith('[')) {
      if (!isValidRegistry(first)) throw new InvalidReferenceError(`invalid registry "${first}"`);
      registry = first;
      rest = rest.slice(slash + 1);
    }
  }
  let tag: string | undefined;
  const colon = rest.lastIndexOf(':');
  if (colon >= 0) {
    tag = rest.slice(colon + 1);
    rest = rest.slice(0, colon);
    if (!isValidTag(tag)) throw new InvalidReferenceError(`invalid tag "${tag}"`);
  }
  if (!isValidName(rest)) throw new InvalidReferenceError(`invalid repository name "${rest}"`);
  const ref: ImageReference = { name: rest };
  if (registry !== undefined) ref.registry = registry;
  if (tag !== undefined) ref.tag = tag;
  if (digest !== undefined) ref.digest = digest;
  return ref;
}

export function formatReference(ref: ImageReference): string {
  let out = ref.registry ? `${ref.registry}/${ref.name}` : ref.name;
  if (ref.tag) out += `:${ref.tag}`;
  if (ref.digest) out += `@${ref.digest}`;
  return out;
}

function parseDigestForReference(s: string): string {
  try {
    return parseDigest(s).value;
  } catch (err) {
    throw new InvalidReferenceError((err as Error).message);
  }
}

/**
 * The store's name for a repository: its registry namespace, then its path, with Docker Hub's
 * convention that a one-part name lives under `library/`. So `docker push 127.0.0.1:5000/app`
 * (no ns, default docker.io) and kubelet's `app:1` (containerd asks for `library/app` with
 * `ns=docker.io`) name the same repository.
 */
export function canonicalRepository(namespace: string, name: string): string {
  const path = namespace === 'docker.io' && !name.includes('/') ? `library/${name}` : name;
  return `${namespace}/${path}`;
}
