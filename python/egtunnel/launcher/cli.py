"""The command line of ``python -m egtunnel.launcher``: EG's launcher arguments, checked, and `main`.

Arguments are those of EG's ``launch_ipykernel.py`` (both spellings), read with the settings EG
exports into the launch command (port range size, port retries, launch timeout) and the bind address
the gateway asks for (``EGTUNNEL_KERNEL_IP``, loopback when it reaches the ports through SSH tunnels).
Bad input exits with status 2 and a message naming the argument or variable, before anything is bound
or started.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
from typing import Optional

from .connection_info import load_public_key
from .errors import LaunchError
from .kernel import launch
from .logs import log, log_level, log_to_original_stderr
from .options import (
    CLUSTER_TYPES,
    DEFAULT_IP,
    DEFAULT_KERNEL_CLASS_NAME,
    DEFAULT_LAUNCH_TIMEOUT,
    KERNEL_IP_VARIABLE,
    SPARK_INIT_MODES,
    TAKE_UP_MARGIN,
    LaunchOptions,
)
from .process import alternate_sigint, exit_deadline


# Arguments EG's launch_ipykernel.py accepts under two spellings: `--NAME` and the older
# `--RemoteProcessProxy.NAME` that EG's own kernelspecs still use.
_DUAL_SPELLINGS = (
    ("kernel-id", "kernel_id", "ID", "the gateway's id for this kernel (required)"),
    ("response-address", "response_address", "IP:PORT", "where to send the connection info"),
    ("public-key", "public_key", "KEY", "the gateway's RSA public key, base64 DER"),
    ("port-range", "port_range", "LOWER..UPPER", "ports to use; 0..0 means any"),
    (
        "spark-context-initialization-mode",
        "spark_init_mode",
        "MODE",
        "Spark session creation: none, lazy (on first use) or eager (at start); default none",
    ),
    ("cluster-type", "cluster_type", "TYPE", "cluster to initialize: spark, dask or none; default spark"),
)


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m egtunnel.launcher",
        description="Start an IPython kernel for Jupyter Enterprise Gateway and report its "
        "connection info to the gateway (EG's remote kernel launcher protocol).",
    )
    for name, dest, metavar, text in _DUAL_SPELLINGS:
        # nargs="?" as in EG's launcher, so that an argv whose placeholder EG left empty still parses
        # and gets a message naming the argument rather than a usage error about the next token.
        parser.add_argument(f"--{name}", dest=dest, nargs="?", metavar=metavar, help=text)
        parser.add_argument(
            f"--RemoteProcessProxy.{name}",
            dest=f"rpp_{dest}",
            nargs="?",
            metavar=metavar,
            help=f"same as --{name}",
        )
    parser.add_argument(
        "--kernel-class-name",
        default=DEFAULT_KERNEL_CLASS_NAME,
        metavar="CLASS",
        help=f"kernel class, a subclass of ipykernel.kernelbase.Kernel (default {DEFAULT_KERNEL_CLASS_NAME})",
    )
    parser.add_argument(
        "--ip",
        help="IPv4 address the kernel and communication ports bind to (default: the environment "
        f"variable {KERNEL_IP_VARIABLE}, which the gateway sets to 127.0.0.1 when it tunnels to the "
        f"kernel, else {DEFAULT_IP})",
    )
    parser.add_argument(
        "--take-up-timeout",
        metavar="SECONDS",
        help="stop the kernel when no request from the gateway reaches the communication port within "
        "SECONDS of reporting the connection info; 0 never stops it (default: the launch timeout, "
        f"KERNEL_LAUNCH_TIMEOUT or EG_KERNEL_LAUNCH_TIMEOUT, else {DEFAULT_LAUNCH_TIMEOUT:.0f}, "
        f"plus {TAKE_UP_MARGIN:.0f})",
    )
    parser.add_argument(
        "connection_file",
        nargs="?",
        help="where to write the connection file (older kernelspecs pass {connection_file}); "
        "a temporary file is used when its directory does not exist",
    )
    return parser


def _pick(parser: argparse.ArgumentParser, args: argparse.Namespace, name: str, dest: str) -> Optional[str]:
    short, long = getattr(args, dest), getattr(args, f"rpp_{dest}")
    if short is not None and long is not None and short != long:
        parser.error(
            f"--{name} and --RemoteProcessProxy.{name} disagree ({short!r} vs {long!r}); give one of them"
        )
    return short if short is not None else long


def _env_int(names: tuple[str, ...], default: int, parser: argparse.ArgumentParser) -> int:
    for env_name in names:
        raw = os.environ.get(env_name)
        if raw is None or raw == "":
            continue
        try:
            value = int(raw)
        except ValueError:
            value = -1
        if value < 0:
            parser.error(f"environment variable {env_name}={raw!r} is not a non-negative integer")
        return value
    return default


def _seconds(text: str, what: str, parser: argparse.ArgumentParser) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < float("inf"):
        parser.error(f"{what}={text!r} is not a non-negative number of seconds")
    return value


def _take_up_timeout(text: Optional[str], parser: argparse.ArgumentParser) -> float:
    if text is not None:
        return _seconds(text, "--take-up-timeout", parser)
    # EG exports its own environment and the kernel's into the launch command: a client's
    # KERNEL_LAUNCH_TIMEOUT overrides the gateway's EG_KERNEL_LAUNCH_TIMEOUT, as in EG.
    for name in ("KERNEL_LAUNCH_TIMEOUT", "EG_KERNEL_LAUNCH_TIMEOUT"):
        raw = os.environ.get(name)
        if raw:
            return _seconds(raw, f"environment variable {name}", parser) + TAKE_UP_MARGIN
    return DEFAULT_LAUNCH_TIMEOUT + TAKE_UP_MARGIN


def _bind_ip(text: Optional[str], parser: argparse.ArgumentParser) -> str:
    what = "--ip"
    if text is None:
        # The gateway exports this into the launch environment when it reaches the kernel through
        # SSH tunnels: the ports then need not, and should not, be reachable from the network.
        text = os.environ.get(KERNEL_IP_VARIABLE) or DEFAULT_IP
        what = f"environment variable {KERNEL_IP_VARIABLE}"
    try:
        return str(ipaddress.IPv4Address(text))
    except ValueError:
        parser.error(f"invalid {what} {text!r}: expected an IPv4 address such as 127.0.0.1 or 0.0.0.0")


def _parse_port_range(text: Optional[str], parser: argparse.ArgumentParser) -> tuple[int, int]:
    if text is None:
        return 0, 0
    lower_text, sep, upper_text = text.partition("..")
    try:
        if not sep:
            raise ValueError
        lower, upper = int(lower_text), int(upper_text)
    except ValueError:
        parser.error(f"invalid port range {text!r}: expected LOWER..UPPER, e.g. 40000..41000, or 0..0 for any")
    if lower == upper:
        # EG (server and its own launcher) treats an empty range as "no restriction".
        if lower != 0:
            log.warning("port range %s is empty; any free port will be used, as Enterprise Gateway does", text)
        return 0, 0
    if not 1 <= lower < upper <= 65535:
        parser.error(f"invalid port range {text!r}: bounds must satisfy 1 <= LOWER < UPPER <= 65535")
    # Same rule and variables as EG, which passes EG_MIN_PORT_RANGE_SIZE to the kernel's environment.
    min_size = _env_int(("MIN_PORT_RANGE_SIZE", "EG_MIN_PORT_RANGE_SIZE"), 1000, parser)
    if upper - lower < min_size:
        parser.error(
            f"port range {text!r} spans {upper - lower} ports; at least {min_size} are required "
            "(EG_MIN_PORT_RANGE_SIZE)"
        )
    return lower, upper


def _parse_response_address(text: str, parser: argparse.ArgumentParser) -> tuple[str, int]:
    host, sep, port_text = text.rpartition(":")
    host = host.strip("[]")
    try:
        port = int(port_text)
    except ValueError:
        port = 0
    if not sep or not host or not 1 <= port <= 65535:
        parser.error(f"invalid response address {text!r}: expected HOST:PORT, e.g. 10.0.0.5:8877")
    return host, port


def parse_args(argv: Optional[list[str]] = None) -> LaunchOptions:
    """Parse and validate the launcher's arguments; bad input exits with status 2 and a message."""
    parser = _build_parser()
    args = parser.parse_args(argv)
    values = {dest: _pick(parser, args, name, dest) for name, dest, _, _ in _DUAL_SPELLINGS}

    kernel_id = values["kernel_id"]
    if not kernel_id:
        parser.error("--kernel-id (or --RemoteProcessProxy.kernel-id) is required")
    if os.sep in kernel_id or "\0" in kernel_id or kernel_id in (".", ".."):
        parser.error(f"invalid kernel id {kernel_id!r}: it names the connection file, so it cannot be a path")
    # An unsubstituted placeholder means the gateway did not know this value, which is a
    # configuration problem worth naming exactly.
    for dest, value in values.items():
        if value is not None and value.startswith("{") and value.endswith("}"):
            parser.error(f"{value} was passed literally: the gateway did not substitute it (argument {dest})")

    response_address = None
    if values["response_address"]:
        response_address = _parse_response_address(values["response_address"], parser)
        if not values["public_key"]:
            parser.error("--public-key is required with --response-address: the connection info is encrypted with it")
        try:
            load_public_key(values["public_key"])
        except LaunchError as exc:
            parser.error(str(exc))

    spark_init_mode = (values["spark_init_mode"] or "none").lower()
    if spark_init_mode not in SPARK_INIT_MODES:
        parser.error(
            f"unknown Spark context initialization mode {values['spark_init_mode']!r}: "
            f"expected one of {', '.join(SPARK_INIT_MODES)}"
        )
    cluster_type = (values["cluster_type"] or "spark").lower()
    if cluster_type not in CLUSTER_TYPES:
        parser.error(f"unknown cluster type {values['cluster_type']!r}: expected one of {', '.join(CLUSTER_TYPES)}")
    if cluster_type == "spark" and spark_init_mode == "none":
        cluster_type = "none"

    ip = _bind_ip(args.ip, parser)
    if not args.kernel_class_name or "." not in args.kernel_class_name:
        parser.error(f"invalid --kernel-class-name {args.kernel_class_name!r}: expected module.Class")

    return LaunchOptions(
        kernel_id=kernel_id,
        response_address=response_address,
        public_key=values["public_key"],
        port_range=_parse_port_range(values["port_range"], parser),
        spark_init_mode=spark_init_mode,
        cluster_type=cluster_type,
        kernel_class_name=args.kernel_class_name,
        ip=ip,
        connection_file=args.connection_file,
        port_retries=_env_int(("MAX_PORT_RANGE_RETRIES", "EG_MAX_PORT_RANGE_RETRIES"), 5, parser),
        take_up_timeout=_take_up_timeout(args.take_up_timeout, parser),
        alternate_sigint=alternate_sigint(os.environ),
    )


def main(argv: Optional[list[str]] = None) -> int:
    options = parse_args(argv)
    log_to_original_stderr(log_level())
    code = 1
    try:
        code = launch(options)
    except LaunchError as exc:
        log.error("%s", exc)
    finally:
        exit_deadline(code)
    return code
