"""Runs a real Enterprise Gateway with read-only views of its live process proxies added.

The end-to-end tests and the demo start this script instead of `jupyter enterprisegateway`: it is the
same EnterpriseGatewayApp with the same argv and environment, plus handlers under /egtunnel/ that
report what the live proxy objects inside the gateway hold (their tunnels, their SSH connections),
so that nothing a test asserts about tunnels is recomputed outside the process that owns them.

    python gateway_app.py [EnterpriseGatewayApp options...]
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from typing import Any

from enterprise_gateway.enterprisegatewayapp import EnterpriseGatewayApp
from tornado import web


def _describe_tunnel(obj: Any) -> dict[str, Any]:
    # EG's own tunnels are pexpect children; egtunnel's are native objects. Report what each has, so a
    # test can tell them apart and never mistakes a missing attribute for a value.
    desc: dict[str, Any] = {"type": f"{type(obj).__module__}.{type(obj).__qualname__}"}
    for name in ("channel", "local_port", "remote_host", "remote_port", "keep_alive_interval", "mode",
                 "kernel_id", "destination", "pid"):
        try:
            value = getattr(obj, name)
        except AttributeError:
            continue
        except Exception as exc:  # a property of a closed tunnel may raise; show why
            desc[name + "_error"] = repr(exc)
            continue
        if value is None or isinstance(value, (int, float, str, bool)):
            desc[name] = value
    for name in ("is_alive", "is_connected", "stats", "isalive"):
        method = getattr(obj, name, None)
        if callable(method):
            try:
                desc[name.replace("isalive", "is_alive")] = method()
            except Exception as exc:
                desc[name + "_error"] = repr(exc)
    return desc


def _describe_proxy(proxy: Any) -> dict[str, Any]:
    cls = type(proxy)
    km = proxy.kernel_manager
    return {
        # Where the gateway's own ZMQ sockets connect: the tunnels' local ends when tunneling is on.
        "kernel_manager_connection": {
            name: getattr(km, name, None)
            for name in ("ip", "shell_port", "iopub_port", "stdin_port", "hb_port", "control_port")
        },
        "class": f"{cls.__module__}.{cls.__qualname__}",
        "mro": [f"{c.__module__}.{c.__qualname__}" for c in cls.__mro__],
        "assigned_host": getattr(proxy, "assigned_host", None),
        "assigned_ip": getattr(proxy, "assigned_ip", None),
        "ip": getattr(proxy, "ip", None),
        "pid": getattr(proxy, "pid", None),
        "pgid": getattr(proxy, "pgid", None),
        "comm_ip": getattr(proxy, "comm_ip", None),
        "comm_port": getattr(proxy, "comm_port", None),
        "tunneled_connect_info": getattr(proxy, "tunneled_connect_info", None),
        "tunnels": {
            str(channel): _describe_tunnel(tunnel)
            for channel, tunnel in dict(getattr(proxy, "tunnel_processes", {}) or {}).items()
        },
    }


def _native_status() -> Any:
    try:
        import egtunnel
    except Exception as exc:  # the EG-only baseline runs without the extension
        return {"error": repr(exc)}
    try:
        return egtunnel.status()
    except Exception as exc:
        return {"error": repr(exc)}


def _imported() -> dict[str, Any]:
    # Which copy of egtunnel this interpreter loaded: an installed wheel or the checkout's sources.
    return {
        "python": sys.executable,
        "prefix": sys.prefix,
        "files": {name: getattr(sys.modules.get(name), "__file__", None) for name in ("egtunnel", "egtunnel._native")},
    }


class _Base(web.RequestHandler):
    def proxy(self, kernel_id: str) -> Any:
        km = self.settings["kernel_manager"]
        if kernel_id not in km:
            raise web.HTTPError(404, f"no kernel {kernel_id}")
        return km.get_kernel(kernel_id).process_proxy

    def write_json(self, value: Any) -> None:
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps(value, default=repr))


class StatusHandler(_Base):
    """GET /egtunnel/status: every live kernel's proxy and tunnels, egtunnel.status(), and where
    egtunnel was imported from."""

    def get(self) -> None:
        km = self.settings["kernel_manager"]
        kernels = {}
        for kid in list(km.list_kernel_ids()):
            try:
                proxy = km.get_kernel(kid).process_proxy
            except KeyError:
                continue
            kernels[kid] = _describe_proxy(proxy) if proxy is not None else None
        connections = _native_status()  # imports egtunnel, if the gateway has not yet
        self.write_json({
            "pid": os.getpid(),
            "threads": threading.active_count(),
            "kernels": kernels,
            "connections": connections,
            "imported": _imported(),
        })


class PollHandler(_Base):
    """POST /egtunnel/poll/<id>: the proxy's poll() as EG's restarter calls it (None means alive)."""

    async def post(self, kernel_id: str) -> None:
        proxy = self.proxy(kernel_id)
        loop = __import__("asyncio").get_running_loop()
        started = time.monotonic()
        result = await loop.run_in_executor(None, proxy.poll)
        self.write_json({"result": result, "seconds": time.monotonic() - started})


class RemoteSignalHandler(_Base):
    """POST /egtunnel/remote-signal/<id>?n=N&path=proxy|paramiko: time N signal-0 probes.

    `proxy` calls the proxy's own remote_signal(0); `paramiko` runs the same `kill -0 <pid>; echo $?`
    through EG's BaseProcessProxyABC.rsh, which opens a fresh paramiko connection per call, so both
    paths are measured against the same live kernel in the same run.
    """

    async def post(self, kernel_id: str) -> None:
        from enterprise_gateway.services.processproxies.processproxy import BaseProcessProxyABC

        proxy = self.proxy(kernel_id)
        n = int(self.get_argument("n", "10"))
        path = self.get_argument("path", "proxy")

        def probe() -> list[Any]:
            results = []
            for _ in range(n):
                started = time.monotonic()
                if path == "paramiko":
                    lines = BaseProcessProxyABC.rsh(proxy, proxy.ip, f"kill -0 {proxy.pid}; echo $?")
                    value: Any = [line.strip() for line in lines]
                else:
                    value = proxy.remote_signal(0)
                results.append({"seconds": time.monotonic() - started, "result": value})
            return results

        loop = __import__("asyncio").get_running_loop()
        self.write_json({"path": path, "calls": await loop.run_in_executor(None, probe)})


class ConnectionFileHandler(_Base):
    """GET /egtunnel/connection-file/<id>: the kernel's connection file as the gateway uses it (local
    tunnel ports and the session key), for `jupyter console --existing`. It hands out the key, so it
    answers loopback clients only; the gateway itself listens on loopback in tests and the demo."""

    def get(self, kernel_id: str) -> None:
        if self.request.remote_ip not in ("127.0.0.1", "::1"):
            raise web.HTTPError(403, "connection files are served to loopback clients only")
        km = self.settings["kernel_manager"].get_kernel(kernel_id)
        info = dict(km.get_connection_info())
        info = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in info.items()}
        self.write_json(info)


class StatusGatewayApp(EnterpriseGatewayApp):
    """EnterpriseGatewayApp plus the /egtunnel/ views; everything else is EG's."""

    def _create_request_handlers(self) -> list[tuple]:
        return [
            (r"/egtunnel/status", StatusHandler),
            (r"/egtunnel/poll/([^/]+)", PollHandler),
            (r"/egtunnel/remote-signal/([^/]+)", RemoteSignalHandler),
            (r"/egtunnel/connection-file/([^/]+)", ConnectionFileHandler),
            *super()._create_request_handlers(),
        ]


if __name__ == "__main__":
    StatusGatewayApp.launch_instance()
