"""The one exception hierarchy of egtunnel; the native module raises these classes.

Defined in Python (not in Rust) so that callers can subclass, pickle and import them without the
extension being loaded.
"""

__all__ = [
    "TunnelError",
    "SshConnectError",
    "SshAuthError",
    "HostKeyError",
    "ConnectionDown",
    "TunnelTimeout",
    "ForwardingProhibited",
    "SshConfigError",
]


class TunnelError(Exception):
    """Base class: a tunnel, SSH connection or remote command failed."""


class SshConnectError(TunnelError):
    """The TCP connection or the SSH handshake to user@host:port failed or timed out."""


class SshAuthError(TunnelError):
    """The server refused every authentication method tried."""


class HostKeyError(TunnelError):
    """The server's host key is unknown (under strict) or differs from known_hosts."""


class ConnectionDown(TunnelError):
    """The SSH connection is down and being re-established; the remote end's state is unknown."""


class TunnelTimeout(TunnelError, TimeoutError):
    """A request over an established connection got no answer in time (the link may be stalled)."""


class ForwardingProhibited(TunnelError):
    """The SSH server's configuration forbids forwarding to the target (AllowTcpForwarding no,
    DisableForwarding yes, or a PermitOpen list without it)."""


class SshConfigError(TunnelError, ValueError):
    """The OpenSSH client configuration (ssh_config) cannot be used; the message names file and line."""
