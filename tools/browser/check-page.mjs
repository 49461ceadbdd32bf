// Opens the debtor's page in Debian's Chromium (headless) as a phone would, once per language:
// an axe-core audit against WCAG 2.1 A and AA, a screenshot, and a keyboard walk (Tab from the
// top) that records what takes focus and whether the focus can be seen; a payment QR code on the
// page is read back; and, under the page's own Content-Security-Policy, a copy button is clicked
// and the clipboard read. Prints one JSON object.
//
// Usage: node check-page.mjs <page url> <screenshot dir> <language>...
import { launch } from "./keyboard.mjs";
import { createRequire } from "node:module";
import { mkdirSync } from "node:fs";
import { join } from "node:path";
import jsQR from "jsqr";
import { PNG } from "pngjs";

const require = createRequire(import.meta.url);
const axePath = require.resolve("axe-core/axe.min.js");
const [url, shots, ...languages] = process.argv.slice(2);
if (!url || !shots || languages.length === 0) {
  console.error("usage: node check-page.mjs <page url> <screenshot dir> <language>...");
  process.exit(2);
}
mkdirSync(shots, { recursive: true });

const browser = await launch();
const result = { languages: {}, keyboard: [], requests: [] };
try {
  // A small phone: the page is mobile first.
  // The page forbids every script (its CSP); the audit injects axe-core past it.
  const context = await browser.newContext({
    viewport: { width: 360, height: 740 },
    deviceScaleFactor: 2,
    bypassCSP: true,
  });
  const page = await context.newPage();
  page.on("request", (r) => result.requests.push(r.url()));
  for (const language of languages) {
    const response = await page.goto(`${url}?lang=${language}`, { waitUntil: "load" });
    const body = await response.body();
    await page.addScriptTag({ path: axePath });
    const audit = await page.evaluate(async () =>
      // eslint-disable-next-line no-undef
      axe.run(document, { runOnly: { type: "tag", values: ["wcag2a", "wcag2aa", "wcag21a", "wcag21aa"] } }),
    );
    const screenshot = join(shots, `portal-${language}.png`);
    await page.screenshot({ path: screenshot, fullPage: true });
    // A payment QR code is read back as a banking app would read it.
    let qr = null;
    const code = await page.$("figure.qr svg");
    if (code) {
      const png = PNG.sync.read(await code.screenshot());
      qr = jsQR(new Uint8ClampedArray(png.data), png.width, png.height)?.data ?? "unreadable";
    }
    result.languages[language] = {
      status: response.status(),
      bytes: body.length,
      lang: await page.evaluate(() => document.documentElement.lang),
      violations: audit.violations.map((v) => ({ id: v.id, impact: v.impact, help: v.help, nodes: v.nodes.length })),
      passes: audit.passes.length,
      screenshot,
      qr,
    };
  }
  // Keyboard only, from the top of the first language's page.
  await page.goto(`${url}?lang=${languages[0]}`, { waitUntil: "load" });
  for (let i = 0; i < 40; i++) {
    await page.keyboard.press("Tab");
    const focused = await page.evaluate(() => {
      const el = document.activeElement;
      if (!el || el === document.body) return null;
      const style = getComputedStyle(el);
      // Back at an element already passed: the walk has gone round.
      const again = el.dataset.walked === "1";
      el.dataset.walked = "1";
      return {
        tag: el.tagName.toLowerCase(),
        text: (el.textContent ?? "").trim().slice(0, 60),
        href: el.getAttribute("href"),
        visible: style.outlineStyle !== "none" && parseFloat(style.outlineWidth) > 0,
        again,
      };
    });
    if (!focused || focused.again) break;
    result.keyboard.push(focused);
  }
  // The copy buttons, under the page's own policy (no bypass): its one script runs, the
  // buttons show, and a click puts the reference on the clipboard.
  const strict = await browser.newContext({
    viewport: { width: 360, height: 740 },
    permissions: ["clipboard-read", "clipboard-write"],
  });
  const plain = await strict.newPage();
  const consoleErrors = [];
  plain.on("console", (m) => {
    if (m.type() === "error") consoleErrors.push(m.text());
  });
  await plain.goto(`${url}?lang=${languages[0]}`, { waitUntil: "load" });
  const buttons = await plain.$$("button.copy:not([hidden])");
  result.copy = { buttons: buttons.length, console_errors: consoleErrors };
  if (buttons.length > 0) {
    result.copy.expected = await buttons[0].getAttribute("data-copy");
    await buttons[0].click();
    await plain.waitForFunction((b) => b.textContent === b.dataset.done, buttons[0]);
    result.copy.copied = await plain.evaluate(() => navigator.clipboard.readText());
    result.copy.label_after = await buttons[0].textContent();
  }
} finally {
  await browser.close();
}
console.log(JSON.stringify(result));
