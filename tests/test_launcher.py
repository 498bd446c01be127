"""Tests for the kernel launcher (`python -m egtunnel.launcher`).

The launcher runs as a real subprocess and reports to a real response listener built from Enterprise
Gateway 3.3's own ResponseManager, so the payload is proven to decode the way the gateway decodes it.
The kernel is then driven with jupyter_client and the communication port the way the gateway drives
them. Everything listens on 127.0.0.1 but the kernel of the one test of the default bind address,
and every wait is bounded.
"""

from __future__ import annotations

import ipaddress
import json
import os
import random
import signal
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path
from typing import Any, Optional

import psutil
import pytest
from jupyter_client import BlockingKernelClient

from egtunnel import launcher

# Runs in its own interpreter because EG reads its EG_* settings when the module is imported and
# ResponseManager is a process-wide singleton.
EG_RESPONSE_LISTENER = textwrap.dedent(
    """
    import asyncio, json, sys
    from tornado.ioloop import IOLoop
    from enterprise_gateway.services.processproxies.processproxy import ResponseManager

    async def main(kernel_id, deadline):
        manager = ResponseManager.instance()
        manager.register_event(kernel_id)
        print(json.dumps({"response_address": manager.response_address,
                          "public_key": manager.public_key}), flush=True)
        end = asyncio.get_running_loop().time() + deadline
        while True:
            try:
                info = await manager.get_connection_info(kernel_id)
                break
            except asyncio.TimeoutError:
                if asyncio.get_running_loop().time() > end:
                    print(json.dumps({"error": "no connection info"}), flush=True)
                    return
        print(json.dumps(info), flush=True)
        manager.stop_response_manager()

    IOLoop.current().run_sync(lambda: main(sys.argv[1], float(sys.argv[2])))
    """
)

START_TIMEOUT = 45.0
EXEC_TIMEOUT = 20.0
EXIT_TIMEOUT = 15.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def random_port_range() -> tuple[int, int]:
    lower = random.randint(20000, 59000)
    return lower, lower + 1000


def send_request(port: int, request: Any) -> None:
    """Send one request as EG's _send_listener_request does: connect, send, close."""
    data = request if isinstance(request, bytes) else json.dumps(request).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(data)


