"""Prometheus metrics against real sshd servers: the endpoint EG_TUNNEL_METRICS_PORT starts on the first
open (in a child process: the variable is read once per process), the values it reports for bytes,
connections, commands and failed opens, counters that survive reconnects and closed connections, and
the collector registered into a registry of the caller's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import pytest
import requests
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

import egtunnel
import harness
from egtunnel import metrics

CHILD = Path(__file__).with_name("metrics_child.py")
Samples = dict[tuple[str, frozenset], float]


def parse(text: str) -> Samples:
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}  # fmt: skip


def value(samples: Samples, name: str, **labels: Any) -> float:
    """The sample `name` whose labels include `labels`; 0 when there is none (a counter not yet created)."""
    want = {k: str(v) for k, v in labels.items()}
    found = [v for (n, ls), v in samples.items() if n == name and want.items() <= dict(ls).items()]
    assert len(found) <= 1, f"{name}{want} is ambiguous: {found}"
    return found[0] if found else 0.0


class Child:
    """metrics_child.py with its own environment; `call` sends one request and returns the answer."""

    def __init__(self, env: dict[str, str]):
        self.proc = subprocess.Popen(
            [sys.executable, str(CHILD)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, env=harness.tagged_env(harness.new_mark(), {**os.environ, **env}))  # fmt: skip

    def call(self, op: str, **kwargs: Any) -> dict:
        assert self.proc.stdin and self.proc.stdout
        self.proc.stdin.write(json.dumps({"op": op, "kwargs": kwargs}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, f"child exited: {self.stderr()}"
        return json.loads(line)

    def stderr(self) -> str:
        self.close()
        assert self.proc.stderr
        return self.proc.stderr.read()

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                assert self.proc.stdin
                self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
                self.proc.stdin.close()
                self.proc.wait(10)
            except (OSError, subprocess.TimeoutExpired):
                harness.stop_popen(self.proc)


@pytest.fixture
def child() -> Iterator[Callable[..., Child]]:
    made: list[Child] = []

    def make(**env: str) -> Child:
        made.append(Child(env))
        return made[-1]

    yield make
    for c in made:
        c.close()


def endpoint(port: int) -> Callable[[], Samples]:
    def scrape() -> Samples:
        response = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5)
        response.raise_for_status()
        return parse(response.text)

    return scrape


def scrape_until(scrape: Callable[[], Samples], ok: Callable[[Samples], bool], timeout: float, what: str) -> Samples:
    """The first scrape for which ok() holds."""
    return harness.wait_until(lambda: (lambda s: s if ok(s) else None)(scrape()), timeout, interval=0.1, what=what)


def test_endpoint_counts_bytes_connections_commands_and_survives_reconnect(
        sshd: harness.SshServer, echo_server: harness.EchoServer, child: Callable[..., Child]) -> None:  # fmt: skip
    port = harness.free_port()
    c = child(EG_TUNNEL_METRICS_PORT=str(port))
    kw = sshd.connect_kwargs()
    dest = {"user": kw["user"], "host": kw["host"], "port": kw["port"]}
    assert not harness.port_accepts("127.0.0.1", port), "no endpoint before the first open"

    # Per-port: the tunnel's connection closes with it, so the test need not wait out a shared one's linger.
    opened = c.call("tunnel", **kw, remote_host="127.0.0.1", remote_port=echo_server.port, mode="per-port")
    payload = b"x" * 10_000 + b"\n"
    assert harness.echo_once("127.0.0.1", opened["local_port"], payload) == payload
    assert c.call("exec", **kw, command="echo hi")["lines"] == ["hi"]
    scrape = endpoint(port)
    # The echo's last bytes may still be on their way into the counters when the client has them.
    first = scrape_until(scrape, lambda s: value(s, "egtunnel_forwarded_bytes_total", **dest, direction="from_remote")
                         >= len(payload), 5, "bytes counted")  # fmt: skip
    assert value(first, "egtunnel_forwarded_bytes_total", **dest, direction="to_remote") == len(payload)
    assert value(first, "egtunnel_forwarded_bytes_total", **dest, direction="from_remote") == len(payload)
    # The tunnel's own connection, and the shared one the command ran on (lingering).
    assert value(first, "egtunnel_ssh_connections", **dest, state="connected") == 2
    assert value(first, "egtunnel_ssh_connections", **dest, state="reconnecting") == 0
    assert value(first, "egtunnel_ssh_connections_opened_total", **dest) == 2
    assert value(first, "egtunnel_forwards", **dest, channel="SHELL") == 1
    assert value(first, "egtunnel_forwards_opened_total", **dest) == 1
    assert value(first, "egtunnel_remote_commands_total", **dest, outcome="ok") == 1
    assert value(first, "egtunnel_remote_command_duration_seconds_count", **dest) == 1
    assert value(first, "egtunnel_remote_command_duration_seconds_bucket", **dest, le="+Inf") == 1
    assert value(first, "egtunnel_remote_command_duration_seconds_bucket", **dest, le="5.0") == 1
    assert 0 < value(first, "egtunnel_remote_command_duration_seconds_sum", **dest) < 5
    assert value(first, "egtunnel_ssh_reconnects_total", **dest) == 0
    assert value(first, "egtunnel_open_failures_total", **dest) == 0
    assert value(first, "process_open_fds") > 0, "the process's own metrics are served too"

    sshd.restart()  # kills the sessions: the tunnel's connection heals, the unused one closes
    healed = scrape_until(scrape, lambda s: value(s, "egtunnel_ssh_reconnects_total", **dest) >= 1
                          and value(s, "egtunnel_ssh_connections", **dest, state="connected") == 1,
                          15, "reconnect counted")  # fmt: skip
    assert value(healed, "egtunnel_ssh_reconnects_total", **dest) == 1
    assert harness.echo_once("127.0.0.1", opened["local_port"], payload) == payload

    c.call("close")  # the connection leaves status(); its counts must stay
    gone = scrape_until(scrape, lambda s: value(s, "egtunnel_ssh_connections", **dest, state="connected") == 0,
                        10, "connection closed")  # fmt: skip
    assert value(gone, "egtunnel_forwards", **dest, channel="SHELL") == 0
    assert value(gone, "egtunnel_open_channels", **dest) == 0
    for name, labels in [("egtunnel_forwarded_bytes_total", {"direction": "to_remote"}),
                         ("egtunnel_forwarded_bytes_total", {"direction": "from_remote"}),
                         ("egtunnel_ssh_reconnects_total", {}), ("egtunnel_ssh_connections_opened_total", {}),
                         ("egtunnel_remote_command_duration_seconds_count", {})]:  # fmt: skip
        assert value(gone, name, **dest, **labels) >= value(healed, name, **dest, **labels) >= \
            value(first, name, **dest, **labels), name  # fmt: skip
        assert value(gone, name, **dest, **labels) > 0, name
    assert value(gone, "egtunnel_forwarded_bytes_total", **dest, direction="to_remote") == 2 * len(payload)


def test_failed_opens_are_counted_by_cause(sshd_factory: Callable[..., harness.SshServer],
                                           child: Callable[..., Child]) -> None:  # fmt: skip
    strict = sshd_factory(extra_config=["AllowTcpForwarding no"])
    port = harness.free_port()
    c = child(EG_TUNNEL_METRICS_PORT=str(port))
    kw = strict.connect_kwargs()
    dest = {"user": kw["user"], "host": kw["host"], "port": kw["port"]}
    tunnel = {**kw, "remote_host": "127.0.0.1", "remote_port": 9, "verify": True}
    assert c.call("tunnel", **tunnel)["error"] == "ForwardingProhibited"
    assert c.call("tunnel", **{**tunnel, "known_hosts": str(strict.empty_known_hosts())})["error"] == "HostKeyError"
    assert c.call("exec", **{**kw, "identity_file": str(strict.wrong_identity_file)}, command="true")["error"] \
        == "SshAuthError"  # fmt: skip
    assert c.call("exec", **kw, command="sleep 5", timeout=0.3)["error"] == "TunnelTimeout"
    assert c.call("tunnel", **{**tunnel, "remote_port": 0})["error"] == "ValueError"  # the caller's bug: not counted
    s = endpoint(port)()
    failures = {dict(ls)["operation"] + "/" + dict(ls)["cause"]: v for (n, ls), v in s.items()
                if n == "egtunnel_open_failures_total" and dict(ls)["host"] == dest["host"]
                and dict(ls)["port"] == str(dest["port"])}  # fmt: skip
    assert failures == {"forward/prohibited": 1, "forward/host-key": 1, "command/auth": 1, "command/timeout": 1}
    assert value(s, "egtunnel_remote_commands_total", **dest, outcome="failed") == 1


@pytest.mark.parametrize(("setting", "expected"), [
    ("abc", "EG_TUNNEL_METRICS_PORT must be an integer from 1 to 65535, got 'abc'"),
    ("70000", "EG_TUNNEL_METRICS_PORT must be an integer from 1 to 65535, got '70000'"),
    ("taken", "cannot listen on 127.0.0.1:"),
])  # fmt: skip
def test_bad_setting_is_logged_and_tunnels_still_work(sshd: harness.SshServer, child: Callable[..., Child],
                                                      setting: str, expected: str) -> None:  # fmt: skip
    with harness.connect("127.0.0.1", sshd.port) as taken:
        value = str(taken.getpeername()[1]) if setting == "taken" else setting
        c = child(EG_TUNNEL_METRICS_PORT=value)
        kw = sshd.connect_kwargs()
        assert c.call("exec", **kw, command="echo ok")["lines"] == ["ok"]
        assert c.call("exec", **kw, command="echo again")["lines"] == ["again"]
    log = c.stderr()
    errors = [line for line in log.splitlines() if line.startswith("ERROR egtunnel.metrics")]
    assert len(errors) == 1 and expected in errors[0], log
    if setting == "taken":
        assert "EG_TUNNEL_METRICS_PORT" in errors[0] and "EG_TUNNEL_METRICS_ADDR" in errors[0]


def test_collector_in_a_registry_of_ones_own(sshd: harness.SshServer) -> None:
    registry = CollectorRegistry()
    collector = metrics.register(registry)
    kw = sshd.connect_kwargs()
    host = kw.pop("host")
    assert egtunnel.remote_exec(host, "true", **kw).exit_status == 0
    s = parse(generate_latest(registry).decode())
    dest = {"user": kw["user"], "host": host, "port": kw["port"]}
    assert value(s, "egtunnel_remote_commands_total", **dest, outcome="ok") == 1
    assert value(s, "egtunnel_remote_command_duration_seconds_count", **dest) == 1
    assert value(s, "egtunnel_ssh_connections", **dest, state="connected") == 1
    assert not any(n.startswith("process_") for n, _ in s), "only egtunnel's families"
    with pytest.raises(ValueError, match="Duplicated timeseries"):
        metrics.register(registry)
    registry.unregister(collector)
    assert generate_latest(registry) == b""


def test_port_setting_is_parsed_strictly() -> None:
    assert metrics.parse_port(" 9464 ") == 9464
    for bad in ["", "0", "65536", "-1", "9464.0", "http"]:
        with pytest.raises(ValueError, match=f"EG_TUNNEL_METRICS_PORT must be an integer from 1 to 65535, got {bad!r}"):
            metrics.parse_port(bad)


def test_unanswered_keepalives_rise_with_a_silent_peer_and_clear_when_it_answers(
        sshd: harness.SshServer, echo_server: harness.EchoServer) -> None:  # fmt: skip
    registry = CollectorRegistry()
    metrics.register(registry)
    kw = sshd.connect_kwargs()
    dest = {"user": kw["user"], "host": kw["host"], "port": kw["port"]}
    # 2 s probes (culling 1 s + margin 1 s), three unanswered before the connection counts as dead.
    t = egtunnel.open_tunnel(**kw, remote_host="127.0.0.1", remote_port=echo_server.port,
                             cull_idle_timeout=1, keepalive_margin=1, keepalive_count_max=3)  # fmt: skip
    scrape = lambda: parse(generate_latest(registry).decode())  # noqa: E731
    try:
        probes_before = value(scrape(), "egtunnel_keepalive_probes_total", **dest)
        sshd.pause_sessions()
        try:
            silent = scrape_until(scrape, lambda s: value(s, "egtunnel_keepalive_probes_unanswered", **dest) >= 1,
                                  5, "an unanswered probe")  # fmt: skip
            assert value(silent, "egtunnel_keepalive_probes_total", **dest) > probes_before
        finally:
            sshd.resume_sessions()
        scrape_until(scrape, lambda s: value(s, "egtunnel_keepalive_probes_unanswered", **dest) == 0,
                     5, "the answer to clear the gauge")  # fmt: skip
    finally:
        t.terminate()
