"""`python -m egtunnel check HOST`: why a kernel host works or not, before a user finds out.

Prints the effective SSH settings with where each came from, the route through any ProxyJump hops,
then each stage of reaching the host (TCP, host key, authentication, a forwarded channel, a remote
command) with its outcome and time, and the keep-alive each kernel channel would get. The stages run
through egtunnel's own native code, so a host that passes here works for kernels. Exit status 0 only
when every stage passed. Secrets are never printed.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Optional, TextIO

from . import _native
from .config import SettingError, parse_ssh_settings, parse_tunnel_settings

KEEP_ALIVE_CHANNELS = ("SHELL", "IOPUB", "STDIN", "HB", "CONTROL", "EG_COMM")
# The native rows' setting names, by the keyword the settings use.
_KEYWORDS = {
    "port": "port",
    "user": "user",
    "stricthostkeychecking": "host_key_policy",
    "userknownhostsfile": "known_hosts",
    "identityfile": "identity_file",
    "connecttimeout": "connect_timeout",
}
_CULL_CLASSES = ("RemoteMappingKernelManager", "MappingKernelManager")


def register(subcommands: Any) -> None:
    """Add `check` to the subcommands of `python -m egtunnel`."""
    parser = subcommands.add_parser(
        "check",
        help="check that a kernel host can be reached the way the gateway will reach it",
        description="Resolve the SSH settings for HOST (arguments, then EG_* variables, then ssh_config, then "
        "defaults), connect step by step through any ProxyJump hops, and print each step with its outcome "
        "and time. Exit status 0 only when every step passes.",
    )
    parser.add_argument("host", metavar="HOST", help="kernel host: a name, an address or an ssh_config alias")
    parser.add_argument("--port", type=int, help="SSH port (default: EG_SSH_PORT, ssh_config, 22)")
    parser.add_argument("--user", help="SSH user (default: EG_REMOTE_USER, ssh_config, the current user)")
    parser.add_argument("--identity-file", help="private key to try first (default: EG_SSH_IDENTITY_FILE, ssh_config)")
    parser.add_argument("--known-hosts", help="known_hosts file (default: EG_SSH_KNOWN_HOSTS, ssh_config, ~/.ssh/known_hosts)")
    parser.add_argument("--host-key-policy", choices=_native.HOST_KEY_POLICIES,
                        help="strict, accept-new or off (default: EG_SSH_HOST_KEY_POLICY, ssh_config, strict)")
    parser.add_argument("--ssh-config", help="ssh_config file, or none (default: EG_SSH_CONFIG, ~/.ssh/config)")
    parser.add_argument("--cull-idle-timeout", type=int, metavar="S",
                        help="culling timeout in seconds for the keep-alive table (default: from --config, else 0)")
    parser.add_argument("--config", metavar="FILE", help="the gateway's configuration file, read for cull_idle_timeout")
    parser.set_defaults(handler=run)


def cull_idle_timeout_from(path: str) -> Optional[int]:
    """The mapping kernel manager's cull_idle_timeout in a Jupyter configuration file, if set there."""
    from traitlets.config.loader import JSONFileConfigLoader, PyFileConfigLoader

    directory, name = os.path.split(os.path.abspath(path))
    loader_class = JSONFileConfigLoader if name.endswith(".json") else PyFileConfigLoader
    config = loader_class(name, path=directory).load_config()
    for cls in _CULL_CLASSES:
        if cls in config and "cull_idle_timeout" in config[cls]:
            return int(config[cls]["cull_idle_timeout"])
    return None


class _Printer:
    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.failed: Optional[str] = None
        self.steps = 0
        self.hops = 1

    def line(self, text: str = "") -> None:
        print(text, file=self.out, flush=True)

    def step(self, hop: int, name: str, ok: bool, detail: str, seconds: float) -> None:
        self.steps += 1
        where = f"{hop}/{self.hops} " if self.hops > 1 else ""
        self.line(f"  [{' ok ' if ok else 'FAIL'}] {where}{name:<32} {seconds * 1000:8.1f} ms  {detail}")
        if not ok and self.failed is None:
            self.failed = f"{name}: {detail}"


