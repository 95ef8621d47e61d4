#!/usr/bin/env -S MALLOC_ARENA_MAX=2 node --optimize-for-size
// The shoal CLI. Runs on Node >= 22.18.
// The first line is the daemon's memory budget (bench/results/gateway.md, mesh.md): blob bytes
// live outside the V8 heap, so V8 sized for memory (a 1 MiB young generation, an old generation
// that grows in small steps) costs no measurable CPU per GB and keeps ~10 MB off an idle node;
// two malloc arenas instead of one per libuv thread keep ~20 MB of freed stream buffers from
// lingering while a node serves or receives layers.
import { enableCompileCache } from 'node:module';
import { currentBundle } from './bundle.js';

// The compile cache (in the OS temp dir, keyed by file contents) keeps V8's code between
// starts, and for the sources the stripped TypeScript: a restarted daemon compiles nothing.
enableCompileCache();

// The bundle starts faster and idles smaller (node/build.ts); after an edit that was not built
// yet, the sources run directly (Node strips their types), so what runs is never stale.
await import(currentBundle(new URL('../dist/', import.meta.url))?.href ?? '../src/cli.ts');
