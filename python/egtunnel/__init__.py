"""egtunnel: native SSH tunnels for Jupyter Enterprise Gateway kernels.

The Rust extension (`egtunnel._native`) does the SSH work; this package re-exports it with a typed
surface and adds the Enterprise Gateway process proxies, which are imported lazily so that the
kernel launcher can run on hosts where Enterprise Gateway is not installed.
"""

from ._native import (
    CHANNELS,
    HOST_KEY_POLICIES,
    MAX_KEEP_ALIVE_INTERVAL,
    TUNNEL_MODES,
    ExecResult,
    ResponseForward,
    SshTarget,
    Tunnel,
    keep_alive_interval,
    open_tunnel,
    refresh_log_levels,
    remote_exec,
    status,
)
from .errors import (
    ConnectionDown,
    ForwardingProhibited,
    HostKeyError,
    SshConfigError,
    SshAuthError,
    SshConnectError,
    TunnelError,
    TunnelTimeout,
)

__all__ = [
    "CHANNELS",
    "HOST_KEY_POLICIES",
    "MAX_KEEP_ALIVE_INTERVAL",
    "TUNNEL_MODES",
    "ExecResult",
    "ResponseForward",
    "SshTarget",
    "Tunnel",
    "keep_alive_interval",
    "open_tunnel",
    "remote_exec",
    "refresh_log_levels",
    "status",
    "TunnelError",
    "SshConnectError",
    "SshAuthError",
    "HostKeyError",
    "ConnectionDown",
    "TunnelTimeout",
    "ForwardingProhibited",
    "SshConfigError",
    "NativeTunnelMixin",
    "DistributedProcessProxy",
    "YarnClusterProcessProxy",
    "ConductorClusterProcessProxy",
]

_PROXY_NAMES = {
    "NativeTunnelMixin",
    "DistributedProcessProxy",
    "YarnClusterProcessProxy",
    "ConductorClusterProcessProxy",
}


def __getattr__(name: str) -> object:
    # Enterprise Gateway is a heavy import and absent on remote hosts; load the proxies on first use.
    if name in _PROXY_NAMES:
        from . import proxy

        return getattr(proxy, name)
    raise AttributeError(f"module 'egtunnel' has no attribute {name!r}")
