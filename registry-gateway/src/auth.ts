import { createHash, timingSafeEqual } from 'node:crypto';

/** The challenge sent with every 401; `docker login` answers it with Basic credentials. */
export const AUTH_CHALLENGE = 'Basic realm="shoal"';

/**
 * Checks the credentials of write requests against one shared push token. Accepted forms:
 * `Bearer <token>`, or `Basic` with any user name and the token as password.
 */
export class PushTokenAuth {
  readonly #tokenHash: Buffer;

  constructor(token: string) {
    if (token === '') throw new Error('push token must not be empty');
    this.#tokenHash = hash(token);
  }

  isAuthorized(authorization: string | undefined): boolean {
    const presented = presentedToken(authorization);
    // Hashing both sides gives equal lengths, so the comparison time says nothing about the token.
    return presented !== undefined && timingSafeEqual(hash(presented), this.#tokenHash);
  }
}

function presentedToken(authorization: string | undefined): string | undefined {
  if (!authorization) return undefined;
  const space = authorization.indexOf(' ');
  if (space < 0) return undefined;
  const scheme = authorization.slice(0, space).toLowerCase();
  const value = authorization.slice(space + 1).trim();
  if (scheme === 'bearer') return value;
  if (scheme !== 'basic') return undefined;
  const decoded = Buffer.from(value, 'base64').toString('utf8');
  const colon = decoded.indexOf(':');
  return colon < 0 ? undefined : decoded.slice(colon + 1);
}

function hash(value: string): Buffer {
  return createHash('sha256').update(value).digest();
}
