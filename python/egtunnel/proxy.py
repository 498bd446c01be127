"""Enterprise Gateway process proxies whose SSH tunnels and remote commands are native (egtunnel._native).

`NativeTunnelMixin` goes before any EG `RemoteProcessProxy` subclass in the MRO and takes over every place
where EG spawns `ssh -L` processes or touches `tunnel_processes`, keeping EG's contracts: the same
`tunnel_processes` dict (its values are native `Tunnel` objects with `terminate()`), the same HTTP errors,
the same return values of `send_signal`/`poll`. The ready-made drop-ins subclass EG's classes of the same
names; `DistributedProcessProxy` also replaces EG's paramiko remote launch and signalling.

Threading: EG drives proxies from the gateway's event loop, partly from coroutines and partly from plain
methods called by coroutines. Blocking SSH work runs in short-lived threads; coroutines await it, and plain
methods called on the loop thread wait for it at most `_LOOP_WAIT` seconds (see `_bounded`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import errno
import functools
import json
import os
import socket
import threading
from dataclasses import dataclass
from socket import gethostbyname
from typing import Any, Callable, Optional, Sequence, Union

from enterprise_gateway.services.processproxies import processproxy as _pp
from enterprise_gateway.services.processproxies.conductor import (
    ConductorClusterProcessProxy as _EGConductorClusterProcessProxy,
)
from enterprise_gateway.services.processproxies.distributed import (
    DistributedProcessProxy as _EGDistributedProcessProxy,
)
from enterprise_gateway.services.processproxies.yarn import (
    YarnClusterProcessProxy as _EGYarnClusterProcessProxy,
)
from tornado import web

from . import _native
from .config import (
    SettingError,
    SshSettings,
    TunnelSettings,
    cull_idle_timeout_of,
    parse_ssh_settings,
    parse_tunnel_settings,
    parse_tunneling,
)
from .errors import ConnectionDown, HostKeyError, SshAuthError, TunnelError

__all__ = [
    "NativeTunnelMixin",
    "DistributedProcessProxy",
    "YarnClusterProcessProxy",
    "ConductorClusterProcessProxy",
]

KernelChannel = _pp.KernelChannel
_COMM = KernelChannel.COMMUNICATION.value

# EG's order of the five ZMQ forwards and the connection-info key of each remote port.
_KERNEL_PORTS = (
    (KernelChannel.SHELL, "shell_port"),
    (KernelChannel.IOPUB, "iopub_port"),
    (KernelChannel.STDIN, "stdin_port"),
    (KernelChannel.HEARTBEAT, "hb_port"),
    (KernelChannel.CONTROL, "control_port"),
)

# A plain method called on the event-loop thread blocks every kernel of the gateway while it waits. Healthy
# SSH round trips take milliseconds; past this budget the work finishes in the background and the caller
# gets EG's "alive / delivered" answer, because an unanswered link is unknown, not dead.
_LOOP_WAIT = 0.5
# A comm-port request that has not completed by then is abandoned (the native side raises TunnelTimeout).
_REQUEST_TIMEOUT = 10.0
# EG's rsh uses exec_command(timeout=30).
_EXEC_TIMEOUT = 30.0

_BIND_CONFLICT_ERRNOS = (errno.EADDRINUSE, errno.EACCES)


def _on_event_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def _start_thread(name: str, fn: Callable[..., Any], *args: Any) -> concurrent.futures.Future:
    """Run `fn` in a new daemon thread; the thread ends with the call, so idle gateways hold no extra threads."""
    future: concurrent.futures.Future = concurrent.futures.Future()

    def run() -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            future.set_result(fn(*args))
        except BaseException as exc:  # noqa: BLE001 - handed to whoever waits on the future
            future.set_exception(exc)

    threading.Thread(target=run, name=f"egtunnel-{name}", daemon=True).start()
    return future


def _channel_name(kernel_channel: Union["KernelChannel", str]) -> str:
    return kernel_channel.value if isinstance(kernel_channel, KernelChannel) else str(kernel_channel)


def _destination(user: Optional[str], host: str, port: int) -> str:
    return SshSettings(port=port, user=user).destination(host)


def _is_bind_conflict(exc: BaseException) -> bool:
    # The local port chosen within the range was taken between our check and the native bind.
    return isinstance(exc, OSError) and not isinstance(exc, ConnectionRefusedError) and exc.errno in _BIND_CONFLICT_ERRNOS


def _http_status(exc: BaseException) -> int:
    if isinstance(exc, web.HTTPError):
        return exc.status_code
    return 403 if isinstance(exc, (SshAuthError, HostKeyError)) else 500


@dataclass(frozen=True)
class _Forward:
    """One port to forward: which kernel channel, where it goes, and through which SSH server."""

    channel: str
    remote_host: str
    remote_port: int
    server: str
    port: int
    key: Optional[str] = None


class LocalPortUnavailable(Exception):
    """No local port within the kernel's port range could be bound for a forward."""