def port_refuses(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            return False
    except ConnectionRefusedError:
        return True


def process_gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def group_empty(pgid: int) -> bool:
    return all(process_gone(p.pid) for p in psutil.process_iter() if _pgid(p.pid) == pgid)


def _pgid(pid: int) -> Optional[int]:
    try:
        return os.getpgid(pid)
    except OSError:
        return None


def wait_until(predicate, timeout: float, interval: float = 0.1) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


class Gateway:
    """The response side of EG: its own ResponseManager in a subprocess."""

    def __init__(self, tmp_path: Path, kernel_id: str) -> None:
        env = dict(os.environ, EG_RESPONSE_IP="127.0.0.1", EG_RESPONSE_PORT=str(free_port()))
        script = tmp_path / "eg_response_listener.py"
        script.write_text(EG_RESPONSE_LISTENER)
        self.proc = subprocess.Popen(
            [sys.executable, str(script), kernel_id, str(START_TIMEOUT)],
            stdout=subprocess.PIPE,
            stderr=open(tmp_path / "gateway.log", "w"),
            env=env,
            text=True,
        )
        hello = self._line()
        self.response_address: str = hello["response_address"]
        self.public_key: str = hello["public_key"]

    def _line(self) -> dict[str, Any]:
        line = self.proc.stdout.readline()
        assert line, f"the EG response listener exited with {self.proc.wait(5)}"
        return json.loads(line)

    def connection_info(self) -> dict[str, Any]:
        info = self._line()
        assert "error" not in info, "the gateway received no connection info it could decode"
        return info

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(5)
        self.proc.stdout.close()


class Kernel:
    """One launcher run, started as EG starts it, with its decoded connection info."""

    def __init__(
        self,
        tmp_path: Path,
        *,
        extra_args: tuple[str, ...] = (),
        env: Optional[dict[str, str]] = None,
        via_nohup_shell: bool = False,
        ip: Optional[str] = "127.0.0.1",
    ) -> None:
        self.kernel_id = str(uuid.uuid4())
        self.tmp_path = tmp_path
        self.port_range = random_port_range()
        self.extra_args = extra_args
        self.log_path = tmp_path / "launcher.log"
        self.env = dict(os.environ, TMPDIR=str(tmp_path), **(env or {}))
        self.via_nohup_shell = via_nohup_shell
        self.ip_args = ("--ip", ip) if ip is not None else ()
        self.gateway: Optional[Gateway] = None
        self.proc: Optional[subprocess.Popen] = None
        self.pid: Optional[int] = None
        self._client: Optional[BlockingKernelClient] = None

    def start(self) -> None:
        self.gateway = Gateway(self.tmp_path, self.kernel_id)
        argv = [
            sys.executable, "-m", "egtunnel.launcher",
            "--RemoteProcessProxy.kernel-id", self.kernel_id,
            "--RemoteProcessProxy.response-address", self.gateway.response_address,
            "--RemoteProcessProxy.public-key", self.gateway.public_key,
            "--RemoteProcessProxy.port-range", "%d..%d" % self.port_range,
            "--RemoteProcessProxy.spark-context-initialization-mode", "none",
            *self.ip_args,
            *self.extra_args,
        ]  # fmt: skip
        if self.via_nohup_shell:
            # DistributedProcessProxy's form: nohup in the background of a shell that exits at once.
            command = "nohup " + " ".join(argv) + f" >> {self.log_path} 2>&1 & echo $!"
            out = subprocess.run(["sh", "-c", command], capture_output=True, text=True, env=self.env, timeout=10)
            self.pid = self.shell_pid = int(out.stdout.strip())
        else:
            self.proc = subprocess.Popen(argv, stdout=open(self.log_path, "w"), stderr=subprocess.STDOUT, env=self.env)
            self.pid = self.proc.pid
        self.info = self.gateway.connection_info()
        self.pgid: int = self.info["pgid"]
        self.comm_port: int = self.info["comm_port"]

    @property
    def client(self) -> BlockingKernelClient:
        if self._client is None:
            client = BlockingKernelClient()
            client.load_connection_info({k: v for k, v in self.info.items() if k not in ("pid", "pgid", "comm_port", "kernel_id")})
            client.start_channels()
            client.wait_for_ready(timeout=START_TIMEOUT)
            self._client = client
        return self._client

    def run(self, code: str, timeout: float = EXEC_TIMEOUT) -> tuple[dict[str, Any], str]:
        output: list[str] = []

        def hook(msg: dict[str, Any]) -> None:
            if msg["msg_type"] == "stream":
                output.append(msg["content"]["text"])
            elif msg["msg_type"] == "execute_result":
                output.append(msg["content"]["data"]["text/plain"])

        reply = self.client.execute_interactive(code, timeout=timeout, output_hook=hook)
        return reply["content"], "".join(output)

    def start_cell(self, code: str) -> str:
        """Submit a cell and return once the kernel has begun executing it."""
        # Without stop_on_error=False, an interrupted cell makes the kernel abort the requests
        # that reach it in the next moment, which is Jupyter's rule and not under test here.
        msg_id = self.client.execute(code, stop_on_error=False)
        end = time.monotonic() + EXEC_TIMEOUT
        while time.monotonic() < end:
            msg = self.client.get_iopub_msg(timeout=EXEC_TIMEOUT)
            if msg["msg_type"] == "execute_input" and msg["parent_header"].get("msg_id") == msg_id:
                time.sleep(0.3)
                return msg_id
        raise AssertionError("the cell never started")

    def reply_to(self, msg_id: str, timeout: float) -> dict[str, Any]:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            msg = self.client.get_shell_msg(timeout=max(0.1, end - time.monotonic()))
            if msg["parent_header"].get("msg_id") == msg_id:
                return msg["content"]
        raise AssertionError("no reply")

    def exited(self, timeout: float) -> bool:
        if self.proc is not None:
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                return False
            return True
        return wait_until(lambda: process_gone(self.pid), timeout)

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def close(self) -> None:
        if self._client is not None:
            self._client.stop_channels()
        # The whole group: processes the kernel started can outlive it. The launcher leads its own
        # group, so its pid names it even when it never reported.
        if self.pid is not None:
            try:
                os.killpg(self.pid, signal.SIGKILL)
            except OSError:
                pass
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(5)
        if self.gateway is not None:
            self.gateway.close()


@pytest.fixture
def start_kernel(tmp_path):
    kernels: list[Kernel] = []

    def start(**kwargs: Any) -> Kernel:
        kernel = Kernel(tmp_path, **kwargs)
        kernels.append(kernel)
        kernel.start()
        return kernel

    yield start
    for kernel in kernels:
        kernel.close()


@pytest.fixture
def kernel(start_kernel) -> Kernel:
    return start_kernel()


# ---------------------------------------------------------------------------------------------
# With the gateway's response listener and a live kernel


def test_payload_is_decoded_by_enterprise_gateway(kernel):
    info = kernel.info
    assert info["kernel_id"] == kernel.kernel_id
    assert info["pid"] == kernel.proc.pid == kernel.pid
    assert info["pgid"] == info["pid"], "the launcher leads its own process group"
    assert info["ip"] == "127.0.0.1"
    assert info["transport"] == "tcp"
    assert info["signature_scheme"] == "hmac-sha256"
    assert len(info["key"]) >= 32
    ports = [info[name] for name in launcher.KERNEL_PORT_NAMES] + [info["comm_port"]]
    lower, upper = kernel.port_range
    assert all(lower <= port <= upper for port in ports), ports
    assert len(set(ports)) == 6


def test_execute_poll_and_interrupt(kernel):
    reply, output = kernel.run("print(6 * 7)")
    assert reply["status"] == "ok"
    assert output.strip() == "42"

    # EG's liveness poll: accepted, no effect.
    send_request(kernel.comm_port, {"signum": 0})
    reply, _ = kernel.run("1")
    assert reply["status"] == "ok"

    msg_id = kernel.start_cell("import time; time.sleep(30)")
    started = time.monotonic()
    send_request(kernel.comm_port, {"signum": signal.SIGINT})
    reply = kernel.reply_to(msg_id, timeout=10)
    assert reply["status"] == "error"
    assert reply["ename"] == "KeyboardInterrupt"
    assert time.monotonic() - started < 10

    # The interrupt reached only the cell: the kernel carries on.
    reply, output = kernel.run("print('still here')")
    assert reply["status"] == "ok"
    assert output.strip() == "still here"
    assert kernel.proc.poll() is None


MALFORMED_REQUESTS = {
    "text": b"not json",
    "binary": b"\xff\xfe",
    "array": b"[1, 2]",
    "word": b'{"signum": "two"}',
    "negative": b'{"signum": -3}',
    "out-of-range": b'{"signum": 4096}',
    "bool": b'{"signum": true}',
    "null": b'{"signum": null}',
    "unknown": b'{"unknown": 1}',
    "empty": b"",
    "oversized": b"{" * (launcher.MAX_REQUEST_BYTES + 10),
}


def test_malformed_requests_are_ignored(kernel):
    for name, request in MALFORMED_REQUESTS.items():
        send_request(kernel.comm_port, request)
        send_request(kernel.comm_port, {"signum": 0})
        assert kernel.proc.poll() is None, f"the launcher died on the {name} request"
    # A peer that stalls mid-request holds up the gateway's requests for a bounded time only.
    with socket.create_connection(("127.0.0.1", kernel.comm_port)) as stalled:
        stalled.sendall(b'{"signum": ')
        started = time.monotonic()
        msg_id = kernel.start_cell("import time; time.sleep(30)")
        send_request(kernel.comm_port, {"signum": signal.SIGINT})
        assert kernel.reply_to(msg_id, timeout=launcher.REQUEST_READ_TIMEOUT + 10)["ename"] == "KeyboardInterrupt"
        assert time.monotonic() - started < launcher.REQUEST_READ_TIMEOUT + 10
    reply, output = kernel.run("print('alive')")
    assert output.strip() == "alive"
    assert "ignoring a request that is not JSON" in kernel.log()


def test_request_is_served_before_the_sender_closes(kernel):
    msg_id = kernel.start_cell("import time; time.sleep(30)")
    with socket.create_connection(("127.0.0.1", kernel.comm_port)) as sender:
        sender.sendall(json.dumps({"signum": signal.SIGINT}).encode())
        assert kernel.reply_to(msg_id, timeout=launcher.REQUEST_READ_TIMEOUT - 1)["ename"] == "KeyboardInterrupt"


def listening_addresses(pid: int) -> set[tuple[str, int]]:
    return {
        (conn.laddr.ip, conn.laddr.port)
        for conn in psutil.Process(pid).net_connections(kind="inet")
        if conn.status == psutil.CONN_LISTEN
    }


def kernel_ports(kernel: Kernel) -> set[int]:
    return {kernel.info[name] for name in launcher.KERNEL_PORT_NAMES} | {kernel.comm_port}


@pytest.mark.parametrize(("env", "bound"), [({"EGTUNNEL_KERNEL_IP": "127.0.0.1"}, "127.0.0.1"), ({}, "0.0.0.0")])
def test_bind_address_follows_the_gateways_variable(start_kernel, monkeypatch, env, bound):
    # Without --ip, as the gateway launches it: a tunneling gateway sets the variable, so the kernel is
    # reachable from its own host only; without it, from everywhere, as with EG's own launcher.
    monkeypatch.delenv("EGTUNNEL_KERNEL_IP", raising=False)
    kernel = start_kernel(ip=None, env=env)
    assert kernel.info["ip"] == bound
    kernel.client  # the kernel has bound its five ports once it answers
    listening = listening_addresses(kernel.pid)
    ports = {(bound, port) for port in kernel_ports(kernel)}
    assert ports <= listening, sorted(listening)
    # Nothing else listens beyond the host (ipykernel binds its IOPub pipe to 127.0.0.1 itself).
    exposed = {(ip, port) for ip, port in listening if not ipaddress.ip_address(ip).is_loopback}
    assert exposed == (set() if bound == "127.0.0.1" else ports), sorted(listening)


def test_idle_connections_do_not_delay_the_gateways_requests(kernel):
    msg_id = kernel.start_cell("import time; time.sleep(30)")
    idle = [socket.create_connection(("127.0.0.1", kernel.comm_port)) for _ in range(launcher.MAX_OPEN_CONNECTIONS)]
    try:
        started = time.monotonic()
        send_request(kernel.comm_port, {"signum": 0})
        send_request(kernel.comm_port, {"signum": signal.SIGINT})
        assert kernel.reply_to(msg_id, timeout=3)["ename"] == "KeyboardInterrupt"
        assert time.monotonic() - started < 1.0
        for _ in range(5):
            send_request(kernel.comm_port, {"signum": 0})
        reply, output = kernel.run("print('served')")
        assert output.strip() == "served"
    finally:
        for sock in idle:
            sock.close()
    # One warning for the whole episode, however many connections it turned away.
    assert kernel.log().count("connections are open on the communication port") == 1, kernel.log()


def install_signal_recorder(kernel: Kernel, *signums: int) -> None:
    # A handler for each, so that a delivered signal is recorded instead of ending the kernel.
    numbers = [int(signum) for signum in signums]
    code = f"import signal\nreceived = []\nfor s in {numbers}:\n    signal.signal(s, lambda n, f: received.append(n))"
    assert kernel.run(code)[0]["status"] == "ok"


def received_signals(kernel: Kernel) -> list[int]:
    return json.loads(kernel.run("print(received)")[1])


def test_signals_the_gateway_does_not_send_are_refused(kernel):
    install_signal_recorder(kernel, signal.SIGHUP, signal.SIGUSR2)
    for signum in (signal.SIGHUP, signal.SIGSTOP, signal.SIGUSR2, 64):
        send_request(kernel.comm_port, {"signum": signum})
    assert wait_until(lambda: kernel.log().count("refusing signal") == 4, 5), kernel.log()
    assert psutil.Process(kernel.pid).status() != psutil.STATUS_STOPPED
    assert received_signals(kernel) == []
    assert kernel.proc.poll() is None


@pytest.mark.parametrize("value", ["SIGUSR2", "12"])
def test_alternate_sigint_is_delivered(start_kernel, value):
    kernel = start_kernel(env={"EG_ALTERNATE_SIGINT": value})
    install_signal_recorder(kernel, signal.SIGUSR1, signal.SIGUSR2)
    send_request(kernel.comm_port, {"signum": signal.SIGUSR1})
    send_request(kernel.comm_port, {"signum": signal.SIGUSR2})
    assert wait_until(lambda: "signal 12 requested by the gateway" in kernel.log(), 5), kernel.log()
    assert wait_until(lambda: received_signals(kernel) == [signal.SIGUSR2], 5)
    assert "refusing signal 10" in kernel.log()


def test_shutdown_request_ends_launcher_kernel_and_children(kernel):
    _, output = kernel.run("import subprocess; child = subprocess.Popen(['sleep', '60']); print(child.pid)")
    child = int(output)
    assert _pgid(child) == kernel.pgid

    send_request(kernel.comm_port, {"shutdown": 1})
    assert kernel.exited(EXIT_TIMEOUT), kernel.log()
    assert kernel.proc.returncode == 0, kernel.log()
    assert port_refuses(kernel.comm_port)
    assert wait_until(lambda: group_empty(kernel.pgid), 5)
    assert process_gone(child)
    assert not list(kernel.tmp_path.glob(f"kernel-{kernel.kernel_id}*")), "connection file left behind"


def test_shutdown_of_a_busy_kernel_terminates_it(kernel):
    kernel.start_cell("import time; time.sleep(60)")
    started = time.monotonic()
    send_request(kernel.comm_port, {"shutdown": 1})
    # The port closes at once, so the gateway's next poll reads "dead" ...
    assert wait_until(lambda: port_refuses(kernel.comm_port), 3)
    # ... and the launcher makes that true within its grace period, not when the cell ends.
    assert kernel.exited(launcher.SHUTDOWN_GRACE + launcher.TERMINATE_GRACE + 5), kernel.log()
    assert time.monotonic() - started < 30
    assert wait_until(lambda: group_empty(kernel.pgid), 5)


def test_kernel_shutdown_closes_the_communication_port(kernel):
    # The kernel ends through its own protocol, before any listener shutdown arrives.
    kernel.client.shutdown()
    assert kernel.exited(EXIT_TIMEOUT), kernel.log()
    assert kernel.proc.returncode == 0
    assert port_refuses(kernel.comm_port)


def test_killed_kernel_leaves_nothing(kernel):
    kernel.run("import subprocess; subprocess.Popen(['sleep', '60'])")
    os.killpg(kernel.pgid, signal.SIGKILL)  # what EG's kill() does when all else failed
    assert kernel.exited(EXIT_TIMEOUT)
    assert port_refuses(kernel.comm_port)
    assert wait_until(lambda: group_empty(kernel.pgid), 5)


TAKE_UP_TIMEOUT = 3.0


def test_kernel_nobody_takes_up_stops_by_itself(start_kernel):
    # The gateway received the report (EG's own ResponseManager decoded it) and then never came:
    # the gateway died or gave the start up. No request reaches the communication port.
    kernel = start_kernel(extra_args=("--take-up-timeout", str(TAKE_UP_TIMEOUT)))
    reported = time.monotonic()
    assert kernel.exited(TAKE_UP_TIMEOUT + launcher.SHUTDOWN_GRACE + launcher.TERMINATE_GRACE + 5), kernel.log()
    assert time.monotonic() - reported >= TAKE_UP_TIMEOUT - 0.5, "stopped before its take-up timeout"
    assert "take-up timeout" in kernel.log()
    assert port_refuses(kernel.comm_port)
    assert wait_until(lambda: group_empty(kernel.pgid), 5)
    assert not list(kernel.tmp_path.glob(f"kernel-{kernel.kernel_id}*")), "connection file left behind"


def test_kernel_the_gateway_polled_outlives_the_take_up_timeout(start_kernel):
    kernel = start_kernel(extra_args=("--take-up-timeout", str(TAKE_UP_TIMEOUT)))
    send_request(kernel.comm_port, {"signum": 0})  # EG's restarter's first poll
    time.sleep(TAKE_UP_TIMEOUT + 1.5)
    assert not kernel.exited(0), kernel.log()
    assert kernel.run("print(6 * 7)")[1] == "42\n"


def test_forked_child_does_not_keep_the_port_open(kernel):
    # A process forked by kernel code inherits the listening socket unless the launcher closes it.
    _, output = kernel.run("import os, time\nchild = os.fork()\nif child == 0:\n    time.sleep(60)\n    os._exit(0)\nprint(child)")
    child = int(output)
    os.kill(kernel.pid, signal.SIGKILL)
    assert kernel.exited(EXIT_TIMEOUT)
    assert not process_gone(child)
    assert port_refuses(kernel.comm_port), "the forked child still holds the communication port"
    os.kill(child, signal.SIGKILL)


def test_launched_like_distributed_process_proxy(start_kernel):
    # nohup in the background of a shell that exits: the launcher is orphaned at once. An inherited
    # JPY_PARENT_PID naming some other process must not make the kernel exit with its shell.
    kernel = start_kernel(via_nohup_shell=True, env={"JPY_PARENT_PID": str(os.getpid())})
    assert kernel.info["pid"] == kernel.shell_pid
    assert kernel.pgid == kernel.pid
    time.sleep(2)  # longer than ipykernel's one-second parent poll
    reply, output = kernel.run("print('orphan ok')")
    assert output.strip() == "orphan ok"

    msg_id = kernel.start_cell("import time; time.sleep(30)")
    send_request(kernel.comm_port, {"signum": signal.SIGINT})
    assert kernel.reply_to(msg_id, timeout=10)["ename"] == "KeyboardInterrupt"

    send_request(kernel.comm_port, {"shutdown": 1})
    assert kernel.exited(EXIT_TIMEOUT), kernel.log()
    assert port_refuses(kernel.comm_port)


FAKE_PYSPARK = {
    "pyspark/__init__.py": "",
    "pyspark/sql/__init__.py": textwrap.dedent(
        """
        import os
        MARKS = os.environ["FAKE_SPARK_MARKS"]

        def mark(event):
            with open(MARKS, "a") as f:
                f.write(event + "\\n")

        class SparkContext:
            def cancelAllJobs(self):
                mark("cancelAllJobs")

        class SparkSession:
            version = "fake-3.5"

            def __init__(self):
                mark("created")
                self.sparkContext = SparkContext()

            def sql(self, query):
                return "sql:" + query

            def stop(self):
                mark("stopped")

            class builder:
                @staticmethod
                def getOrCreate():
                    return SparkSession()
        """
    ),
}


@pytest.fixture
def fake_pyspark(tmp_path) -> tuple[dict[str, str], Path]:
    root = tmp_path / "site"
    for name, text in FAKE_PYSPARK.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    marks = tmp_path / "spark-marks"
    marks.write_text("")
    path = os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))
    return {"PYTHONPATH": path, "FAKE_SPARK_MARKS": str(marks)}, marks


