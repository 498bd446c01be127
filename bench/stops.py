#!/usr/bin/env python3
"""Gateway stops under load: a real Enterprise Gateway with three kernels streaming output through
egtunnel's tunnels, egtunnel's loggers at DEBUG, is stopped with SIGTERM, again and again. Each stop
must end the gateway with exit status 0 and a log that does not end in an abort ("FATAL: exception not
rethrown", which is what a thread entering Python during finalization produces).

    .venv/bin/python bench/stops.py            # 32 stops
    .venv/bin/python bench/stops.py -n 4

Exit status 0 when every stop was clean, 1 otherwise.
"""

from __future__ import annotations

import argparse
import sys
import time

from lab import Lab, log

STREAM = "import time\nfor i in range(200000):\n    print(i, flush=True)\n    time.sleep(0.002)\n"
ABORT_MARKS = ("exception not rethrown", "FATAL", "Aborted", "core dumped")


def one_stop(lab: Lab, index: int) -> tuple[bool, str]:
    # The gateway's DEBUG level reaches egtunnel's loggers too (they propagate to the root logger).
    gw = lab.start_gateway(f"gateway-{index}", log_level="DEBUG")
    client = gw.client()
    kernels = [client.start_kernel("egt") for _ in range(3)]
    for k in kernels:
        k.send("execute_request", {"code": STREAM, "silent": False, "store_history": False,
                                   "user_expressions": {}, "allow_stdin": False})  # fmt: skip
    # Output flowing through every kernel's IOPUB tunnel when the signal comes.
    deadline = time.monotonic() + 30
    for k in kernels:
        while time.monotonic() < deadline:
            msg = k.recv(deadline)
            if msg and msg.get("msg_type") == "stream":
                break
    proc = gw.process
    lab.stop_gateway()
    tail = gw.log_text()[-3000:]
    code = proc.returncode if proc is not None else None
    clean = code == 0 and not any(mark in tail for mark in ABORT_MARKS)
    last = tail.strip().splitlines()[-1] if tail.strip() else ""
    client.close()
    return clean, f"exit {code}, last line: {last[:160]}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", type=int, default=32)
    args = ap.parse_args()
    failures = 0
    with Lab(1) as lab:
        for i in range(args.n):
            clean, detail = one_stop(lab, i)
            failures += not clean
            log(f"stop {i + 1}/{args.n}: {'clean' if clean else 'NOT CLEAN'}: {detail}")
    print(f"{args.n - failures} clean, {failures} not clean")
    return 0 if failures == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
