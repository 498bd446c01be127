"""The test harness checked against the OpenSSH client: if these fail, no egtunnel result means anything.
They need no native code, so they run before (and independently of) the extension.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
import time
from typing import Iterator

import pytest

import harness

SSH_TIMEOUT = 20.0


def _run_ssh_client(server: harness.SshServer, *options: str) -> subprocess.Popen:
    return subprocess.Popen(
        server.ssh_argv(options=["-N", *options]),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.fixture
def ssh_clients() -> Iterator[list[subprocess.Popen]]:
    procs: list[subprocess.Popen] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=5)


# --- SshServer on loopback


def test_login_with_the_authorized_key(sshd: harness.SshServer) -> None:
    res = sshd.ssh("echo", "logged-in", timeout=SSH_TIMEOUT)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "logged-in"
    # The [host]:port form is what OpenSSH and libssh2 look up for a port other than 22.
    assert sshd.known_hosts.read_text() == f"[127.0.0.1]:{sshd.port} {sshd.host_public_key}\n"
    assert f"Accepted publickey for {sshd.user}" in sshd.log_text()


def test_wrong_key_is_refused(sshd: harness.SshServer) -> None:
    res = sshd.ssh("true", identity_file=sshd.wrong_identity_file, timeout=SSH_TIMEOUT)
    assert res.returncode == 255
    assert "Permission denied (publickey)" in res.stderr
    assert "Accepted publickey" not in sshd.log_text()


def test_unknown_host_key_is_refused(sshd: harness.SshServer) -> None:
    res = sshd.ssh("true", known_hosts=sshd.empty_known_hosts(), timeout=SSH_TIMEOUT)
    assert res.returncode == 255
    assert "Host key verification failed" in res.stderr


def test_restart_keeps_port_and_host_key(sshd: harness.SshServer) -> None:
    port, key, pid = sshd.port, sshd.host_public_key, sshd.pid
    sshd.restart()
    assert (sshd.port, sshd.host_public_key) == (port, key)
    assert sshd.pid != pid
    res = sshd.ssh("true", timeout=SSH_TIMEOUT)
    assert res.returncode == 0, res.stderr


def test_regenerated_host_key_is_a_changed_key(sshd: harness.SshServer) -> None:
    old = sshd.host_public_key
    new = sshd.regenerate_host_key()
    assert new != old and sshd.running
    res = sshd.ssh("true", timeout=SSH_TIMEOUT)
    assert res.returncode == 255
    assert "REMOTE HOST IDENTIFICATION HAS CHANGED" in res.stderr
    sshd.write_known_hosts()
    assert sshd.ssh("true", timeout=SSH_TIMEOUT).returncode == 0


def test_keepalive_requests_appear_in_the_log(sshd: harness.SshServer, ssh_clients: list) -> None:
    since = sshd.log_offset()
    ssh_clients.append(_run_ssh_client(sshd, "-o", "ServerAliveInterval=1"))
    sshd.wait_for_log(harness.KEEPALIVE_LOG_LINE, timeout=10, since=since, count=2)


def test_paused_session_is_a_dead_peer(sshd: harness.SshServer, ssh_clients: list) -> None:
    since = sshd.log_offset()
    client = _run_ssh_client(sshd, "-o", "ServerAliveInterval=1", "-o", "ServerAliveCountMax=2")
    ssh_clients.append(client)
    # Pausing during the handshake would test ConnectTimeout instead; a keep-alive answered means the
    # session is past authentication.
    sshd.wait_for_log(harness.KEEPALIVE_LOG_LINE, timeout=10, since=since)
    assert sshd.established_connections() == 1
    stopped = time.monotonic()
    assert sshd.pause_sessions()
    _, err = client.communicate(timeout=10)
    # interval x (count_max + 1) plus scheduling slack
    assert time.monotonic() - stopped < 5
    assert "Timeout, server" in err
    # The server side still holds the connection until the session runs again and sees the EOF.
    sshd.resume_sessions()
    harness.wait_until(lambda: sshd.established_connections() == 0, 10, what="the session to end")


def test_stop_kills_sessions_and_what_they_started(sshd: harness.SshServer, ssh_clients: list) -> None:
    res = sshd.ssh("nohup sleep 300 >/dev/null 2>&1 & echo $!", timeout=SSH_TIMEOUT)
    orphan = int(res.stdout.strip())
    client = _run_ssh_client(sshd)
    ssh_clients.append(client)
    harness.wait_until(lambda: sshd.session_pids(), 10, what="the session process")
    sessions = sshd.session_pids()
    sshd.stop()
    assert not sshd.running
    assert not any(harness.procs.alive(p) for p in [orphan, *sessions])
    assert not harness.is_listening(sshd.port)
    client.wait(timeout=10)


# --- TCP services on loopback


def test_echo_finishes_sending_after_half_close(echo_server: harness.EchoServer) -> None:
    payload = bytes(range(256)) * 4096  # 1 MiB, larger than any socket buffer on the path
    assert harness.echo_once(*echo_server.address, payload=payload) == payload


def test_echo_64_mib_each_way(echo_server: harness.EchoServer) -> None:
    result = harness.sha256_echo(*echo_server.address, 64 << 20)
    assert result.ok, result


@pytest.mark.parametrize("mode", ["sink", "source"])
def test_one_way_services(mode: str) -> None:
    with harness.EchoServer(mode=mode) as server:
        fn = harness.sink_send if mode == "sink" else harness.source_receive
        result = fn(*server.address, 16 << 20)
    assert result.ok, result


def test_echo_server_exits_when_its_parent_is_gone() -> None:
    server = harness.EchoServer().start()
    try:
        proc = server._proc
        assert proc is not None and proc.stdin is not None
        proc.stdin.close()
        assert proc.wait(timeout=5) == 0
    finally:
        server.close()


def test_openssh_forward_to_loopback(sshd: harness.SshServer, echo_server: harness.EchoServer) -> None:
    with harness.openssh_forward(sshd, 0, "127.0.0.1", echo_server.port) as fwd:
        assert sshd.established_connections() == 1
        assert harness.echo_once("127.0.0.1", fwd.local_port) == b"hello egtunnel\n"
        samples = harness.round_trips("127.0.0.1", fwd.local_port, count=200)
    assert len(samples) == 200 and harness.percentile(samples, 50) < 0.05
    assert not harness.is_listening(fwd.local_port)


def test_process_counters_see_our_own_resources() -> None:
    fds, threads = harness.fd_count(), harness.thread_count()
    release = threading.Event()
    t = threading.Thread(target=release.wait)
    t.start()
    with socket.socket() as s:
        assert harness.fd_count() == fds + 1 and harness.thread_count() == threads + 1
        s.close()
        release.set()
        t.join()
    # The OS thread finishes exiting just after join() returns; give it a moment to leave /proc.
    harness.wait_until(lambda: harness.thread_count() == threads, 2, what="the joined thread to leave /proc")
    assert (harness.fd_count(), harness.thread_count()) == (fds, threads)


def test_percentile_is_nearest_rank() -> None:
    samples = [float(i) for i in range(1, 101)]
    assert harness.percentile(samples, 50) == 50.0
    assert harness.percentile(samples, 99) == 99.0
    assert harness.percentile(samples, 100) == 100.0
    assert harness.percentile([3.0], 0) == 3.0


# --- RemoteHost (network namespace)


@pytest.mark.netns
def test_remote_host_is_reachable_only_on_its_address(remote_host: harness.RemoteHost) -> None:
    echo, sshd = remote_host.echo, remote_host.sshd
    assert echo is not None and sshd is not None
    assert echo.host == sshd.host == remote_host.address
    assert harness.echo_once(*echo.address) == b"hello egtunnel\n"
    for port in (echo.port, sshd.port):
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
    res = remote_host.run(["ip", "-4", "-o", "addr", "show"], capture_output=True, text=True)
    assert f"{remote_host.address}/24" in res.stdout and remote_host.gateway_address not in res.stdout


@pytest.mark.netns
def test_remote_host_reaches_back_to_the_gateway_address(remote_host: harness.RemoteHost) -> None:
    with socket.create_server((remote_host.gateway_address, 0)) as listener:
        port = listener.getsockname()[1]
        script = f"import socket; socket.create_connection(('{remote_host.gateway_address}', {port}), 5).sendall(b'hi')"
        client = remote_host.popen(["python3", "-c", script])
        listener.settimeout(10)
        conn, peer = listener.accept()
        with conn:
            assert peer[0] == remote_host.address
            assert conn.recv(2) == b"hi"
        assert client.wait(timeout=10) == 0


@pytest.mark.netns
def test_remote_sshd_login_restart_and_changed_key(remote_host: harness.RemoteHost) -> None:
    sshd = remote_host.sshd
    assert sshd is not None
    res = sshd.ssh("hostname -I", timeout=SSH_TIMEOUT)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == [remote_host.address]
    key = sshd.host_public_key
    sshd.restart()
    assert sshd.host_public_key == key
    assert sshd.ssh("true", timeout=SSH_TIMEOUT).returncode == 0
    sshd.regenerate_host_key()
    assert sshd.ssh("true", timeout=SSH_TIMEOUT).returncode == 255


@pytest.mark.netns
def test_openssh_forward_to_remote_echo(remote_host: harness.RemoteHost) -> None:
    sshd, echo = remote_host.sshd, remote_host.echo
    assert sshd is not None and echo is not None
    with harness.openssh_forward(sshd, 0, remote_host.address, echo.port) as fwd:
        assert harness.echo_once("127.0.0.1", fwd.local_port) == b"hello egtunnel\n"
        result = harness.sha256_echo("127.0.0.1", fwd.local_port, 64 << 20)
        assert result.ok, result
        assert sshd.established_connections() == 1


@pytest.mark.netns
def test_link_down_drops_packets_silently(remote_host: harness.RemoteHost) -> None:
    echo = remote_host.echo
    assert echo is not None
    with harness.connect(*echo.address) as conn:
        conn.sendall(b"a")
        assert conn.recv(1) == b"a"
        remote_host.link_down()
        conn.settimeout(0.5)
        conn.sendall(b"b")
        with pytest.raises(socket.timeout):
            conn.recv(1)
        remote_host.link_up()
        # TCP retransmits the lost segment; the first retry comes within a second or so.
        conn.settimeout(10)
        assert conn.recv(1) == b"b"


@pytest.mark.netns
def test_remote_host_close_leaves_nothing_behind() -> None:
    reason = harness.netns_unavailable_reason()
    if reason:
        pytest.skip(reason)
    host = harness.RemoteHost().start()
    try:
        sshd = host.ssh_server()
        host.echo_server()
        sleeper = host.popen(["sleep", "300"])
        orphan = int(sshd.ssh("nohup sleep 300 >/dev/null 2>&1 & echo $!", timeout=SSH_TIMEOUT).stdout)
        pids = host.pids()
        assert sleeper.pid in pids and orphan in pids
    finally:
        host.close()
    assert not any(harness.procs.alive(p) for p in pids)
    assert host.name not in harness.netns.netns_names()
    assert host.host_ifname not in harness.netns.link_names()


@pytest.mark.netns
def test_leftovers_of_a_dead_run_are_removed() -> None:
    reason = harness.netns_unavailable_reason()
    if reason:
        pytest.skip(reason)
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale_ns, stale_if = f"egt{dead.pid}n1", f"egt{dead.pid}h1"
    subprocess.run(["ip", "netns", "add", stale_ns], check=True)
    subprocess.run(["ip", "link", "add", stale_if, "type", "veth", "peer", "name", f"egt{dead.pid}p1",
                    "netns", stale_ns], check=True)  # fmt: skip
    sleeper = subprocess.Popen(["ip", "netns", "exec", stale_ns, "sleep", "300"],
                               env={**os.environ, harness.OWNER_ENV: f"{dead.pid}:1"})  # fmt: skip
    try:
        harness.wait_until(lambda: harness.procs.alive(sleeper.pid) and sleeper.pid in _netns_pids(stale_ns), 5)
        with harness.RemoteHost():
            pass
        assert stale_ns not in harness.netns.netns_names()
        assert stale_if not in harness.netns.link_names()
        assert sleeper.wait(timeout=5) == -signal.SIGKILL
    finally:
        if sleeper.poll() is None:
            sleeper.kill()
            sleeper.wait()
        subprocess.run(["ip", "netns", "del", stale_ns], capture_output=True)
        subprocess.run(["ip", "link", "del", stale_if], capture_output=True)


def _netns_pids(name: str) -> list[int]:
    res = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True)
    return [int(p) for p in res.stdout.split()]
