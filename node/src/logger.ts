import { pino, type Logger } from 'pino';
import { PinoPretty } from 'pino-pretty';

export type { Logger };

/**
 * JSON lines on stdout, which log shippers and the tests read; a person at a terminal gets
 * them pretty-printed instead (same content, formatted in this thread, no worker).
 */
export function createLogger(level: string, name: string): Logger {
  const options = { level, base: { node: name } };
  if (!process.stdout.isTTY) return pino(options);
  return pino(options, PinoPretty({ colorize: true, translateTime: 'SYS:HH:MM:ss.l', ignore: 'pid,hostname,node' }));
}
