// What the browser scripts share: Debian's Chromium started as these machines need it, and a
// keyboard walk (Tab until the focused element is the one wanted).
import { chromium } from "playwright-core";

export function launch() {
  return chromium.launch({
    executablePath: process.env.CHROMIUM ?? "/usr/bin/chromium",
    args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync"],
  });
}

// Tab until `matches` holds for the focused element ({tag, id, text, visible}: `visible` says
// whether its focus outline can be seen); whether it was reached, and the stops on the way.
export async function tabTo(page, matches) {
  const stops = [];
  for (let i = 0; i < 80; i++) {
    await page.keyboard.press("Tab");
    const focused = await page.evaluate(() => {
      const el = document.activeElement;
      if (!el || el === document.body) return null;
      const style = getComputedStyle(el);
      return {
        tag: el.tagName.toLowerCase(),
        id: el.id,
        text: (el.textContent ?? "").trim().slice(0, 60),
        visible: style.outlineStyle !== "none" && parseFloat(style.outlineWidth) > 0,
      };
    });
    if (!focused) continue;
    stops.push(focused);
    if (matches(focused)) return { reached: true, stops };
  }
  return { reached: false, stops };
}
