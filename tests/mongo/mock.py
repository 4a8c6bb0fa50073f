"""A scripted MongoDB wire-protocol server for the Rust tests (mockupdb + pymongo's bson).

It answers the driver's handshake and monitoring itself; every other command is handed to the
test: one JSON command per stdin line, one JSON answer per stdout line.

  {"receive": <timeout s>}                  -> {"id": n, "command": name, "doc": <relaxed Extended JSON>}
  {"reply": <Extended JSON doc>, "to": n}   -> {"ok": true}   answers command n (default: the last)
  {"hangup": true, "to": n}                 -> {"ok": true}   closes its connection instead
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

pending = {}
for line in sys.stdin:
    command = json.loads(line)
    try:
        if "receive" in command:
            request = server.receives(timeout=command["receive"])
            number = len(pending) + 1
            pending[number] = request
            doc = json.loads(json_util.dumps(request.doc))
            print(json.dumps({"id": number, "command": request.command_name, "doc": doc}), flush=True)
        elif "reply" in command:
            pending[command.get("to") or len(pending)].reply(json_util.loads(json.dumps(command["reply"])))
            print(json.dumps({"ok": True}), flush=True)
        elif "hangup" in command:
            pending[command.get("to") or len(pending)].hangup()
            print(json.dumps({"ok": True}), flush=True)
    except Exception as error:  # noqa: BLE001 - report every failure to the test
        print(json.dumps({"error": repr(error)}), flush=True)
