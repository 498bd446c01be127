"""Settings of the Enterprise Gateway process proxies: parsed and validated once per kernel start.

Pure Python with no Enterprise Gateway or native import, so that every rule can be tested without a
gateway or an SSH server. Sources are the gateway's environment (EG's own variable names where EG has
one) and the kernelspec's `metadata.process_proxy.config`, which overrides the environment per kernelspec.
A bad value raises `SettingError` naming the setting and the value; the proxies turn it into HTTP 500.
"""

from __future__ import annotations

import ipaddress
import math
import os
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

__all__ = [
    "ALLOWED_HOST_KEY_POLICIES",
    "ALLOWED_RESPONSE_MODES",
    "ALLOWED_TUNNEL_MODES",
    "DEFAULT_CONNECT_TIMEOUT",
    "DEFAULT_KEEPALIVE_COUNT_MAX",
    "DEFAULT_KEEPALIVE_MARGIN",
    "DEFAULT_MAX_SESSIONS",
    "DEFAULT_MAX_STARTUPS",
    "DEFAULT_SSH_PORT",
    "MAX_KEEPALIVE_COUNT_MAX",
    "MAX_KEEPALIVE_MARGIN",
    "SettingError",
    "SshSettings",
    "TunnelSettings",
    "cull_idle_timeout_of",
    "parse_ssh_settings",
    "parse_tunnel_settings",
    "parse_tunneling",
]

DEFAULT_SSH_PORT = 22
DEFAULT_CONNECT_TIMEOUT = 10.0
DEFAULT_KEEPALIVE_MARGIN = 60
DEFAULT_KEEPALIVE_COUNT_MAX = 3
# Below OpenSSH's stock MaxSessions (10) and the MaxStartups start (10), with room for other clients.
DEFAULT_MAX_SESSIONS = 8
DEFAULT_MAX_STARTUPS = 8
MAX_SERVER_BUDGET = 10_000
ALLOWED_HOST_KEY_POLICIES = ("strict", "accept-new", "off")
ALLOWED_TUNNEL_MODES = ("shared", "per-port")
# How the launcher's connection info reaches the gateway: over a remote forward on the kernel host's
# loopback ("ssh"), straight to EG's response address ("direct"), or over SSH where the server allows
# remote forwarding and directly (with one warning) where it does not ("auto").
ALLOWED_RESPONSE_MODES = ("auto", "ssh", "direct")
# Where egtunnel's launcher binds the kernel's ports on its host when tunneling is on: the host's
# loopback, which only the SSH server's forwards (and local users) reach.
DEFAULT_KERNEL_IP = "127.0.0.1"

# The native keep-alive timer is an unsigned 32-bit count of seconds; a margin up to EG's own maximum
# interval (100 years) keeps culling timeout + margin inside it, and anything larger is a typo.
MAX_KEEPALIVE_MARGIN = 100 * 365 * 24 * 60 * 60
MAX_KEEPALIVE_COUNT_MAX = 2**31 - 1

_TRUE = ("true",)
_FALSE = ("false",)


class SettingError(ValueError):
    """A setting has a value the proxies cannot use; `str()` names the setting and the value."""

    def __init__(self, setting: str, value: object, expected: str) -> None:
        self.setting = setting
        self.value = value
        self.expected = expected
        super().__init__(f"Invalid value {value!r} for {setting}: {expected}")


@dataclass(frozen=True)
class SshSettings:
    """How the gateway reaches a kernel host over SSH: one set for tunnels and remote exec alike.

    None means "not set here": the native side then takes the value from the OpenSSH client
    configuration (`ssh_config`), else OpenSSH's default. Values set here win over the file.
    """

    port: Optional[int] = None
    user: Optional[str] = None
    # Never printed: excluded from repr so that logging a settings object cannot leak it.
    password: Optional[str] = field(default=None, repr=False)
    known_hosts: Optional[str] = None
    host_key_policy: Optional[str] = None
    identity_file: Optional[str] = None
    connect_timeout: Optional[float] = None
    max_sessions: int = DEFAULT_MAX_SESSIONS
    max_startups: int = DEFAULT_MAX_STARTUPS
    # EG_SSH_CONFIG: None reads ~/.ssh/config then /etc/ssh/ssh_config, "none" reads no file.
    ssh_config: Optional[str] = None

    def destination(self, host: str) -> str:
        """`user@host:port` as far as these settings tell (the native target knows ssh_config's too)."""
        user = self.user if self.user else _current_user()
        return f"{user}@{host}:{self.port if self.port is not None else DEFAULT_SSH_PORT}"

    def native_kwargs(self) -> dict[str, Any]:
        """Keyword arguments shared by `open_tunnel`, `remote_exec` and `SshTarget`."""
        return {
            "port": self.port,
            "user": self.user,
            "password": self.password,
            "known_hosts": self.known_hosts,
            "host_key_policy": self.host_key_policy,
            "identity_file": self.identity_file,
            "connect_timeout": self.connect_timeout,
            "max_sessions": self.max_sessions,
            "max_startups": self.max_startups,
            "ssh_config": self.ssh_config,
        }

    def sources(self, environ: Mapping[str, str]) -> dict[str, str]:
        """Which variable set each value that is set here, for `python -m egtunnel check`."""
        names = {
            "port": "EG_SSH_PORT",
            "user": "EG_REMOTE_USER",
            "known_hosts": "EG_SSH_KNOWN_HOSTS",
            "host_key_policy": "EG_SSH_HOST_KEY_POLICY",
            "identity_file": "EG_SSH_IDENTITY_FILE",
            "connect_timeout": "EG_SSH_CONNECT_TIMEOUT",
        }
        return {key: f"environment {name}" for key, name in names.items() if _env_value(environ, name) is not None}


