"""Featureflip's published Python SDK (PyPI `featureflip`, unmodified) against a running
changegate: `/v1/sdk/flags` at start, local evaluation, changes through its own `/v1/sdk/stream`
(streaming on, so no polling), analytics to `/v1/sdk/events`.

Reads BASE, SDK_KEY, SERVICE_KEY and ENVIRONMENT from the environment. Prints one JSON line per
observation; exits non-zero on the first expectation that fails. Between its two phases it prints
{"step": "restart"} and waits for a line on stdin: the test restarts the gateway on the same port.

With ROLLOUT_USERS=n it instead prints, for users 0‥n, the variant the SDK serves them of the
flag `rollout` (one JSON line, {"step": "rollout", "variants": [...]}), for the test to compare
with the server's evaluations.
"""
import os
import sys

import structlog
from featureflip import Config, FeatureflipClient

from common import BASE, SDK_KEY, Changes, say

NL = {"user_id": "u-1", "country": "NL"}
ANYONE = {"user_id": "u-1"}


def rollout_context(i):
    """The same users the Rust test evaluates on the server (as `targetingKey` / `user_id`)."""
    context = {"user_id": f"user-{i}"}
    if i % 3 == 0:
        context["country"] = "NL"
    if i % 5 == 0:
        context["plan"] = "beta"
    return context


# The SDK logs through structlog, to stdout by default: this app keeps stdout for its report.
structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
# Analytics flush quickly, so the test sees them counted at /metrics.
config = Config(base_url=BASE, streaming=True, init_timeout=10.0, flush_interval=0.2)
client = FeatureflipClient(sdk_key=SDK_KEY, config=config)

users = int(os.environ.get("ROLLOUT_USERS", "0"))
if users:
    details = [client.variation_detail("rollout", rollout_context(i), "none", track=False) for i in range(users)]
    say(step="rollout", variants=[d.variation_key for d in details], reasons=sorted({d.reason.value for d in details}))
    client.close()
    sys.exit(0)

changes = Changes()
client.on_update(lambda keys: [changes.record(key) for key in keys])

beta = client.variation_detail("beta", ANYONE, False)
say(step="boolean", value=beta.value, reason=beta.reason.value)
assert beta.value is True, beta
banner = client.variation_detail("banner", NL, "none")
say(step="string", value=banner.value, variant=banner.variation_key, reason=banner.reason.value)
assert banner.value == "nl" and banner.reason.value == "RULE_MATCH", banner
missing = client.variation_detail("no-such-flag", ANYONE, False)
say(step="missing", value=missing.value, error=missing.reason.value)
assert missing.value is False and missing.reason.value == "FLAG_NOT_FOUND", missing

changes.change_until_seen("banner", {"defaultVariant": "winter", "rules": []})
after = client.variation("banner", NL, "none")
say(step="after-change", value=after)
assert after == "winter", after
client.flush()

say(step="restart")
sys.stdin.readline()
changes.change_until_seen("banner", {"defaultVariant": "summer"})
again = client.variation("banner", ANYONE, "none")
say(step="after-restart", value=again)
assert again == "summer", again
client.close()
say(step="done")
