"""Small TCP services that tests and benchmarks tunnel to, run as their own process so that they can
live inside a network namespace and never compete with the test process for the GIL.

Modes:
  echo    send every byte back; after the client's EOF, finish sending, then close (half-close aware).
  sink    read until EOF, then answer one line "<byte count> <sha256 hex>\\n" and close.
  source  read one line "<n>\\n", send n bytes of the pattern stream and close the write side.

Usage: python echo_server.py [--host H] [--port P] [--mode echo|sink|source]
Prints "listening <port>" on stdout once bound. Exits on SIGTERM or when stdin reaches EOF, so a
parent that dies without cleaning up (even by SIGKILL) does not leave the server behind.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import signal
import socket
import threading

MODES = ("echo", "sink", "source")
BUFFER_SIZE = 256 * 1024
# A period that is not a power of two, so a chunk lost or duplicated at any usual buffer boundary
# changes the digest even though the stream repeats.
PATTERN_PERIOD = (1 << 20) + 13

_pattern: bytes | None = None


def pattern_block() -> bytes:
    """One period of the deterministic byte stream, plus room to slice a whole buffer from any offset."""
    global _pattern
    if _pattern is None:
        period = random.Random(0x5EED).randbytes(PATTERN_PERIOD)
        _pattern = period + period[:BUFFER_SIZE]
    return _pattern


def pattern_chunks(nbytes: int, chunk: int = BUFFER_SIZE):
    """Yield memoryviews that together form the first nbytes of the pattern stream."""
    if chunk > BUFFER_SIZE:
        raise ValueError(f"chunk must be at most {BUFFER_SIZE}")
    view = memoryview(pattern_block())
    offset = 0
    remaining = nbytes
    while remaining > 0:
        n = min(chunk, remaining)
        yield view[offset : offset + n]
        offset = (offset + n) % PATTERN_PERIOD
        remaining -= n


def pattern_digest(nbytes: int) -> str:
    """sha256 hex of the first nbytes of the pattern stream."""
    h = hashlib.sha256()
    for piece in pattern_chunks(nbytes):
        h.update(piece)
    return h.hexdigest()


def _serve_echo(conn: socket.socket) -> None:
    buf = bytearray(BUFFER_SIZE)
    view = memoryview(buf)
    while True:
        n = conn.recv_into(buf)
        if n == 0:
            break
        conn.sendall(view[:n])
    conn.shutdown(socket.SHUT_WR)


def _serve_sink(conn: socket.socket) -> None:
    buf = bytearray(BUFFER_SIZE)
    view = memoryview(buf)
    h = hashlib.sha256()
    total = 0
    while True:
        n = conn.recv_into(buf)
        if n == 0:
            break
        h.update(view[:n])
        total += n
    conn.sendall(f"{total} {h.hexdigest()}\n".encode())
    conn.shutdown(socket.SHUT_WR)


def _serve_source(conn: socket.socket) -> None:
    line = b""
    while not line.endswith(b"\n"):
        piece = conn.recv(64)
        if not piece:
            return
        line += piece
        if len(line) > 64:
            return
    for piece in pattern_chunks(int(line.strip())):
        conn.sendall(piece)
    conn.shutdown(socket.SHUT_WR)
    # Drain until the client closes, so our close never turns unread input into a reset.
    while conn.recv(BUFFER_SIZE):
        pass


_HANDLERS = {"echo": _serve_echo, "sink": _serve_sink, "source": _serve_source}


def _handle(conn: socket.socket, mode: str) -> None:
    with conn:
        try:
            _HANDLERS[mode](conn)
        except OSError:
            # A client that resets mid-stream is a normal event for a test service.
            pass


def _exit_now(*_: object) -> None:
    # Connection threads may sit in blocking calls; interpreter shutdown would wait on them (and abort
    # on the stdin lock), while nothing here needs an orderly exit.
    os._exit(0)


def _exit_when_parent_goes() -> None:
    while os.read(0, 4096):
        pass
    _exit_now()


def serve(host: str, port: int, mode: str) -> None:
    listener = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((host, port))
    listener.listen(1024)
    print(f"listening {listener.getsockname()[1]}", flush=True)
    while True:
        conn, _ = listener.accept()
        # Round-trip measurements must see the tunnel's latency, not Nagle on our side.
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        threading.Thread(target=_handle, args=(conn, mode), daemon=True).start()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--mode", choices=MODES, default="echo")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _exit_now)
    threading.Thread(target=_exit_when_parent_goes, daemon=True).start()
    serve(args.host, args.port, args.mode)


if __name__ == "__main__":
    main()
