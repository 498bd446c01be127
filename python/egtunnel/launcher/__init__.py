"""Kernel launcher speaking Enterprise Gateway's remote launcher protocol: ``python -m egtunnel.launcher``.

It is a drop-in for EG's ``launch_ipykernel.py`` in a kernelspec's argv. It picks the kernel's five
ports and a communication port within the port range, writes the connection file, sends the
connection info to the gateway's response address (EG's version-1 payload: the JSON encrypted with
AES-128-ECB under a fresh key, that key encrypted with the gateway's RSA public key), serves the
gateway's ``{"signum": N}`` and ``{"shutdown": 1}`` requests on the communication port, and runs an
IPython kernel in this same process.

Exposure: all six ports bind ``--ip``, else the address in ``EGTUNNEL_KERNEL_IP``, else 0.0.0.0 (EG's
default). A gateway that reaches the kernel through SSH tunnels exports ``EGTUNNEL_KERNEL_IP=127.0.0.1``
into the launch environment, so the kernel is reachable from its own host only, and the ``ip`` of the
connection info tells the gateway so. The communication port serves several connections at once, so
idle ones cannot hold the gateway's requests back, and delivers only the signals EG sends: 0 (a poll),
SIGINT, SIGTERM, SIGKILL and the kernelspec's ``EG_ALTERNATE_SIGINT``.

Process layout: the kernel runs on the main thread and the communication listener is a thread of the
same process, and the launcher makes itself the leader of its own process group. So the reported
``pid`` is the kernel's, ``pgid`` equals it, and EG's ``kill -SIG -<pgid>`` reaches the kernel and
whatever it started and nothing else; when the kernel dies the listener dies with it, so the gateway's
next poll is refused and no listener can outlive its kernel.

A kernel nobody takes up stops by itself: once the connection info is sent, the gateway asks the
communication port for the kernel's liveness every few seconds (EG's restarter polls with signal 0). If
no request at all arrives within the take-up timeout (EG's launch timeout, read from the environment EG
exports, plus a margin), the gateway has died or given the start up, and the kernel shuts down.

The launcher is installed with egtunnel on each kernel host and runs from there. Its modules:
``cli`` (the arguments and `main`), ``options`` (what a launch is asked to do), ``kernel`` (the
launch, start to end), ``ports`` (ports and the connection file), ``connection_info`` (the encrypted
report to the gateway), ``comm`` (the communication port), ``process`` (process group, signals,
exit), ``cluster`` (Spark and Dask sessions), ``logs`` and ``errors``.

This package needs only the standard library, ipykernel (with its jupyter_client and pyzmq) and
pycryptodomex, the library EG itself uses for this payload, so remote hosts need nothing more; none of
its modules imports another part of egtunnel.
"""

from __future__ import annotations

from .cli import main, parse_args
from .cluster import init_cluster
from .comm import (
    ACCEPT_POLL_INTERVAL,
    LISTEN_BACKLOG,
    MAX_OPEN_CONNECTIONS,
    MAX_REQUEST_BYTES,
    REQUEST_READ_TIMEOUT,
    SHUTDOWN_GRACE,
    TERMINATE_GRACE,
    CommListener,
)
from .connection_info import (
    PAYLOAD_VERSION,
    RESPONSE_ATTEMPTS,
    RESPONSE_CONNECT_TIMEOUT,
    encrypt_connection_info,
    load_public_key,
    send_to_gateway,
)
from .errors import LaunchError
from .kernel import _parent_handle, control_channel_shutdown, launch, resolve_kernel_class
from .logs import log
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
from .ports import KERNEL_PORT_NAMES, bind_in_range, write_connection_file
from .process import (
    ALTERNATE_SIGINT_VARIABLE,
    EXIT_DEADLINE,
    GATEWAY_SIGNALS,
    alternate_sigint,
    lead_process_group,
    send_signal,
)

__all__ = ["main", "parse_args", "LaunchOptions", "LaunchError", "encrypt_connection_info"]
