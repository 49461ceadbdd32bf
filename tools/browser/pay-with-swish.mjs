// Pays with Swish from the debtor's page with the keyboard alone, in Debian's Chromium
// (headless): Tab from the top until the pay button with the given text has the focus, Enter.
// On the page that follows (open the app, or scan its QR code) an axe-core audit runs, the QR
// code is read back as the Swish app would read it, the app link's token is taken and a
// screenshot saved; the first JSON line says so. The payer then answers in the app (the test
// tells the stand-in and writes a line to stdin); Tab reaches the link with the given text,
// Enter, and the page the portal answers is read: the second JSON line.
//
// Usage: node pay-with-swish.mjs <page url> <button text> <check link text> <screenshot dir>
import { launch, tabTo } from "./keyboard.mjs";
import { createRequire } from "node:module";
import { join } from "node:path";
import { createInterface } from "node:readline";
import jsQR from "jsqr";
import { PNG } from "pngjs";

const require = createRequire(import.meta.url);
const axePath = require.resolve("axe-core/axe.min.js");
const [url, buttonText, checkText, shots] = process.argv.slice(2);
if (!url || !buttonText || !checkText || !shots) {
  console.error("usage: node pay-with-swish.mjs <page url> <button text> <check link text> <screenshot dir>");
  process.exit(2);
}

const browser = await launch();
const lines = createInterface({ input: process.stdin })[Symbol.asyncIterator]();
try {
  // The audit injects axe-core past the page's script policy.
  const context = await browser.newContext({ viewport: { width: 360, height: 740 }, deviceScaleFactor: 2, bypassCSP: true });
  const page = await context.newPage();
  await page.goto(url, { waitUntil: "load" });
  const toPay = await tabTo(page, (f) => f.tag === "button" && f.text === buttonText);
  const shown = { pay_button: { reached: toPay.reached, tabs: toPay.stops.length } };
  if (toPay.reached) {
    await Promise.all([page.waitForNavigation({ waitUntil: "load" }), page.keyboard.press("Enter")]);
    shown.heading = await page.evaluate(() => document.querySelector("h1")?.textContent ?? "");
    shown.app_link = await page.evaluate(() => document.querySelector("a.swish-app")?.getAttribute("href") ?? "");
    const code = await page.$("figure svg");
    if (code) {
      const png = PNG.sync.read(await code.screenshot());
      shown.qr = jsQR(new Uint8ClampedArray(png.data), png.width, png.height)?.data ?? "unreadable";
    }
    await page.addScriptTag({ path: axePath });
    const audit = await page.evaluate(async () =>
      // eslint-disable-next-line no-undef
      axe.run(document, { runOnly: { type: "tag", values: ["wcag2a", "wcag2aa", "wcag21a", "wcag21aa"] } }),
    );
    shown.violations = audit.violations.map((v) => ({ id: v.id, impact: v.impact, help: v.help }));
    shown.passes = audit.passes.length;
    shown.screenshot = join(shots, "portal-swish-sv.png");
    await page.screenshot({ path: shown.screenshot, fullPage: true });
  }
  console.log(JSON.stringify(shown));
  if (toPay.reached) {
    await lines.next();
    const result = {};
    const toCheck = await tabTo(page, (f) => f.tag === "a" && f.text === checkText);
    result.check_link = { reached: toCheck.reached, focus_visible: toCheck.stops.at(-1)?.visible ?? false };
    if (toCheck.reached) {
      await Promise.all([page.waitForNavigation({ waitUntil: "load" }), page.keyboard.press("Enter")]);
      result.heading = await page.evaluate(() => document.querySelector("h1")?.textContent ?? "");
      result.status = await page.evaluate(() => document.querySelector("[role=status]")?.textContent ?? "");
      result.screenshot = join(shots, "portal-swish-paid-sv.png");
      await page.screenshot({ path: result.screenshot, fullPage: true });
    }
    console.log(JSON.stringify(result));
  }
} finally {
  await browser.close();
}
