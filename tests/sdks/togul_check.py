"""Togul's published Python SDK (PyPI `togul`, unmodified) against a running changegate.

Reads BASE, SDK_KEY, SERVICE_KEY and ENVIRONMENT from the environment. Prints one JSON line per
observation; exits non-zero on the first expectation that fails. Between its two phases it prints
{"step": "restart"} and waits for a line on stdin: the test restarts the gateway on the same port.
"""
import sys
import threading

from togul import Config, TogulAPIError, TogulClient, TogulStreamClient

from common import BASE, ENVIRONMENT, SDK_KEY, Changes, say

# Polling off: results stay cached for an hour; only the stream's invalidations refresh them.
config = Config(api_key=SDK_KEY, environment=ENVIRONMENT, base_url=BASE, cache_ttl=3600)
client = TogulClient(config)

beta = client.evaluate("beta", {"user_id": "u-1"})
say(step="boolean", value=beta.value, value_type=beta.value_type, enabled=beta.enabled, reason=beta.reason)
assert (beta.value, beta.value_type, beta.enabled, beta.reason) == (True, "boolean", True, "default"), beta
banner = client.evaluate("banner", {"user_id": "u-1", "country": "NL"})
say(step="string", value=banner.value, value_type=banner.value_type, reason=banner.reason)
assert (banner.value, banner.value_type, banner.reason) == ("nl", "string", "rule_match"), banner
try:
    client.evaluate("no-such-flag")
    raise AssertionError("an unknown flag must fail")
except TogulAPIError as error:
    say(step="missing", status=error.status_code, code=error.error_code)
    assert (error.status_code, error.error_code) == (404, "flag_not_found"), vars(error)

changes = Changes()
stream = TogulStreamClient(config, client.cache)
stream.on_cache_invalidated(changes.record)
threading.Thread(target=stream.connect, daemon=True).start()


changes.change_until_seen("banner", {"defaultVariant": "winter", "rules": []})
after = client.evaluate("banner", {"user_id": "u-1", "country": "NL"})
say(step="after-change", value=after.value, reason=after.reason)
assert (after.value, after.reason) == ("winter", "default"), after

say(step="restart")
sys.stdin.readline()
changes.change_until_seen("banner", {"defaultVariant": "summer"})
again = client.evaluate("banner", {"user_id": "u-1"})
say(step="after-restart", value=again.value)
assert again.value == "summer", again
stream.stop()
say(step="done")
