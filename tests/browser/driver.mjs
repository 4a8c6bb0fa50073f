// Drives Debian's Chromium for the Rust browser tests: one JSON command per stdin line, one
// JSON answer per stdout line. Commands: {"goto": url}, {"html": markup}, {"eval": expression},
// {"serve": directory, "page": markup} (serves the directory's files and the markup as
// /page.html from a new origin; answers its base URL).
import { chromium } from "playwright-core";
import http from "node:http";
import { readFile } from "node:fs/promises";
import path from "node:path";
import readline from "node:readline";

const types = { ".js": "text/javascript", ".mjs": "text/javascript", ".json": "application/json" };

function serve(root, page) {
  const server = http.createServer(async (request, response) => {
    const pathname = new URL(request.url, "http://x").pathname;
    if (pathname === "/page.html") {
      response.writeHead(200, { "content-type": "text/html" }).end(page);
      return;
    }
    const file = path.join(root, path.normalize(pathname));
    if (!file.startsWith(root)) return response.writeHead(403).end();
    try {
      const body = await readFile(file);
      response.writeHead(200, { "content-type": types[path.extname(file)] || "application/octet-stream" }).end(body);
    } catch {
      response.writeHead(404).end();
    }
  });
  return new Promise((resolve) => server.listen(0, "127.0.0.1", () => resolve(`http://127.0.0.1:${server.address().port}`)));
}

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
    else if (command.serve !== undefined) result = await serve(path.resolve(command.serve), command.page);
    console.log(JSON.stringify({ ok: true, result }));
  } catch (error) {
    console.log(JSON.stringify({ ok: false, error: String(error) }));
  }
}
await browser.close();