def test_lazy_spark_session_is_created_on_first_use(start_kernel, fake_pyspark):
    env, marks = fake_pyspark
    kernel = start_kernel(
        env=env,
        extra_args=("--RemoteProcessProxy.spark-context-initialization-mode", "lazy", "--cluster-type", "spark"),
    )
    _, output = kernel.run("print(repr(spark))")
    assert "created when first used" in output
    assert marks.read_text() == ""

    _, output = kernel.run("print(sql('select 1'), spark.version, type(sc).__name__, type(spark).__name__)")
    assert output.split() == ["sql:select", "1", "fake-3.5", "SparkContext", "SparkSession"]
    assert marks.read_text().split() == ["created"]

    msg_id = kernel.start_cell("import time; time.sleep(30)")
    send_request(kernel.comm_port, {"signum": signal.SIGINT})
    assert kernel.reply_to(msg_id, timeout=10)["ename"] == "KeyboardInterrupt"
    assert wait_until(lambda: "cancelAllJobs" in marks.read_text(), 5)

    send_request(kernel.comm_port, {"shutdown": 1})
    assert kernel.exited(EXIT_TIMEOUT), kernel.log()
    assert marks.read_text().split() == ["created", "cancelAllJobs", "stopped"]


def test_eager_spark_session_is_created_at_start(start_kernel, fake_pyspark):
    env, marks = fake_pyspark
    kernel = start_kernel(
        env=env,
        extra_args=("--RemoteProcessProxy.spark-context-initialization-mode", "eager", "--cluster-type", "spark"),
    )
    assert wait_until(lambda: marks.read_text().split() == ["created"], 10)
    _, output = kernel.run("print(type(spark).__name__)")
    assert output.strip() == "SparkSession"