def run(args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    p = _Printer(out)
    try:
        ssh = parse_ssh_settings(os.environ, user=os.environ.get("EG_REMOTE_USER") or None,
                                 password=os.environ.get("EG_REMOTE_PWD") or None)  # fmt: skip
        tunnel = parse_tunnel_settings(os.environ, None)
    except SettingError as exc:
        p.line(f"egtunnel check {args.host}: {exc}")
        return 1
    kwargs = ssh.native_kwargs()
    sources = ssh.sources(os.environ)
    for key in ("port", "user", "identity_file", "known_hosts", "host_key_policy", "ssh_config"):
        value = getattr(args, key)
        if value is not None:
            kwargs[key] = value
            sources[key] = "argument --" + key.replace("_", "-")
    if "ssh_config" not in sources and os.environ.get("EG_SSH_CONFIG"):
        sources["ssh_config"] = "environment EG_SSH_CONFIG"

    p.line(f"egtunnel check {args.host}")
    p.line(f"ssh_config: {kwargs['ssh_config'] or '~/.ssh/config, /etc/ssh/ssh_config'}"
           f" ({sources.get('ssh_config', 'default')})")  # fmt: skip
    explain_args = {k: kwargs[k] for k in ("port", "user", "identity_file", "known_hosts", "host_key_policy",
                                           "connect_timeout", "ssh_config")}  # fmt: skip
    try:
        rows, route = _native.explain(args.host, **explain_args)
    except Exception as exc:  # noqa: BLE001 - every failure is reported the same way
        p.line(f"  [FAIL] settings: {type(exc).__name__}: {exc}")
        return 1
    p.line("Effective settings (argument > EG_* environment > ssh_config > default):")
    count_max: Optional[str] = None
    for setting, value, origin in rows:
        if origin == "argument":
            origin = sources.get(_KEYWORDS.get(setting, ""), "argument")
        if setting == "ignored":
            p.line(f"  {'(ignored)':<24} {value:<40} {origin}  not supported by egtunnel")
            continue
        if setting == "serveralivecountmax":
            count_max = value
        p.line(f"  {setting:<24} {value:<40} {origin}")
    p.line("Route: gateway -> " + " -> ".join(route) + ("" if len(route) == 1 else "  (ProxyJump)"))
    p.hops = len(route)
    p.line("Steps:")
    check_args = dict(explain_args, password=kwargs["password"])
    try:
        ok = _native.check_host(args.host, p.step, **check_args)
    except Exception as exc:  # noqa: BLE001
        p.line(f"  [FAIL] {type(exc).__name__}: {exc}")
        ok = False

    cull, cull_source = _cull_idle_timeout(args)
    count = tunnel.keepalive_count_max or (int(count_max) if count_max else 3)
    p.line(f"Keep-alive per channel at cull_idle_timeout={cull} s ({cull_source}), "
           f"margin {tunnel.keepalive_margin} s, {count} unanswered probes end a connection:")  # fmt: skip
    for channel in KEEP_ALIVE_CHANNELS:
        interval = _native.keep_alive_interval(channel, cull, tunnel.keepalive_margin)
        if interval >= _native.MAX_KEEP_ALIVE_INTERVAL:
            text = f"{interval} s (the maximum: no probes)"
        else:
            text = f"{interval} s (dead after {interval * count} s without an answer)"
        p.line(f"  {channel:<8} {text}")
    if ok and p.failed is None:
        p.line(f"Result: OK, all {p.steps} steps passed")
        return 0
    p.line(f"Result: FAILED at {p.failed or 'settings'}")
    return 1


def _cull_idle_timeout(args: argparse.Namespace) -> tuple[int, str]:
    if args.cull_idle_timeout is not None:
        return args.cull_idle_timeout, "argument --cull-idle-timeout"
    if args.config:
        try:
            found = cull_idle_timeout_from(args.config)
        except Exception as exc:  # noqa: BLE001 - a broken file is reported, not fatal to the check
            return 0, f"{args.config} could not be read ({type(exc).__name__}: {exc}), so 0"
        if found is not None:
            return found, f"from {args.config}"
        return 0, f"not set in {args.config}, so 0"
    return 0, "default; give --config or --cull-idle-timeout"
