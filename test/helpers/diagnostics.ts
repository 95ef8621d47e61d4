import type { SuiteContext, TestContext } from 'node:test';

/**
 * For an afterEach hook: when the test failed, attaches each section (daemon logs, client
 * requests) to its report, so a red CI run explains itself.
 */
export function explainFailure(context: TestContext | SuiteContext, sections: () => Record<string, string | undefined>): void {
  // `passed` exists on TestContext at run time but not yet in @types/node's TestContext.
  if (!('passed' in context) || context.passed || !('diagnostic' in context)) return;
  for (const [title, text] of Object.entries(sections())) {
    if (text) context.diagnostic(`${title}:\n${text}`);
  }
}