# ---------------------------------------------------------------------------------------------
# Failures before the kernel starts


def run_launcher(*args: str, tmp_path: Path, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "egtunnel.launcher", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=dict(os.environ, TMPDIR=str(tmp_path)),
    )


def test_cli_rejects_unknown_spark_mode(tmp_path):
    result = run_launcher(
        "--RemoteProcessProxy.kernel-id", "k1", "--RemoteProcessProxy.spark-context-initialization-mode", "sometimes",
        tmp_path=tmp_path,
    )  # fmt: skip
    assert result.returncode == 2
    assert "unknown Spark context initialization mode 'sometimes': expected one of none, lazy, eager" in result.stderr


def test_cli_rejects_unknown_kernel_class_before_reporting(tmp_path):
    gateway = Gateway(tmp_path, "k2")
    try:
        result = run_launcher(
            "--kernel-id", "k2", "--response-address", gateway.response_address,
            "--public-key", gateway.public_key, "--kernel-class-name", "no_such_module.Kernel",
            tmp_path=tmp_path,
        )  # fmt: skip
        assert result.returncode == 1
        assert "kernel class 'no_such_module.Kernel' cannot be imported" in result.stderr
        result = run_launcher("--kernel-id", "k2", "--kernel-class-name", "json.JSONDecoder", tmp_path=tmp_path)
        assert result.returncode == 1
        assert "is not a subclass of ipykernel.kernelbase.Kernel" in result.stderr
        assert not list(tmp_path.glob("kernel-k2*")), "connection file left behind"
    finally:
        gateway.close()


