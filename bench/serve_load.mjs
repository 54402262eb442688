// Load test of fathom serve (loopback only, bounded): C concurrent streaming clients (default 64)
// through the official openai npm client, R requests in all. Each request is greedy on one of a
// set of prompts whose answers were first taken one at a time, so a lost, cut or mixed-up
// response shows as a mismatch. Reports errors, mismatches, and p50/p99 time to first token and
// inter-token latency, plus the output tokens/s of the whole run against the one-at-a-time rate
// measured in the same run (the peer). Run by scripts/bench-serve.sh, which starts the server.
//   node bench/serve_load.mjs URL [--clients 64] [--requests 256] [--max-tokens 32]
import OpenAI from "../tests/js/node_modules/openai/index.mjs";

const args = process.argv.slice(2);
const url = args[0];
const opt = (name, dflt) => { const i = args.indexOf(name); return i >= 0 ? Number(args[i + 1]) : dflt; };
const clients = opt("--clients", 64), requests = opt("--requests", 256), maxTokens = opt("--max-tokens", 32);
if (!url || !(clients >= 1 && clients <= 1024 && requests >= clients && maxTokens >= 1)) {
  console.error("usage: node bench/serve_load.mjs URL [--clients 1..1024] [--requests >= clients] [--max-tokens N]");
  process.exit(2);
}
const client = new OpenAI({ baseURL: url, apiKey: "none", maxRetries: 0, timeout: 600_000 });
const model = (await client.models.list()).data[0].id;
const topics = ["the list type", "git rebase", "the Linux kernel", "a dictionary", "the tar command", "a generator",
                "the ls command", "str.split", "the with statement", "git branch", "a tuple", "the cd command",
                "sqlite", "bash arrays", "the kernel scheduler", "a lambda"];
const prompts = topics.map((t) => `Here is what ${t} does:`);

async function run(prompt, timing) {
  const t0 = performance.now();
  let text = "", first = 0, last = 0, tokens = 0;
  const gaps = [];
  const stream = await client.completions.create({ model, prompt, max_tokens: maxTokens, temperature: 0, stream: true,
                                                  ignore_eos: true });
  for await (const chunk of stream) {
    const piece = chunk.choices[0]?.text ?? "";
    const now = performance.now();
    if (!chunk.choices[0]?.finish_reason || piece) {
      if (tokens === 0) first = now - t0; else gaps.push(now - last);
      last = now;
      tokens++;
    }
    text += piece;
  }
  if (timing) { timing.ttft.push(first); timing.itl.push(...gaps); }
  return { text, tokens };
}

// one at a time: the reference answers and the unbatched rate
const want = new Map();
let t = performance.now(), soloTokens = 0;
for (const p of prompts) { const r = await run(p); want.set(p, r.text); soloTokens += r.tokens; }
const soloRate = soloTokens / ((performance.now() - t) / 1000);

// C clients, R requests: each client takes the next request until none is left
const timing = { ttft: [], itl: [] };
let next = 0, errors = 0, mismatches = 0, tokens = 0;
t = performance.now();
await Promise.all(Array.from({ length: clients }, async () => {
  while (next < requests) {
    const p = prompts[next++ % prompts.length];
    try {
      const r = await run(p, timing);
      tokens += r.tokens;
      if (r.text !== want.get(p)) mismatches++;
    } catch (e) {
      errors++;
      console.error("request failed:", e.message);
    }
  }
}));
const secs = (performance.now() - t) / 1000;
const pct = (xs, q) => { const s = [...xs].sort((a, b) => a - b); return s.length ? s[Math.min(s.length - 1, Math.floor(q * s.length))] : NaN; };
console.log(`\n| load test: ${clients} streaming clients, ${requests} requests of ${maxTokens} tokens | value |`);
console.log("|---|---|");
console.log(`| errors / mismatched responses | ${errors} / ${mismatches} |`);
console.log(`| time to first token p50 / p99 (ms) | ${pct(timing.ttft, 0.5).toFixed(1)} / ${pct(timing.ttft, 0.99).toFixed(1)} |`);
console.log(`| inter-token latency p50 / p99 (ms) | ${pct(timing.itl, 0.5).toFixed(1)} / ${pct(timing.itl, 0.99).toFixed(1)} |`);
console.log(`| output tokens/s, all clients | ${(tokens / secs).toFixed(0)} |`);
console.log(`| output tokens/s, one request at a time (peer, same run) | ${soloRate.toFixed(0)} |`);
console.log(`| ratio | ${(tokens / secs / soloRate).toFixed(2)}x |`);
process.exit(errors || mismatches ? 1 : 0);
