"""A scripted MongoDB wire-protocol server for the Rust tests (mockupdb + pymongo's bson).

It answers the driver's handshake and monitoring itself; every other command is handed to the
test: one JSON command per stdin line, one JSON answer per stdout line.

  {"receive": <timeout s>}        -> {"command": name, "doc": <relaxed Extended JSON>}
  {"reply": <Extended JSON doc>}  -> {"ok": true}   answers the last received command
  {"hangup": true}                -> {"ok": true}   closes its connection instead
"""
import json
import sys

from bson import json_util
from mockupdb import MockupDB

server = MockupDB(auto_ismaster={
    "maxWireVersion": 21, "minWireVersion": 0, "isWritablePrimary": True,
    "maxBsonObjectSize": 16777216, "maxMessageSizeBytes": 48000000, "maxWriteBatchSize": 100000,
    "logicalSessionTimeoutMinutes": 30, "ok": 1,
})
server.autoresponds("endSessions", ok=1)
server.autoresponds("killCursors", ok=1)
server.autoresponds("ping", ok=1)
print(json.dumps({"port": server.run()}), flush=True)

last = None
for line in sys.stdin:
    command = json.loads(line)
    try:
        if "receive" in command:
            last = server.receives(timeout=command["receive"])
            doc = json.loads(json_util.dumps(last.doc))
            print(json.dumps({"command": last.command_name, "doc": doc}), flush=True)
        elif "reply" in command:
            last.reply(json_util.loads(json.dumps(command["reply"])))
            print(json.dumps({"ok": True}), flush=True)
        elif "hangup" in command:
            last.hangup()
            print(json.dumps({"ok": True}), flush=True)
    except Exception as error:  # noqa: BLE001 - report every failure to the test
        print(json.dumps({"error": repr(error)}), flush=True)