@dataclass(frozen=True)
class TunnelSettings:
    """Per-kernelspec tunnel behaviour: connection sharing and the keep-alive policy's knobs."""

    mode: str = "shared"
    keepalive_margin: int = DEFAULT_KEEPALIVE_MARGIN
    # None: ssh_config's ServerAliveCountMax for the host, else 3.
    keepalive_count_max: Optional[int] = None
    response: str = "auto"
    kernel_ip: str = DEFAULT_KERNEL_IP


def _current_user() -> str:
    import getpass

    return getpass.getuser()


def _config(proxy_config: Optional[Mapping[str, Any]]) -> Mapping[str, Any]:
    return proxy_config if proxy_config is not None else {}


def _env_value(environ: Mapping[str, str], name: str) -> Optional[str]:
    # Container templates commonly export empty variables to mean "unset"; EG treats EG_REMOTE_USER the same way.
    value = environ.get(name)
    if value is None or not value.strip():
        return None
    return value.strip()


def _kernelspec_name(key: str) -> str:
    return f"kernelspec process_proxy.config.{key}"


def _pick(
    environ: Mapping[str, str], env_name: str, proxy_config: Mapping[str, Any], key: Optional[str]
) -> tuple[Optional[object], str]:
    """The effective raw value and the name to blame for it: the kernelspec wins over the environment."""
    if key is not None and proxy_config.get(key) is not None:
        return proxy_config[key], _kernelspec_name(key)
    return _env_value(environ, env_name), env_name


def _int_setting(raw: object, setting: str, *, minimum: int, maximum: int, expected: str) -> int:
    # bool is an int subclass, and "1.0" or 2.5 are not integers: accept only what is written as one.
    if isinstance(raw, bool):
        raise SettingError(setting, raw, expected)
    if isinstance(raw, int):
        value = raw
    elif isinstance(raw, str) and raw.strip().isdigit() and raw.strip().isascii():
        value = int(raw.strip())
    elif isinstance(raw, str) and raw.strip().startswith("-") and raw.strip()[1:].isdigit():
        value = int(raw.strip())
    else:
        raise SettingError(setting, raw, expected)
    if value < minimum or value > maximum:
        raise SettingError(setting, raw, expected)
    return value


def _choice(raw: object, setting: str, allowed: tuple[str, ...]) -> str:
    expected = "allowed values are " + ", ".join(repr(a) for a in allowed)
    if not isinstance(raw, str) or raw.strip().lower() not in allowed:
        raise SettingError(setting, raw, expected)
    return raw.strip().lower()


def _path(raw: Optional[str]) -> Optional[str]:
    return os.path.expanduser(raw) if raw else None


def parse_tunneling(proxy_config: Optional[Mapping[str, Any]], eg_default: bool) -> bool:
    """Whether this kernelspec's kernels are tunneled: the kernelspec's `tunneling`, else EG's decision."""
    raw = _config(proxy_config).get("tunneling")
    if raw is None:
        return bool(eg_default)
    if isinstance(raw, bool):
        return raw
    if isinstance(raw, str) and raw.strip().lower() in _TRUE + _FALSE:
        return raw.strip().lower() in _TRUE
    raise SettingError(_kernelspec_name("tunneling"), raw, "must be true or false")


def _budget(environ: Mapping[str, str], env_name: str, cfg: Mapping[str, Any], key: Optional[str], default: int) -> int:
    raw, setting = _pick(environ, env_name, cfg, key)
    if raw is None:
        return default
    return _int_setting(
        raw,
        setting,
        minimum=1,
        maximum=MAX_SERVER_BUDGET,
        expected=f"must be a positive integer (at most {MAX_SERVER_BUDGET}), below the server's limit",
    )