def test_unreachable_gateway_fails_cleanly(tmp_path):
    dead_port = free_port()
    public_key = launcher_public_key()
    result = run_launcher(
        "--kernel-id", "k3", "--response-address", f"127.0.0.1:{dead_port}", "--public-key", public_key,
        "--ip", "127.0.0.1", tmp_path=tmp_path, timeout=60,
    )  # fmt: skip
    assert result.returncode == 1
    assert f"could not send the connection info to the gateway at 127.0.0.1:{dead_port}" in result.stderr
    assert not list(tmp_path.glob("kernel-k3*")), "connection file left behind"


def launcher_public_key() -> str:
    from Cryptodome.PublicKey import RSA

    pem = RSA.generate(1024).publickey().export_key("PEM").decode()
    return "".join(line for line in pem.splitlines() if "-----" not in line)


# ---------------------------------------------------------------------------------------------
# Argument parsing (in process)

BASE = ["--kernel-id", "abc"]


def parse_error(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        launcher.parse_args(argv)
    assert exc.value.code == 2
    return capsys.readouterr().err


def test_defaults(monkeypatch):
    monkeypatch.delenv("EGTUNNEL_KERNEL_IP", raising=False)
    monkeypatch.delenv("EG_ALTERNATE_SIGINT", raising=False)
    options = launcher.parse_args(BASE)
    assert options.ip == "0.0.0.0"
    assert options.port_range == (0, 0)
    assert options.spark_init_mode == "none"
    assert options.cluster_type == "none"
    assert options.kernel_class_name == "ipykernel.ipkernel.IPythonKernel"
    assert options.response_address is None
    assert options.connection_file is None
    assert options.alternate_sigint is None


def test_both_spellings_are_accepted():
    key = launcher_public_key()
    names = ["kernel-id", "response-address", "public-key", "port-range", "spark-context-initialization-mode", "cluster-type"]
    values = ["k", "10.1.2.3:8877", key, "40000..41000", "lazy", "spark"]
    short = launcher.parse_args([arg for n, v in zip(names, values) for arg in (f"--{n}", v)])
    long = launcher.parse_args([arg for n, v in zip(names, values) for arg in (f"--RemoteProcessProxy.{n}", v)])
    assert short == long
    assert short.response_address == ("10.1.2.3", 8877)
    assert short.port_range == (40000, 41000)
    assert (short.spark_init_mode, short.cluster_type) == ("lazy", "spark")


def test_equal_spellings_may_repeat():
    assert launcher.parse_args(BASE + ["--RemoteProcessProxy.kernel-id", "abc"]).kernel_id == "abc"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "--kernel-id (or --RemoteProcessProxy.kernel-id) is required"),
        (["--kernel-id"], "--kernel-id (or --RemoteProcessProxy.kernel-id) is required"),
        (["--kernel-id", "a/b"], "invalid kernel id 'a/b'"),
        (BASE + ["--RemoteProcessProxy.kernel-id", "xyz"], "disagree ('abc' vs 'xyz')"),
        (BASE + ["--spark-context-initialization-mode", "often"], "expected one of none, lazy, eager"),
        (BASE + ["--cluster-type", "hadoop"], "unknown cluster type 'hadoop': expected one of spark, dask, none"),
        (BASE + ["--port-range", "abc"], "invalid port range 'abc'"),
        (BASE + ["--port-range", "40000"], "invalid port range '40000'"),
        (BASE + ["--port-range", "41000..40000"], "1 <= LOWER < UPPER <= 65535"),
        (BASE + ["--port-range", "65000..70000"], "1 <= LOWER < UPPER <= 65535"),
        (BASE + ["--port-range", "40000..40010"], "spans 10 ports; at least 1000 are required"),
        (BASE + ["--port-range", "{port_range}"], "{port_range} was passed literally"),
        (BASE + ["--response-address", "10.0.0.1:8877"], "--public-key is required with --response-address"),
        (BASE + ["--response-address", "10.0.0.1", "--public-key", "x"], "invalid response address '10.0.0.1'"),
        (BASE + ["--response-address", "10.0.0.1:99999", "--public-key", "x"], "invalid response address"),
        (BASE + ["--response-address", "10.0.0.1:8877", "--public-key", "bm90IGEga2V5"], "invalid public key"),
        (BASE + ["--response-address", "10.0.0.1:8877", "--public-key", "%%%"], "invalid public key"),
        (BASE + ["--ip", "localhost"], "invalid --ip 'localhost'"),
        (BASE + ["--kernel-class-name", "Kernel"], "expected module.Class"),
    ],
)
def test_bad_arguments_are_rejected(argv, message, capsys):
    assert message in parse_error(argv, capsys)


