// A server-side subscriber with the `eventsource` npm package: the key travels in a header, and
// after a disconnect it resumes with Last-Event-ID (the package does this itself; the id is also
// kept here so a restarted process can resume where it left off).
//
//   npm install eventsource@3
//   CHANGEGATE_URL=http://127.0.0.1:8080 CHANGEGATE_KEY=flc_anon_… node examples/node-subscriber.mjs order.*
import { EventSource } from "eventsource";

const base = process.env.CHANGEGATE_URL ?? "http://127.0.0.1:8080";
const key = process.env.CHANGEGATE_KEY;
const topic = process.argv[2] ?? "*";
let lastEventId = process.env.LAST_EVENT_ID ?? "";

const source = new EventSource(`${base}/v1/events/subscribe?topic=${encodeURIComponent(topic)}`, {
  fetch: (url, init) =>
    fetch(url, {
      ...init,
      headers: { ...init.headers, apikey: key, ...(lastEventId ? { "Last-Event-ID": lastEventId } : {}) },
    }),
});

source.onopen = () => console.error(`connected${lastEventId ? ` (resuming after ${lastEventId})` : ""}`);
source.onerror = (e) => console.error("disconnected; retrying", e.message ?? "");
source.onmessage = (e) => {
  lastEventId = e.lastEventId;
  console.log(JSON.stringify({ id: e.lastEventId, ...JSON.parse(e.data) }));
};
source.addEventListener("reset", (e) => {
  lastEventId = e.lastEventId;
  console.error("reset:", e.data, "— refetch your state");
});
