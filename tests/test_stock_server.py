"""The native core against OpenSSH servers as distributions ship them, and as operators harden them.

The default fixture keeps every OpenSSH limit at its default (MaxSessions 10, MaxStartups 10:30:100, no
ClientAlive probes). Tests that need another value set it on their own server and say why.
"""

from __future__ import annotations

import concurrent.futures
import re
import time

import pytest

import egtunnel
import harness


def exec_kwargs(server: harness.SshServer, **kw: object) -> dict:
    """connect_kwargs without the host, which remote_exec takes positionally."""
    return {k: v for k, v in {**server.connect_kwargs(), **kw}.items() if k != "host"}


def conn_status(server: harness.SshServer) -> list[dict]:
    return [c for c in egtunnel.status() if c["port"] == server.port and c["host"] == server.host]


def timed_command(tag: int, seconds: float = 0.4) -> str:
    """Prints the tag with its start and end time (seconds since the epoch) on the remote host."""
    return f"s=$(date +%s.%N); sleep {seconds}; e=$(date +%s.%N); echo {tag} $s $e"


def max_overlap(intervals: list[tuple[float, float]]) -> int:
    events = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals])
    best = current = 0
    for _, delta in events:
        current += delta
        best = max(best, current)
    return best


def run_concurrently(server: harness.SshServer, n: int, timeout: float = 30.0, **kw: object) -> list[tuple[float, float]]:
    """n remote commands at once on the server's shared connection; returns their (start, end) times."""
    with concurrent.futures.ThreadPoolExecutor(n) as pool:
        futures = [pool.submit(egtunnel.remote_exec, server.host, timed_command(i), timeout=timeout,
                               **exec_kwargs(server, **kw)) for i in range(n)]  # fmt: skip
        results = [f.result() for f in futures]
    intervals = []
    for i, r in enumerate(results):
        assert r.exit_status == 0, r
        tag, start, end = r.lines()[-1].split()
        assert int(tag) == i
        intervals.append((float(start), float(end)))
    return intervals


def test_twenty_concurrent_commands_on_a_stock_server_stay_within_the_budget(sshd: harness.SshServer) -> None:
    intervals = run_concurrently(sshd, 20)
    assert len(intervals) == 20
    # Queued in arrival order behind the default budget of 8 session channels (OpenSSH allows 10).
    assert 2 <= max_overlap(intervals) <= 8
    (c,) = conn_status(sshd)
    assert c["session_budget"] == 8 and c["session_refusals"] == 0
    assert sshd.log_count("Accepted publickey") == 1


def test_max_sessions_one_runs_commands_one_at_a_time(sshd_factory) -> None:
    # MaxSessions 1: the server multiplexes no sessions at all; egtunnel's budget of 8 must adapt.
    server = sshd_factory(extra_config=["MaxSessions 1"])
    intervals = run_concurrently(server, 6)
    assert max_overlap(intervals) == 1
    (c,) = conn_status(server)
    assert c["session_budget"] == 1 and c["session_refusals"] >= 1


def test_sessions_refused_for_good_fail_at_the_deadline_naming_max_sessions(sshd_factory) -> None:
    # MaxSessions 0 allows forwarding only: every session channel is refused.
    server = sshd_factory(extra_config=["MaxSessions 0"])
    start = time.monotonic()
    with pytest.raises(egtunnel.TunnelError) as info:
        egtunnel.remote_exec(server.host, "true", timeout=2.0, **exec_kwargs(server))
    assert 1.9 <= time.monotonic() - start < 5
    message = str(info.value)
    assert "MaxSessions" in message and "refused" in message
    assert f"{server.user}@{server.host}:{server.port}" in message


def test_budget_setting_is_validated(sshd: harness.SshServer) -> None:
    with pytest.raises(ValueError, match="max_sessions"):
        egtunnel.remote_exec(sshd.host, "true", max_sessions=0, **exec_kwargs(sshd))
    with pytest.raises(ValueError, match="max_startups"):
        egtunnel.remote_exec(sshd.host, "true", max_startups=-1, **exec_kwargs(sshd))


# --- handshakes within MaxStartups ---------------------------------------------------------------


def open_per_port_at_once(server: harness.SshServer, n: int, port: int, **kw: object) -> list[egtunnel.Tunnel]:
    with concurrent.futures.ThreadPoolExecutor(n) as pool:
        futures = [pool.submit(egtunnel.open_tunnel, **server.connect_kwargs(), remote_host="127.0.0.1",
                               remote_port=port, mode="per-port", **kw) for _ in range(n)]  # fmt: skip
        return [f.result() for f in futures]


def test_dropped_handshakes_are_retried_until_they_succeed(sshd_factory, echo_server: harness.EchoServer) -> None:
    # MaxStartups 1:100:1: beyond one unauthenticated connection the server drops every new one, so
    # egtunnel's three concurrent handshakes collide with it.
    server = sshd_factory(extra_config=["MaxStartups 1:100:1"], log_level="DEBUG1")
    tunnels = open_per_port_at_once(server, 8, echo_server.port)
    try:
        for t in tunnels:
            assert harness.echo_once("127.0.0.1", t.local_port) == b"hello egtunnel\n"
        assert server.log_count("past MaxStartups") >= 1
        assert server.log_count("Accepted publickey") == 8
    finally:
        for t in tunnels:
            t.terminate()


