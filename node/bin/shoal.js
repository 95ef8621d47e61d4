#!/usr/bin/env -S MALLOC_ARENA_MAX=2 node --optimize-for-size
// The shoal CLI. Runs on Node >= 22.18, which executes the TypeScript sources directly.
// The first line is the daemon's memory budget (bench/results/gateway.md, mesh.md): blob bytes
// live outside the V8 heap, so V8 sized for memory (a 1 MiB young generation, an old generation
// that grows in small steps) costs no measurable CPU per GB and keeps ~10 MB off an idle node;
// two malloc arenas instead of one per libuv thread keep ~20 MB of freed stream buffers from
// lingering while a node serves or receives layers.
import { enableCompileCache } from 'node:module';

// Node strips the sources' types with a WebAssembly compiler that stays resident (~17 MB of
// RSS) and recompiles every module on each start. The compile cache (in the OS temp dir, keyed
// by file contents) keeps both the stripped sources and V8's code, so a restarted daemon loads
// neither: idle RSS and start-up CPU drop (bench/results/mesh.md).
enableCompileCache();
await import('../src/cli.ts');
