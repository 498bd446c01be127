"""One kernel's native tunnels and remote commands: its settings, forwards and their lifecycle.

Enterprise Gateway's process proxies keep a kernel's tunnels in `tunnel_processes` and reach the
kernel's launcher through its communication port. `KernelTunnels` does that work for the egtunnel
proxies, which keep only EG's hook methods, each handing over to it:

- opening a kernel's forwards is one native call, all or nothing, awaited by coroutines (no thread);
  the EG_COMM forward's local port is reserved, never listening: only egtunnel's requests reach the
  launcher's port, which can shut down or kill the kernel;
- comm-port requests and remote signals follow EG's liveness rule: a refused comm port means the
  kernel is gone, a connection that is down means liveness unknown (the kernel is kept);
- on the gateway's event loop nothing waits on the network: requests run on egtunnel's runtime and a
  poll answers from the kernel's last known liveness while one refresh per kernel is in flight.
  Off the loop (a worker thread, the gateway's start-up revival) the same calls simply block.
  The liveness record and its rules are native (the EG_COMM forward's own, and `_native.Liveness`
  for polls by remote command); nothing here keeps a copy;
- with tunneling on, the launcher's connection info can come back over the host's connection: a remote
  forward on the host's loopback (`response_forward`), checked once per host to listen there only;
- a start that fails after the launch command went out stops, on the kernel's host, every process
  whose arguments carry the kernel's id (`stop_launched`), in the background.

No Enterprise Gateway import here: the module works with any object that gives it a logger.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import json
import logging
import re
import shlex
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional

from . import _native
from .config import SshSettings, TunnelSettings
from .errors import ConnectionDown, ForwardingProhibited, HostKeyError, SshAuthError

__all__ = ["ALIVE", "DEAD", "UNKNOWN", "Forward", "KernelTunnels", "is_loopback", "on_event_loop"]

COMM = "EG_COMM"
# EG's order of the five ZMQ forwards and the connection-info key of each remote port.
KERNEL_PORTS = (
    ("SHELL", "shell_port"),
    ("IOPUB", "iopub_port"),
    ("STDIN", "stdin_port"),
    ("HB", "hb_port"),
    ("CONTROL", "control_port"),
)
# A comm-port request that has not completed by then is abandoned (TunnelTimeout).
REQUEST_TIMEOUT = 10.0
# EG's rsh uses exec_command(timeout=30).
EXEC_TIMEOUT = 30.0

ALIVE, DEAD, UNKNOWN = "alive", "dead", "unknown"

# Kernel ids EG generates are UUIDs; anything else is not spliced into a remote command.
_KERNEL_ID = re.compile(r"[A-Za-z0-9_-]+")
# Between SIGTERM and SIGKILL, and again later for a launcher whose start was still on its way when the
# first signals went out (a launch command that timed out may yet run).
STOP_LAUNCHED_GRACE = 1
STOP_LAUNCHED_LATE = 2
# After a kernel's shutdown, how long the processes of its launch get to exit on their own before what
# is left of them is killed: longer than egtunnel's launcher takes to escalate a shutdown request to
# SIGKILL (5 s, then 2 s), so a kernel that stops on its own is never killed.
LEFTOVER_GRACE = 10
# The background commands still running; asyncio keeps only weak references to tasks.
_background: set[asyncio.Future] = set()
# Per SSH destination and remote-forward port: where the server binds it beyond the host's loopback
# ("" when nowhere), as `ss` on the host found it once.
_EXPOSED: dict[tuple[str, int], str] = {}
# Destinations whose fallback to the direct response address has been logged (once per destination).
_direct_logged: set[str] = set()


def on_event_loop() -> Optional[asyncio.AbstractEventLoop]:
    """The running event loop when called on its thread, else None."""
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


@dataclass(frozen=True)
class Forward:
    """One port to forward: which kernel channel, where it goes, and through which SSH server."""

    channel: str
    remote_host: str
    remote_port: int
    server: str
    port: int


def http_status(exc: BaseException) -> int:
    """EG's status for a failed start: 403 when SSH refused us (credentials, host key), else 500."""
    return 403 if isinstance(exc, (SshAuthError, HostKeyError)) else 500


