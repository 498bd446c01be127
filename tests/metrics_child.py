"""A process of its own for the metrics tests: EG_TUNNEL_METRICS_PORT is read once per process, on its
first open, so each test drives a fresh one. It reads one JSON request per line on stdin and answers
one JSON line on stdout:

  {"op": "tunnel", "kwargs": {...}}  -> {"local_port": N}   open_tunnel(**kwargs), kept open
  {"op": "exec", "kwargs": {...}}    -> {"lines": [...]}     remote_exec(**kwargs)
  {"op": "close"}                    -> {}                   terminate every tunnel
  {"op": "quit"}                                             exit
Errors answer {"error": "<exception class>", "message": "..."}. Log records go to stderr.
"""

from __future__ import annotations

import json
import logging
import sys

import egtunnel


def main() -> None:
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    tunnels: list[egtunnel.Tunnel] = []
    for line in sys.stdin:
        req = json.loads(line)
        op = req["op"]
        try:
            if op == "tunnel":
                t = egtunnel.open_tunnel(**req["kwargs"])
                tunnels.append(t)
                reply: dict = {"local_port": t.local_port}
            elif op == "exec":
                reply = {"lines": egtunnel.remote_exec(**req["kwargs"]).lines()}
            elif op == "close":
                for t in tunnels:
                    t.terminate()
                tunnels.clear()
                reply = {}
            elif op == "quit":
                return
            else:
                reply = {"error": "ValueError", "message": f"unknown op {op!r}"}
        except Exception as e:  # noqa: BLE001 - the test decides what was expected
            reply = {"error": type(e).__name__, "message": str(e)}
        print(json.dumps(reply), flush=True)


if __name__ == "__main__":
    main()
