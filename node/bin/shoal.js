#!/usr/bin/env node
// The shoal CLI. Runs on Node >= 22.18, which executes the TypeScript sources directly.
import '../src/cli.ts';
