// A naive Node SSE server, the peer a team would write in an afternoon: `GET /sub` streams,
// `POST /pub` sends its body to every subscriber as one `data:` line — one write per event per
// subscriber, an id per message, a comment every 15 s. No auth, no replay beyond the ids.
// Usage: node naive-sse.js <port>   (prints "listening on http://127.0.0.1:<port>")
'use strict';
const http = require('http');

const subscribers = new Set();
let id = 0;

const server = http.createServer((req, res) => {
  if (req.method === 'GET' && req.url.startsWith('/sub')) {
    res.writeHead(200, { 'content-type': 'text/event-stream', 'cache-control': 'no-cache' });
    res.write('retry: 2000\n\n');
    subscribers.add(res);
    req.on('close', () => subscribers.delete(res));
    return;
  }
  if (req.method === 'POST' && req.url.startsWith('/pub')) {
    const chunks = [];
    req.on('data', (c) => chunks.push(c));
    req.on('end', () => {
      id += 1;
      const data = Buffer.concat(chunks).toString().replace(/\n/g, ' ');
      const message = `id: ${id}\ndata: ${data}\n\n`;
      for (const sub of subscribers) sub.write(message);
      res.writeHead(202, { 'content-type': 'application/json' });
      res.end(`{"id":"${id}"}`);
    });
    return;
  }
  res.writeHead(404);
  res.end();
});

setInterval(() => {
  for (const sub of subscribers) sub.write(': heartbeat\n\n');
}, 15000).unref();

server.keepAliveTimeout = 10000;
server.listen(Number(process.argv[2] || 0), '127.0.0.1', () => {
  console.log(`listening on http://127.0.0.1:${server.address().port}`);
});
