// Validates an AsyncAPI document with the AsyncAPI Initiative's own parser
// (@asyncapi/parser, which `scripts/test` installs with npm).
// Usage: node validate_asyncapi.js <node_modules dir> < document.json
// Prints a JSON list of the parser's diagnostics ({severity, code,
// message, path}); severity 0 is an error.
const path = require("path");
const { Parser } = require(path.join(process.argv[2], "@asyncapi/parser"));

let input = "";
process.stdin.on("data", (chunk) => (input += chunk));
process.stdin.on("end", async () => {
  const { diagnostics } = await new Parser().parse(input);
  const out = diagnostics.map((d) => ({
    severity: d.severity,
    code: d.code,
    message: d.message,
    path: d.path.join("/"),
  }));
  console.log(JSON.stringify(out));
});
