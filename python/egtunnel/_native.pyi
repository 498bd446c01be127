# Type stubs for the Rust extension egtunnel._native: the whole surface the Python package builds on.
from typing import Awaitable, Callable, Optional, Sequence, TypedDict, final

__all__ = [
    "MAX_KEEP_ALIVE_INTERVAL",
    "CHANNELS",
    "TUNNEL_MODES",
    "HOST_KEY_POLICIES",
    "ExecResult",
    "Liveness",
    "ResponseForward",
    "SshTarget",
    "Tunnel",
    "keep_alive_interval",
    "open_tunnel",
    "remote_exec",
    "status",
    "metrics",
    "refresh_log_levels",
    "explain",
    "check_host",
]

MAX_KEEP_ALIVE_INTERVAL: int
CHANNELS: tuple[str, ...]
TUNNEL_MODES: tuple[str, ...]
HOST_KEY_POLICIES: tuple[str, ...]

class _TunnelStats(TypedDict):
    bytes_in: int
    bytes_out: int
    connections: int
    active_connections: int
    rejected_connections: int  # closed at once: the forward already served its cap of connections
    keepalives_sent: int

@final
class ExecResult:
    @property
    def exit_status(self) -> Optional[int]: ...
    @property
    def stdout(self) -> bytes: ...
    @property
    def stderr(self) -> bytes: ...
    def lines(self) -> list[str]: ...

def keep_alive_interval(channel: str, cull_idle_timeout: int, margin: int = 60) -> int: ...

@final
class ResponseForward:
    @property
    def port(self) -> int: ...
    @property
    def address(self) -> str: ...
    def close(self) -> None: ...

@final
class Tunnel:
    @property
    def local_port(self) -> int: ...
    @property
    def channel(self) -> str: ...
    @property
    def keep_alive_interval(self) -> int: ...
    @property
    def remote_host(self) -> str: ...
    @property
    def remote_port(self) -> int: ...
    @property
    def kernel_id(self) -> Optional[str]: ...
    @property
    def mode(self) -> str: ...
    @property
    def destination(self) -> str: ...
    def is_alive(self) -> bool: ...
    def is_connected(self) -> bool: ...
    def stats(self) -> _TunnelStats: ...
    def send_request(self, data: bytes, timeout: float = 10.0) -> None: ...
    def request(self, data: bytes, timeout: float = 10.0) -> Awaitable[None]: ...
    def probe(self, data: bytes, timeout: float = 10.0) -> str: ...
    def probe_blocking(self, data: bytes, timeout: float = 10.0) -> str: ...
    def send_background(
        self,
        data: bytes,
        what: str,
        timeout: float = 10.0,
        fallback_target: Optional[SshTarget] = None,
        fallback_command: Optional[str] = None,
    ) -> None: ...
    def terminate(self) -> None: ...
    def __enter__(self) -> "Tunnel": ...
    def __exit__(self, *exc: object) -> None: ...

def open_tunnel(
    host: str,
    remote_host: str,
    remote_port: int,
    *,
    channel: str = "SHELL",
    cull_idle_timeout: int = 0,
    keepalive_margin: int = 60,
    keepalive_count_max: Optional[int] = None,
    port: Optional[int] = None,
    user: Optional[str] = None,
    identity_file: Optional[str] = None,
    password: Optional[str] = None,
    known_hosts: Optional[str] = None,
    host_key_policy: Optional[str] = None,
    local_port: int = 0,
    connect_timeout: Optional[float] = None,
    mode: str = "per-port",
    kernel_id: Optional[str] = None,
    verify: bool = False,
    max_sessions: int = 8,
    max_startups: int = 8,
    refused_wait: float = 30.0,
    ssh_config: Optional[str] = None,
) -> Tunnel: ...

def remote_exec(
    host: str,
    command: str,
    *,
    port: Optional[int] = None,
    user: Optional[str] = None,
    identity_file: Optional[str] = None,
    password: Optional[str] = None,
    known_hosts: Optional[str] = None,
    host_key_policy: Optional[str] = None,
    connect_timeout: Optional[float] = None,
    timeout: float = 30.0,
    max_sessions: int = 8,
    max_startups: int = 8,
    ssh_config: Optional[str] = None,
) -> ExecResult: ...

_ForwardSpec = tuple[str, str, int]

