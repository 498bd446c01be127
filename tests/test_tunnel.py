"""The native tunnel core against real OpenSSH servers: data paths, errors, keep-alive, clean shutdown."""

from __future__ import annotations

import logging
import os
import re
import signal
import socket
import threading
import time

import pytest

import egtunnel
import harness


def open_to(server: harness.SshServer, remote_host: str, remote_port: int, **kw: object) -> egtunnel.Tunnel:
    return egtunnel.open_tunnel(**{**server.connect_kwargs(), **kw}, remote_host=remote_host, remote_port=remote_port)


# Below Linux's minimum delayed-ACK time (40 ms); see test_round_trips_have_no_delayed_ack_stalls.
DELAYED_ACK_BAR = 0.032


# --- data paths ---------------------------------------------------------------------------------


@pytest.mark.netns
def test_data_reaches_echo_server_on_remote_host(remote_host: harness.RemoteHost) -> None:
    with open_to(remote_host.sshd, remote_host.address, remote_host.echo.port) as t:
        assert t.local_port > 0 and t.remote_host == remote_host.address
        assert harness.echo_once("127.0.0.1", t.local_port, b"through the namespace\n") == b"through the namespace\n"
        stats = t.stats()
    assert stats["bytes_out"] == stats["bytes_in"] == len(b"through the namespace\n")
    assert stats["connections"] == 1


@pytest.mark.netns
def test_64_mib_each_way_arrive_intact(remote_host: harness.RemoteHost) -> None:
    with open_to(remote_host.sshd, remote_host.address, remote_host.echo.port) as t:
        r = harness.sha256_echo("127.0.0.1", t.local_port, nbytes=64 << 20, timeout=120)
    assert r.received_bytes == r.sent_bytes == 64 << 20
    assert r.received_sha256 == r.sent_sha256


@pytest.mark.netns
def test_round_trips_have_no_delayed_ack_stalls(remote_host: harness.RemoteHost) -> None:
    """sshd leaves Nagle on for tunnel-only connections; without our ACK handling ~1% of round trips
    wait for a delayed ACK (ssh -N -L shows ~100 in 10,000 on this path).

    A delayed ACK holds a round trip for at least Linux's minimum ACK delay, 40 ms. The bar sits below
    that and above what a loaded machine's scheduler adds to a round trip (up to ~25 ms with both
    cores busy), so that the test counts stalls of the kind it names, not preemptions."""
    with open_to(remote_host.sshd, remote_host.address, remote_host.echo.port) as t:
        samples = harness.round_trips("127.0.0.1", t.local_port, count=10_000, size=1024)
    stalled = [round(s * 1000, 1) for s in samples if s > DELAYED_ACK_BAR]
    assert len(stalled) <= 3, f"{len(stalled)} round trips over {DELAYED_ACK_BAR * 1000:.0f} ms: {stalled}"


@pytest.mark.netns
def test_200_concurrent_connections_through_one_forward(remote_host: harness.RemoteHost) -> None:
    with open_to(remote_host.sshd, remote_host.address, remote_host.echo.port) as t:
        socks = [harness.connect("127.0.0.1", t.local_port) for _ in range(200)]
        try:
            for i, s in enumerate(socks):
                s.sendall(f"connection {i:03d}\n".encode())
            for i, s in enumerate(socks):
                assert harness.recv_exact(s, 15) == f"connection {i:03d}\n".encode()
            assert t.stats()["active_connections"] == 200
        finally:
            for s in socks:
                s.close()
        assert t.stats()["connections"] == 200
        harness.wait_until(lambda: t.stats()["active_connections"] == 0, 10, what="local connections to end")


def test_half_close_is_carried_both_ways(sshd: harness.SshServer, echo_server: harness.EchoServer) -> None:
    with open_to(sshd, "127.0.0.1", echo_server.port) as t:
        with harness.connect("127.0.0.1", t.local_port) as s:
            s.sendall(b"abc")
            s.shutdown(socket.SHUT_WR)  # our EOF must reach the echo server...
            assert harness.recv_all(s) == b"abc"  # ...and its EOF must come back after the echo


def test_connection_to_a_port_not_listening_yet_is_held_until_it_listens(
    sshd: harness.SshServer, caplog: pytest.LogCaptureFixture
) -> None:
    # A kernel's launcher reports its ports before the kernel listens: the local connection must wait
    # for the remote port (bytes kept), not be closed, and nothing is worth a warning meanwhile.
    port = harness.free_port()
    caplog.set_level(logging.WARNING, logger="egtunnel")
    with open_to(sshd, "127.0.0.1", port) as t:
        with harness.connect("127.0.0.1", t.local_port) as s:
            s.sendall(b"sent before the port listened\n")
            time.sleep(0.8)
            with harness.EchoServer(port=port):
                s.settimeout(10)
                assert harness.recv_exact(s, 30) == b"sent before the port listened\n"
        assert t.is_alive()
    assert not [r for r in caplog.records if f"127.0.0.1:{port}" in r.getMessage()]