class _CloseAfter:
    """Stands in for the EG_COMM tunnel while a shutdown request to the launcher is still in flight.

    EG terminates the EG_COMM tunnel right after sending the shutdown request; closing it before the request
    has left would orphan the remote listener, so the close waits for the request to finish.
    """

    def __init__(self, tunnel: Any, pending: concurrent.futures.Future) -> None:
        self._tunnel = tunnel
        self._pending = pending

    def terminate(self) -> None:
        self._pending.add_done_callback(lambda _done: self._tunnel.terminate())

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tunnel, name)


class NativeTunnelMixin:
    """Makes an EG `RemoteProcessProxy` subclass tunnel natively; list it first among the bases.

    Tunneling is on when EG's `EG_ENABLE_TUNNELING` says so, unless the kernelspec's
    `process_proxy.config.tunneling` (true/false) says otherwise. With tunneling off every EG behaviour is
    left as EG has it.
    """

    # Subclasses that run remote commands natively need the SSH settings even without tunneling.
    _egtunnel_remote_exec = False

    def __init__(self, kernel_manager: Any, proxy_config: dict) -> None:
        super().__init__(kernel_manager, proxy_config)  # type: ignore[call-arg]
        self._egt_probe: Optional[concurrent.futures.Future] = None
        self._egt_unknown_logged = False
        self._egt_revive_failed = False
        self._egt_ssh_settings: Optional[SshSettings] = None
        self._egt_tunnel_settings: Optional[TunnelSettings] = None
        try:
            self.native_tunneling = parse_tunneling(proxy_config, _pp.tunneling_enabled is True)
        except SettingError as exc:
            self._egt_setting_failed(exc)
        # Fail the start now rather than after the remote kernel is already running.
        if self.native_tunneling or self._egtunnel_remote_exec:
            self._egt_ssh()
        if self.native_tunneling:
            self._egt_tunnels()
            if getattr(self, "use_gss", False):
                self.log_and_raise(
                    http_status_code=500,
                    reason=f"KernelID '{self.kernel_id}': EG_REMOTE_GSS_SSH=true is not supported by "
                    "native SSH tunnels; use key or password authentication, or turn tunneling off.",
                )

    # ----------------------------------------------------------------------------------------- settings

    def _egt_setting_failed(self, exc: SettingError) -> None:
        self.log_and_raise(http_status_code=500, reason=f"KernelID '{self.kernel_id}': {exc}")

    def _egt_ssh(self) -> SshSettings:
        if self._egt_ssh_settings is None:
            try:
                self._egt_ssh_settings = parse_ssh_settings(
                    os.environ, user=self.remote_user, password=self.remote_pwd, proxy_config=self.proxy_config
                )
            except SettingError as exc:
                self._egt_setting_failed(exc)
        return self._egt_ssh_settings  # type: ignore[return-value]

    def _egt_tunnels(self) -> TunnelSettings:
        if self._egt_tunnel_settings is None:
            try:
                self._egt_tunnel_settings = parse_tunnel_settings(os.environ, self.proxy_config)
            except SettingError as exc:
                self._egt_setting_failed(exc)
        return self._egt_tunnel_settings  # type: ignore[return-value]

    def _egt_dest(self, host: str, port: Optional[int] = None) -> str:
        ssh = self._egt_ssh()
        return _destination(ssh.user, host, ssh.port if port is None else port)

    def _get_keep_alive_interval(self, kernel_channel: Union["KernelChannel", str]) -> int:
        """EG's policy, with the margin configurable; the culling timeout is the mapping manager's."""
        return _native.keep_alive_interval(
            _channel_name(kernel_channel),
            max(0, cull_idle_timeout_of(self.kernel_manager)),
            self._egt_tunnels().keepalive_margin,
        )

    # --------------------------------------------------------------------------- bounded blocking calls

    def _bounded(
        self, name: str, fn: Callable[..., Any], *args: Any, probe: bool = False
    ) -> tuple[bool, Any]:
        """Run a blocking SSH call for a plain (non-async) EG method.

        Off the loop thread the call simply runs. On it, the call runs in a thread and is awaited for at
        most `_LOOP_WAIT`; then `(False, future)` is returned and the work goes on in the background.
        Liveness probes (`probe=True`) do not pile up: while one is still out, the next returns at once.
        Returns `(True, result)` or raises the call's exception.
        """
        if not _on_event_loop():
            return True, fn(*args)
        if probe and self._egt_probe is not None and not self._egt_probe.done():
            return False, self._egt_probe
        future = _start_thread(name, fn, *args)
        if probe:
            self._egt_probe = future
        concurrent.futures.wait([future], timeout=_LOOP_WAIT)
        if not future.done():
            return False, future
        return True, future.result()

    def _egt_liveness_unknown(self, what: str, cause: object) -> None:
        # Polls come every few seconds: say it once at warning, then at debug until the link answers again.
        message = (
            f"{what} for KernelID '{self.kernel_id}' got no answer ({cause}); liveness is unknown, "
            "so the kernel is treated as alive."
        )
        if self._egt_unknown_logged:
            self.log.debug(message)
        else:
            self._egt_unknown_logged = True
            self.log.warning(message)

    # ------------------------------------------------------------------------------------ opening tunnels

    def _spawn_ssh_tunnel(
        self,
        kernel_channel: Union["KernelChannel", str],
        local_port: int,
        remote_port: int,
        remote_ip: str,
        server: str,
        port: Optional[int] = None,
        key: Optional[str] = None,
    ) -> Any:
        """Open one native forward and return it once it listens and its SSH connection is authenticated."""
        ssh = self._egt_ssh()
        tunnels = self._egt_tunnels()
        kwargs = ssh.native_kwargs()
        if port is not None:
            kwargs["port"] = int(port)
        if key:
            kwargs["identity_file"] = os.path.expanduser(key)
        return _native.open_tunnel(
            server,
            remote_ip,
            int(remote_port),
            channel=_channel_name(kernel_channel),
            cull_idle_timeout=max(0, cull_idle_timeout_of(self.kernel_manager)),
            keepalive_margin=tunnels.keepalive_margin,
            keepalive_count_max=tunnels.keepalive_count_max,
            local_port=int(local_port),
            mode=tunnels.mode,
            kernel_id=self.kernel_id,
            # A server that forbids forwarding fails the start here, not the kernel's first message.
            verify=True,
            **kwargs,
        )

    def _create_ssh_tunnel(
        self,
        kernel_channel: Union["KernelChannel", str],
        local_port: int,
        remote_port: int,
        remote_ip: str,
        server: str,
        port: Optional[int] = None,
        key: Optional[str] = None,
    ) -> None:
        """EG's contract: open the forward on exactly `local_port` and record it in `tunnel_processes`."""
        forward = self._egt_forward(kernel_channel, remote_ip, remote_port, server, port, key)
        self.log.debug(
            f"Creating SSH tunnel for '{forward.channel}': 127.0.0.1:'{local_port}' to "
            f"'{remote_ip}':'{remote_port}'"
        )
        try:
            tunnel = self._spawn_ssh_tunnel(
                kernel_channel, local_port, remote_port, remote_ip, server, forward.port, key
            )
        except Exception as exc:
            self._egt_fail([], [(forward, exc)])
        self._egt_store([(forward, tunnel)])

    def _tunnel_to_kernel(
        self,
        connection_info: dict,
        server: str,
        port: Optional[int] = None,
        key: Optional[str] = None,
    ) -> tuple:
        """Forward the five ZMQ ports (EG's order) and return their local ports; blocks until all listen."""
        forwards = self._egt_kernel_forwards(connection_info, server, port, key)
        opened = self._egt_open_blocking(forwards)
        self._egt_store(list(zip(forwards, opened)))
        return tuple(t.local_port for t in opened)

    def _tunnel_to_port(
        self,
        kernel_channel: Union["KernelChannel", str],
        remote_ip: str,
        remote_port: int,
        server: str,
        port: Optional[int] = None,
        key: Optional[str] = None,
    ) -> int:
        """Forward one extra port (EG uses it for EG_COMM) and return the local port."""
        forward = self._egt_forward(kernel_channel, remote_ip, remote_port, server, port, key)
        (tunnel,) = self._egt_open_blocking([forward])
        self._egt_store([(forward, tunnel)])
        return tunnel.local_port

    def _egt_forward(
        self,
        kernel_channel: Union["KernelChannel", str],
        remote_ip: str,
        remote_port: int,
        server: str,
        port: Optional[int],
        key: Optional[str],
    ) -> _Forward:
        return _Forward(
            _channel_name(kernel_channel),
            remote_ip,
            int(remote_port),
            server,
            self._egt_ssh().port if port is None else int(port),
            key,
        )

    def _egt_kernel_forwards(
        self, connection_info: dict, server: str, port: Optional[int], key: Optional[str]
    ) -> list[_Forward]:
        ssh_port = self._egt_ssh().port if port is None else int(port)
        remote_ip = connection_info["ip"]
        return [
            _Forward(channel.value, remote_ip, int(connection_info[field]), server, ssh_port, key)
            for channel, field in _KERNEL_PORTS
        ]

    def _egt_open_one(self, forward: _Forward, taken: set, lock: threading.Lock) -> Any:
        """Open `forward` on a local port within the kernel's port range, retrying when a bind race is lost."""
        if self.upper_port - self.lower_port == 0:
            return self._spawn_ssh_tunnel(
                forward.channel, 0, forward.remote_port, forward.remote_host, forward.server,
                forward.port, forward.key,
            )
        attempts = _pp.max_port_range_retries + 1
        for _ in range(attempts):
            with lock:
                candidate = self._get_candidate_port()
                if candidate in taken or not self._egt_port_free(candidate):
                    continue
                taken.add(candidate)
            try:
                return self._spawn_ssh_tunnel(
                    forward.channel, candidate, forward.remote_port, forward.remote_host,
                    forward.server, forward.port, forward.key,
                )
            except (OSError, ValueError) as exc:
                if not _is_bind_conflict(exc):
                    raise
                self.log.debug(
                    f"Local port {candidate} for {forward.channel} was taken meanwhile; trying another."
                )
        raise LocalPortUnavailable(
            f"no free local port within range {self.kernel_manager.port_range} after {attempts} attempts"
        )

    @staticmethod
    def _egt_port_free(candidate: int) -> bool:
        # Same test as EG's select_socket (bind on all interfaces), with the listener's SO_REUSEADDR.
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("", candidate))
        except OSError:
            return False
        finally:
            sock.close()
        return True

    def _egt_open_plan(self, forwards: Sequence[_Forward]) -> tuple[list[_Forward], list[_Forward]]:
        # In shared mode the first forward brings up (or reuses) the host's one connection; the rest are only
        # channels on it. Opening it alone first means one handshake, and one error report if it fails.
        if self._egt_tunnels().mode == "shared" and len(forwards) > 1:
            return list(forwards[:1]), list(forwards[1:])
        return [], list(forwards)

    def _egt_open_blocking(self, forwards: Sequence[_Forward]) -> list[Any]:
        """Open the forwards concurrently; all or nothing. Blocks the calling thread."""
        taken: set = set()
        lock = threading.Lock()
        first, rest = self._egt_open_plan(forwards)
        outcomes: list[tuple[_Forward, Any]] = []
        for group in (first, rest):
            futures = [
                _start_thread(f"open-{f.channel}", self._egt_open_one, f, taken, lock) for f in group
            ]
            concurrent.futures.wait(futures)
            outcomes += [(f, _outcome(fut)) for f, fut in zip(group, futures)]
            if any(isinstance(o, BaseException) for _, o in outcomes):
                break
        return self._egt_collect(outcomes)

    async def _egt_open_async(self, forwards: Sequence[_Forward]) -> list[Any]:
        """As `_egt_open_blocking`, awaited from a coroutine so the gateway's loop keeps serving."""
        taken: set = set()
        lock = threading.Lock()
        first, rest = self._egt_open_plan(forwards)
        outcomes: list[tuple[_Forward, Any]] = []
        for group in (first, rest):
            futures = [
                _start_thread(f"open-{f.channel}", self._egt_open_one, f, taken, lock) for f in group
            ]
            try:
                # return_exceptions: every outcome is collected below, none is left unretrieved.
                await asyncio.gather(*(asyncio.wrap_future(fut) for fut in futures), return_exceptions=True)
            except asyncio.CancelledError:
                # The start was abandoned: whatever still comes up must not stay listening.
                for fut in futures:
                    fut.add_done_callback(_terminate_result)
                for _, outcome in outcomes:
                    _terminate_quietly(outcome)
                raise
            outcomes += [(f, _outcome(fut)) for f, fut in zip(group, futures)]
            if any(isinstance(o, BaseException) for _, o in outcomes):
                break
        return self._egt_collect(outcomes)

    def _egt_collect(self, outcomes: list[tuple[_Forward, Any]]) -> list[Any]:
        failures = [(f, o) for f, o in outcomes if isinstance(o, BaseException)]
        if failures:
            self._egt_fail([o for _, o in outcomes if not isinstance(o, BaseException)], failures)
        return [o for _, o in outcomes]

    def _egt_fail(self, opened: list[Any], failures: list[tuple[_Forward, BaseException]]) -> None:
        """Close every forward of this kernel, then raise EG's HTTP error for the most telling failure."""
        for tunnel in opened:
            _terminate_quietly(tunnel)
        self._egt_close_all()
        # An authentication or host-key refusal explains the others (they fail for the same reason).
        forward, exc = sorted(failures, key=lambda fe: _http_status(fe[1]) != 403)[0]
        if isinstance(exc, web.HTTPError):
            cause = exc.reason or exc.log_message or str(exc)
        else:
            cause = f"{type(exc).__name__}: {exc}"
        self.log_and_raise(
            http_status_code=_http_status(exc),
            reason=(
                f"Could not open SSH tunnel for port {forward.channel} of KernelID '{self.kernel_id}' "
                f"(127.0.0.1 -> {forward.remote_host}:{forward.remote_port} via "
                f"{self._egt_dest(forward.server, forward.port)}): {cause}"
            ),
        )

    def _egt_close_all(self) -> None:
        for tunnel in list(self.tunnel_processes.values()):
            _terminate_quietly(tunnel)
        self.tunnel_processes.clear()

    def _egt_store(self, pairs: list[tuple[_Forward, Any]]) -> None:
        for forward, tunnel in pairs:
            previous = self.tunnel_processes.get(forward.channel)
            if previous is not None and previous is not tunnel:
                _terminate_quietly(previous)
            self.tunnel_processes[forward.channel] = tunnel
            self.log.debug(
                f"Native SSH tunnel for '{forward.channel}' of KernelID '{self.kernel_id}': "
                f"127.0.0.1:{tunnel.local_port} -> {forward.remote_host}:{forward.remote_port} via "
                f"{self._egt_dest(forward.server, forward.port)}, keep-alive "
                f"{tunnel.keep_alive_interval} s, mode {tunnel.mode}"
            )

    # ------------------------------------------------------------------------------- connection info

    def _egt_forwards_for(self, connect_info: dict) -> list[_Forward]:
        """EG's tunnel layout: every port goes to the kernel host's own address, through sshd on that host."""
        connect_info["ip"] = self.assigned_ip
        self.tunneled_connect_info = dict(connect_info)
        forwards = self._egt_kernel_forwards(connect_info, self.assigned_ip, None, None)
        if "comm_port" in connect_info:
            forwards.append(
                _Forward(
                    _COMM,
                    self.assigned_ip,
                    int(connect_info["comm_port"]),
                    self.assigned_ip,
                    self._egt_ssh().port,
                )
            )
        return forwards

    def _egt_apply(self, connect_info: dict, forwards: list[_Forward], tunnels: list[Any]) -> None:
        self._egt_store(list(zip(forwards, tunnels)))
        local = {f.channel: t.local_port for f, t in zip(forwards, tunnels)}
        self.log.debug(f"Local ports used to create SSH tunnels: '{tuple(local.values())[:5]}'")
        connect_info["ip"] = "127.0.0.1"
        for channel, field in _KERNEL_PORTS:
            connect_info[field] = local[channel.value]
        if _COMM in local:
            self.comm_ip = connect_info["ip"]
            self.comm_port = local[_COMM]
            connect_info["comm_port"] = self.comm_port
            self.log.debug(
                f"Established gateway communication to: {self.assigned_ip}:"
                f"{self.tunneled_connect_info['comm_port']} for KernelID '{self.kernel_id}' via tunneled "
                f"port 127.0.0.1:{self.comm_port}"
            )
        else:
            self.log.debug(
                f"Gateway communication port has NOT been established for KernelID '{self.kernel_id}' "
                "(optional)."
            )
        self._update_connection(connect_info)

    def _egt_setup_untunneled(self, connect_info: dict) -> None:
        # EG's own branch for tunneling off, for when EG_ENABLE_TUNNELING is on but this kernelspec opts out
        # (EG's method reads the module flag, so it cannot be reused here).
        self.log.debug(f"Host assigned to the kernel is: '{self.assigned_host}' '{self.assigned_ip}'")
        connect_info["ip"] = self.assigned_ip
        if "comm_port" in connect_info:
            self.comm_ip = connect_info["ip"]
            self.comm_port = int(connect_info["comm_port"])
            self.log.debug(
                f"Established gateway communication to: {self.assigned_ip}:{self.comm_port} for "
                f"KernelID '{self.kernel_id}'"
            )
        else:
            self.log.debug(
                f"Gateway communication port has NOT been established for KernelID '{self.kernel_id}' "
                "(optional)."
            )
        self._update_connection(connect_info)

    def _setup_connection_info(self, connect_info: dict) -> None:
        """EG's entry point; this blocking form serves `load_process_info` (gateway start, no loop yet)."""
        if not self.native_tunneling:
            if _pp.tunneling_enabled is True:
                return self._egt_setup_untunneled(connect_info)
            return super()._setup_connection_info(connect_info)  # type: ignore[misc]
        self.log.debug(f"Host assigned to the kernel is: '{self.assigned_host}' '{self.assigned_ip}'")
        forwards = self._egt_forwards_for(connect_info)
        tunnels = self._egt_open_blocking(forwards)
        self._egt_apply(connect_info, forwards, tunnels)
        return None

    async def _egt_setup_connection_info_async(self, connect_info: dict) -> None:
        if not self.native_tunneling:
            self._setup_connection_info(connect_info)
            return
        self.log.debug(f"Host assigned to the kernel is: '{self.assigned_host}' '{self.assigned_ip}'")
        forwards = self._egt_forwards_for(connect_info)
        tunnels = await self._egt_open_async(forwards)
        self._egt_apply(connect_info, forwards, tunnels)

    async def receive_connection_info(self) -> bool:
        """EG's method, with the tunnels opened off the event loop and their HTTP status kept.

        EG calls `_setup_connection_info` synchronously from here and turns any failure into a 500; the
        native forwards are awaited instead, and a 403 (authentication, host key) reaches the client as 403.
        """
        if not self.native_tunneling:
            return await super().receive_connection_info()  # type: ignore[misc]
        try:
            connect_info = await self.response_manager.get_connection_info(self.kernel_id)
        except Exception as exc:
            if type(exc) is socket.timeout or type(exc) is asyncio.TimeoutError:
                self.log.debug(
                    f"Waiting for KernelID '{self.kernel_id}' to send connection info from host "
                    f"'{self.assigned_host}' - retrying..."
                )
                return False
            await self._egt_kill_off_loop()
            self.log_and_raise(
                http_status_code=500,
                reason=f"Exception occurred waiting for connection file response for KernelId "
                f"'{self.kernel_id}' on host '{self.assigned_host}': {exc}",
            )
        try:
            await self._egt_setup_connection_info_async(connect_info)
        except web.HTTPError:
            # The launcher is running remotely but cannot be reached: stop it, as EG does.
            await self._egt_kill_off_loop()
            raise
        except Exception as exc:
            await self._egt_kill_off_loop()
            self.log_and_raise(
                http_status_code=500,
                reason=f"Exception occurred waiting for connection file response for KernelId "
                f"'{self.kernel_id}' on host '{self.assigned_host}': {exc}",
            )
        return True

    async def _egt_kill_off_loop(self) -> None:
        try:
            await asyncio.wrap_future(_start_thread("kill", self.kill))
        except Exception as exc:
            self.log.warning(f"Killing KernelID '{self.kernel_id}' after a failed start failed: {exc}")

    def load_process_info(self, process_info: dict) -> None:
        """EG's revival of a persisted kernel; tunnels are re-opened by `_setup_connection_info`.

        A host that cannot be reached must not stop the gateway from starting: the kernel then polls as
        gone and EG drops its session, as it would have with its own tunnels.
        """
        try:
            super().load_process_info(process_info)  # type: ignore[misc]
        except web.HTTPError as exc:
            if not self.native_tunneling:
                raise
            self._egt_revive_failed = True
            self.log.warning(
                f"KernelID '{self.kernel_id}' cannot be revived: its tunnels could not be re-established "
                f"({exc.reason})."
            )

    def poll(self) -> Any:
        if self._egt_revive_failed:
            return False
        return super().poll()  # type: ignore[misc]

    # ------------------------------------------------------------------------- comm-port requests

    def _send_listener_request(self, request: dict, shutdown_socket: bool = False) -> None:
        """EG's comm-port request, sent through the EG_COMM tunnel's SSH connection to the remote port.

        A local connection to a forward always succeeds, so EG's refusal test would never fire through a
        tunnel; asking the remote end directly restores it. Outcomes, as EG's callers expect them:
        the remote port refuses → ConnectionRefusedError(ECONNREFUSED) ("no process", dead); the SSH
        connection is down and re-establishing → return normally (liveness unknown, kernel kept); any
        other failure → raised (EG logs it and falls back to its remote signal).
        """
        if not self.native_tunneling or self.comm_port <= 0:
            return super()._send_listener_request(request, shutdown_socket)  # type: ignore[misc]
        tunnel = self.tunnel_processes.get(_COMM)
        if tunnel is None:
            # EG's own local connect would be refused once the EG_COMM forward is gone (after
            # shutdown_listener or cleanup), which is how it learns the launcher has exited.
            raise ConnectionRefusedError(
                errno.ECONNREFUSED,
                f"EG_COMM tunnel of KernelID '{self.kernel_id}' is closed; cannot send {request}",
            )
        data = json.dumps(request).encode(encoding="utf-8")
        is_poll = request.get("signum") == 0
        try:
            done, outcome = self._bounded(
                f"send-{self.kernel_id}", tunnel.send_request, data, _REQUEST_TIMEOUT, probe=is_poll
            )
        except ConnectionDown as exc:
            if is_poll:
                self._egt_liveness_unknown("Poll through the EG_COMM tunnel", exc)
            else:
                self.log.warning(
                    f"Request {request} for KernelID '{self.kernel_id}' not delivered: {exc}"
                )
            return None
        if not done:
            if shutdown_socket and not isinstance(tunnel, _CloseAfter):
                self.tunnel_processes[_COMM] = _CloseAfter(tunnel, outcome)
            if is_poll:
                self._egt_liveness_unknown("Poll through the EG_COMM tunnel", "still waiting")
            else:
                self.log.debug(
                    f"Request {request} for KernelID '{self.kernel_id}' still in flight; continuing."
                )
            return None
        self._egt_unknown_logged = False
        return None


