// Pays from the debtor's page with the keyboard alone, in Debian's Chromium (headless): Tab from
// the top until the pay button with the given text has the focus, Enter; on the provider's page
// (the stand-in), Tab until its approve button has the focus, Enter; back on the portal's return
// page, its heading and status are read and a screenshot is taken. Prints one JSON object.
//
// Usage: node pay-by-keyboard.mjs <page url> <button text> <approve button id> <screenshot file>
import { launch, tabTo } from "./keyboard.mjs";

const [url, buttonText, approveId, screenshot] = process.argv.slice(2);
if (!url || !buttonText || !approveId || !screenshot) {
  console.error("usage: node pay-by-keyboard.mjs <page url> <button text> <approve button id> <screenshot file>");
  process.exit(2);
}

const browser = await launch();
const result = {};
try {
  const context = await browser.newContext({ viewport: { width: 360, height: 740 }, deviceScaleFactor: 2 });
  const page = await context.newPage();
  await page.goto(url, { waitUntil: "load" });
  const toPay = await tabTo(page, (f) => f.tag === "button" && f.text === buttonText);
  result.pay_button = { reached: toPay.reached, tabs: toPay.stops.length, focus_visible: toPay.stops.at(-1)?.visible ?? false };
  if (toPay.reached) {
    await Promise.all([page.waitForNavigation({ waitUntil: "load" }), page.keyboard.press("Enter")]);
    result.provider_url = page.url();
    result.provider_text = ((await page.textContent("body")) ?? "").trim().slice(0, 200);
    const toApprove = await tabTo(page, (f) => f.id === approveId);
    result.approve_button = { reached: toApprove.reached, tabs: toApprove.stops.length };
    if (toApprove.reached) {
      await Promise.all([page.waitForNavigation({ waitUntil: "load" }), page.keyboard.press("Enter")]);
      result.return_url = page.url();
      result.heading = await page.evaluate(() => document.querySelector("h1")?.textContent ?? "");
      result.status = await page.evaluate(() => document.querySelector("[role=status]")?.textContent ?? "");
      result.lang = await page.evaluate(() => document.documentElement.lang);
      await page.screenshot({ path: screenshot, fullPage: true });
      result.screenshot = screenshot;
    }
  }
} finally {
  await browser.close();
}
console.log(JSON.stringify(result));