def test_stock_server_drops_no_handshake_of_many_concurrent_connections(sshd: harness.SshServer,
                                                                        echo_server: harness.EchoServer) -> None:  # fmt: skip
    # 24 per-port connections at once (four kernels' worth) against MaxStartups 10:30:100: without the
    # handshake budget sshd drops some of them.
    tunnels = open_per_port_at_once(sshd, 24, echo_server.port)
    try:
        assert sshd.log_count("past MaxStartups") == 0
        assert sshd.log_count("Accepted publickey") == 24
    finally:
        for t in tunnels:
            t.terminate()


def test_a_handshake_slot_frees_only_when_the_server_has_counted_the_connection_authenticated(sshd_factory,
        echo_server: harness.EchoServer) -> None:  # fmt: skip
    # MaxStartups 4:100:4: the server drops every connection beyond four unauthenticated ones, and
    # egtunnel allows itself four. sshd's listener learns of an authentication from the session's
    # process some time after the client saw it succeed; a slot freed at that point lets the next
    # handshake in while sshd still counts four, and it is dropped.
    server = sshd_factory(extra_config=["MaxStartups 4:100:4"], log_level="DEBUG1")
    tunnels = open_per_port_at_once(server, 24, echo_server.port, max_startups=4)
    try:
        assert server.log_count("past MaxStartups") == 0
        assert server.log_count("Accepted publickey") == 24
    finally:
        for t in tunnels:
            t.terminate()


def test_handshakes_dropped_until_the_deadline_fail_naming_max_startups(sshd_factory) -> None:
    # A "server" that accepts TCP and closes at once, as sshd does past MaxStartups.
    import socket
    import threading

    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def drop_all() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                continue
            conn.close()

    thread = threading.Thread(target=drop_all, daemon=True)
    thread.start()
    try:
        with pytest.raises(egtunnel.SshConnectError) as info:
            egtunnel.remote_exec("127.0.0.1", "true", port=listener.getsockname()[1], connect_timeout=1.5,
                                 host_key_policy="off")  # fmt: skip
        message = str(info.value)
        assert "MaxStartups" in message and re.search(r"dropped \d+ handshake", message), message
    finally:
        stop.set()
        thread.join()
        listener.close()


# --- server keep-alives ----------------------------------------------------------------------------


def test_server_keepalives_are_answered_on_connections_without_channels(sshd_factory) -> None:
    # ClientAliveInterval 2 / CountMax 2: the server cuts a client that leaves 2 probes unanswered
    # (about 6 s). A CONTROL forward probes nothing by itself and, with no local client, has no channel.
    server = sshd_factory(extra_config=["ClientAliveInterval 2", "ClientAliveCountMax 2"], log_level="DEBUG1")
    control_per_port = egtunnel.open_tunnel(**server.connect_kwargs(), remote_host="127.0.0.1", remote_port=9,
                                            channel="CONTROL", mode="per-port", cull_idle_timeout=300)  # fmt: skip
    control_shared = egtunnel.open_tunnel(**server.connect_kwargs(), remote_host="127.0.0.1", remote_port=9,
                                          channel="CONTROL", mode="shared", cull_idle_timeout=300)  # fmt: skip
    try:
        time.sleep(30)
        conns = conn_status(server)
        assert sorted(c["mode"] for c in conns) == ["per-port", "shared"]
        for c in conns:
            assert c["alive"] and c["reconnects"] == 0, c
            assert c["keepalives_sent"] == 0, "the CONTROL rule sends no probes of its own"
        assert server.log_count("Timeout, client not responding") == 0
        assert server.log_count("Accepted publickey") == 2
        # The server did probe both connections throughout (sshd logs each answer it gets), and got answers.
        assert server.log_count("for keepalive") >= 10
    finally:
        control_per_port.terminate()
        control_shared.terminate()


# --- forwarding refused by the server ------------------------------------------------------------


@pytest.mark.parametrize("setting", ["AllowTcpForwarding no", "DisableForwarding yes", "PermitOpen 127.0.0.1:1"])
def test_forwarding_forbidden_by_the_server_fails_the_open(sshd_factory, echo_server: harness.EchoServer,
                                                          setting: str) -> None:  # fmt: skip
    server = sshd_factory(extra_config=[setting])
    local = harness.free_port()
    with pytest.raises(egtunnel.ForwardingProhibited) as info:
        egtunnel.open_tunnel(**server.connect_kwargs(), remote_host="127.0.0.1", remote_port=echo_server.port,
                             local_port=local, verify=True, mode="shared")  # fmt: skip
    message = str(info.value)
    assert f"127.0.0.1:{echo_server.port}" in message and f"{server.user}@{server.host}:{server.port}" in message
    assert "AllowTcpForwarding" in message and "PermitOpen" in message
    assert not harness.is_listening(local)
    harness.wait_until(lambda: conn_status(server) == [], 10, what="connection closed")


def test_verify_accepts_a_port_that_does_not_listen_yet(sshd: harness.SshServer) -> None:
    port = harness.free_port()
    with egtunnel.open_tunnel(**sshd.connect_kwargs(), remote_host="127.0.0.1", remote_port=port, verify=True) as t:
        assert t.is_alive()
