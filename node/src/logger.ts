import { pino, type Logger } from 'pino';

export type { Logger };

/** JSON lines on stdout: what log shippers and the tests read. */
export function createLogger(level: string, name: string): Logger {
  return pino({ level, base: { node: name } });
}
