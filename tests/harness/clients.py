"""Clients of the echo_server.py services, for checking and measuring what goes through a tunnel:
single exchanges, streams whose sha256 is compared end to end, round-trip timings, percentiles."""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import socket
import threading
import time
from dataclasses import dataclass
from typing import Sequence

from . import echo_server
from .waits import START_TIMEOUT


def connect(host: str, port: int, timeout: float = START_TIMEOUT) -> socket.socket:
    """A TCP connection with TCP_NODELAY, so measurements are not skewed by our own Nagle."""
    s = socket.create_connection((host, port), timeout=timeout)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def recv_exact_into(s: socket.socket, view: memoryview, what: str = "connection") -> None:
    """Fill view from s; allocation-free, so timed loops can call it."""
    got, n = 0, len(view)
    while got < n:
        k = s.recv_into(view[got:])
        if k == 0:
            raise ConnectionError(f"{what} closed after {got} of {n} bytes")
        got += k


def recv_exact(s: socket.socket, n: int) -> bytes:
    """n bytes from s; ConnectionError if it closes first."""
    buf = bytearray(n)
    recv_exact_into(s, memoryview(buf))
    return bytes(buf)


def recv_all(s: socket.socket) -> bytes:
    """Everything s sends until the peer closes its side."""
    chunks = []
    while True:
        piece = s.recv(echo_server.BUFFER_SIZE)
        if not piece:
            return b"".join(chunks)
        chunks.append(piece)


def echo_once(host: str, port: int, payload: bytes = b"hello egtunnel\n", timeout: float = START_TIMEOUT) -> bytes:
    """Send payload, half-close, and return everything the echo server sends back before closing."""
    with connect(host, port, timeout) as s:
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        return recv_all(s)


@dataclass
class StreamResult:
    sent_bytes: int
    sent_sha256: str
    received_bytes: int
    received_sha256: str
    seconds: float

    @property
    def ok(self) -> bool:
        return self.sent_bytes == self.received_bytes and self.sent_sha256 == self.received_sha256

    @property
    def bytes_per_second(self) -> float:
        return max(self.sent_bytes, self.received_bytes) / self.seconds if self.seconds > 0 else float("inf")


def sha256_echo(host: str, port: int, nbytes: int = 64 << 20, timeout: float = 120.0) -> StreamResult:
    """Send nbytes to an echo server while reading the echo back concurrently; compare sha256.

    Writing and reading at once matters: a client that wrote everything first would deadlock as soon
    as the buffers along the path are full.
    """
    sent = hashlib.sha256()
    errors: list[BaseException] = []
    with connect(host, port, timeout) as s:
        s.settimeout(timeout)

        def writer() -> None:
            try:
                for piece in echo_server.pattern_chunks(nbytes):
                    sent.update(piece)
                    s.sendall(piece)
                s.shutdown(socket.SHUT_WR)
            except BaseException as e:  # re-raised in the calling thread
                errors.append(e)

        start = time.perf_counter()
        t = threading.Thread(target=writer, name="sha256_echo-writer", daemon=True)
        t.start()
        received = hashlib.sha256()
        count = 0
        buf = bytearray(echo_server.BUFFER_SIZE)
        view = memoryview(buf)
        try:
            while True:
                k = s.recv_into(buf)
                if k == 0:
                    break
                received.update(view[:k])
                count += k
        finally:
            if t.is_alive():
                # Unblock a writer stuck in sendall before waiting for it.
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
            t.join(timeout)
        seconds = time.perf_counter() - start
    if errors:
        raise errors[0]
    return StreamResult(nbytes, sent.hexdigest(), count, received.hexdigest(), seconds)


def sink_send(host: str, port: int, nbytes: int, timeout: float = 120.0) -> StreamResult:
    """Send nbytes one way to a sink server; received_* is what the server counted and hashed."""
    sent = hashlib.sha256()
    with connect(host, port, timeout) as s:
        s.settimeout(timeout)
        start = time.perf_counter()
        for piece in echo_server.pattern_chunks(nbytes):
            sent.update(piece)
            s.sendall(piece)
        s.shutdown(socket.SHUT_WR)
        reply = recv_all(s).decode()
        seconds = time.perf_counter() - start
    count, digest = reply.split()
    return StreamResult(nbytes, sent.hexdigest(), int(count), digest, seconds)


def source_receive(host: str, port: int, nbytes: int, timeout: float = 120.0) -> StreamResult:
    """Ask a source server for nbytes and read them; sent_* is what the server's pattern should be."""
    received = hashlib.sha256()
    count = 0
    with connect(host, port, timeout) as s:
        s.settimeout(timeout)
        start = time.perf_counter()
        s.sendall(f"{nbytes}\n".encode())
        buf = bytearray(echo_server.BUFFER_SIZE)
        view = memoryview(buf)
        while True:
            k = s.recv_into(buf)
            if k == 0:
                break
            received.update(view[:k])
            count += k
        seconds = time.perf_counter() - start
    return StreamResult(nbytes, echo_server.pattern_digest(nbytes), count, received.hexdigest(), seconds)


def round_trips(host: str, port: int, count: int = 10_000, size: int = 1024, timeout: float = 10.0) -> list[float]:
    """Seconds of each of count round trips of size bytes through one connection to an echo server."""
    payload = os.urandom(size)
    samples = []
    clock = time.perf_counter
    with connect(host, port, timeout) as s:
        s.settimeout(timeout)
        for _ in range(count):
            t0 = clock()
            s.sendall(payload)
            back = recv_exact(s, size)
            samples.append(clock() - t0)
            if back != payload:
                raise AssertionError("echo returned different bytes")
    return samples


def percentile(samples: Sequence[float], p: float) -> float:
    """Nearest-rank percentile, p in [0, 100]."""
    if not samples:
        raise ValueError("no samples")
    ordered = sorted(samples)
    k = max(0, min(len(ordered) - 1, math.ceil(p / 100 * len(ordered)) - 1))
    return ordered[k]
