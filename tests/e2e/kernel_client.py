"""A small Enterprise Gateway client: kernels over REST, cells over the kernel's websocket.

It speaks the same REST and websocket protocol JupyterLab and `jupyter console --gateway-url` speak, so
that what the end-to-end tests observe is what a user of the gateway would observe. Every call is
bounded in time: a hung gateway fails a test instead of stalling the run.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Optional

import requests
import websocket


class GatewayError(Exception):
    """The gateway answered a REST call with an error status."""

    def __init__(self, method: str, path: str, response: requests.Response):
        self.status = response.status_code
        self.reason = _reason(response)
        self.elapsed = response.elapsed.total_seconds()
        super().__init__(f"{method} {path} -> {self.status}: {self.reason}")


def _reason(response: requests.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text
    return str(body.get("message") or body.get("reason") or body)


@dataclass
class CellResult:
    """What one execute_request produced, collected until the reply and the idle status are both in."""

    status: str = ""
    stdout: str = ""
    stderr: str = ""
    result: Optional[str] = None
    ename: Optional[str] = None
    evalue: Optional[str] = None
    seconds: float = 0.0
    statuses: list[str] = field(default_factory=list)


class Rest:
    """REST calls to one gateway with a default timeout."""

    def __init__(self, base_url: str, timeout: float = 30.0):
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.session = requests.Session()

    def call(self, method: str, path: str, *, json_body: Any = None, timeout: Optional[float] = None,
             ok: tuple[int, ...] = (200, 201, 204)) -> requests.Response:
        response = self.session.request(method, self.base_url + path, json=json_body,
                                        timeout=timeout or self.timeout)
        if response.status_code not in ok:
            raise GatewayError(method, path, response)
        return response

    def close(self) -> None:
        self.session.close()


class Kernel:
    """One kernel started through POST /api/kernels; the websocket is opened on first use."""

    def __init__(self, rest: Rest, kernel_id: str, name: str, start_seconds: float):
        self.rest = rest
        self.id = kernel_id
        self.name = name
        self.start_seconds = start_seconds
        self.session_id = uuid.uuid4().hex
        self._ws: Optional[websocket.WebSocket] = None
        self.deleted = False
        # Kernel-level states the gateway announced on this websocket (restarting, dead, ...), so a
        # test can tell whether the gateway ever gave up on the kernel while it looked elsewhere.
        self.lifecycle_states: list[str] = []

    # -- REST -------------------------------------------------------------------------------------

    def model(self) -> dict[str, Any]:
        return self.rest.call("GET", f"/api/kernels/{self.id}").json()

    def interrupt(self, timeout: float = 15.0) -> float:
        started = time.monotonic()
        self.rest.call("POST", f"/api/kernels/{self.id}/interrupt", timeout=timeout)
        return time.monotonic() - started

    def restart(self, timeout: float = 90.0) -> float:
        """Restart and reconnect: a gateway restart gives the kernel new ports, as JupyterLab knows."""
        self.close_ws()
        started = time.monotonic()
        self.rest.call("POST", f"/api/kernels/{self.id}/restart", timeout=timeout)
        return time.monotonic() - started

    def delete(self, timeout: float = 60.0) -> float:
        self.close_ws()
        started = time.monotonic()
        self.rest.call("DELETE", f"/api/kernels/{self.id}", timeout=timeout)
        self.deleted = True
        return time.monotonic() - started

    # -- websocket --------------------------------------------------------------------------------

    @property
    def ws_url(self) -> str:
        base = self.rest.base_url.replace("http://", "ws://", 1).replace("https://", "wss://", 1)
        return f"{base}/api/kernels/{self.id}/channels?session_id={self.session_id}"

    def ws(self, timeout: float = 60.0) -> websocket.WebSocket:
        if self._ws is None:
            self._ws = websocket.create_connection(self.ws_url, timeout=timeout)
        return self._ws

    def close_ws(self) -> None:
        if self._ws is not None:
            try:
                self._ws.close(timeout=2)
            except Exception:
                pass
            self._ws = None

    def send(self, msg_type: str, content: dict[str, Any], channel: str = "shell") -> str:
        msg_id = uuid.uuid4().hex
        self.ws().send(json.dumps({
            "header": {
                "msg_id": msg_id,
                "msg_type": msg_type,
                "username": "e2e",
                "session": self.session_id,
                "date": datetime.now(timezone.utc).isoformat(),
                "version": "5.3",
            },
            "parent_header": {},
            "metadata": {},
            "content": content,
            "channel": channel,
            "buffers": [],
        }))
        return msg_id

    def recv(self, deadline: float) -> Optional[dict[str, Any]]:
        """The next message, or None once the deadline has passed."""
        ws = self.ws()
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            # Short socket timeouts: websocket-client answers the server's pings inside recv() and
            # starts its timeout afresh after each, so one long timeout could outlive the deadline.
            ws.settimeout(min(remaining, 1.0))
            try:
                raw = ws.recv()
                break
            except websocket.WebSocketTimeoutException:
                continue
        if isinstance(raw, bytes):  # binary frames carry buffers this client never asks for
            return {}
        msg = json.loads(raw)
        state = msg.get("content", {}).get("execution_state")
        if state in ("restarting", "dead", "autorestarting"):
            self.lifecycle_states.append(state)
        return msg

    def execute(self, code: str, timeout: float = 60.0, on_busy: Any = None) -> CellResult:
        """Run a cell; `on_busy` is called once the kernel reports it is running this cell."""
        started = time.monotonic()
        deadline = started + timeout
        msg_id = self.send("execute_request", {
            "code": code, "silent": False, "store_history": True, "user_expressions": {},
            "allow_stdin": False, "stop_on_error": True,
        })
        cell = CellResult()
        replied = idle = False
        while not (replied and idle):
            msg = self.recv(deadline)
            if msg is None:
                raise TimeoutError(f"cell did not finish within {timeout}s on kernel {self.id}: "
                                   f"{cell}")
            if msg.get("parent_header", {}).get("msg_id") != msg_id:
                continue
            kind = msg.get("msg_type") or msg.get("header", {}).get("msg_type")
            content = msg.get("content", {})
            if kind == "execute_reply":
                replied = True
                cell.status = content.get("status", "")
                cell.ename = content.get("ename", cell.ename)
                cell.evalue = content.get("evalue", cell.evalue)
            elif kind == "status":
                state = content.get("execution_state", "")
                cell.statuses.append(state)
                if state == "busy" and on_busy is not None:
                    on_busy()
                    on_busy = None
                idle = idle or state == "idle"
            elif kind == "stream":
                if content.get("name") == "stderr":
                    cell.stderr += content.get("text", "")
                else:
                    cell.stdout += content.get("text", "")
            elif kind in ("execute_result", "display_data"):
                cell.result = content.get("data", {}).get("text/plain")
            elif kind == "error":
                cell.ename = content.get("ename")
                cell.evalue = content.get("evalue")
        cell.seconds = time.monotonic() - started
        return cell

    def wait_for_lifecycle(self, states: set[str], timeout: float) -> Optional[str]:
        """Wait until the gateway announces one of `states` (restarting, dead); None if it never did."""
        deadline = time.monotonic() + timeout
        while True:
            seen = [s for s in self.lifecycle_states if s in states]
            if seen:
                return seen[0]
            if self.recv(deadline) is None:
                return None


class GatewayClient:
    """Starts and tracks kernels on one gateway, and deletes whatever is left when closed."""

    def __init__(self, base_url: str, timeout: float = 30.0):
        self.rest = Rest(base_url, timeout)
        self.kernels: list[Kernel] = []

    def kernelspecs(self, timeout: float = 10.0) -> dict[str, Any]:
        return self.rest.call("GET", "/api/kernelspecs", timeout=timeout).json()

    def list_kernels(self) -> list[dict[str, Any]]:
        return self.rest.call("GET", "/api/kernels").json()

    def start_kernel(self, name: str, env: Optional[dict[str, str]] = None,
                     timeout: float = 90.0) -> Kernel:
        body: dict[str, Any] = {"name": name}
        if env:
            body["env"] = env
        started = time.monotonic()
        response = self.rest.call("POST", "/api/kernels", json_body=body, timeout=timeout)
        kernel = Kernel(self.rest, response.json()["id"], name, time.monotonic() - started)
        self.kernels.append(kernel)
        return kernel

    def close(self) -> None:
        for kernel in self.kernels:
            kernel.close_ws()
            if not kernel.deleted:
                try:
                    kernel.delete(timeout=10)
                except Exception:
                    pass  # already gone (failed start, culled, removed as dead): nothing to do
        self.kernels.clear()
        self.rest.close()
