// fathom serve through the official `openai` npm client: the API as real clients call it.
// Run by tests/js/run.sh, which starts `fathom serve` on fathom-mini and sets FATHOM_URL and
// FATHOM_KEY. Uses node's own test runner (node --test).
import { test } from "node:test";
import assert from "node:assert/strict";
import OpenAI from "openai";

const baseURL = process.env.FATHOM_URL;
const apiKey = process.env.FATHOM_KEY;
assert.ok(baseURL && apiKey, "FATHOM_URL and FATHOM_KEY must be set (tests/js/run.sh sets them)");
const client = new OpenAI({ baseURL, apiKey, maxRetries: 0, timeout: 60_000 });
const model = "fathom-mini";
const root = baseURL.replace(/\/v1$/, "");

async function metrics() {
  const text = await (await fetch(`${root}/metrics`)).text();
  const get = (name) => Number(text.match(new RegExp(`^${name} (\\d+)$`, "m"))[1]);
  return { running: get("fathom_requests_running"), waiting: get("fathom_requests_waiting"), kv: get("fathom_kv_cache_tokens") };
}

test("models lists the model served", async () => {
  const list = await client.models.list();
  assert.deepEqual(list.data.map((m) => m.id), [model]);
});

test("chat completion, then the same streamed: the deltas add up to the same text", async () => {
  const messages = [{ role: "user", content: "What does str.split do?" }];
  const r = await client.chat.completions.create({ model, messages, max_tokens: 16, temperature: 0 });
  const text = r.choices[0].message.content;
  assert.equal(r.choices[0].message.role, "assistant");
  assert.ok(text.length > 0);
  assert.equal(r.usage.total_tokens, r.usage.prompt_tokens + r.usage.completion_tokens);
  const stream = await client.chat.completions.create({ model, messages, max_tokens: 16, temperature: 0, stream: true });
  let streamed = "";
  let finish = null;
  for await (const chunk of stream) {
    const c = chunk.choices[0];
    if (c?.delta?.content) streamed += c.delta.content;
    if (c?.finish_reason) finish = c.finish_reason;
  }
  assert.equal(streamed, text);
  assert.equal(finish, r.choices[0].finish_reason);
});

test("completions with n > 1 and a seed repeat; a stop string cuts the text", async () => {
  const req = { model, prompt: "The list type in Python", max_tokens: 12, temperature: 0.9, seed: 3, n: 3 };
  const a = await client.completions.create(req);
  const b = await client.completions.create(req);
  assert.equal(a.choices.length, 3);
  assert.deepEqual(a.choices.map((c) => c.text), b.choices.map((c) => c.text));
  const full = (await client.completions.create({ model, prompt: "The list type in Python", max_tokens: 24, temperature: 0 }))
    .choices[0].text;
  assert.ok(full.length > 10);
  const stop = full.slice(Math.floor(full.length / 2), Math.floor(full.length / 2) + 3);
  const cut = await client.completions.create({ model, prompt: "The list type in Python", max_tokens: 24, temperature: 0, stop: [stop] });
  assert.equal(cut.choices[0].finish_reason, "stop");
  assert.equal(cut.choices[0].text, full.slice(0, full.indexOf(stop)));
});

test("concurrent requests give the greedy text each gets alone", async () => {
  const prompts = ["The Linux kernel", "To create a new branch in Git,", "A dictionary maps keys", "The tar command",
                   "In Python, a generator", "The ls command"];
  const ask = (prompt) => client.completions.create({ model, prompt, max_tokens: 10, temperature: 0 }).then((r) => r.choices[0].text);
  const alone = [];
  for (const p of prompts) alone.push(await ask(p));
  const together = await Promise.all(prompts.map(ask));
  assert.deepEqual(together, alone);
});

test("errors are OpenAI errors with 4xx statuses, and the server keeps serving", async () => {
  const messages = [{ role: "user", content: "hi" }];
  const wrongKey = new OpenAI({ baseURL, apiKey: "not-the-key", maxRetries: 0 });
  await assert.rejects(wrongKey.models.list(), (e) => e instanceof OpenAI.AuthenticationError && e.status === 401);
  await assert.rejects(client.chat.completions.create({ model: "gpt-9", messages }),
                       (e) => e instanceof OpenAI.NotFoundError && /gpt-9/.test(e.message));
  for (const bad of [{ max_tokens: -1 }, { max_tokens: 1e12 }, { temperature: "hot" }, { messages: [] }, { n: 0 },
                     { stop: 5 }]) {
    await assert.rejects(client.chat.completions.create({ model, messages, ...bad }),
                         (e) => e instanceof OpenAI.BadRequestError && e.status === 400, JSON.stringify(bad));
  }
  const r = await client.chat.completions.create({ model, messages, max_tokens: 2 });
  assert.equal(r.choices.length, 1);
});

test("a stream aborted by the client frees its place in the engine", async () => {
  const controller = new AbortController();
  const stream = await client.completions.create(
    { model, prompt: "The Linux kernel", max_tokens: 2000, temperature: 0, stream: true },
    { signal: controller.signal });
  let chunks = 0;
  try {
    for await (const _ of stream) {
      if (++chunks === 3) controller.abort();  // the client ends the iteration (or throws AbortError)
    }
  } catch (e) {
    assert.equal(e.name, "APIUserAbortError", String(e));
  }
  assert.equal(chunks, 3);
  const deadline = Date.now() + 10_000;
  let m = await metrics();
  while ((m.running || m.waiting || m.kv) && Date.now() < deadline) {
    await new Promise((r) => setTimeout(r, 20));
    m = await metrics();
  }
  assert.deepEqual(m, { running: 0, waiting: 0, kv: 0 });
});