def test_port_range_size_follows_eg_setting(monkeypatch, capsys):
    monkeypatch.setenv("EG_MIN_PORT_RANGE_SIZE", "10")
    assert launcher.parse_args(BASE + ["--port-range", "40000..40010"]).port_range == (40000, 40010)
    monkeypatch.setenv("EG_MIN_PORT_RANGE_SIZE", "lots")
    assert "EG_MIN_PORT_RANGE_SIZE='lots' is not a non-negative integer" in parse_error(
        BASE + ["--port-range", "40000..40010"], capsys
    )


def test_take_up_timeout_follows_the_launch_timeout(monkeypatch, capsys):
    for name in ("KERNEL_LAUNCH_TIMEOUT", "EG_KERNEL_LAUNCH_TIMEOUT"):
        monkeypatch.delenv(name, raising=False)
    margin = launcher.TAKE_UP_MARGIN
    assert launcher.parse_args(BASE).take_up_timeout == launcher.DEFAULT_LAUNCH_TIMEOUT + margin
    monkeypatch.setenv("EG_KERNEL_LAUNCH_TIMEOUT", "50")
    assert launcher.parse_args(BASE).take_up_timeout == 50 + margin
    # A client's KERNEL_LAUNCH_TIMEOUT overrides the gateway's, as in EG.
    monkeypatch.setenv("KERNEL_LAUNCH_TIMEOUT", "7")
    assert launcher.parse_args(BASE).take_up_timeout == 7 + margin
    assert launcher.parse_args(BASE + ["--take-up-timeout", "0"]).take_up_timeout == 0
    assert "--take-up-timeout='soon' is not a non-negative number" in parse_error(BASE + ["--take-up-timeout", "soon"], capsys)
    monkeypatch.setenv("KERNEL_LAUNCH_TIMEOUT", "-1")
    assert "KERNEL_LAUNCH_TIMEOUT='-1' is not a non-negative number" in parse_error(BASE, capsys)


