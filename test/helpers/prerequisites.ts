import { accessSync, constants } from 'node:fs';
import { delimiter, join } from 'node:path';

export interface Prerequisites {
  /** Executables that must be on PATH. */
  commands?: string[];
  /** Files that must exist (e.g. /bin/busybox from busybox-static). */
  files?: string[];
  /** Whether the suite needs root (dockerd, containerd). */
  root?: boolean;
}

/** The absolute path of an executable on PATH, or undefined. */
export function findExecutable(name: string): string | undefined {
  for (const dir of (process.env.PATH ?? '').split(delimiter)) {
    if (!dir) continue;
    const candidate = join(dir, name);
    try {
      accessSync(candidate, constants.X_OK);
      return candidate;
    } catch {
      // not in this directory
    }
  }
  return undefined;
}

function fileExists(path: string): boolean {
  try {
    accessSync(path, constants.R_OK);
    return true;
  } catch {
    return false;
  }
}

/** Why the prerequisites are not met, or undefined when they are. */
export function missingPrerequisites(required: Prerequisites): string | undefined {
  const missing: string[] = [];
  for (const command of required.commands ?? []) {
    if (!findExecutable(command)) missing.push(`command ${command} not on PATH`);
  }
  for (const file of required.files ?? []) {
    if (!fileExists(file)) missing.push(`file ${file} missing`);
  }
  if (required.root && process.getuid?.() !== 0) missing.push('must run as root');
  return missing.length ? missing.join('; ') : undefined;
}

export interface PrerequisiteGate {
  /** Options for describe(): a skip with the reason, except under CI. */
  options: { skip?: string };
  /** Call first in the suite's before hook: under CI a missing prerequisite fails the suite. */
  check(): void;
}

/**
 * A missing prerequisite skips the suite on a developer machine but fails it when CI is set,
 * so CI never goes green without having run the real clients.
 */
export function prerequisiteGate(required: Prerequisites): PrerequisiteGate {
  const reason = missingPrerequisites(required);
  const underCi = Boolean(process.env.CI);
  return {
    options: reason && !underCi ? { skip: reason } : {},
    check() {
      if (reason) throw new Error(`e2e prerequisites missing under CI: ${reason}`);
    },
  };
}
