"""A process that exits (normally, or by a SIGTERM handler, as a gateway does) while egtunnel is busy:
six forwards streaming, remote commands in flight from daemon threads, every record logged at DEBUG,
and the server going away during exit. Used by test_clean_exit.py; never imported by the suite.

Usage: python exit_child.py SECONDS {exit,sigterm}
Prints "ready" once traffic flows, then exits after SECONDS (or waits for SIGTERM).
"""

from __future__ import annotations

import logging
import signal
import socket
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402  - imported first: its atexit closes the servers after egtunnel's gate

import egtunnel  # noqa: E402

CHANNELS = ("SHELL", "IOPUB", "STDIN", "HB", "CONTROL", "EG_COMM")


def stream(port: int) -> None:
    s = socket.create_connection(("127.0.0.1", port))
    buf = b"x" * 65536
    while True:
        try:
            s.sendall(buf)
            s.recv(65536)
        except OSError:
            return


def commands(target: egtunnel.SshTarget) -> None:
    while True:
        try:
            target.exec("echo hi", timeout=5)
        except Exception:  # noqa: BLE001 - the server goes away at exit
            pass


def main() -> None:
    logging.basicConfig(level=logging.DEBUG, stream=sys.stderr, format="%(name)s %(message)s")
    server = harness.SshServer(log_level="INFO").start()
    echo = harness.EchoServer().start()
    kw = server.connect_kwargs()
    target = egtunnel.SshTarget(kw.pop("host"), **kw)
    tunnels = target.open_forwards([(c, "127.0.0.1", echo.port) for c in CHANNELS], kernel_id="exit")
    for t in tunnels:
        threading.Thread(target=stream, args=(t.local_port,), daemon=True).start()
    for _ in range(2):
        threading.Thread(target=commands, args=(target,), daemon=True).start()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print("ready", flush=True)
    if sys.argv[2] == "sigterm":
        while True:
            time.sleep(1)
    time.sleep(float(sys.argv[1]))
    sys.exit(0)


if __name__ == "__main__":
    main()
