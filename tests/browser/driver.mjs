// Drives Debian's Chromium for the Rust browser tests: one JSON command per stdin line, one
// JSON answer per stdout line. Commands: {"goto": url}, {"html": markup}, {"eval": expression}.
import { chromium } from "playwright-core";
import readline from "node:readline";

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
  ],
});
const page = await browser.newPage();
const lines = readline.createInterface({ input: process.stdin });
console.log(JSON.stringify({ ready: true }));
for await (const line of lines) {
  const command = JSON.parse(line);
  try {
    let result = null;
    if (command.goto !== undefined) await page.goto(command.goto);
    else if (command.html !== undefined) await page.setContent(command.html);
    else if (command.eval !== undefined) result = await page.evaluate(command.eval);
    console.log(JSON.stringify({ ok: true, result }));
  } catch (error) {
    console.log(JSON.stringify({ ok: false, error: String(error) }));
  }
}
await browser.close();
