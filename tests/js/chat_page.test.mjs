// The web chat page of fathom serve (GET /) in headless Chromium, driven by playwright-core:
// a message is sent, the answer streams into the page, Stop ends a long answer, the conversation
// stays in the page. Run by tests/js/run.sh (FATHOM_URL, FATHOM_KEY); skipped, with the reason,
// without a Chromium binary (Debian: apt-get install chromium).
import { test } from "node:test";
import assert from "node:assert/strict";
import { existsSync } from "node:fs";
import { chromium } from "playwright-core";

const root = process.env.FATHOM_URL.replace(/\/v1$/, "");
const browserPath = ["/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome"].find(existsSync);

test("the chat page sends, streams, stops and keeps the conversation", { skip: !browserPath && "no Chromium here" },
     async () => {
  const browser = await chromium.launch({ executablePath: browserPath, args: ["--no-sandbox"] });
  try {
    const page = await browser.newPage();
    const seen = [];
    page.on("pageerror", (e) => seen.push(String(e)));
    await page.goto(root + "/");
    await page.fill("#key", process.env.FATHOM_KEY);
    await page.dispatchEvent("#key", "change");
    // a first question: the answer streams in (the Stop button is live meanwhile), then ends
    await page.fill("#input", "What does str.split do?");
    await page.click("#send");
    await page.waitForSelector(".msg.user");
    await page.waitForFunction(() => document.querySelector(".msg.assistant .content")?.textContent.length > 0,
                               null, { timeout: 30_000 });
    await page.waitForFunction(() => document.querySelector(".msg.assistant .meta")?.textContent.length > 0,
                               null, { timeout: 60_000 });
    const first = await page.textContent(".msg.assistant .content");
    assert.ok(first.length > 0);
    assert.match(await page.textContent(".msg.assistant .meta"), /^(stop|length) /);
    // a second one, stopped while it streams: a long answer (the page's ?max_tokens and
    // ?ignore_eos knobs; the conversation comes back from the page's session storage)
    await page.goto(root + "/?max_tokens=4000&ignore_eos=1");
    await page.waitForSelector(".msg.assistant .content");
    await page.fill("#input", "Tell me everything about the Linux kernel.");
    await page.click("#send");
    await page.waitForFunction(() => document.querySelectorAll(".msg.assistant .content")[1]?.textContent.length > 0,
                               null, { timeout: 30_000 });
    assert.equal(await page.isEnabled("#stop"), true);
    await page.click("#stop");
    await page.waitForFunction(() => document.querySelectorAll(".msg.assistant .meta")[1]?.textContent.startsWith("stopped"),
                               null, { timeout: 10_000 });
    assert.equal(await page.isEnabled("#send"), true);
    // the conversation is kept: two questions, two answers, and a reload brings them back
    assert.equal(await page.locator(".msg.user").count(), 2);
    await page.reload();
    await page.waitForSelector(".msg.assistant .content");
    assert.equal(await page.locator(".msg.user").count(), 2);
    assert.equal(await page.locator(".msg.assistant").count(), 2);
    assert.equal(await page.textContent(".msg.assistant .content"), first);
    assert.deepEqual(seen, [], "script errors in the page");
  } finally {
    await browser.close();
  }
});
