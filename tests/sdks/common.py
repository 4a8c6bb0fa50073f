"""What the SDK scripts share: their settings, how they report, how they change a flag through
the management API, and how they wait for the SDK's own stream to report that change."""
import json
import os
import threading
import time

import httpx

BASE, SDK_KEY, SERVICE_KEY, ENVIRONMENT = (os.environ[k] for k in ("BASE", "SDK_KEY", "SERVICE_KEY", "ENVIRONMENT"))


def say(**what):
    """One observation, as a JSON line the Rust test reads."""
    print(json.dumps(what), flush=True)


def patch(flag, body):
    """Changes `flag` through changegate's management API (service key)."""
    response = httpx.patch(f"{BASE}/v1/flags/{flag}?environment={ENVIRONMENT}", headers={"apikey": SERVICE_KEY}, json=body)
    assert response.status_code == 200, (response.status_code, response.text)


class Changes:
    """Flag keys the SDK reported as changed; `record` is the SDK's callback."""

    def __init__(self):
        self.keys = []
        self._seen = threading.Event()

    def record(self, flag_key):
        self.keys.append(flag_key)
        self._seen.set()

    def change_until_seen(self, flag, body, within=15.0):
        """Changes `flag` until the SDK's stream reports it (the stream may still be connecting)."""
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            self._seen.clear()
            patch(flag, body)
            if self._seen.wait(1.0) and flag in self.keys:
                return
        raise AssertionError(f"no change reported for {flag} within {within} s: {self.keys}")