def test_bind_address_from_the_environment(monkeypatch, capsys):
    monkeypatch.setenv("EGTUNNEL_KERNEL_IP", "127.0.0.1")
    assert launcher.parse_args(BASE).ip == "127.0.0.1"
    # An explicit --ip wins, and is the only one checked.
    assert launcher.parse_args(BASE + ["--ip", "10.0.0.7"]).ip == "10.0.0.7"
    monkeypatch.setenv("EGTUNNEL_KERNEL_IP", "localhost")
    assert launcher.parse_args(BASE + ["--ip", "0.0.0.0"]).ip == "0.0.0.0"
    assert "invalid environment variable EGTUNNEL_KERNEL_IP 'localhost'" in parse_error(BASE, capsys)
    monkeypatch.setenv("EGTUNNEL_KERNEL_IP", "")
    assert launcher.parse_args(BASE).ip == "0.0.0.0"


def test_bad_kernel_ip_variable_stops_the_launch(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "egtunnel.launcher", "--kernel-id", "k4"],
        capture_output=True,
        text=True,
        timeout=30,
        env=dict(os.environ, TMPDIR=str(tmp_path), EGTUNNEL_KERNEL_IP="10.0.0.300"),
    )
    assert result.returncode == 2
    assert "invalid environment variable EGTUNNEL_KERNEL_IP '10.0.0.300'" in result.stderr
    assert not list(tmp_path.glob("kernel-k4*")), "connection file left behind"


