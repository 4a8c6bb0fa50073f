"""Flipswitch's published Python SDK (PyPI `flipswitch-sdk`, unmodified) against a running
changegate: OFREP evaluation plus its `/api/v1/flags/events` stream, polling off.

Reads BASE, SDK_KEY, SERVICE_KEY and ENVIRONMENT from the environment. Prints one JSON line per
observation; exits non-zero on the first expectation that fails. Between its two phases it prints
{"step": "restart"} and waits for a line on stdin: the test restarts the gateway on the same port.
"""
import sys
import time

from flipswitch import FlipswitchProvider
from openfeature import api
from openfeature.evaluation_context import EvaluationContext

from common import BASE, SDK_KEY, Changes, say

NL = EvaluationContext(targeting_key="u-1", attributes={"country": "NL"})
ANYONE = EvaluationContext(targeting_key="u-1")


provider = FlipswitchProvider(api_key=SDK_KEY, base_url=BASE, enable_realtime=True, enable_polling_fallback=False)
changes = Changes()
provider.add_flag_change_listener(lambda event: changes.record(event.flag_key))
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


changes.change_until_seen("banner", {"defaultVariant": "winter", "rules": []})
after = client.get_string_value("banner", "none", NL)
say(step="after-change", value=after)
assert after == "winter", after

say(step="restart")
sys.stdin.readline()
changes.change_until_seen("banner", {"defaultVariant": "summer"})
again = client.get_string_value("banner", "none", ANYONE)
say(step="after-restart", value=again)
assert again == "summer", again
api.shutdown()
say(step="done")
