"""Kernel launcher speaking Enterprise Gateway's remote launcher protocol: ``python -m egtunnel.launcher``.

It is a drop-in for EG's ``launch_ipykernel.py`` in a kernelspec's argv. It picks the kernel's five
ports and a communication port within the port range, writes the connection file, sends the
connection info to the gateway's response address (EG's version-1 payload: the JSON encrypted with
AES-128-ECB under a fresh key, that key encrypted with the gateway's RSA public key), serves the
gateway's ``{"signum": N}`` and ``{"shutdown": 1}`` requests on the communication port, and runs an
IPython kernel in this same process.

Process layout: the kernel runs on the main thread and the communication listener is a thread of the
same process, and the launcher makes itself the leader of its own process group. So the reported
``pid`` is the kernel's, ``pgid`` equals it, and EG's ``kill -SIG -<pgid>`` reaches the kernel and
whatever it started and nothing else; when the kernel dies the listener dies with it, so the gateway's
next poll is refused and no listener can outlive its kernel.

A kernel nobody takes up stops by itself: once the connection info is sent, the gateway asks the
communication port for the kernel's liveness every few seconds (EG's restarter polls with signal 0). If
no request at all arrives within the take-up timeout (EG's launch timeout, read from the environment EG
exports, plus a margin), the gateway has died or given the start up, and the kernel shuts down.

This module needs only the standard library, ipykernel (with its jupyter_client and pyzmq) and
pycryptodomex, the library EG itself uses for this payload, so remote hosts need nothing more.
"""

from __future__ import annotations

import argparse
import atexit
import base64
import ipaddress
import json
import logging
import os
import random
import signal
import socket
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Callable, Optional

__all__ = ["main", "parse_args", "LaunchOptions", "LaunchError", "encrypt_connection_info"]

log = logging.getLogger("egtunnel.launcher")

DEFAULT_KERNEL_CLASS_NAME = "ipykernel.ipkernel.IPythonKernel"
SPARK_INIT_MODES = ("none", "lazy", "eager")
CLUSTER_TYPES = ("spark", "dask", "none")
# The payload layout EG's ResponseManager decodes as "version 1".
PAYLOAD_VERSION = 1
KERNEL_PORT_NAMES = ("shell_port", "iopub_port", "stdin_port", "hb_port", "control_port")

# A gateway request is a few bytes; anything larger is not from the gateway.
MAX_REQUEST_BYTES = 64 * 1024
# EG closes its end right after sending; a peer that keeps the connection open must not stall the
# listener, because polls and interrupts queue behind it.
REQUEST_READ_TIMEOUT = 5.0
# How often the listener rechecks whether it should stop while no request arrives.
ACCEPT_POLL_INTERVAL = 0.5
# After a shutdown request the kernel gets this long to stop on its own before its process group is
# terminated: long enough for the kernel's own shutdown, short enough that a kernel stuck in a cell
# does not run on for long after the gateway believes it gone (the closed port reads as "dead").
SHUTDOWN_GRACE = 5.0
# Between SIGTERM and SIGKILL, for kernels whose code handles or ignores SIGTERM.
TERMINATE_GRACE = 2.0
# Once the kernel has stopped, interpreter exit must not hang on threads started by user code.
EXIT_DEADLINE = 5.0
RESPONSE_CONNECT_TIMEOUT = 30.0
RESPONSE_ATTEMPTS = 3
# EG's default launch timeout (EG_KERNEL_LAUNCH_TIMEOUT unset), and what the take-up timeout adds to
# the launch timeout: the gateway's tunnel set-up after the report (bounded by its SSH connect timeout)
# and its first poll, which comes 3 s after the start, with room for a busy gateway.
DEFAULT_LAUNCH_TIMEOUT = 30.0
TAKE_UP_MARGIN = 30.0


class LaunchError(RuntimeError):
    """The launch cannot proceed; the message says why in terms of the launcher's inputs."""


# ---------------------------------------------------------------------------------------------
# Arguments