@pytest.mark.parametrize(
    ("value", "signum"),
    [("SIGUSR2", signal.SIGUSR2), ("12", 12), (" SIGQUIT ", signal.SIGQUIT), ("", None), ("USR2", None),
     ("SIG_IGN", None), ("NSIG", None), ("signal", None), ("0", None), ("4096", None)],
)  # fmt: skip
def test_alternate_sigint_follows_eg(monkeypatch, value, signum):
    # EG converts the name with getattr(signal, name); anything else leaves interrupts to SIGINT.
    monkeypatch.setenv("EG_ALTERNATE_SIGINT", value)
    assert launcher.parse_args(BASE).alternate_sigint == signum


def test_empty_port_range_means_any_port():
    # EG's rule: a range of size zero disables port-range enforcement.
    assert launcher.parse_args(BASE + ["--port-range", "40000..40000"]).port_range == (0, 0)


def test_spark_mode_none_disables_spark_cluster():
    options = launcher.parse_args(BASE + ["--cluster-type", "spark", "--spark-context-initialization-mode", "NONE"])
    assert options.cluster_type == "none"
    options = launcher.parse_args(BASE + ["--cluster-type", "dask"])
    assert options.cluster_type == "dask"


@pytest.mark.parametrize(
    ("value", "kept"),
    [(lambda: str(os.getppid()), True), (lambda: "999999", False), (lambda: "abc", False), (lambda: "", False)],
)
def test_parent_pid_is_honoured_only_when_it_names_the_parent(monkeypatch, value, kept):
    monkeypatch.setenv("JPY_PARENT_PID", value())
    assert launcher._parent_handle() == (os.getppid() if kept else 0)