def test_refused_remote_port_closes_that_connection_only_after_the_wait(
    sshd: harness.SshServer, caplog: pytest.LogCaptureFixture
) -> None:
    port = harness.free_port()
    caplog.set_level(logging.WARNING, logger="egtunnel")
    with open_to(sshd, "127.0.0.1", port, refused_wait=1.0) as t:
        with harness.connect("127.0.0.1", t.local_port) as s:
            s.settimeout(10)
            start = time.monotonic()
            try:
                assert s.recv(1) == b""
            except ConnectionResetError:
                pass
            assert 0.9 <= time.monotonic() - start < 5
        harness.wait_until(lambda: any(f"127.0.0.1:{port}" in r.getMessage() for r in caplog.records), 5,
                         what="warning naming the refused port")  # fmt: skip
        with harness.EchoServer(port=port):
            assert harness.echo_once("127.0.0.1", t.local_port) == b"hello egtunnel\n"
        assert t.is_alive()
    warning = next(r for r in caplog.records if f"127.0.0.1:{port}" in r.getMessage())
    assert warning.levelno == logging.WARNING and warning.name.startswith("egtunnel")


def test_explicit_local_port_and_attributes(sshd: harness.SshServer, echo_server: harness.EchoServer) -> None:
    port = harness.free_port()
    t = open_to(sshd, "127.0.0.1", echo_server.port, local_port=port, channel="IOPUB", cull_idle_timeout=300,
                kernel_id="k-1")  # fmt: skip
    try:
        assert (t.local_port, t.channel, t.keep_alive_interval, t.kernel_id) == (port, "IOPUB", 360, "k-1")
        assert t.destination == f"{sshd.user}@127.0.0.1:{sshd.port}"
        assert t.mode == "per-port" and t.is_alive() and t.is_connected()
        assert "IOPUB" in repr(t)
    finally:
        t.terminate()
    assert not t.is_alive()


# --- terminate ----------------------------------------------------------------------------------


def test_terminate_frees_port_and_returns_fds_and_threads_to_baseline(
    sshd: harness.SshServer, echo_server: harness.EchoServer
) -> None:
    # terminate() frees the port before it returns and leaves the rest (draining, closing the SSH
    # connection) to the runtime, so the descriptors come back shortly after, not during, the call.
    open_to(sshd, "127.0.0.1", echo_server.port).terminate()  # the runtime's threads start once
    harness.wait_until(lambda: sshd.established_connections() == 0, 5, what="first connection closed")
    fds, threads = harness.fd_count(), harness.thread_count()
    t = open_to(sshd, "127.0.0.1", echo_server.port)
    held = [harness.connect("127.0.0.1", t.local_port) for _ in range(5)]
    for s in held:
        s.sendall(b"x")
        assert s.recv(1) == b"x"
    start = time.monotonic()
    t.terminate()
    elapsed = time.monotonic() - start
    t.terminate()  # idempotent
    assert harness.port_is_free(t.local_port)
    for s in held:
        s.close()
    assert elapsed < 0.02, f"terminate took {elapsed * 1000:.1f} ms"
    harness.wait_until(lambda: sshd.established_connections() == 0 and harness.fd_count() == fds, 5,
                     what=f"descriptors back to {fds} (now {harness.fd_count()})")  # fmt: skip
    assert harness.thread_count() == threads


COUNTING_SERVER = """
import hashlib, socket, sys
with socket.create_server(("127.0.0.1", 0)) as server:
    print(server.getsockname()[1], flush=True)
    conn, _ = server.accept()
    h, n = hashlib.sha256(), 0
    while chunk := conn.recv(65536):
        h.update(chunk)
        n += len(chunk)
    print(n, h.hexdigest(), flush=True)
"""