class DistributedProcessProxy(NativeTunnelMixin, _EGDistributedProcessProxy):
    """EG's DistributedProcessProxy with native tunnels and native remote launch and signalling.

    EG opens a new paramiko connection for every launch, poll and signal; here they are commands on the
    host's pooled SSH connection, run off the event loop where EG's caller is a coroutine.
    """

    _egtunnel_remote_exec = True

    def _egt_exec(self, host: str, command: str) -> Any:
        return _native.remote_exec(host, command, timeout=_EXEC_TIMEOUT, **self._egt_ssh().native_kwargs())

    def rsh(self, host: str, command: str) -> list[str]:
        """EG's contract: stdout lines, or stderr lines when stdout is empty; 403 when SSH refuses us."""
        if getattr(self, "use_gss", False):
            return super().rsh(host, command)
        try:
            result = self._egt_exec(host, command)
        except (SshAuthError, HostKeyError) as exc:
            self.log_and_raise(
                http_status_code=403,
                reason=f"SSH to {self._egt_dest(host)} refused for KernelID '{self.kernel_id}': "
                f"{type(exc).__name__}: {exc}",
            )
        return result.lines()

    def remote_signal(self, signum: int) -> Optional[bool]:
        """EG's `kill -N target; echo $?` through the pooled connection; None when delivered, else False.

        A poll (signal 0) that cannot reach the host because the connection is down or timing out reports
        the kernel alive: an unreachable host says nothing about the kernel, and EG would otherwise discard
        a healthy kernel after a network blip.
        """
        if getattr(self, "use_gss", False):
            return super().remote_signal(signum)
        target = "-" + str(self.pgid) if self.pgid > 0 and signum > 0 else str(self.pid)
        cmd = f"kill -{signum} {target}; echo $?"
        if signum > 0:
            self.log.debug(f"Sending signal: {signum} to target: {target} on host: {self.ip}")
        try:
            done, outcome = self._bounded(
                f"signal-{self.kernel_id}", self._egt_exec, self.ip, cmd, probe=signum == 0
            )
        except (SshAuthError, HostKeyError) as exc:
            self.log.warning(
                f"Remote signal({signum}) to '{target}' on {self._egt_dest(self.ip)} failed with "
                f"exception '{exc}'."
            )
            return False
        except (TunnelError, TimeoutError) as exc:
            if signum == 0:
                self._egt_liveness_unknown(f"Remote poll on {self._egt_dest(self.ip)}", exc)
                return None
            self.log.warning(
                f"Remote signal({signum}) to '{target}' on {self._egt_dest(self.ip)} failed with "
                f"exception '{exc}'."
            )
            return False
        except Exception as exc:
            self.log.warning(
                f"Remote signal({signum}) to '{target}' on host '{self.ip}' failed with exception '{exc}'."
            )
            return False
        if not done:
            if signum == 0:
                self._egt_liveness_unknown(f"Remote poll on {self._egt_dest(self.ip)}", "still waiting")
            else:
                self.log.debug(f"Remote signal({signum}) to '{target}' still in flight; continuing.")
            return None
        self._egt_unknown_logged = False
        val = None
        for line in outcome.lines():
            val = line.strip()
        if val == "0":
            return None
        return False

    async def launch_process(self, kernel_cmd: str, **kwargs: Any) -> "DistributedProcessProxy":
        """EG's launch with the host lookup and the remote command off the event loop.

        EG wraps every launch failure into a 500; an SSH authentication or host-key refusal stays a 403.
        """
        env_dict = kwargs.get("env")
        # EG's RemoteProcessProxy part (env, authorization); EG's own Distributed body is replaced below.
        await super(_EGDistributedProcessProxy, self).launch_process(kernel_cmd, **kwargs)

        self.assigned_host = self._determine_next_host(env_dict)
        self.ip = await asyncio.wrap_future(
            _start_thread("resolve", gethostbyname, self.assigned_host)
        )
        self.assigned_ip = self.ip

        try:
            result_pid = await asyncio.wrap_future(
                _start_thread(
                    f"launch-{self.kernel_id}",
                    functools.partial(self._launch_remote_process, kernel_cmd, **kwargs),
                )
            )
            self.pid = int(result_pid)
        except web.HTTPError:
            raise
        except Exception as exc:
            self.log_and_raise(
                http_status_code=500,
                reason=f"Failure occurred starting kernel on '{self.ip}' "
                f"({self._egt_dest(self.ip)}).  Returned result: {exc}",
            )

        self.log.info(
            f"Kernel launched on '{self.assigned_host}', pid: {self.pid}, ID: {self.kernel_id}, "
            f"Log file: {self.assigned_host}:{self.kernel_log}, Command: '{kernel_cmd}'.  "
        )
        await self.confirm_remote_startup()
        return self


class YarnClusterProcessProxy(NativeTunnelMixin, _EGYarnClusterProcessProxy):
    """EG's YarnClusterProcessProxy with native tunnels to the YARN node running the kernel."""


class ConductorClusterProcessProxy(NativeTunnelMixin, _EGConductorClusterProcessProxy):
    """EG's ConductorClusterProcessProxy with native tunnels to the Conductor host running the kernel."""


def _outcome(future: concurrent.futures.Future) -> Any:
    exc = future.exception()
    return exc if exc is not None else future.result()


def _terminate_quietly(tunnel: Any) -> None:
    if isinstance(tunnel, BaseException):
        return
    try:
        tunnel.terminate()
    except Exception:  # noqa: BLE001 - closing is best effort; the failure being reported matters more
        pass


def _terminate_result(future: concurrent.futures.Future) -> None:
    if not future.cancelled() and future.exception() is None:
        _terminate_quietly(future.result())