@final
class SshTarget:
    def __new__(
        cls,
        host: str,
        *,
        port: Optional[int] = None,
        user: Optional[str] = None,
        identity_file: Optional[str] = None,
        password: Optional[str] = None,
        known_hosts: Optional[str] = None,
        host_key_policy: Optional[str] = None,
        connect_timeout: Optional[float] = None,
        max_sessions: int = 8,
        max_startups: int = 8,
        ssh_config: Optional[str] = None,
    ) -> "SshTarget": ...
    @property
    def destination(self) -> str: ...
    @property
    def host_name(self) -> str: ...
    @property
    def jumps(self) -> list[str]: ...
    @property
    def respond_to(self) -> Optional[str]: ...
    def responding_to(self, address: str) -> "SshTarget": ...
    def response_forward(self, timeout: float = 30.0) -> ResponseForward: ...
    def response_forward_async(self, timeout: float = 30.0) -> Awaitable[ResponseForward]: ...
    def exec(self, command: str, timeout: float = 30.0) -> ExecResult: ...
    def exec_async(self, command: str, timeout: float = 30.0) -> Awaitable[ExecResult]: ...
    def open_forwards(
        self,
        forwards: list[_ForwardSpec],
        *,
        port_range: tuple[int, int] = (0, 0),
        bind_attempts: int = 6,
        mode: str = "shared",
        cull_idle_timeout: int = 0,
        keepalive_margin: int = 60,
        keepalive_count_max: Optional[int] = None,
        kernel_id: Optional[str] = None,
        verify: bool = True,
        refused_wait: float = 30.0,
        reserved: Sequence[str] = (),
    ) -> list[Tunnel]: ...
    def open_forwards_async(
        self,
        forwards: list[_ForwardSpec],
        *,
        port_range: tuple[int, int] = (0, 0),
        bind_attempts: int = 6,
        mode: str = "shared",
        cull_idle_timeout: int = 0,
        keepalive_margin: int = 60,
        keepalive_count_max: Optional[int] = None,
        kernel_id: Optional[str] = None,
        verify: bool = True,
        refused_wait: float = 30.0,
        reserved: Sequence[str] = (),
    ) -> Awaitable[list[Tunnel]]: ...

@final
class Liveness:
    def __new__(cls, what: str) -> "Liveness": ...
    @property
    def state(self) -> str: ...
    def mark_dead(self) -> None: ...
    def probe_command(self, target: SshTarget, command: str, timeout: float = 30.0) -> str: ...
    def probe_command_blocking(self, target: SshTarget, command: str, timeout: float = 30.0) -> str: ...

def status() -> list[dict[str, object]]: ...

class _CommandSeconds(TypedDict):
    buckets: list[tuple[float, int]]  # (upper bound in seconds, cumulative count); +Inf is `count`
    count: int
    sum: float

class _DestinationMetrics(TypedDict):
    user: str
    host: str
    port: int
    connections: dict[str, int]  # live, by state: connected, reconnecting, stopped
    forwards: dict[str, int]  # live, by channel
    open_channels: int
    keepalives_unanswered: int
    connections_opened: int
    reconnects: int
    forwards_opened: int
    bytes_to_remote: int
    bytes_from_remote: int
    keepalives_sent: int
    commands_ok: int
    commands_failed: int
    command_seconds: _CommandSeconds
    failures: list[tuple[str, str, int]]  # (operation, cause, count), non-zero only

def metrics() -> list[_DestinationMetrics]: ...
def refresh_log_levels() -> None: ...
def explain(
    host: str,
    *,
    port: Optional[int] = None,
    user: Optional[str] = None,
    identity_file: Optional[str] = None,
    known_hosts: Optional[str] = None,
    host_key_policy: Optional[str] = None,
    connect_timeout: Optional[float] = None,
    ssh_config: Optional[str] = None,
) -> tuple[list[tuple[str, str, str]], list[str]]: ...
def check_host(
    host: str,
    report: Callable[[int, str, bool, str, float], object],
    *,
    port: Optional[int] = None,
    user: Optional[str] = None,
    identity_file: Optional[str] = None,
    password: Optional[str] = None,
    known_hosts: Optional[str] = None,
    host_key_policy: Optional[str] = None,
    connect_timeout: Optional[float] = None,
    ssh_config: Optional[str] = None,
    command: str = "echo egtunnel-check",
) -> bool: ...
