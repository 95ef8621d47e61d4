import { execFile } from 'node:child_process';

export interface RunOptions {
  env?: NodeJS.ProcessEnv;
  cwd?: string;
  /** Milliseconds before the command is killed; default 60 s. */
  timeoutMs?: number;
  /** Written to the command's standard input (e.g. a password for --password-stdin). */
  input?: string;
}

export interface RunResult {
  stdout: string;
  stderr: string;
}

/** A command that failed, with everything it printed so the test failure explains itself. */
export class CommandError extends Error {
  readonly exitCode: number | null;
  readonly stdout: string;
  readonly stderr: string;

  constructor(commandLine: string, exitCode: number | null, signal: string | null, stdout: string, stderr: string) {
    const status = signal ? `killed by ${signal}` : `exit code ${exitCode}`;
    super(`${commandLine}\n  ${status}\n  stderr: ${stderr.trim()}\n  stdout: ${stdout.trim()}`);
    this.name = 'CommandError';
    this.exitCode = exitCode;
    this.stdout = stdout;
    this.stderr = stderr;
  }
}

/** Runs a command to completion; rejects with a CommandError on a non-zero exit or timeout. */
export function run(command: string, args: string[], options: RunOptions = {}): Promise<RunResult> {
  const commandLine = [command, ...args].join(' ');
  return new Promise((resolve, reject) => {
    const child = execFile(
      command,
      args,
      {
        env: options.env ?? process.env,
        cwd: options.cwd,
        timeout: options.timeoutMs ?? 60_000,
        killSignal: 'SIGKILL',
        maxBuffer: 64 * 1024 * 1024,
        encoding: 'utf8',
      },
      (error, stdout, stderr) => {
        if (!error) return resolve({ stdout, stderr });
        const exitCode = typeof error.code === 'number' ? error.code : null;
        const signal = error.signal ?? null;
        reject(new CommandError(commandLine, exitCode, signal, stdout, stderr));
      },
    );
    child.stdin?.end(options.input);
  });
}

/** Runs a command that is expected to fail; resolves with its error, rejects if it succeeded. */
export async function runExpectingFailure(command: string, args: string[], options: RunOptions = {}): Promise<CommandError> {
  try {
    const { stdout, stderr } = await run(command, args, options);
    throw new Error(`expected ${[command, ...args].join(' ')} to fail, but it succeeded\n  stdout: ${stdout}\n  stderr: ${stderr}`);
  } catch (error) {
    if (error instanceof CommandError) return error;
    throw error;
  }
}
