#!/usr/bin/env -S node --max-semi-space-size=2
// The shoal CLI. Runs on Node >= 22.18, which executes the TypeScript sources directly.
// Blob bytes live outside the V8 heap, so a small young generation costs nothing in speed and
// keeps the daemon's RSS ~25 MB lower while it streams layers (bench/results/gateway.md).
import { enableCompileCache } from 'node:module';

// Node strips the sources' types with a WebAssembly compiler that stays resident (~17 MB of
// RSS) and recompiles every module on each start. The compile cache (in the OS temp dir, keyed
// by file contents) keeps both the stripped sources and V8's code, so a restarted daemon loads
// neither: idle RSS and start-up CPU drop (bench/results/mesh.md).
enableCompileCache();
await import('../src/cli.ts');
