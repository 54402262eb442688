// The chat page `fathom serve` answers GET / with (see web_page.h): one HTML document, its style
// and script inline, no external resource, so it works on a machine without the internet.
#include "serve/web_page.h"

namespace fathom::serve {

std::string_view chat_page_html() {
  // The script talks to the server's own /v1/chat/completions with stream: true, reads the
  // Server-Sent Events from the response body as they arrive, and appends each delta: content to
  // the answer, reasoning_content to a collapsible "Reasoning" block above it. Stop aborts the
  // fetch (the server then cancels the request). The conversation lives in the page (and in
  // sessionStorage, so a reload keeps it); "New chat" clears it. Text is inserted as text, never
  // as HTML.
  static const char* const kPage = R"page(<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>fathom chat</title>
<style>
  :root { color-scheme: light dark; --fg: #1d1d1f; --bg: #fafafa; --muted: #6b6b70; --me: #e4efff; --line: #d8d8dc; }
  @media (prefers-color-scheme: dark) { :root { --fg: #e8e8ea; --bg: #18181a; --muted: #9a9aa0; --me: #22324a; --line: #34343a; } }
  * { box-sizing: border-box; }
  body { margin: 0; font: 15px/1.5 system-ui, sans-serif; color: var(--fg); background: var(--bg);
         display: flex; flex-direction: column; height: 100vh; }
  header { display: flex; gap: .75rem; align-items: center; padding: .6rem 1rem; border-bottom: 1px solid var(--line); }
  header h1 { font-size: 1rem; margin: 0; }
  header .model { color: var(--muted); font-size: .85rem; }
  header .spacer { flex: 1; }
  header input { width: 12rem; }
  #log { flex: 1; overflow-y: auto; padding: 1rem; display: flex; flex-direction: column; gap: .8rem; }
  .msg { max-width: 52rem; white-space: pre-wrap; word-wrap: break-word; padding: .55rem .8rem; border-radius: .6rem; }
  .user { align-self: flex-end; background: var(--me); }
  .assistant { align-self: flex-start; border: 1px solid var(--line); }
  .assistant details { color: var(--muted); font-size: .9rem; margin-bottom: .4rem; }
  .assistant details summary { cursor: pointer; }
  .error { color: #c0392b; }
  .meta { color: var(--muted); font-size: .8rem; }
  form { display: flex; gap: .5rem; padding: .75rem 1rem; border-top: 1px solid var(--line); }
  textarea { flex: 1; resize: vertical; min-height: 2.6rem; max-height: 12rem; font: inherit; padding: .45rem; }
  button { font: inherit; padding: .4rem .9rem; }
</style>
</head>
<body>
<header>
  <h1>fathom chat</h1><span class="model" id="model">…</span><span class="spacer"></span>
  <input id="key" type="password" placeholder="API key (if the server needs one)" autocomplete="off">
  <button id="new" type="button">New chat</button>
</header>
<main id="log" aria-live="polite"></main>
<form id="form">
  <textarea id="input" placeholder="Ask something… (Enter sends, Shift+Enter for a new line)" rows="2"></textarea>
  <button id="send" type="submit">Send</button>
  <button id="stop" type="button" disabled>Stop</button>
</form>
<script>
"use strict";
const log = document.getElementById("log"), input = document.getElementById("input");
const sendBtn = document.getElementById("send"), stopBtn = document.getElementById("stop");
const keyInput = document.getElementById("key");
let model = null, controller = null;
// Optional knobs in the page's address: ?max_tokens=N&ignore_eos=1 (tests use them for long answers)
const params = new URLSearchParams(location.search);
let conversation = JSON.parse(sessionStorage.getItem("fathom-chat") || "[]");
keyInput.value = localStorage.getItem("fathom-key") || "";
keyInput.addEventListener("change", () => localStorage.setItem("fathom-key", keyInput.value));

function headers() {
  const h = { "Content-Type": "application/json" };
  if (keyInput.value) h["Authorization"] = "Bearer " + keyInput.value;
  return h;
}
function save() { sessionStorage.setItem("fathom-chat", JSON.stringify(conversation)); }
function bubble(role) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  log.appendChild(div);
  return div;
}
function render(msg) {
  const div = bubble(msg.role);
  if (msg.role === "assistant") {
    const parts = assistantParts(div);
    if (msg.reasoning) { parts.details.hidden = false; parts.reasoning.textContent = msg.reasoning; }
    parts.content.textContent = msg.content;
  } else {
    div.textContent = msg.content;
  }
}
function assistantParts(div) {
  const details = document.createElement("details");
  details.hidden = true;
  const summary = document.createElement("summary");
  summary.textContent = "Reasoning";
  const reasoning = document.createElement("div");
  details.append(summary, reasoning);
  const content = document.createElement("div");
  content.className = "content";
  const meta = document.createElement("div");
  meta.className = "meta";
  div.append(details, content, meta);
  return { details, reasoning, content, meta };
}
function busy(on) { sendBtn.disabled = on; stopBtn.disabled = !on; }

async function loadModel() {
  try {
    const r = await fetch("/v1/models", { headers: headers() });
    const j = await r.json();
    if (!r.ok) throw new Error(j.error ? j.error.message : r.statusText);
    model = j.data[0].id;
    document.getElementById("model").textContent = model;
  } catch (e) {
    document.getElementById("model").textContent = "(models: " + e.message + ")";
  }
}

async function send(text) {
  conversation.push({ role: "user", content: text });
  save();
  render(conversation[conversation.length - 1]);
  const div = bubble("assistant");
  const parts = assistantParts(div);
  const answer = { role: "assistant", content: "", reasoning: "" };
  controller = new AbortController();
  busy(true);
  const started = performance.now();
  let tokens = 0, finish = "";
  try {
    const body = { messages: conversation.map(m => ({ role: m.role, content: m.content })), stream: true };
    if (model) body.model = model;
    if (params.get("max_tokens")) body.max_tokens = Number(params.get("max_tokens"));
    if (params.get("ignore_eos") === "1") body.ignore_eos = true;
    const r = await fetch("/v1/chat/completions", { method: "POST", headers: headers(), body: JSON.stringify(body),
                                                    signal: controller.signal });
    if (!r.ok) {
      const j = await r.json().catch(() => ({}));
      throw new Error(j.error ? j.error.message : r.status + " " + r.statusText);
    }
    const reader = r.body.getReader(), decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        if (!event.startsWith("data: ")) continue;
        const data = event.slice(6);
        if (data === "[DONE]") continue;
        const choice = JSON.parse(data).choices[0];
        if (!choice) continue;
        const d = choice.delta || {};
        if (d.reasoning_content) {
          answer.reasoning += d.reasoning_content;
          parts.details.hidden = false;
          parts.reasoning.textContent = answer.reasoning;
        }
        if (d.content) { answer.content += d.content; parts.content.textContent = answer.content; tokens++; }
        if (choice.finish_reason) finish = choice.finish_reason;
        log.scrollTop = log.scrollHeight;
      }
    }
  } catch (e) {
    if (e.name === "AbortError") {
      finish = "stopped";
    } else {
      const err = document.createElement("div");
      err.className = "error";
      err.textContent = e.message;
      div.appendChild(err);
      finish = "error";
    }
  } finally {
    controller = null;
    busy(false);
  }
  const secs = (performance.now() - started) / 1000;
  parts.meta.textContent = finish + " · " + secs.toFixed(1) + " s";
  if (finish !== "error") { conversation.push(answer); save(); }
  input.focus();
}

document.getElementById("form").addEventListener("submit", e => {
  e.preventDefault();
  const text = input.value.trim();
  if (!text || controller) return;
  input.value = "";
  send(text);
});
input.addEventListener("keydown", e => {
  if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); document.getElementById("form").requestSubmit(); }
});
stopBtn.addEventListener("click", () => { if (controller) controller.abort(); });
document.getElementById("new").addEventListener("click", () => {
  if (controller) controller.abort();
  conversation = [];
  save();
  log.textContent = "";
});
conversation.forEach(render);
loadModel();
input.focus();
</script>
</body>
</html>
)page";
  return kPage;
}

}  // namespace fathom::serve
