// The published OpenFeature OFREP providers against a running changegate. Reads BASE,
// SDK_KEY, SERVICE_KEY and ENVIRONMENT from the environment; prints one JSON line per
// observation and exits non-zero on the first expectation that fails.
import assert from "node:assert/strict";
import { EventSource } from "eventsource";
import { OpenFeature as ServerFeature } from "@openfeature/server-sdk";
import { OFREPProvider } from "@openfeature/ofrep-provider";
import { OpenFeature as WebFeature, ProviderEvents } from "@openfeature/web-sdk";
import { OFREPWebProvider } from "@openfeature/ofrep-web-provider";

// The web provider listens with the global EventSource, as it would in a browser.
globalThis.EventSource = EventSource;

const { BASE, SDK_KEY, SERVICE_KEY, ENVIRONMENT } = process.env;
const say = (what) => console.log(JSON.stringify(what));

async function patchFlag(key, patch) {
  const response = await fetch(`${BASE}/v1/flags/${key}?environment=${ENVIRONMENT}`, {
    method: "PATCH",
    headers: { apikey: SERVICE_KEY, "content-type": "application/json" },
    body: JSON.stringify(patch),
  });
  assert.equal(response.status, 200, `PATCH ${key}`);
}

// Server provider: dynamic context, one remote evaluation per call.
await ServerFeature.setProviderAndWait(new OFREPProvider({ baseUrl: BASE, headers: [["X-API-Key", SDK_KEY]] }));
const server = ServerFeature.getClient();
const before = await server.getBooleanDetails("new-checkout", false, { targetingKey: "user-1", country: "NL" });
say({ provider: "server", step: "before", value: before.value, reason: before.reason, variant: before.variant });
assert.equal(before.value, true);
assert.equal(before.reason, "TARGETING_MATCH");
await patchFlag("new-checkout", { enabled: false });
const after = await server.getBooleanDetails("new-checkout", false, { targetingKey: "user-1", country: "NL" });
say({ provider: "server", step: "after", value: after.value, reason: after.reason });
assert.equal(after.value, false);
assert.equal(after.reason, "DISABLED");
const missing = await server.getBooleanDetails("no-such-flag", true, { targetingKey: "user-1" });
say({ provider: "server", step: "missing", value: missing.value, errorCode: missing.errorCode });
assert.equal(missing.errorCode, "FLAG_NOT_FOUND");

// Web provider: static context, bulk evaluation, no polling — the change must arrive through
// the SSE notification the bulk response advertises.
await WebFeature.setContext({ targetingKey: "user-1", country: "NL" });
await WebFeature.setProviderAndWait(
  new OFREPWebProvider({ baseUrl: BASE, headers: [["X-API-Key", SDK_KEY]], pollInterval: 0, cacheMode: "disabled" }),
);
const web = WebFeature.getClient();
say({ provider: "web", step: "before", value: web.getStringValue("banner", "none") });
assert.equal(web.getStringValue("banner", "none"), "summer");
const changed = new Promise((resolve) => web.addHandler(ProviderEvents.ConfigurationChanged, resolve));
await patchFlag("banner", { defaultVariant: "winter" });
await Promise.race([changed, new Promise((_, reject) => setTimeout(() => reject(new Error("no ConfigurationChanged within 10 s")), 10000))]);
say({ provider: "web", step: "after", value: web.getStringValue("banner", "none") });
assert.equal(web.getStringValue("banner", "none"), "winter");

await WebFeature.close();
await ServerFeature.close();
process.exit(0);
