"""Flipswitch's published Python SDK (PyPI `flipswitch-sdk`, unmodified) against a running
changegate: OFREP evaluation plus its `/api/v1/flags/events` stream, polling off.

Reads BASE, SDK_KEY, SERVICE_KEY and ENVIRONMENT from the environment. Prints one JSON line per
observation; exits non-zero on the first expectation that fails. Between its two phases it prints
{"step": "restart"} and waits for a line on stdin: the test restarts the gateway on the same port.
"""
import json
import os
import sys
import threading
import time

import httpx
from openfeature import api
from openfeature.evaluation_context import EvaluationContext
from flipswitch import FlipswitchProvider

BASE, SDK_KEY, SERVICE_KEY, ENVIRONMENT = (os.environ[k] for k in ("BASE", "SDK_KEY", "SERVICE_KEY", "ENVIRONMENT"))
NL = EvaluationContext(targeting_key="u-1", attributes={"country": "NL"})
ANYONE = EvaluationContext(targeting_key="u-1")


def say(**what):
    print(json.dumps(what), flush=True)


def patch(flag, body):
    response = httpx.patch(f"{BASE}/v1/flags/{flag}?environment={ENVIRONMENT}", headers={"apikey": SERVICE_KEY}, json=body)
    assert response.status_code == 200, (response.status_code, response.text)


provider = FlipswitchProvider(api_key=SDK_KEY, base_url=BASE, enable_realtime=True, enable_polling_fallback=False)
changed = []
seen = threading.Event()


def on_change(event):
    changed.append(event.flag_key)
    seen.set()


provider.add_flag_change_listener(on_change)
api.set_provider(provider)
client = api.get_client()

deadline = time.monotonic() + 10
while True:
    beta = client.get_boolean_details("beta", False, ANYONE)
    if not beta.error_code or time.monotonic() > deadline:
        break
    time.sleep(0.05)
say(step="boolean", value=beta.value, reason=str(beta.reason), error=str(beta.error_code))
assert beta.value is True and not beta.error_code, beta
banner = client.get_string_details("banner", "none", NL)
say(step="string", value=banner.value, variant=banner.variant)
assert banner.value == "nl", banner
missing = client.get_boolean_details("no-such-flag", False, ANYONE)
say(step="missing", value=missing.value, error=str(missing.error_code))
assert missing.value is False and "FLAG_NOT_FOUND" in str(missing.error_code), missing


def change_until_seen(flag, body, within=15.0):
    """Changes `flag` until the SDK's stream reports it (the stream may still be connecting)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        seen.clear()
        patch(flag, body)
        if seen.wait(1.0) and flag in changed:
            return
    raise AssertionError(f"no change event for {flag} within {within} s: {changed}")


change_until_seen("banner", {"defaultVariant": "winter", "rules": []})
after = client.get_string_value("banner", "none", NL)
say(step="after-change", value=after)
assert after == "winter", after

say(step="restart")
sys.stdin.readline()
change_until_seen("banner", {"defaultVariant": "summer"})
again = client.get_string_value("banner", "none", ANYONE)
say(step="after-restart", value=again)
assert again == "summer", again
api.shutdown()
say(step="done")