@dataclass(frozen=True)
class LaunchOptions:
    kernel_id: str
    response_address: Optional[tuple[str, int]]
    public_key: Optional[str]
    port_range: tuple[int, int]
    spark_init_mode: str
    cluster_type: str
    kernel_class_name: str
    ip: str
    connection_file: Optional[str]
    # Failed binds tolerated per port before giving up (EG's MAX_PORT_RANGE_RETRIES).
    port_retries: int = 5
    # Seconds after the report within which the gateway's first request must arrive; 0 waits forever.
    take_up_timeout: float = DEFAULT_LAUNCH_TIMEOUT + TAKE_UP_MARGIN


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
        default="0.0.0.0",
        help="IPv4 address the kernel and communication ports bind to (default 0.0.0.0)",
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

    try:
        ip = str(ipaddress.IPv4Address(args.ip))
    except ValueError:
        parser.error(f"invalid --ip {args.ip!r}: expected an IPv4 address such as 0.0.0.0")

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
    )


# ---------------------------------------------------------------------------------------------
# The encrypted connection-info payload


def _crypto() -> Any:
    try:
        from Cryptodome.Cipher import AES, PKCS1_v1_5
        from Cryptodome.PublicKey import RSA
        from Cryptodome.Random import get_random_bytes
        from Cryptodome.Util.Padding import pad
    except ImportError as exc:
        raise LaunchError(
            "pycryptodomex is required to encrypt the connection info for the gateway: "
            "pip install 'egtunnel[launcher]' (or pycryptodomex)"
        ) from exc
    return SimpleNamespace(AES=AES, PKCS1_v1_5=PKCS1_v1_5, RSA=RSA, get_random_bytes=get_random_bytes, pad=pad)


def load_public_key(text: str) -> Any:
    """The gateway's public key: its PEM body, i.e. base64 of the DER, as EG passes it."""
    crypto = _crypto()
    try:
        key = crypto.RSA.import_key(base64.b64decode(text.encode("ascii"), validate=True))
    except (ValueError, IndexError, TypeError, UnicodeEncodeError) as exc:
        raise LaunchError(f"invalid public key: expected the base64 of an RSA public key in DER form ({exc})") from exc
    if key.has_private():
        raise LaunchError("invalid public key: a private key was given")
    return key


def encrypt_connection_info(connection_info: dict[str, Any], public_key: str) -> bytes:
    """EG's version-1 payload for `connection_info`, ready to send to the response address."""
    crypto = _crypto()
    aes_key = crypto.get_random_bytes(16)
    plaintext = json.dumps(connection_info).encode("utf-8")
    encrypted_info = crypto.AES.new(aes_key, crypto.AES.MODE_ECB).encrypt(crypto.pad(plaintext, 16))
    encrypted_key = crypto.PKCS1_v1_5.new(load_public_key(public_key)).encrypt(aes_key)
    payload = {
        "version": PAYLOAD_VERSION,
        "key": base64.b64encode(encrypted_key).decode("ascii"),
        "conn_info": base64.b64encode(encrypted_info).decode("ascii"),
    }
    return base64.b64encode(json.dumps(payload).encode("utf-8"))


def send_to_gateway(address: tuple[str, int], payload: bytes) -> None:
    last_error: Optional[OSError] = None
    for attempt in range(RESPONSE_ATTEMPTS):
        if attempt:
            time.sleep(attempt)
        try:
            with socket.create_connection(address, timeout=RESPONSE_CONNECT_TIMEOUT) as conn:
                conn.sendall(payload)
                # The gateway reads until end of stream before it decodes.
                conn.shutdown(socket.SHUT_WR)
            return
        except OSError as exc:
            last_error = exc
            log.warning("sending the connection info to %s:%s failed (%s)", *address, exc)
    raise LaunchError(
        f"could not send the connection info to the gateway at {address[0]}:{address[1]} "
        f"after {RESPONSE_ATTEMPTS} attempts: {last_error}"
    )


# ---------------------------------------------------------------------------------------------
# Ports and the connection file


def bind_in_range(ip: str, port_range: tuple[int, int], retries: int) -> socket.socket:
    """A TCP socket bound to a free port of the range (any port for 0..0)."""
    lower, upper = port_range
    attempts = 1 if lower == upper else retries + 1
    last_error: Optional[OSError] = None
    for _ in range(attempts):
        candidate = 0 if lower == upper else random.randint(lower, upper)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.bind((ip, candidate))
            return sock
        except OSError as exc:
            sock.close()
            last_error = exc
    raise LaunchError(f"no free port found in range {lower}..{upper} on {ip} after {attempts} attempts: {last_error}")


