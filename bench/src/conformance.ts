// npm run bench:conformance
//
// Runs the same OCI Distribution v1.1.1 conformance checks against a Shoal node and against the
// reference registry (docker-registry) in one run, and writes bench/results/conformance.{json,md}.
import { join } from 'node:path';
import { runConformance, type CheckResult } from '../../registry-gateway/test/conformance-checks.ts';
import { startDockerRegistry } from '../../test/helpers/docker-registry.ts';
import { startShoalNode } from '../../test/helpers/node.ts';
import { describeMachine, markdownMachine } from './machine.ts';
import { writeResults } from './shared.ts';

const OUT = new URL('../results/', import.meta.url).pathname;

const shoal = await startShoalNode();
const reference = await startDockerRegistry();
let results: { shoal: CheckResult[]; dockerRegistry: CheckResult[] };
try {
  results = { shoal: await runConformance(shoal.gatewayUrl), dockerRegistry: await runConformance(reference.url) };
} finally {
  await shoal.stop();
  await reference.stop();
}

const failed = (rs: CheckResult[]) => rs.filter((r) => !r.ok);
const machine = describeMachine();
const md = [
  '# OCI Distribution v1.1.1 conformance: Shoal vs docker-registry 2.8',
  '',
  markdownMachine(machine),
  '',
  `| registry | checks | passed | failed |`,
  '|---|---:|---:|---:|',
  `| Shoal | ${results.shoal.length} | ${results.shoal.length - failed(results.shoal).length} | ${failed(results.shoal).length} |`,
  `| docker-registry | ${results.dockerRegistry.length} | ${results.dockerRegistry.length - failed(results.dockerRegistry).length} | ${failed(results.dockerRegistry).length} |`,
  '',
  '## Checks docker-registry fails',
  '',
  ...failed(results.dockerRegistry).map((r) => `- [${r.category}] ${r.name}${r.detail ? `: ${r.detail.split('\n')[0]}` : ''}`),
  '',
  ...(failed(results.shoal).length ? ['## Checks Shoal fails', '', ...failed(results.shoal).map((r) => `- [${r.category}] ${r.name}`), ''] : []),
].join('\n');
await writeResults(OUT, { 'conformance.json': `${JSON.stringify({ machine, ...results }, null, 2)}\n`, 'conformance.md': md });
console.log(md);