class KernelTunnels:
    """A kernel's forwards (kept in EG's `tunnel_processes` dict) and its comm-port requests."""

    def __init__(
        self,
        kernel_id: str,
        log: logging.Logger,
        ssh: SshSettings,
        settings: TunnelSettings,
        store: dict,
        cull_idle_timeout: Callable[[], int],
    ) -> None:
        self.kernel_id = kernel_id
        self.log = log
        self.ssh = ssh
        self.settings = settings
        # EG's `tunnel_processes`: EG's own cleanup() and shutdown_listener() terminate what is here.
        self.store = store
        self._cull_idle_timeout = cull_idle_timeout
        # The gateway's response address (IP:PORT) when connection info comes back over SSH (see
        # `response_forward`); set before the first target is made, since it is part of the connection.
        self.respond_to: Optional[str] = None
        self._targets: dict[tuple[str, Optional[int]], Any] = {}
        # The name the kernel's host was given (an ssh_config alias) by the address EG resolved it to:
        # EG passes addresses to the hooks, and ssh_config's Host patterns match the name.
        self._names: dict[str, str] = {}
        # The kernel's liveness as remote polls find it (a poll through the EG_COMM tunnel reads the
        # forward's own record instead).
        self.remote = _native.Liveness(f"Remote poll for KernelID '{kernel_id}'")

    # ------------------------------------------------------------------------------------------ settings

    def name_host(self, address: Optional[str], name: Optional[str]) -> None:
        """Records that EG's `address` for the kernel's host was resolved from `name`."""
        if address and name and address != name:
            self._names[address] = name

    def destination(self, host: str, port: Optional[int] = None) -> str:
        try:
            return str(self.target(host, port).destination)
        except Exception:  # noqa: BLE001 - a message about a host whose settings are themselves broken
            return SshSettings(port=self.ssh.port if port is None else port, user=self.ssh.user).destination(host)

    def target(self, host: str, port: Optional[int] = None) -> Any:
        """The native SSH target for `host` (validated once, cached), under the name ssh_config knows."""
        host = self._names.get(host, host)
        key = (host, self.ssh.port if port is None else int(port))
        found = self._targets.get(key)
        if found is None:
            kwargs = self.ssh.native_kwargs()
            kwargs["port"] = key[1]
            found = _native.SshTarget(host, **kwargs)
            if self.respond_to:
                found = found.responding_to(self.respond_to)
            self._targets[key] = found
        return found

    def keep_alive_interval(self, channel: str) -> int:
        return _native.keep_alive_interval(channel, self.cull_idle_timeout(), self.settings.keepalive_margin)

    def cull_idle_timeout(self) -> int:
        return max(0, self._cull_idle_timeout())

    # ------------------------------------------------------------------------------------------- opening

    def layout(self, connect_info: dict, host: str) -> list[Forward]:
        """EG's tunnel layout: every port goes to the kernel host's address, through sshd on that host."""
        forwards = [
            Forward(channel, connect_info["ip"], int(connect_info[field]), host, self.ssh.port)
            for channel, field in KERNEL_PORTS
        ]
        if "comm_port" in connect_info:
            forwards.append(Forward(COMM, connect_info["ip"], int(connect_info["comm_port"]), host, self.ssh.port))
        return forwards

    def _open_args(self, forwards: list[Forward], port_range: tuple[int, int], bind_attempts: int) -> tuple[Any, list, dict]:
        servers = {(f.server, f.port) for f in forwards}
        if len(servers) != 1:
            raise ValueError(f"a kernel's forwards go through one SSH server, got {sorted(servers)}")
        (server, port), = servers
        spec = [(f.channel, f.remote_host, f.remote_port) for f in forwards]
        kwargs = {
            "port_range": port_range,
            "bind_attempts": bind_attempts,
            "mode": self.settings.mode,
            "cull_idle_timeout": self.cull_idle_timeout(),
            "keepalive_margin": self.settings.keepalive_margin,
            "keepalive_count_max": self.settings.keepalive_count_max,
            "kernel_id": self.kernel_id,
            # A server that forbids forwarding fails the start here, not the kernel's first message.
            "verify": True,
            # The launcher's port shuts down or kills the kernel, and egtunnel's requests reach it on
            # channels of their own: its local port is only reserved (EG keeps the number as comm_port),
            # so that no local user of the gateway host can connect to it.
            "reserved": [f.channel for f in forwards if f.channel == COMM],
        }
        return self.target(server, port), spec, kwargs

    async def open(self, forwards: list[Forward], port_range: tuple[int, int] = (0, 0), bind_attempts: int = 6) -> dict[str, Any]:
        """Opens the forwards, all or nothing, and records them; returns {channel: tunnel}."""
        target, spec, kwargs = self._open_args(forwards, port_range, bind_attempts)
        tunnels = await target.open_forwards_async(spec, **kwargs)
        return self._record(forwards, tunnels)

    def open_blocking(self, forwards: list[Forward], port_range: tuple[int, int] = (0, 0), bind_attempts: int = 6) -> dict[str, Any]:
        """As `open`, blocking the calling thread (the gateway's start-up revival, EG's plain hooks)."""
        target, spec, kwargs = self._open_args(forwards, port_range, bind_attempts)
        return self._record(forwards, target.open_forwards(spec, **kwargs))

    def _record(self, forwards: list[Forward], tunnels: Iterable[Any]) -> dict[str, Any]:
        opened = {}
        for forward, tunnel in zip(forwards, tunnels):
            previous = self.store.get(forward.channel)
            if previous is not None and previous is not tunnel:
                previous.terminate()
            self.store[forward.channel] = tunnel
            opened[forward.channel] = tunnel
            self.log.debug(
                f"Native SSH tunnel for '{forward.channel}' of KernelID '{self.kernel_id}': "
                f"127.0.0.1:{tunnel.local_port} -> {forward.remote_host}:{forward.remote_port} via "
                f"{tunnel.destination}, keep-alive {tunnel.keep_alive_interval} s, mode {tunnel.mode}"
            )
        # A forward just opened starts with a record of its own, alive.
        return opened

    def failure_reason(self, forwards: list[Forward], exc: BaseException) -> str:
        """The HTTP reason for a failed open: the kernel, where its forwards went, and the native cause
        (which names each failed channel)."""
        first = forwards[0]
        return (
            f"Could not open SSH tunnels for KernelID '{self.kernel_id}' to {first.remote_host} via "
            f"{self.destination(first.server, first.port)}: {type(exc).__name__}: {exc}"
        )

    # -------------------------------------------------------------------------------------- comm requests

    def request(self, request: dict, fallback: Optional[tuple[Any, str]] = None) -> None:
        """EG's comm-port request with EG's outcomes: raises ConnectionRefusedError (errno ECONNREFUSED)
        when the launcher is gone, returns when delivered or when liveness is unknown.

        On the event loop nothing waits: a poll (`{"signum": 0}`) answers from the last known liveness
        while a native probe refreshes it, and other requests are sent natively in the background, their
        outcome logged. `fallback` (an SshTarget and a command) runs natively when a signal cannot be
        delivered, as EG falls back to its remote signal.
        """
        tunnel = self.store.get(COMM)
        if tunnel is None:
            # EG's own local connect would be refused once the EG_COMM forward is gone (after
            # shutdown_listener or cleanup), which is how it learns the launcher has exited.
            raise ConnectionRefusedError(
                errno.ECONNREFUSED, f"EG_COMM tunnel of KernelID '{self.kernel_id}' is closed; cannot send {request}"
            )
        data = json.dumps(request).encode("utf-8")
        if request.get("signum") == 0:
            # Unknown (no answer) is reported as alive; the native side logs it.
            state = tunnel.probe(data, REQUEST_TIMEOUT) if on_event_loop() else tunnel.probe_blocking(data, REQUEST_TIMEOUT)
            if state == DEAD:
                raise ConnectionRefusedError(errno.ECONNREFUSED, f"KernelID '{self.kernel_id}': no launcher listening")
            return
        if on_event_loop() is None:
            try:
                tunnel.send_request(data, REQUEST_TIMEOUT)
            except ConnectionDown as exc:
                self.log.warning(f"Request {request} for KernelID '{self.kernel_id}' not delivered: {exc}")
            return
        target, command = fallback if fallback is not None else (None, None)
        tunnel.send_background(data, f"Request {request} for KernelID '{self.kernel_id}'", REQUEST_TIMEOUT,
                               target, command)  # fmt: skip

    # ---------------------------------------------------------------------------- response over SSH

    async def response_forward(self, host: str) -> Optional[Any]:
        """The remote forward this start's connection info comes back over (`ResponseForward`; close it
        once the info has arrived), or None when it goes to the gateway's response address directly.

        Under response "auto" a server that refuses remote forwarding, or binds it beyond the host's
        loopback (GatewayPorts yes), means direct, with one warning per host; under "ssh" the start fails.
        """
        if not self.respond_to:
            return None
        target = self.target(host)
        try:
            forward = await target.response_forward_async(EXEC_TIMEOUT)
        except ForwardingProhibited as exc:
            self._direct(target, str(exc))
            return None
        try:
            exposed = await self._exposed_at(target, forward.port)
        except BaseException:
            forward.close()
            raise
        if exposed:
            forward.close()
            self._direct(target, f"the SSH server {target.destination} binds the remote forward on "
                                f"{exposed}, reachable from the network, not on the host's 127.0.0.1 only "
                                "(its sshd_config sets GatewayPorts yes)")  # fmt: skip
            return None
        return forward

    async def _exposed_at(self, target: Any, port: int) -> str:
        """Where, beyond the host's loopback, the server listens on `port` ("" if nowhere, or unknown)."""
        key = (target.destination, port)
        if key not in _EXPOSED:
            result = await target.exec_async(f"ss -Hltn 'sport = :{int(port)}'", EXEC_TIMEOUT)
            lines = result.stdout.decode(errors="replace").splitlines() if result.exit_status == 0 else []
            if result.exit_status != 0:
                self.log.debug(f"Cannot list listening sockets on {target.destination} (ss: {result.stderr!r}); "
                               "assuming the remote forward listens on 127.0.0.1 as asked.")  # fmt: skip
            _EXPOSED[key] = ", ".join(a for a in _listen_addresses(lines) if not _is_loopback_address(a))
        return _EXPOSED[key]

    def _direct(self, target: Any, why: str) -> None:
        """Connection info goes directly after all: logged once per host, or refused under "ssh"."""
        if self.settings.response == "ssh":
            raise ForwardingProhibited(f"{why}; connection info cannot come back over SSH (response: ssh). "
                                       "Allow remote forwarding on the host's loopback, or set response to auto or direct.")  # fmt: skip
        if target.destination not in _direct_logged:
            _direct_logged.add(target.destination)
            self.log.warning(f"Kernels on {target.destination} send their connection info directly to the gateway's "
                             f"response address {self.respond_to}, not over SSH: {why}")  # fmt: skip

    # ------------------------------------------------------------------------------- failed starts

    def _id_pattern(self) -> Optional[str]:
        """The shell-quoted pkill pattern of this kernel's processes, or None when the id cannot be put
        in a command safely (see `stop_launched_command`)."""
        if not _KERNEL_ID.fullmatch(self.kernel_id):
            return None
        # The id ends at a blank or the end of the arguments: another id that merely starts with it is spared.
        return shlex.quote(f"kernel-id[ =]{self.kernel_id}([[:space:]]|$)")

    def stop_launched_command(self) -> Optional[str]:
        """The remote command that stops every process started for this kernel, or None when the id
        cannot be put in a command safely.

        EG's launchers (its own launch_ipykernel.py and egtunnel's) take the id as `--kernel-id ID` or
        `--RemoteProcessProxy.kernel-id ID`, so the id is in the arguments of the launcher, of a wrapper
        script that passes them on, and of EG's listener process, which its launcher forks: a pid or a
        process group misses some of those, and before the connection info arrives EG knows neither. The
        bracket keeps the pattern from matching the shell that runs it; pkill excludes itself.
        """
        pattern = self._id_pattern()
        if pattern is None:
            return None
        return (f"p={pattern}; pkill -TERM -f -- \"$p\"; found=$?; sleep {STOP_LAUNCHED_GRACE}; "
                f"pkill -KILL -f -- \"$p\"; sleep {STOP_LAUNCHED_LATE}; pkill -KILL -f -- \"$p\"; echo $found")

    def stop_launched(self, host: str) -> None:
        """Stops what was launched for this kernel on `host` after its start failed, without waiting.

        On the event loop the command runs natively in the background and its outcome is logged; the
        failed start is reported at once. Off the loop it runs to completion.
        """
        command = self.stop_launched_command()
        if command is None:
            self.log.warning(f"KernelID '{self.kernel_id}' is not a plain id; processes it launched on "
                             f"{host} are left to the launcher's own exit.")  # fmt: skip
            return
        try:
            target = self.target(host)
        except Exception as exc:  # noqa: BLE001 - the start's own failure is what gets reported
            self.log.warning(f"Cannot stop KernelID '{self.kernel_id}' on {host} after its failed start: {exc}")
            return
        self.log.info(f"Stopping processes of KernelID '{self.kernel_id}' on {target.destination} after its failed start.")
        self._in_background(target, command, self._stopped, self._stop_failed)

    def _in_background(self, target: Any, command: str, done: Callable[[Any, Any], None],
                       failed: Callable[[Any, BaseException], None]) -> None:
        """Runs `command` on `target` natively and hands its result to `done` (or the exception to
        `failed`): in the background on the event loop, to completion off it."""
        if on_event_loop() is None:
            try:
                result = target.exec(command, EXEC_TIMEOUT)
            except Exception as exc:  # noqa: BLE001 - reported by `failed`
                failed(target, exc)
            else:
                done(target, result)
            return
        future = asyncio.ensure_future(target.exec_async(command, EXEC_TIMEOUT))
        _background.add(future)

        def finished(f: asyncio.Future) -> None:
            _background.discard(f)
            if f.cancelled():
                return
            exc = f.exception()
            if exc is not None:
                failed(target, exc)
            else:
                done(target, f.result())

        future.add_done_callback(finished)

    def _stopped(self, target: Any, result: Any) -> None:
        lines = [line.strip() for line in result.lines()]
        # pkill: 0 = signalled some, 1 = none matched; anything else is pkill's own failure.
        found = lines[-1] if lines else ""
        if found == "0":
            self.log.info(f"Stopped the processes of KernelID '{self.kernel_id}' on {target.destination}.")
        elif found == "1":
            self.log.debug(f"No process of KernelID '{self.kernel_id}' was left on {target.destination}.")
        else:
            self.log.warning(f"Stopping KernelID '{self.kernel_id}' on {target.destination} failed: pkill said {lines!r}.")

    def _stop_failed(self, target: Any, exc: BaseException) -> None:
        self.log.warning(f"Stopping KernelID '{self.kernel_id}' on {target.destination} after its failed start "
                         f"failed: {type(exc).__name__}: {exc}")  # fmt: skip

    # ------------------------------------------------------------------------------- after shutdown

    def leftovers_command(self, pgid: int) -> Optional[str]:
        """The remote command that gives the processes of one launch of this kernel (its process group,
        and the id in their arguments) `LEFTOVER_GRACE` seconds to exit, then kills what is left and
        prints one `... killed (pid N)` line per process; None when the id or group cannot be used.

        The group is the launch's own (sshd starts each command in a session of its own), so a restart's
        new launch is never touched; the id keeps a reused group number from matching anything else.
        pidwait sleeps on the processes themselves; a host without it waits on each pid with tail.
        """
        pattern = self._id_pattern()
        if pattern is None or pgid <= 0:
            return None
        grace = LEFTOVER_GRACE
        # Exit status: pkill's (0: killed some, 1: nothing left), or pgrep's when nothing ran at all.
        return (f"p={pattern}; g={int(pgid)}; pids=$(pgrep -g \"$g\" -f -- \"$p\") || exit; "
                f"if command -v pidwait >/dev/null 2>&1; then timeout {grace} pidwait -g \"$g\" -f -- \"$p\"; "
                f"else timeout {grace} sh -c 'for q; do tail -s 0.2 --pid=\"$q\" -f /dev/null; done' sh $pids; fi; "
                f"pkill -KILL -e -g \"$g\" -f -- \"$p\"")

    def remove_leftovers(self, host: str, pgid: int) -> None:
        """After the kernel's shutdown, makes sure nothing of its launch `pgid` stays on `host`.

        EG takes a kernel for gone once its communication port stops answering, which its launcher
        closes before the kernel process itself has exited; a kernel that then misses its shutdown (a
        lost control message, a listener that hangs) would run on unseen. Without waiting: what had to
        be killed is logged as a warning.
        """
        command = self.leftovers_command(pgid)
        if command is None:
            return
        try:
            target = self.target(host)
        except Exception as exc:  # noqa: BLE001 - the shutdown itself has succeeded
            self.log.warning(f"Cannot check KernelID '{self.kernel_id}' left nothing on {host}: {exc}")
            return
        self._in_background(target, command, self._leftovers_done, self._leftovers_failed)

    def _leftovers_done(self, target: Any, result: Any) -> None:
        killed = [line.strip() for line in result.stdout.decode(errors="replace").splitlines() if "killed (pid" in line]
        if killed:
            self.log.warning(f"KernelID '{self.kernel_id}': {len(killed)} process(es) of it still ran on "
                             f"{target.destination} {LEFTOVER_GRACE} s after its shutdown; killed: {'; '.join(killed)}")  # fmt: skip
            if result.exit_status == 0:
                return
        elif result.exit_status == 1:
            self.log.debug(f"KernelID '{self.kernel_id}' left nothing running on {target.destination}.")
            return
        # pkill could not kill some (another user's process), or the host lacks pgrep/pkill.
        self.log.warning(f"Checking that KernelID '{self.kernel_id}' left nothing on {target.destination} "
                         f"failed (exit {result.exit_status}): {result.stderr.decode(errors='replace').strip()!r}")  # fmt: skip

    def _leftovers_failed(self, target: Any, exc: BaseException) -> None:
        self.log.warning(f"Checking that KernelID '{self.kernel_id}' left nothing on {target.destination} failed: "
                         f"{type(exc).__name__}: {exc}")  # fmt: skip

    # ------------------------------------------------------------------------------------- remote signals

    def remote_signal(self, host: str, command: str, signum: int) -> Optional[bool]:
        """EG's `kill -N target; echo $?` on the kernel's host: None when delivered, False otherwise.

        A poll (signal 0) that cannot reach the host because the connection is down or timing out
        reports the kernel alive: an unreachable host says nothing about the kernel, and EG would
        otherwise discard a healthy kernel after a network blip. On the event loop a poll answers from
        the last known state and other signals are sent in the background, their outcome logged.
        """
        target = self.target(host)
        if signum == 0:
            # Unknown (no answer) is reported as alive; the native record logs it and never lets it
            # override a kernel known dead.
            if on_event_loop() is None:
                state = self.remote.probe_command_blocking(target, command, EXEC_TIMEOUT)
            else:
                state = self.remote.probe_command(target, command, EXEC_TIMEOUT)
            return False if state == DEAD else None
        if on_event_loop() is None:
            return None if self._signal_outcome(target, command, signum) else False
        self._in_background(target, command, lambda t, result: self._signal_sent(t, result, signum),
                            lambda t, exc: self._signal_failed(t, exc, signum))  # fmt: skip
        return None

    def _signal_outcome(self, target: Any, command: str, signum: int) -> bool:
        """Runs a signal's command to completion: True when `kill` delivered it."""
        try:
            return _delivered(target.exec(command, EXEC_TIMEOUT))
        except Exception as exc:  # noqa: BLE001 - EG reports any failed signal as undelivered
            self.log.warning(f"Remote signal({signum}) for KernelID '{self.kernel_id}' failed with exception '{exc}'.")
            return False

    def _signal_sent(self, target: Any, result: Any, signum: int) -> None:
        if not _delivered(result):
            self.log.debug(f"Remote signal({signum}) for KernelID '{self.kernel_id}': no such process.")
            self.remote.mark_dead()
        else:
            self.log.debug(f"Remote signal({signum}) delivered for KernelID '{self.kernel_id}'.")

    def _signal_failed(self, target: Any, exc: BaseException, signum: int) -> None:
        self.log.warning(f"Remote signal({signum}) on {target.destination} for KernelID '{self.kernel_id}' failed with exception '{exc}'.")


def _listen_addresses(lines: Iterable[str]) -> list[str]:
    """The local addresses (ADDR:PORT) of `ss -Hltn` output lines."""
    return [fields[3] for fields in (line.split() for line in lines) if len(fields) >= 4]


def is_loopback(host: Any) -> bool:
    """Whether `host` is a loopback IP address (anything else, names included, is not)."""
    try:
        return ipaddress.ip_address(str(host)).is_loopback
    except ValueError:
        return False


def _is_loopback_address(address: str) -> bool:
    """The same for `ss`'s ADDR:PORT, [v6]:PORT or addr%iface:PORT."""
    return is_loopback(address.rsplit(":", 1)[0].strip("[]").split("%")[0])


def _delivered(result: Any) -> bool:
    """`kill ...; echo $?` printed 0."""
    lines = [line.strip() for line in result.lines()]
    return bool(lines) and lines[-1] == "0"