def test_terminate_delivers_bytes_already_accepted(sshd_factory) -> None:
    """terminate() while a client is still sending: every byte the tunnel took from the client reaches
    the remote service, followed by EOF, before the channel closes."""
    import hashlib
    import subprocess
    import sys

    sshd = sshd_factory(log_level="INFO")  # per-packet DEBUG3 logging would slow sshd's draining
    # The service runs in its own process, so it reads at full speed while this test spins.
    with subprocess.Popen([sys.executable, "-c", COUNTING_SERVER], stdout=subprocess.PIPE, text=True) as service:
        try:
            port = int(service.stdout.readline())
            t = open_to(sshd, "127.0.0.1", port)
            s = harness.connect("127.0.0.1", t.local_port)
            s.setblocking(False)
            payload = os.urandom(8 << 20)
            sent = 0
            try:
                while sent < len(payload) and t.stats()["bytes_out"] < (1 << 20):
                    try:
                        sent += s.send(payload[sent : sent + 65536])
                    except BlockingIOError:
                        time.sleep(0.001)
                start = time.monotonic()
                t.terminate()  # mid-stream: part of what was sent is still queued inside the tunnel
                assert time.monotonic() - start < 0.1
            finally:
                s.close()
            count, digest = service.communicate(timeout=10)[0].split()
        finally:
            service.kill()
    accepted = t.stats()["bytes_out"]
    assert 0 < accepted <= sent
    assert int(count) == accepted, "the remote service saw EOF before every accepted byte"
    assert digest == hashlib.sha256(payload[:accepted]).hexdigest()


# --- errors -------------------------------------------------------------------------------------


def listening_ports() -> set[int]:
    """Ports this process listens on (inodes of our sockets matched against /proc/net/tcp)."""
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            link = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        m = re.match(r"socket:\[(\d+)\]", link)
        if m:
            inodes.add(m.group(1))
    ports = set()
    with open("/proc/net/tcp") as f:
        for line in list(f)[1:]:
            parts = line.split()
            if parts[3] == "0A" and parts[9] in inodes:
                ports.add(int(parts[1].split(":")[1], 16))
    return ports


def test_wrong_key_is_ssh_auth_error(sshd: harness.SshServer, echo_server: harness.EchoServer) -> None:
    before = listening_ports()
    with pytest.raises(egtunnel.SshAuthError) as info:
        open_to(sshd, "127.0.0.1", echo_server.port, identity_file=str(sshd.wrong_identity_file))
    assert f"{sshd.user}@127.0.0.1:{sshd.port}" in str(info.value)
    assert "SHELL" in str(info.value)
    assert listening_ports() == before


def test_unknown_host_key_under_strict_binds_nothing(sshd: harness.SshServer, echo_server: harness.EchoServer) -> None:
    before = listening_ports()
    port = harness.free_port()
    with pytest.raises(egtunnel.HostKeyError, match=re.escape(f"[127.0.0.1]:{sshd.port}")):
        open_to(sshd, "127.0.0.1", echo_server.port, known_hosts=str(sshd.empty_known_hosts()), local_port=port)
    assert listening_ports() == before
    assert harness.port_is_free(port)


@pytest.mark.parametrize("policy", ["strict", "accept-new"])
def test_changed_host_key_is_refused(sshd: harness.SshServer, echo_server: harness.EchoServer, policy: str) -> None:
    with open_to(sshd, "127.0.0.1", echo_server.port, host_key_policy=policy):
        pass
    sshd.regenerate_host_key()
    with pytest.raises(egtunnel.HostKeyError, match="differs"):
        open_to(sshd, "127.0.0.1", echo_server.port, host_key_policy=policy)


def test_accept_new_records_the_key(sshd: harness.SshServer, echo_server: harness.EchoServer, tmp_path) -> None:
    kh = tmp_path / "ssh" / "known_hosts"
    with open_to(sshd, "127.0.0.1", echo_server.port, known_hosts=str(kh), host_key_policy="accept-new") as t:
        assert harness.echo_once("127.0.0.1", t.local_port) == b"hello egtunnel\n"
    recorded = kh.read_text()
    assert f"[127.0.0.1]:{sshd.port} {sshd.host_public_key}" in recorded
    # Now known: strict accepts it too.
    with open_to(sshd, "127.0.0.1", echo_server.port, known_hosts=str(kh)):
        pass


def test_policy_off_skips_the_check(sshd: harness.SshServer, echo_server: harness.EchoServer) -> None:
    with open_to(sshd, "127.0.0.1", echo_server.port, known_hosts=str(sshd.empty_known_hosts()), host_key_policy="off"):
        pass


def test_unresponsive_server_is_connect_error_within_timeout(sshd: harness.SshServer, echo_server: harness.EchoServer) -> None:
    """The listener accepts TCP (kernel backlog) but never speaks SSH: a host that is gone behind a NAT."""
    os.kill(sshd.pid, signal.SIGSTOP)
    try:
        start = time.monotonic()
        with pytest.raises(egtunnel.SshConnectError, match="timed out"):
            open_to(sshd, "127.0.0.1", echo_server.port, connect_timeout=1.5)
        assert time.monotonic() - start < 1.5 + 1.0
    finally:
        os.kill(sshd.pid, signal.SIGCONT)


