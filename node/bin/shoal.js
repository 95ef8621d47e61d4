#!/usr/bin/env -S node --max-semi-space-size=2
// The shoal CLI. Runs on Node >= 22.18, which executes the TypeScript sources directly.
// Blob bytes live outside the V8 heap, so a small young generation costs nothing in speed and
// keeps the daemon's RSS ~25 MB lower while it streams layers (bench/results/gateway.md).
import '../src/cli.ts';