def write_connection_file(path: Optional[str], kernel_id: str, info: dict[str, Any]) -> str:
    if path is None or not os.path.isdir(os.path.dirname(os.path.abspath(path))):
        fd, path = tempfile.mkstemp(prefix=f"kernel-{kernel_id}-", suffix=".json")
    else:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    # The file holds the message-signing key.
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "w") as handle:
        json.dump(info, handle, indent=2)
    return path


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("could not remove connection file %s: %s", path, exc)


# ---------------------------------------------------------------------------------------------
# The communication listener


class CommListener(threading.Thread):
    """Serves the gateway's requests on the communication port, one JSON object per connection.

    A daemon thread of the kernel's process: it cannot outlive the kernel, and it never keeps the
    process alive on its own.
    """

    def __init__(
        self,
        sock: socket.socket,
        request_kernel_stop: Callable[[], None],
        on_interrupt: Optional[Callable[[], None]] = None,
    ) -> None:
        super().__init__(name="egtunnel-comm-listener", daemon=True)
        self._sock = sock
        self._sock.settimeout(ACCEPT_POLL_INTERVAL)
        self.port: int = sock.getsockname()[1]
        self._request_kernel_stop = request_kernel_stop
        self._on_interrupt = on_interrupt
        self._stopping = threading.Event()
        self._shutdown_requested = False
        # Set by the gateway's first request; until then `_take_up_deadline` (monotonic) may stop the kernel.
        self.taken_up = threading.Event()
        self._take_up_deadline: Optional[float] = None
        # Set by the main thread once the kernel has returned; ends the shutdown escalation.
        self.kernel_stopped = threading.Event()
        # A process forked by kernel code (multiprocessing, os.fork) would otherwise hold the port
        # open after the kernel is gone, and the gateway would keep seeing a live kernel.
        os.register_at_fork(after_in_child=self._close_in_child)

    def stop(self) -> None:
        self._stopping.set()

    def expect_take_up(self, seconds: float) -> None:
        """The connection info is out: the gateway's first request must arrive within `seconds` (0: no limit)."""
        if seconds > 0:
            self._take_up_deadline = time.monotonic() + seconds

    def _abandoned(self) -> bool:
        deadline = self._take_up_deadline
        return deadline is not None and not self.taken_up.is_set() and time.monotonic() > deadline

    def run(self) -> None:
        # Signals sent to the process must land on the kernel's main thread: a SIGINT taken by this
        # thread would not wake a cell sleeping in a system call.
        signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
        try:
            while not self._stopping.is_set():
                if self._abandoned():
                    # Nothing holds this kernel: the gateway died or gave the start up after the report.
                    log.error("no request from the gateway within the take-up timeout after the connection "
                              "info was sent; nobody uses this kernel, so it stops")  # fmt: skip
                    self._shutdown_requested = True
                    break
                try:
                    conn, _ = self._sock.accept()
                except socket.timeout:
                    continue
                except OSError as exc:
                    if self._stopping.is_set():
                        break
                    log.warning("accepting on the communication port failed: %s", exc)
                    time.sleep(ACCEPT_POLL_INTERVAL)
                    continue
                with conn:
                    request = self._read_request(conn)
                if request is not None:
                    self.handle(request)
        finally:
            # Closed before the kernel is stopped, so the gateway's polls turn into refusals at once.
            self._sock.close()
        if self._shutdown_requested:
            self._stop_kernel()

    def _read_request(self, conn: socket.socket) -> Optional[dict[str, Any]]:
        conn.settimeout(REQUEST_READ_TIMEOUT)
        data = b""
        try:
            while True:
                chunk = conn.recv(4096)
                if not chunk:
                    break
                data += chunk
                if len(data) > MAX_REQUEST_BYTES:
                    log.warning("ignoring a request larger than %d bytes", MAX_REQUEST_BYTES)
                    return None
                # A complete object is the whole request (more bytes could only make it invalid), so
                # it is served without waiting for the sender to close; a relay that does not pass
                # the close on cannot delay it.
                request = _json_object(data)
                if request is not None:
                    return request
        except OSError as exc:
            log.warning("ignoring a request that was not completed: %s", exc)
            return None
        if not data:
            return None
        try:
            request = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            log.warning("ignoring a request that is not JSON: %s", exc)
            return None
        if not isinstance(request, dict):
            log.warning("ignoring a request that is not a JSON object: %r", request)
            return None
        return request

    def handle(self, request: dict[str, Any]) -> None:
        """Act on one decoded request; anything malformed is logged and ignored."""
        if "signum" in request or "shutdown" in request:
            self.taken_up.set()
        if "signum" in request:
            self._signal(request["signum"])
        if request.get("shutdown"):
            log.info("shutdown requested by the gateway")
            self._shutdown_requested = True
            self._stopping.set()
        unknown = set(request) - {"signum", "shutdown"}
        if unknown:
            log.warning("ignoring unknown request fields: %s", ", ".join(sorted(unknown)))

    def _signal(self, raw: Any) -> None:
        # EG's own listener takes int(value), so numeric strings are accepted too.
        try:
            if isinstance(raw, bool) or not isinstance(raw, (int, str)):
                raise ValueError
            signum = int(raw)
            if signum < 0:
                raise ValueError
        except ValueError:
            log.warning("ignoring a signal request with an invalid signal number: %r", raw)
            return
        if signum == 0:
            # A poll: that this thread answers proves the kernel's process is alive.
            return
        log.info("signal %d requested by the gateway", signum)
        try:
            send_signal(signum)
        except (OSError, ValueError) as exc:
            log.warning("sending signal %d failed: %s", signum, exc)
            return
        if signum == signal.SIGINT and self._on_interrupt is not None:
            try:
                self._on_interrupt()
            except Exception:
                log.exception("interrupt hook failed")

    def _stop_kernel(self) -> None:
        try:
            self._request_kernel_stop()
        except Exception:
            log.exception("asking the kernel to shut down failed")
        deadline = time.monotonic() + SHUTDOWN_GRACE
        while time.monotonic() < deadline:
            _reap_exited_children()
            if self.kernel_stopped.wait(0.1):
                return
        log.warning("the kernel did not stop within %.0f s of the shutdown request; terminating it", SHUTDOWN_GRACE)
        for signum, grace in ((signal.SIGTERM, TERMINATE_GRACE), (signal.SIGKILL, None)):
            try:
                send_signal(signum)
            except OSError as exc:
                log.warning("sending signal %d failed: %s", signum, exc)
            if grace is not None and self.kernel_stopped.wait(grace):
                return

    def _close_in_child(self) -> None:
        try:
            self._sock.close()
        except OSError:
            pass


