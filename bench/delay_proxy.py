"""A TCP proxy on loopback that delays every byte by a fixed time in each direction (RTT = 2 x delay),
keeping byte order, so that egtunnel can be measured against a distant sshd on one machine.

Run as its own process (the benchmark's clients must not share its event loop, or their load would
add to the delay): `python delay_proxy.py --target HOST:PORT --delay-ms 25` prints "listening PORT"
once bound. SIGUSR1 resets every proxied connection at once (an abrupt network cut: both ends see a
reset), and the proxy keeps accepting new ones. It exits on SIGTERM or when stdin reaches EOF, so a
parent that dies leaves nothing behind. `DelayProxy` starts and stops such a process from Python.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
from typing import Optional

CHUNK = 256 * 1024


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with a reset rather than a FIN: the peer learns at once, as after a real cut."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
    writer.transport.abort()


class _Pipe:
    """One direction of one connection: bytes read now are written `delay` seconds later, in order.

    A reader task stamps each chunk with its arrival time; a writer task sleeps until the oldest
    chunk is due. Reading never waits for writing, so the delay is a pure latency, not a bandwidth cap.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float) -> None:
        self.reader, self.writer, self.delay = reader, writer, delay
        self.queue: collections.deque[tuple[float, bytes]] = collections.deque()
        self.ready = asyncio.Event()

    async def read(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                data = await self.reader.read(CHUNK)
                self.queue.append((loop.time() + self.delay, data))
                self.ready.set()
                if not data:
                    return
        except (ConnectionError, OSError):
            self.queue.append((loop.time() + self.delay, b""))
            self.ready.set()

    async def write(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                while not self.queue:
                    self.ready.clear()
                    await self.ready.wait()
                due, data = self.queue[0]
                wait = due - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                self.queue.popleft()
                if not data:
                    if self.writer.can_write_eof():
                        self.writer.write_eof()
                    return
                self.writer.write(data)
                await self.writer.drain()
        except (ConnectionError, OSError):
            return


async def serve(listen_host: str, listen_port: int, target: tuple[str, int], delay: float,
                announce: bool = True) -> None:  # fmt: skip
    connections: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()

    async def handle(c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter) -> None:
        try:
            u_reader, u_writer = await asyncio.open_connection(*target)
        except OSError:
            _reset(c_writer)
            return
        for w in (c_writer, u_writer):
            sock = w.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        pair = (c_writer, u_writer)
        connections.add(pair)
        up, down = _Pipe(c_reader, u_writer, delay), _Pipe(u_reader, c_writer, delay)
        tasks = [asyncio.create_task(t) for t in (up.read(), up.write(), down.read(), down.write())]
        try:
            await asyncio.gather(*tasks)
        except asyncio.CancelledError:
            pass  # the proxy is stopping
        finally:
            connections.discard(pair)
            for w in pair:
                w.close()

    def cut() -> None:
        for pair in list(connections):
            for w in pair:
                _reset(w)
        connections.clear()

    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGUSR1, cut)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    server = await asyncio.start_server(handle, listen_host, listen_port, backlog=1024)
    port = server.sockets[0].getsockname()[1]
    if announce:
        print(f"listening {port}", flush=True)
    # A parent that goes away closes our stdin: leave with it.
    threading.Thread(target=lambda: (sys.stdin.read(), loop.call_soon_threadsafe(stop.set)), daemon=True).start()
    async with server:
        await stop.wait()
    cut()


class DelayProxy:
    """A delay proxy process in front of `target`; `port` is where to connect instead."""

    def __init__(self, target: tuple[str, int], delay_ms: float, env: Optional[dict] = None) -> None:
        self.target, self.delay_ms = target, delay_ms
        self.proc: Optional[subprocess.Popen] = None
        self.port = 0
        self.env = env

    def start(self) -> "DelayProxy":
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--target", f"{self.target[0]}:{self.target[1]}",
             "--delay-ms", str(self.delay_ms)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=self.env,
        )  # fmt: skip
        line = self.proc.stdout.readline() if self.proc.stdout else ""
        if not line.startswith("listening "):
            self.stop()
            raise RuntimeError(f"delay proxy did not start: {line!r}")
        self.port = int(line.split()[1])
        return self

    def cut(self) -> None:
        """Reset every proxied connection now."""
        if self.proc is not None:
            self.proc.send_signal(signal.SIGUSR1)

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout):
            if f is not None:
                f.close()
        self.proc = None

    def __enter__(self) -> "DelayProxy":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--listen", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=0, help="port to listen on (default: any free port)")
    p.add_argument("--target", required=True, help="HOST:PORT to forward to")
    p.add_argument("--delay-ms", type=float, required=True, help="one-way delay per direction (RTT = 2 x this)")
    a = p.parse_args()
    host, _, port = a.target.rpartition(":")
    asyncio.run(serve(a.listen, a.port, (host, int(port)), a.delay_ms / 1000.0))


if __name__ == "__main__":
    main()
