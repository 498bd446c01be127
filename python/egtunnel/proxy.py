"""Enterprise Gateway process proxies whose SSH tunnels and remote commands are native.

`NativeTunnelMixin` goes before any EG `RemoteProcessProxy` subclass in the MRO. It keeps only EG's hook
methods, each handing over to the kernel's `KernelTunnels` (egtunnel.kernel_tunnels), which does the work;
EG's contracts stay: the same `tunnel_processes` dict (its values are native `Tunnel` objects whose
`terminate()` returns at once), the same HTTP errors, the same return values of `send_signal`/`poll`.
The ready-made drop-ins subclass EG's classes of the same names; `DistributedProcessProxy` also
replaces EG's paramiko remote launch and signalling, and stops on the host whatever a failed start
launched there.

EG calls some hooks from coroutines (launch, connection info) and others as plain methods on its event
loop (poll, send_signal, kill, cleanup, shutdown_listener). The first await native calls; the second
never wait on the network (see `KernelTunnels`).
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import socket
from typing import Any, Optional, Union

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

from .config import (
    SettingError,
    TunnelSettings,
    cull_idle_timeout_of,
    parse_ssh_settings,
    parse_tunnel_settings,
    parse_tunneling,
)
from .errors import HostKeyError, SshAuthError, SshConnectError
from .kernel_tunnels import (
    COMM,
    EXEC_TIMEOUT,
    KERNEL_PORTS,
    Forward,
    KernelTunnels,
    http_status,
    is_loopback,
    on_event_loop,
)

__all__ = [
    "NativeTunnelMixin",
    "DistributedProcessProxy",
    "YarnClusterProcessProxy",
    "ConductorClusterProcessProxy",
]

KernelChannel = _pp.KernelChannel
# Response addresses that cannot be carried over SSH, already logged (once per address).
_unusable_response_logged: set[str] = set()


def _channel_name(kernel_channel: Union["KernelChannel", str]) -> str:
    return kernel_channel.value if isinstance(kernel_channel, KernelChannel) else str(kernel_channel)


class NativeTunnelMixin:
    """Makes an EG `RemoteProcessProxy` subclass tunnel natively; list it first among the bases.

    Tunneling is on when EG's `EG_ENABLE_TUNNELING` says so, unless the kernelspec's
    `process_proxy.config.tunneling` (true/false) says otherwise. With tunneling off every EG behaviour is
    left as EG has it. `self.egtunnel` is the kernel's `KernelTunnels` (None when no SSH of ours is used).
    """

    # Subclasses that run remote commands natively need the SSH settings even without tunneling.
    _egtunnel_remote_exec = False
    # Subclasses whose kill() returns at once on the event loop.
    _egtunnel_kill_on_loop = False

    def __init__(self, kernel_manager: Any, proxy_config: dict) -> None:
        super().__init__(kernel_manager, proxy_config)  # type: ignore[call-arg]
        self.egtunnel: Optional[KernelTunnels] = None
        self._egtunnel_revive_failed = False
        try:
            self.native_tunneling = parse_tunneling(proxy_config, _pp.tunneling_enabled is True)
            # Fail the start now rather than after the remote kernel is already running.
            if self.native_tunneling or self._egtunnel_remote_exec:
                # EG defaults the remote user to the gateway's own; only a set EG_REMOTE_USER may override
                # the User of the host's ssh_config entry.
                ssh = parse_ssh_settings(os.environ, user=os.environ.get("EG_REMOTE_USER") and self.remote_user,
                                         password=self.remote_pwd, proxy_config=self.proxy_config)  # fmt: skip
                settings = parse_tunnel_settings(os.environ, self.proxy_config) if self.native_tunneling else TunnelSettings()
                self.egtunnel = KernelTunnels(self.kernel_id, self.log, ssh, settings, self.tunnel_processes,
                                              lambda: cull_idle_timeout_of(self.kernel_manager))  # fmt: skip
                self.egtunnel.respond_to = self._egtunnel_respond_to(settings)
        except SettingError as exc:
            self.log_and_raise(http_status_code=500, reason=f"KernelID '{self.kernel_id}': {exc}")
        if self.native_tunneling and getattr(self, "use_gss", False):
            self.log_and_raise(
                http_status_code=500,
                reason=f"KernelID '{self.kernel_id}': EG_REMOTE_GSS_SSH=true is not supported by "
                "native SSH tunnels; use key or password authentication, or turn tunneling off.",
            )

    def _egtunnel_respond_to(self, settings: TunnelSettings) -> Optional[str]:
        """EG's response address, when this proxy's launches carry connection info back over SSH."""
        if not (self.native_tunneling and self._egtunnel_remote_exec) or settings.response == "direct":
            return None
        address = str(getattr(self.kernel_manager, "response_address", None) or "")
        host, _, port = address.rpartition(":")
        try:
            ipaddress.ip_address(host.strip("[]"))
            return address if port.isdigit() else None
        except ValueError:
            pass
        if settings.response == "ssh":
            raise SettingError("response", settings.response,
                               f"needs the gateway's response address as IP:PORT, got {address!r} (set EG_RESPONSE_IP)")  # fmt: skip
        if address not in _unusable_response_logged:
            _unusable_response_logged.add(address)
            self.log.warning(f"Connection info goes directly to the gateway's response address {address!r}, not over "
                             "SSH: a remote forward needs it as IP:PORT (set EG_RESPONSE_IP).")  # fmt: skip
        return None

    def _egtunnel_launch_env(self, kwargs: dict) -> None:
        """Tells egtunnel's launcher where to bind the kernel's ports: with tunneling on, the host's
        loopback unless the kernelspec says otherwise (EG's launcher ignores it and binds 0.0.0.0)."""
        env = kwargs.get("env")
        if self.native_tunneling and isinstance(env, dict) and self.egtunnel is not None:
            env["EGTUNNEL_KERNEL_IP"] = self.egtunnel.settings.kernel_ip

    async def launch_process(self, kernel_cmd: Any, **kwargs: Any) -> Any:
        """EG's launch, with the launcher told where to bind the kernel's ports."""
        self._egtunnel_launch_env(kwargs)
        return await super().launch_process(kernel_cmd, **kwargs)  # type: ignore[misc]

    def _get_keep_alive_interval(self, kernel_channel: Union["KernelChannel", str]) -> int:
        """EG's policy, with the margin configurable; the culling timeout is the mapping manager's."""
        return self.egtunnel.keep_alive_interval(_channel_name(kernel_channel))  # type: ignore[union-attr]

    # ------------------------------------------------------------------------------ opening tunnels

    def _port_range(self) -> tuple[tuple[int, int], int]:
        return (int(self.lower_port), int(self.upper_port)), _pp.max_port_range_retries + 1

    def _egtunnel_open(self, forwards: list[Forward]) -> dict[str, Any]:
        """Blocking open with EG's HTTP errors; for EG's plain hooks and the start-up revival."""
        try:
            return self.egtunnel.open_blocking(forwards, *self._port_range())  # type: ignore[union-attr]
        except Exception as exc:
            self.log_and_raise(http_status_code=http_status(exc), reason=self.egtunnel.failure_reason(forwards, exc))  # type: ignore[union-attr]

    def _spawn_ssh_tunnel(self, kernel_channel: Union["KernelChannel", str], local_port: int, remote_port: int,
                          remote_ip: str, server: str, port: Optional[int] = None, key: Optional[str] = None) -> Any:  # fmt: skip
        """EG's hook: one forward on exactly `local_port`, returned once it listens."""
        forward = Forward(_channel_name(kernel_channel), remote_ip, int(remote_port), server,
                          self.egtunnel.ssh.port if port is None else int(port))  # type: ignore[union-attr]  # fmt: skip
        port_range = (int(local_port), int(local_port)) if local_port else (0, 0)
        try:
            return self.egtunnel.open_blocking([forward], port_range, 1)[forward.channel]  # type: ignore[union-attr]
        except Exception as exc:
            self.log_and_raise(http_status_code=http_status(exc), reason=self.egtunnel.failure_reason([forward], exc))  # type: ignore[union-attr]

    def _create_ssh_tunnel(self, kernel_channel: Union["KernelChannel", str], local_port: int, remote_port: int,
                           remote_ip: str, server: str, port: Optional[int] = None, key: Optional[str] = None) -> None:  # fmt: skip
        """EG's hook: open the forward and record it in `tunnel_processes` (done by the open)."""
        self._spawn_ssh_tunnel(kernel_channel, local_port, remote_port, remote_ip, server, port, key)

    def _tunnel_to_kernel(self, connection_info: dict, server: str, port: Optional[int] = None,
                          key: Optional[str] = None) -> tuple:  # fmt: skip
        """EG's hook: forward the five ZMQ ports (EG's order) and return their local ports."""
        forwards = self.egtunnel.layout({**connection_info, "comm_port": None}, server)[:5]  # type: ignore[union-attr]
        opened = self._egtunnel_open(forwards)
        return tuple(opened[f.channel].local_port for f in forwards)

    def _tunnel_to_port(self, kernel_channel: Union["KernelChannel", str], remote_ip: str, remote_port: int,
                        server: str, port: Optional[int] = None, key: Optional[str] = None) -> int:  # fmt: skip
        """EG's hook: forward one extra port (EG uses it for EG_COMM) and return the local port."""
        forward = Forward(_channel_name(kernel_channel), remote_ip, int(remote_port), server,
                          self.egtunnel.ssh.port if port is None else int(port))  # type: ignore[union-attr]  # fmt: skip
        return self._egtunnel_open([forward])[forward.channel].local_port

    # ---------------------------------------------------------------------------- connection info

    def _egtunnel_layout(self, connect_info: dict) -> list[Forward]:
        self.log.debug(f"Host assigned to the kernel is: '{self.assigned_host}' '{self.assigned_ip}'")
        self.egtunnel.name_host(self.assigned_ip, self.assigned_host)  # type: ignore[union-attr]
        # A launcher that bound the host's loopback is reached there, through the host's sshd; the
        # persisted copy keeps that address so a revived gateway forwards to it again.
        kernel_ip = "127.0.0.1" if is_loopback(connect_info.get("ip")) else self.assigned_ip
        connect_info["ip"] = self.assigned_ip
        self.tunneled_connect_info = dict(connect_info, ip=kernel_ip)
        return self.egtunnel.layout({**connect_info, "ip": kernel_ip}, self.assigned_ip)  # type: ignore[union-attr]

    def _egtunnel_apply(self, connect_info: dict, opened: dict[str, Any]) -> None:
        """EG's rewrite of the connection info to the tunnels' local ends."""
        self.log.debug(f"Local ports used to create SSH tunnels: '{tuple(opened[c].local_port for c, _ in KERNEL_PORTS)}'")
        connect_info["ip"] = "127.0.0.1"
        for channel, field in KERNEL_PORTS:
            connect_info[field] = opened[channel].local_port
        if COMM in opened:
            self.comm_ip = connect_info["ip"]
            self.comm_port = connect_info["comm_port"] = opened[COMM].local_port
            self.log.debug(f"Established gateway communication to: {self.assigned_ip}:{self.tunneled_connect_info['comm_port']} "
                           f"for KernelID '{self.kernel_id}' via tunneled port 127.0.0.1:{self.comm_port}")  # fmt: skip
        else:
            self.log.debug(f"Gateway communication port has NOT been established for KernelID '{self.kernel_id}' (optional).")
        self._update_connection(connect_info)

    def _egtunnel_setup_untunneled(self, connect_info: dict) -> None:
        # EG's own branch for tunneling off, for when EG_ENABLE_TUNNELING is on but this kernelspec opts out
        # (EG's method reads the module flag, so it cannot be reused here).
        connect_info["ip"] = self.assigned_ip
        if "comm_port" in connect_info:
            self.comm_ip = connect_info["ip"]
            self.comm_port = int(connect_info["comm_port"])
        self._update_connection(connect_info)

    def _setup_connection_info(self, connect_info: dict) -> None:
        """EG's entry point; this blocking form serves `load_process_info` (the gateway's start-up revival)."""
        if not self.native_tunneling:
            if _pp.tunneling_enabled is True:
                return self._egtunnel_setup_untunneled(connect_info)
            return super()._setup_connection_info(connect_info)  # type: ignore[misc]
        forwards = self._egtunnel_layout(connect_info)
        self._egtunnel_apply(connect_info, self._egtunnel_open(forwards))
        return None

    async def receive_connection_info(self) -> bool:
        """EG's method, with the kernel's forwards awaited (one native call) and their HTTP status kept.

        EG calls `_setup_connection_info` synchronously from here and turns any failure into a 500; here a
        403 (authentication, host key) reaches the client as 403, and the remote kernel is stopped.
        """
        if not self.native_tunneling:
            return await super().receive_connection_info()  # type: ignore[misc]
        try:
            connect_info = await self.response_manager.get_connection_info(self.kernel_id)
        except Exception as exc:
            if type(exc) is socket.timeout or type(exc) is asyncio.TimeoutError:
                self.log.debug(f"Waiting for KernelID '{self.kernel_id}' to send connection info from host "
                               f"'{self.assigned_host}' - retrying...")  # fmt: skip
                return False
            await self._egtunnel_stop_launched()
            self.log_and_raise(http_status_code=500, reason=f"Exception occurred waiting for connection file "
                               f"response for KernelId '{self.kernel_id}' on host '{self.assigned_host}': {exc}")  # fmt: skip
        forwards = self._egtunnel_layout(connect_info)
        try:
            opened = await self.egtunnel.open(forwards, *self._port_range())  # type: ignore[union-attr]
        except Exception as exc:
            # The launcher runs remotely but cannot be reached: stop it, as EG does.
            await self._egtunnel_stop_launched()
            self.log_and_raise(http_status_code=http_status(exc), reason=self.egtunnel.failure_reason(forwards, exc))  # type: ignore[union-attr]
        self._egtunnel_apply(connect_info, opened)
        return True

    async def _egtunnel_stop_launched(self) -> None:
        """Stops a kernel whose start failed after launch. A proxy whose kill() waits (EG's sleeps
        between polls, a resource manager's API) runs it in the loop's executor, as EG itself does."""
        try:
            if self._egtunnel_kill_on_loop:
                self.kill()  # type: ignore[attr-defined]
            else:
                await asyncio.get_running_loop().run_in_executor(None, self.kill)  # type: ignore[attr-defined]
        except Exception as exc:  # noqa: BLE001 - the start's own failure is what gets reported
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
            self._egtunnel_revive_failed = True
            self.log.warning(f"KernelID '{self.kernel_id}' cannot be revived: its tunnels could not be "
                             f"re-established ({exc.reason}).")  # fmt: skip

    # ---------------------------------------------------------------- plain hooks on the event loop

    def poll(self) -> Any:
        if self._egtunnel_revive_failed:
            return False
        return super().poll()  # type: ignore[misc]

    def _send_listener_request(self, request: dict, shutdown_socket: bool = False) -> None:
        """EG's comm-port request, through the EG_COMM tunnel's connection to the remote port.

        The EG_COMM forward's local port never listens (no local user may reach the launcher's port), and
        a local connection to a forward would say nothing about the launcher anyway; the request goes to
        the remote end on a channel of its own, which restores EG's refusal test (see `KernelTunnels.request`).
        """
        if not self.native_tunneling or self.comm_port <= 0:
            return super()._send_listener_request(request, shutdown_socket)  # type: ignore[misc]
        self.egtunnel.request(request, self._egtunnel_fallback(request))  # type: ignore[union-attr]
        return None

    def _egtunnel_fallback(self, request: dict) -> Optional[tuple[Any, str]]:
        """EG's path when the launcher cannot take a signal: `kill` on the kernel's host, natively."""
        signum = request.get("signum")
        if not self._egtunnel_remote_exec or not isinstance(signum, int) or signum <= 0 or not (self.ip and self.pid > 0):
            return None
        if _pp.BaseProcessProxyABC.ip_is_local(self.ip) or getattr(self, "use_gss", False):
            return None
        target = "-" + str(self.pgid) if self.pgid > 0 else str(self.pid)
        return self.egtunnel.target(self.ip), f"kill -{int(signum)} {target}; echo $?"  # type: ignore[union-attr]


class DistributedProcessProxy(NativeTunnelMixin, _EGDistributedProcessProxy):
    """EG's DistributedProcessProxy with native tunnels and native remote launch and signalling.

    EG opens a new paramiko connection for every launch, poll and signal; here they are commands on the
    host's pooled SSH connection, awaited where EG's caller is a coroutine.
    """

    _egtunnel_remote_exec = True
    _egtunnel_kill_on_loop = True

    def rsh(self, host: str, command: str) -> list[str]:
        """EG's contract: stdout lines, or stderr lines when stdout is empty; 403 when SSH refuses us."""
        if getattr(self, "use_gss", False):
            return super().rsh(host, command)
        try:
            return self.egtunnel.target(host).exec(command, EXEC_TIMEOUT).lines()  # type: ignore[union-attr]
        except (SshAuthError, HostKeyError) as exc:
            self._egtunnel_refused(host, exc)
            raise

    def _egtunnel_refused(self, host: str, exc: BaseException) -> None:
        self.log_and_raise(http_status_code=403, reason=f"SSH to {self.egtunnel.destination(host)} refused for "  # type: ignore[union-attr]
                           f"KernelID '{self.kernel_id}': {type(exc).__name__}: {exc}")  # fmt: skip

    def remote_signal(self, signum: int) -> Optional[bool]:
        """EG's `kill -N target; echo $?` through the pooled connection (see `KernelTunnels.remote_signal`)."""
        if getattr(self, "use_gss", False):
            return super().remote_signal(signum)
        target = "-" + str(self.pgid) if self.pgid > 0 and signum > 0 else str(self.pid)
        if signum > 0:
            self.log.debug(f"Sending signal: {signum} to target: {target} on host: {self.ip}")
        return self.egtunnel.remote_signal(self.ip, f"kill -{signum} {target}; echo $?", signum)  # type: ignore[union-attr]

    def kill(self) -> Optional[bool]:
        """EG's kill (SIGTERM, poll until gone, then SIGKILL). EG sleeps between polls; on the event loop
        the same steps run as a task instead, so the gateway keeps serving meanwhile.

        A kill during the start (EG's launch timeout, failed forwards) also stops on the host whatever was
        launched for the kernel, at once rather than after EG's seconds of signals and polls."""
        if self._egtunnel_starting:
            self._egtunnel_stop_failed_start()
        if on_event_loop() is None or getattr(self, "use_gss", False):
            return super().kill()  # type: ignore[misc]
        result = self.terminate()  # type: ignore[attr-defined]
        asyncio.ensure_future(self._egtunnel_escalate())
        return result

    async def _egtunnel_escalate(self) -> None:
        for _ in range(_pp.max_poll_attempts):
            if self.poll() is not None:
                return
            await asyncio.sleep(_pp.poll_interval)
        if self.ip and self.pid > 0:
            self.log.debug(f"KernelID '{self.kernel_id}' still alive after SIGTERM; sending SIGKILL.")
            self.send_signal(9)  # type: ignore[attr-defined]

    def cleanup(self) -> None:
        """EG's cleanup, then a check on the kernel's host that nothing of this launch runs on unseen
        (see `KernelTunnels.remove_leftovers`); a restart's new launch is a group of its own."""
        host, pgid = self.ip, self.pgid if isinstance(self.pgid, int) else 0
        super().cleanup()  # type: ignore[misc]
        if (self.egtunnel is None or self._egtunnel_stop_fired or not host or pgid <= 0
                or pgid == self._egtunnel_checked_pgid or _pp.BaseProcessProxyABC.ip_is_local(host)
                or getattr(self, "use_gss", False)):
            return
        self._egtunnel_checked_pgid = pgid
        self.egtunnel.remove_leftovers(host, pgid)

    # The process group whose leftovers were last looked for (EG may clean up one launch twice).
    _egtunnel_checked_pgid = 0

    async def launch_process(self, kernel_cmd: str, **kwargs: Any) -> "DistributedProcessProxy":
        """EG's launch with the remote command awaited on the host's pooled connection.

        EG wraps every launch failure into a 500; an SSH authentication or host-key refusal stays a 403.
        """
        env_dict = kwargs.get("env")
        self._egtunnel_launch_env(kwargs)
        # EG's RemoteProcessProxy part (env, authorization); EG's own Distributed body is replaced below.
        await super(_EGDistributedProcessProxy, self).launch_process(kernel_cmd, **kwargs)
        self.assigned_host = self._determine_next_host(env_dict)
        try:
            self.ip = self.assigned_ip = await _resolve(self.egtunnel.target(self.assigned_host))  # type: ignore[union-attr]
        except (OSError, ValueError) as exc:
            self.log_and_raise(http_status_code=500, reason=f"KernelID '{self.kernel_id}': cannot resolve kernel host "
                               f"'{self.assigned_host}': {type(exc).__name__}: {exc}")  # fmt: skip
        self.egtunnel.name_host(self.assigned_ip, self.assigned_host)  # type: ignore[union-attr]
        remote = not _pp.BaseProcessProxyABC.ip_is_local(self.ip)
        self._egtunnel_loop = asyncio.get_running_loop()
        self._egtunnel_launch_host, self._egtunnel_stop_fired, self._egtunnel_starting = None, False, True
        try:
            await self._egtunnel_launch(kernel_cmd, remote, **kwargs)
            self.log.info(f"Kernel launched on '{self.assigned_host}', pid: {self.pid}, ID: {self.kernel_id}, "
                          f"Log file: {self.assigned_host}:{self.kernel_log}, Command: '{kernel_cmd}'.  ")  # fmt: skip
            await self.confirm_remote_startup()
        except BaseException:
            # Whatever failed once the command may have reached the host (its own timeout, EG's launch
            # timeout, the forwards, the launcher's report): EG's kill reaches at most one pid (none when
            # the command's answer never came; the process group only once the launcher has reported),
            # so everything started for this id is stopped on the host as well.
            self._egtunnel_stop_failed_start()
            raise
        finally:
            self._egtunnel_starting = False
            # The connection info has arrived (or never will): the remote forward may go.
            if self._egtunnel_response is not None:
                self._egtunnel_response.close()
                self._egtunnel_response = None
        return self

    # The host the launch command went to, once it may have reached it; None before (or when local).
    _egtunnel_launch_host: Optional[str] = None
    # Between the launch and the end of launch_process: a kill() then means the start failed.
    _egtunnel_starting = False
    _egtunnel_stop_fired = False
    _egtunnel_loop: Optional[asyncio.AbstractEventLoop] = None
    # This start's remote forward back to the gateway, held until the connection info has arrived.
    _egtunnel_response: Any = None

    def _egtunnel_stop_failed_start(self) -> None:
        """Once per start, in the background: stop on the host everything launched for this kernel
        (`KernelTunnels.stop_launched`). EG calls kill() from an executor thread on a launch timeout, so
        the remote command is handed to the event loop, which never waits for it."""
        host = self._egtunnel_launch_host
        if host is None or self._egtunnel_stop_fired:
            return
        self._egtunnel_stop_fired = True
        loop = self._egtunnel_loop
        if on_event_loop() is None and loop is not None and loop.is_running():
            loop.call_soon_threadsafe(self.egtunnel.stop_launched, host)  # type: ignore[union-attr]
        else:
            self.egtunnel.stop_launched(host)  # type: ignore[union-attr]

    async def _egtunnel_launch(self, kernel_cmd: str, remote: bool, **kwargs: Any) -> None:
        """EG's launch command (native exec on the pooled connection, or EG's local Popen); sets the pid."""
        try:
            if not remote:
                result_pid = self._launch_remote_process(kernel_cmd, **kwargs)  # EG's local Popen path
            else:
                kernel_cmd = await self._egtunnel_response_over_ssh(kernel_cmd)
                cmd = self._build_startup_command(kernel_cmd, **kwargs)
                self.log.debug(f"Invoking cmd: '{cmd}' on host: {self.assigned_host}")
                self._egtunnel_launch_host = self.ip
                result = await self.egtunnel.target(self.ip).exec_async(cmd, EXEC_TIMEOUT)  # type: ignore[union-attr]
                result_pid = ([line.strip() for line in result.lines()] or ["bad_pid"])[-1]
            self.pid = int(result_pid)
        except web.HTTPError:
            raise
        except (SshConnectError, SshAuthError, HostKeyError) as exc:
            # Refused before any command went out: there is nothing to stop on the host.
            self._egtunnel_launch_host = None
            if isinstance(exc, SshConnectError):
                self.log_and_raise(http_status_code=500, reason=f"Failure occurred starting kernel on '{self.ip}' "
                                   f"({self.egtunnel.destination(self.ip)}).  Returned result: {exc}")  # type: ignore[union-attr]  # fmt: skip
            self._egtunnel_refused(self.ip, exc)
        except Exception as exc:
            self.log_and_raise(http_status_code=500, reason=f"Failure occurred starting kernel on '{self.ip}' "
                               f"({self.egtunnel.destination(self.ip)}).  Returned result: {exc}")  # type: ignore[union-attr]  # fmt: skip

    async def _egtunnel_response_over_ssh(self, kernel_cmd: Any) -> Any:
        """The launch argv with EG's response address replaced by the remote forward's on the host's
        loopback, so the host needs no route to the gateway (see `KernelTunnels.response_forward`)."""
        # EG's response address, set only when this start's connection info may come back over SSH.
        address = self.egtunnel.respond_to  # type: ignore[union-attr]
        if not address or not any(address in str(arg) for arg in kernel_cmd):
            return kernel_cmd
        forward = await self.egtunnel.response_forward(self.ip)  # type: ignore[union-attr]
        if forward is None:
            return kernel_cmd
        self._egtunnel_response = forward
        self.log.debug(f"KernelID '{self.kernel_id}' sends its connection info to {forward.address} on "
                       f"'{self.assigned_host}', carried over SSH to {address}.")  # fmt: skip
        return [str(arg).replace(address, forward.address) if address in str(arg) else arg for arg in kernel_cmd]


async def _resolve(target: Any) -> str:
    """EG's gethostbyname of the kernel host, without blocking the loop, for the name ssh_config gives it
    (HostName). A host behind a ProxyJump hop may have a name only the hop can resolve: it is kept as a
    name, and the forwards' destinations are resolved on the far side."""
    host = target.host_name
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, None, family=socket.AF_INET, type=socket.SOCK_STREAM)
    except OSError:
        if target.jumps:
            return str(host)
        raise
    return str(infos[0][4][0])


class YarnClusterProcessProxy(NativeTunnelMixin, _EGYarnClusterProcessProxy):
    """EG's YarnClusterProcessProxy with native tunnels to the YARN node running the kernel."""


class ConductorClusterProcessProxy(NativeTunnelMixin, _EGConductorClusterProcessProxy):
    """EG's ConductorClusterProcessProxy with native tunnels to the Conductor host running the kernel."""