def _json_object(data: bytes) -> Optional[dict[str, Any]]:
    if not data.rstrip().endswith(b"}"):
        return None
    try:
        value = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _reap_exited_children() -> None:
    # ipykernel's shutdown terminates the kernel's children and then waits until none is left, but
    # it does not collect them; an uncollected child stays a zombie and the wait runs to its end
    # (about 30 s). Once the kernel is shutting down, nobody else needs their exit status.
    while True:
        try:
            pid, _ = os.waitpid(-os.getpgrp(), os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def send_signal(signum: int) -> None:
    """Signal the kernel the way EG's remote_signal does: its process group when it leads one."""
    pid = os.getpid()
    if os.getpgrp() == pid:
        os.killpg(pid, signum)
    else:
        os.kill(pid, signum)


def lead_process_group() -> None:
    """Become the leader of a new process group unless already one (e.g. started with setsid).

    Started by a shell without job control or by another program, the launcher would share that
    caller's group, and EG's `kill -SIG -<pgid>` would hit the caller too.
    """
    if os.getpgrp() == os.getpid():
        return
    try:
        os.setpgid(0, 0)
    except OSError as exc:
        log.warning("could not start a process group (%s); signals will target the process only", exc)


def control_channel_shutdown(connection_info: dict[str, Any]) -> Callable[[], None]:
    """A callable asking the kernel to shut down through its own control channel.

    The kernel's protocol is the one stop request every ipykernel version honours, and it runs the
    kernel's own shutdown (children terminated, shutdown broadcast on IOPub).
    """

    def request() -> None:
        import zmq
        from jupyter_client.session import Session

        host = connection_info["ip"]
        if host == "0.0.0.0":
            host = "127.0.0.1"
        session = Session(
            key=connection_info["key"].encode("ascii"),
            signature_scheme=connection_info["signature_scheme"],
        )
        context = zmq.Context()
        try:
            sock = context.socket(zmq.DEALER)
            sock.linger = 1000
            sock.connect(f"tcp://{host}:{connection_info['control_port']}")
            session.send(sock, "shutdown_request", {"restart": False})
            sock.close()
        finally:
            context.term()

    return request


# ---------------------------------------------------------------------------------------------
# Optional cluster sessions in the kernel's namespace (EG's --cluster-type)


class _LazySparkSession:
    """Creates the Spark session at most once, in whichever thread needs it first."""

    NAMES = ("spark", "sc", "sql")

    def __init__(self, namespace: dict[str, Any]) -> None:
        self._namespace = namespace
        self._lock = threading.Lock()
        self._session: Any = None
        self._error: Optional[BaseException] = None
        self.placeholders = {name: _Deferred(name, self) for name in self.NAMES}

    def get(self) -> Any:
        with self._lock:
            if self._session is None and self._error is None:
                try:
                    from pyspark.sql import SparkSession

                    self._session = SparkSession.builder.getOrCreate()
                    atexit.register(self._session.stop)
                    log.info("Spark session created")
                except Exception as exc:
                    self._error = exc
                    log.exception("creating the Spark session failed")
                else:
                    real = {"spark": self._session, "sc": self._session.sparkContext, "sql": self._session.sql}
                    for name, value in real.items():
                        # A name the user has rebound meanwhile is theirs.
                        if self._namespace.get(name) is self.placeholders[name]:
                            self._namespace[name] = value
            if self._error is not None:
                raise RuntimeError(f"the Spark session could not be created: {self._error}") from self._error
            return self._session

    def resolve(self, name: str) -> Any:
        session = self.get()
        return {"spark": session, "sc": session.sparkContext, "sql": session.sql}[name]

    def create_in_background(self) -> None:
        threading.Thread(target=self._create_quietly, name="egtunnel-spark-init", daemon=True).start()

    def _create_quietly(self) -> None:
        try:
            self.get()
        except RuntimeError:
            pass  # already logged; each use of the names reports it

    def cancel_jobs(self) -> None:
        if self._session is not None:
            self._session.sparkContext.cancelAllJobs()


class _Deferred:
    """Stands in a kernel namespace for a Spark object until the session exists."""

    def __init__(self, name: str, owner: _LazySparkSession) -> None:
        self._name = name
        self._owner = owner

    def __getattr__(self, attribute: str) -> Any:
        # IPython probes objects for display hooks; those must not start a cluster session.
        if attribute.startswith("__") or attribute.startswith("_ipython_") or attribute.startswith("_repr_"):
            raise AttributeError(attribute)
        return getattr(self._owner.resolve(self._name), attribute)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._owner.resolve(self._name)(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<{self._name}: the Spark session is created when first used>"


def init_cluster(cluster_type: str, spark_init_mode: str, namespace: dict[str, Any]) -> Optional[Callable[[], None]]:
    """Put the cluster handles into the kernel's namespace; returns a hook to run on interrupts."""
    if cluster_type == "spark":
        try:
            import pyspark  # noqa: F401
        except ImportError:
            log.warning("a Spark session was requested but pyspark is not installed; continuing without one")
            return None
        spark = _LazySparkSession(namespace)
        namespace.update(spark.placeholders)
        if spark_init_mode == "eager":
            spark.create_in_background()
        return spark.cancel_jobs
    if cluster_type == "dask":
        try:
            import dask_yarn

            namespace["cluster"] = dask_yarn.YarnCluster.from_current()
        except Exception as exc:
            log.warning("a Dask cluster was requested but could not be attached (%s); continuing without one", exc)
    return None


# ---------------------------------------------------------------------------------------------
# The kernel


def resolve_kernel_class(name: str) -> type:
    from ipykernel.kernelbase import Kernel

    module_name, _, class_name = name.rpartition(".")
    try:
        module = __import__(module_name, fromlist=[class_name])
        kernel_class = getattr(module, class_name)
    except (ImportError, AttributeError) as exc:
        raise LaunchError(f"kernel class {name!r} cannot be imported: {exc}") from exc
    if not (isinstance(kernel_class, type) and issubclass(kernel_class, Kernel)):
        raise LaunchError(f"kernel class {name!r} is not a subclass of ipykernel.kernelbase.Kernel")
    return kernel_class


def _parent_handle() -> int:
    # jupyter_client sets JPY_PARENT_PID for a kernel it starts as its own child, and ipykernel then
    # exits when that parent goes. A value that does not name this process's parent was inherited
    # through an exported environment (EG exports its whole environment to remote launches) and
    # would end a nohup'ed kernel as soon as its shell exits.
    value = os.environ.get("JPY_PARENT_PID", "")
    return int(value) if value.isdigit() and int(value) == os.getppid() else 0


def _log_to_original_stderr(level: int) -> None:
    # Once the kernel starts it redirects file descriptor 2 to the notebook; a duplicate taken now
    # keeps the launcher's messages in the kernel log and out of users' cells.
    stream = os.fdopen(os.dup(2), "w", buffering=1)
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("[%(levelname)1.1s %(asctime)s.%(msecs)03d %(name)s] %(message)s", "%H:%M:%S"))
    log.addHandler(handler)
    log.setLevel(level)
    log.propagate = False


def _log_level() -> int:
    raw = os.environ.get("LOG_LEVEL") or os.environ.get("EG_LOG_LEVEL") or "INFO"
    if raw.isdigit():
        return int(raw)
    level = logging.getLevelName(raw.upper())
    return level if isinstance(level, int) else logging.INFO


def _exit_deadline(code: int) -> None:
    # Interpreter exit waits for non-daemon threads; one left running by kernel code would keep this
    # process (and its group) alive with nobody listening for the gateway.
    timer = threading.Timer(EXIT_DEADLINE, os._exit, args=(code,))
    timer.daemon = True
    timer.start()


def launch(options: LaunchOptions) -> int:
    kernel_class = resolve_kernel_class(options.kernel_class_name)
    from ipykernel.kernelapp import IPKernelApp

    lead_process_group()
    # Interrupts are for cells; one arriving before the kernel has installed its own handling must
    # not end the launch. ipykernel ignores SIGINT between cells in the same way.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    pid = os.getpid()

    # All six sockets are held together so that the six ports differ; the five kernel ports are
    # released only just before the kernel binds them.
    reservations = [bind_in_range(options.ip, options.port_range, options.port_retries) for _ in KERNEL_PORT_NAMES]
    comm_sock = bind_in_range(options.ip, options.port_range, options.port_retries)
    comm_sock.listen(16)
    connection_info: dict[str, Any] = {
        **{name: sock.getsockname()[1] for name, sock in zip(KERNEL_PORT_NAMES, reservations)},
        "ip": options.ip,
        "key": str(uuid.uuid4()),
        "transport": "tcp",
        "signature_scheme": "hmac-sha256",
        "kernel_name": "",
    }
    connection_file = write_connection_file(options.connection_file, options.kernel_id, connection_info)
    namespace: dict[str, Any] = {}
    on_interrupt = init_cluster(options.cluster_type, options.spark_init_mode, namespace)
    listener = CommListener(comm_sock, control_channel_shutdown(connection_info), on_interrupt)
    listener.start()
    log.info(
        "kernel %s: pid %d, ports %s, communication port %d",
        options.kernel_id,
        pid,
        ", ".join(str(connection_info[name]) for name in KERNEL_PORT_NAMES),
        listener.port,
    )
    try:
        if options.response_address is not None:
            assert options.public_key is not None
            payload = encrypt_connection_info(
                {
                    **connection_info,
                    "pid": pid,
                    "pgid": os.getpgrp(),
                    "comm_port": listener.port,
                    "kernel_id": options.kernel_id,
                },
                options.public_key,
            )
            send_to_gateway(options.response_address, payload)
            listener.expect_take_up(options.take_up_timeout)
        else:
            log.info("no response address given; connection file: %s", connection_file)
        for sock in reservations:
            sock.close()

        app = IPKernelApp.instance(
            kernel_class=kernel_class,
            connection_file=connection_file,
            ip=options.ip,
            user_ns=namespace,
            parent_handle=_parent_handle(),
        )
        app.initialize([])
        if options.response_address is not None:
            # Read by the kernel at start only; the gateway has its copy, and the key it holds should
            # not outlive a kernel that is killed.
            _remove(connection_file)
        app.start()
        log.info("kernel %s stopped", options.kernel_id)
        return 0
    finally:
        listener.kernel_stopped.set()
        listener.stop()
        listener.join(ACCEPT_POLL_INTERVAL * 4)
        for sock in reservations:
            sock.close()
        _remove(connection_file)


def main(argv: Optional[list[str]] = None) -> int:
    options = parse_args(argv)
    _log_to_original_stderr(_log_level())
    code = 1
    try:
        code = launch(options)
    except LaunchError as exc:
        log.error("%s", exc)
    finally:
        _exit_deadline(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
