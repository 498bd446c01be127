"""One launch in the launcher's process: bind the ports, report to the gateway, run the kernel, clean up.

The kernel is ipykernel's `IPKernelApp` on the main thread; ipykernel (with jupyter_client and pyzmq)
is imported only when a launch starts, so that parsing the arguments needs none of it.
"""

from __future__ import annotations

import os
import signal
import uuid
from typing import Any, Callable

from .cluster import init_cluster
from .comm import ACCEPT_POLL_INTERVAL, LISTEN_BACKLOG, CommListener
from .connection_info import encrypt_connection_info, send_to_gateway
from .errors import LaunchError
from .logs import log
from .options import LaunchOptions
from .ports import KERNEL_PORT_NAMES, bind_in_range, remove_connection_file, write_connection_file
from .process import lead_process_group


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


def launch(options: LaunchOptions) -> int:
    kernel_class = resolve_kernel_class(options.kernel_class_name)
    from ipykernel.kernelapp import IPKernelApp

    lead_process_group()
    # Interrupts are for cells; one arriving before the kernel has installed its own handling must
    # not end the launch. ipykernel ignores SIGINT between cells in the same way.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    pid = os.getpid()

    # All six sockets are held together so that the six ports differ; the five kernel ports are
    # released only just before the kernel binds them. All bind options.ip, which the connection info
    # reports, so the gateway learns whether the kernel is reachable from other hosts at all.
    reservations = [bind_in_range(options.ip, options.port_range, options.port_retries) for _ in KERNEL_PORT_NAMES]
    comm_sock = bind_in_range(options.ip, options.port_range, options.port_retries)
    comm_sock.listen(LISTEN_BACKLOG)
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
    listener = CommListener(
        comm_sock, control_channel_shutdown(connection_info), on_interrupt, options.alternate_sigint
    )
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
            remove_connection_file(connection_file)
        app.start()
        log.info("kernel %s stopped", options.kernel_id)
        return 0
    finally:
        listener.kernel_stopped.set()
        listener.stop()
        listener.join(ACCEPT_POLL_INTERVAL * 4)
        for sock in reservations:
            sock.close()
        remove_connection_file(connection_file)
