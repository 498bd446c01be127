"""EchoServer: the TCP services of echo_server.py (echo, sink, source) in a child process of their own,
on loopback or inside a network namespace, started and stopped like the SSH servers."""

from __future__ import annotations

import os
import re
import select
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

from . import echo_server
from .netns import exec_prefix
from .owner import marked_pids, new_mark, reap_once, register, tagged_env, unregister
from .procs import kill_and_wait, stop_popen
from .waits import START_TIMEOUT

ECHO_SERVER_SCRIPT = Path(__file__).with_name("echo_server.py")


class EchoServer:
    """echo_server.py in a child process, on loopback or inside a namespace (see that file)."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, mode: str = "echo", netns: Optional[str] = None):
        if mode not in echo_server.MODES:
            raise ValueError(f"mode must be one of {echo_server.MODES}")
        self.host = host
        self.port = port
        self.mode = mode
        self.netns = netns
        self.mark = new_mark()
        self._proc: Optional[subprocess.Popen] = None
        register(self)

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> Optional[int]:
        return self._proc.pid if self._proc else None

    def start(self) -> "EchoServer":
        if self.running:
            return self
        reap_once()
        argv = [*exec_prefix(self.netns), sys.executable, str(ECHO_SERVER_SCRIPT),
                "--host", self.host, "--port", str(self.port), "--mode", self.mode]  # fmt: skip
        # stdin stays open for the child's lifetime: its EOF tells the server that we are gone.
        # stderr goes to an unnamed file, which can neither fill up like a pipe nor be left behind.
        with tempfile.TemporaryFile() as err:
            self._proc = subprocess.Popen(
                argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, env=tagged_env(self.mark)
            )
            line = self._read_line(self._proc, START_TIMEOUT)
            m = re.fullmatch(r"listening (\d+)", line.strip())
            if not m:
                self.stop()
                err.seek(0)
                detail = err.read().decode(errors="replace").strip()
                raise RuntimeError(f"{self.mode} server on {self.host}:{self.port} failed: {line!r} {detail}")
        self.port = int(m.group(1))
        return self

    @staticmethod
    def _read_line(proc: subprocess.Popen, timeout: float) -> str:
        assert proc.stdout is not None
        fd = proc.stdout.fileno()
        data = b""
        deadline = time.monotonic() + timeout
        while not data.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return data.decode(errors="replace")
            piece = os.read(fd, 256)
            if not piece:
                break
            data += piece
        return data.decode(errors="replace")

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            stop_popen(proc)
        # Connection threads die with the process; anything else carrying our mark goes too.
        kill_and_wait(marked_pids(self.mark))

    def close(self) -> None:
        self.stop()
        unregister(self)

    def __enter__(self) -> "EchoServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        where = f" netns={self.netns}" if self.netns else ""
        return f"<EchoServer {self.mode} {self.host}:{self.port}{where}>"