def parse_ssh_settings(
    environ: Mapping[str, str],
    *,
    user: Optional[str] = None,
    password: Optional[str] = None,
    proxy_config: Optional[Mapping[str, Any]] = None,
) -> SshSettings:
    """SSH settings from EG's variables; `user` and `password` come from EG's own proxy (EG_REMOTE_*).

    Each variable left unset leaves its value to the OpenSSH client configuration (EG_SSH_CONFIG names
    another file, `none` disables it). The session budget may also come from the kernelspec
    (`max_sessions`), which then wins; the handshake budget is per host for the whole gateway, so only
    the environment sets it.
    """
    port_raw = _env_value(environ, "EG_SSH_PORT")
    port: Optional[int] = None
    if port_raw is not None:
        port = _int_setting(
            port_raw, "EG_SSH_PORT", minimum=1, maximum=65535, expected="must be a port number 1-65535"
        )

    policy_raw = _env_value(environ, "EG_SSH_HOST_KEY_POLICY")
    policy: Optional[str] = None
    if policy_raw is not None:
        policy = _choice(policy_raw, "EG_SSH_HOST_KEY_POLICY", ALLOWED_HOST_KEY_POLICIES)

    timeout_raw = _env_value(environ, "EG_SSH_CONNECT_TIMEOUT")
    connect_timeout: Optional[float] = None
    if timeout_raw is not None:
        expected = "must be a positive number of seconds"
        try:
            connect_timeout = float(timeout_raw)
        except ValueError:
            raise SettingError("EG_SSH_CONNECT_TIMEOUT", timeout_raw, expected) from None
        if not math.isfinite(connect_timeout) or connect_timeout <= 0:
            raise SettingError("EG_SSH_CONNECT_TIMEOUT", timeout_raw, expected)

    ssh_config = _env_value(environ, "EG_SSH_CONFIG")
    if ssh_config is not None and ssh_config.lower() != "none":
        ssh_config = os.path.expanduser(ssh_config)

    return SshSettings(
        port=port,
        user=user or None,
        password=password or None,
        known_hosts=_path(_env_value(environ, "EG_SSH_KNOWN_HOSTS")),
        host_key_policy=policy,
        identity_file=_path(_env_value(environ, "EG_SSH_IDENTITY_FILE")),
        connect_timeout=connect_timeout,
        max_sessions=_budget(environ, "EG_SSH_MAX_SESSIONS", _config(proxy_config), "max_sessions", DEFAULT_MAX_SESSIONS),
        max_startups=_budget(environ, "EG_SSH_MAX_STARTUPS", {}, None, DEFAULT_MAX_STARTUPS),
        ssh_config=ssh_config,
    )


def parse_tunnel_settings(
    environ: Mapping[str, str], proxy_config: Optional[Mapping[str, Any]]
) -> TunnelSettings:
    """Tunnel mode and keep-alive knobs; the kernelspec's config keys override the environment."""
    cfg = _config(proxy_config)

    raw, setting = _pick(environ, "EG_SSH_TUNNEL_MODE", cfg, "tunnel_mode")
    mode = "shared" if raw is None else _choice(raw, setting, ALLOWED_TUNNEL_MODES)

    raw, setting = _pick(environ, "EG_SSH_KEEPALIVE_MARGIN", cfg, "keepalive_margin")
    margin = DEFAULT_KEEPALIVE_MARGIN
    if raw is not None:
        margin = _int_setting(
            raw,
            setting,
            minimum=0,
            maximum=MAX_KEEPALIVE_MARGIN,
            expected=f"must be a non-negative integer (seconds, at most {MAX_KEEPALIVE_MARGIN})",
        )

    raw, setting = _pick(environ, "EG_SSH_KEEPALIVE_COUNT_MAX", cfg, "keepalive_count_max")
    count_max: Optional[int] = None
    if raw is not None:
        count_max = _int_setting(
            raw,
            setting,
            minimum=1,
            maximum=MAX_KEEPALIVE_COUNT_MAX,
            expected=f"must be a positive integer (at most {MAX_KEEPALIVE_COUNT_MAX})",
        )

    raw, setting = _pick(environ, "EG_SSH_RESPONSE", cfg, "response")
    response = "auto" if raw is None else _choice(raw, setting, ALLOWED_RESPONSE_MODES)

    raw, setting = _pick(environ, "EG_SSH_KERNEL_IP", cfg, "kernel_ip")
    kernel_ip = DEFAULT_KERNEL_IP if raw is None else _ipv4(raw, setting)

    return TunnelSettings(mode=mode, keepalive_margin=margin, keepalive_count_max=count_max,
                          response=response, kernel_ip=kernel_ip)  # fmt: skip


def _ipv4(raw: object, setting: str) -> str:
    expected = "must be an IPv4 address the launcher binds the kernel's ports to (127.0.0.1, or 0.0.0.0 for every interface)"
    try:
        return str(ipaddress.IPv4Address(str(raw).strip()))
    except ValueError:
        raise SettingError(setting, raw, expected) from None


def cull_idle_timeout_of(kernel_manager: object) -> int:
    """The mapping kernel manager's culling timeout as seen from a kernel manager; 0 without a parent."""
    try:
        value = kernel_manager.parent.cull_idle_timeout  # type: ignore[attr-defined]
    except AttributeError:
        return 0
    try:
        return int(value)
    except (TypeError, ValueError):
        return 0