@pytest.mark.netns
def test_unreachable_host_is_connect_error_within_timeout(netns_host: harness.RemoteHost) -> None:
    """An address in the namespace's subnet where no machine answers (ARP goes unanswered)."""
    nobody = netns_host.address.rsplit(".", 1)[0] + ".77"
    start = time.monotonic()
    with pytest.raises(egtunnel.SshConnectError, match=re.escape(f"@{nobody}:22")):
        egtunnel.open_tunnel(nobody, "127.0.0.1", 9, connect_timeout=1.0, host_key_policy="off")
    assert time.monotonic() - start < 1.0 + 1.0


def test_closed_ssh_port_is_connect_error() -> None:
    port = harness.free_port()
    with pytest.raises(egtunnel.SshConnectError, match=f"127.0.0.1:{port}"):
        egtunnel.open_tunnel("127.0.0.1", "127.0.0.1", 9, port=port, host_key_policy="off")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"channel": "shell"}, "valid channels"),
        ({"keepalive_margin": -1}, "non-negative"),
        ({"keepalive_count_max": 0}, "positive"),
        ({"host_key_policy": "yes"}, "strict, accept-new, off"),
        ({"mode": "pooled"}, "shared, per-port"),
        ({"local_port": 70000}, "local_port"),
        ({"port": 0}, "port must be"),
        ({"connect_timeout": 0}, "connect_timeout"),
    ],
)
def test_bad_arguments_say_what_to_fix(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        egtunnel.open_tunnel("127.0.0.1", "127.0.0.1", 9, **kwargs)


def test_password_never_reaches_a_log_line(sshd: harness.SshServer, caplog: pytest.LogCaptureFixture) -> None:
    secret = "hunter2-do-not-log"
    caplog.set_level(logging.DEBUG, logger="egtunnel")
    with pytest.raises(egtunnel.SshAuthError) as info:
        open_to(sshd, "127.0.0.1", 9, identity_file=str(sshd.wrong_identity_file), password=secret)
    assert secret not in str(info.value)
    assert all(secret not in r.getMessage() for r in caplog.records)


def test_rust_log_records_reach_python_logging(sshd: harness.SshServer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="egtunnel")
    with open_to(sshd, "127.0.0.1", 9):
        pass
    assert any(r.name.startswith("egtunnel") and f"127.0.0.1:{sshd.port}" in r.getMessage() for r in caplog.records)


# --- keep-alive on the wire ----------------------------------------------------------------------

PROBE = re.compile(r"rtype keepalive@\S+ want_reply 1")


def test_idle_shell_forward_probes_every_interval_and_control_never(sshd_factory) -> None:
    shell_server, control_server = sshd_factory(), sshd_factory()
    shell_mark, control_mark = shell_server.log_offset(), control_server.log_offset()
    common = {"remote_host": "127.0.0.1", "remote_port": 9, "cull_idle_timeout": 1, "keepalive_margin": 1}
    shell = egtunnel.open_tunnel(**shell_server.connect_kwargs(), channel="SHELL", **common)
    control = egtunnel.open_tunnel(**control_server.connect_kwargs(), channel="CONTROL", **common)
    try:
        assert shell.keep_alive_interval == 2
        assert control.keep_alive_interval == egtunnel.MAX_KEEP_ALIVE_INTERVAL
        time.sleep(10.5)
        shell_probes = PROBE.findall(shell_server.log_text(shell_mark))
        control_probes = PROBE.findall(control_server.log_text(control_mark))
        assert 4 <= len(shell_probes) <= 6, shell_probes
        assert control_probes == []
        assert shell.stats()["keepalives_sent"] == len(shell_probes)
        assert control.stats()["keepalives_sent"] == 0
        assert shell.is_alive() and control.is_alive()
    finally:
        shell.terminate()
        control.terminate()


def test_dead_peer_is_reported_within_interval_times_count_plus_one(
    sshd: harness.SshServer, echo_server: harness.EchoServer
) -> None:
    t = open_to(sshd, "127.0.0.1", echo_server.port, cull_idle_timeout=1, keepalive_margin=1, keepalive_count_max=3)
    try:
        assert t.is_alive()
        stopped = sshd.pause_sessions()
        assert stopped, "no sshd session process to stop"
        start = time.monotonic()
        try:
            harness.wait_until(lambda: not t.is_alive(), 2 * 4 + 1.0, interval=0.05, what="is_alive() to turn false")
            assert time.monotonic() - start <= 2 * 4 + 0.5
        finally:
            for pid in stopped:
                try:
                    os.kill(pid, signal.SIGCONT)
                except ProcessLookupError:
                    pass
    finally:
        t.terminate()


def test_status_lists_connections_and_forwards(sshd: harness.SshServer, echo_server: harness.EchoServer) -> None:
    with open_to(sshd, "127.0.0.1", echo_server.port, channel="HB", kernel_id="kid", cull_idle_timeout=300) as t:
        entries = [c for c in egtunnel.status() if c["port"] == sshd.port]
        assert len(entries) == 1
        c = entries[0]
        assert (c["user"], c["host"], c["mode"], c["alive"], c["keep_alive_interval"]) == (
            sshd.user, "127.0.0.1", "per-port", True, 360)  # fmt: skip
        (f,) = c["forwards"]
        assert (f["kernel_id"], f["channel"], f["local_port"], f["remote_port"]) == ("kid", "HB", t.local_port, echo_server.port)
    assert not [c for c in egtunnel.status() if c["port"] == sshd.port]


def test_blocking_calls_release_the_gil(sshd: harness.SshServer) -> None:
    """A Python thread keeps running while another waits on a slow SSH handshake."""
    os.kill(sshd.pid, signal.SIGSTOP)
    ticks = 0
    done = threading.Event()

    def spin() -> None:
        nonlocal ticks
        while not done.is_set():
            ticks += 1
            time.sleep(0.001)

    th = threading.Thread(target=spin)
    th.start()
    try:
        with pytest.raises(egtunnel.SshConnectError):
            open_to(sshd, "127.0.0.1", 9, connect_timeout=0.5)
    finally:
        done.set()
        th.join()
        os.kill(sshd.pid, signal.SIGCONT)
    assert ticks > 100


def test_taken_local_port_is_oserror_eaddrinuse(sshd: harness.SshServer) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(OSError) as info:
            open_to(sshd, "127.0.0.1", 9, local_port=port)
    import errno

    assert info.value.errno == errno.EADDRINUSE
    assert f"127.0.0.1:{port}" in str(info.value)


def test_a_port_that_takes_requests_without_answering_holds_up_no_other_channel(
        sshd: harness.SshServer, echo_server: harness.EchoServer, caplog: pytest.LogCaptureFixture) -> None:
    # A launcher's listener that hangs: it listens with a queue of one (as EG's does) and never accepts.
    # Each request beyond its queue would leave the server's connect, and every channel open of the
    # shared connection behind it, waiting for as long as TCP retries.
    caplog.set_level(logging.WARNING, logger="egtunnel")
    with socket.socket() as hung, open_to(sshd, "127.0.0.1", echo_server.port) as echo:
        hung.bind(("127.0.0.1", 0))
        hung.listen(1)
        with open_to(sshd, "127.0.0.1", hung.getsockname()[1], channel="EG_COMM") as comm:
            for signum in (2, 15, 0, 9):
                comm.send_background(f'{{"signum": {signum}}}'.encode(), f"signal {signum}", timeout=1.0)
            started = time.monotonic()
            for _ in range(3):
                assert harness.echo_once("127.0.0.1", echo.local_port, b"still served\n") == b"still served\n"
            assert time.monotonic() - started < 2.0
            harness.wait_until(lambda: sum("did not answer it" in r.getMessage() for r in caplog.records) == 1, 5,
                               what="the stalled port to be named once")
            # The requests queued behind the first fail at once instead of queueing at the port.
            harness.wait_until(lambda: sum("took an earlier request without answering it" in r.getMessage()
                                           for r in caplog.records) == 3, 5, what="the three later requests to fail")
            assert harness.echo_once("127.0.0.1", echo.local_port, b"after\n") == b"after\n"


def test_send_request_delivers_then_reports_refusal(sshd: harness.SshServer) -> None:
    import errno

    with harness.EchoServer(mode="sink") as sink:
        with open_to(sshd, "127.0.0.1", sink.port, channel="EG_COMM") as t:
            t.send_request(b'{"signum": 0}', timeout=5)
            assert t.stats()["bytes_out"] == len(b'{"signum": 0}')
    closed = harness.free_port()
    with open_to(sshd, "127.0.0.1", closed, channel="EG_COMM") as t:
        with pytest.raises(ConnectionRefusedError) as info:
            t.send_request(b"{}", timeout=5)
        assert info.value.errno == errno.ECONNREFUSED
        assert f"127.0.0.1:{closed}" in str(info.value) and "EG_COMM" in str(info.value)
    with pytest.raises(egtunnel.TunnelError, match="terminated"):
        t.send_request(b"{}", timeout=5)
