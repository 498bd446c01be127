"""Connection sharing, remote exec and self-healing of the native core against real sshd servers."""

from __future__ import annotations

import logging
import re
import time

import pytest

import egtunnel
import harness

CHANNELS = ["SHELL", "IOPUB", "STDIN", "HB", "CONTROL", "EG_COMM"]


def kernel_forwards(server: harness.SshServer, remote_host: str, remote_port: int, mode: str, kernel_id: str,
                    cull: int = 300, **kw: object) -> list[egtunnel.Tunnel]:  # fmt: skip
    """Six forwards as a kernel has them (all to one service here: what matters is the connection count)."""
    return [
        egtunnel.open_tunnel(**server.connect_kwargs(), remote_host=remote_host, remote_port=remote_port,
                             channel=ch, mode=mode, kernel_id=kernel_id, cull_idle_timeout=cull, **kw)  # fmt: skip
        for ch in CHANNELS
    ]


def conn_status(server: harness.SshServer) -> list[dict]:
    return [c for c in egtunnel.status() if c["port"] == server.port and c["host"] == server.host]


def terminate_all(tunnels: list[egtunnel.Tunnel]) -> None:
    for t in tunnels:
        t.terminate()


def accepted_logins(server: harness.SshServer, since: int = 0) -> int:
    return server.log_count("Accepted publickey", since)


# --- sharing -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("mode", "per_kernel"), [("shared", 0), ("per-port", 6)])
def test_connections_per_host_for_three_kernels(sshd: harness.SshServer, echo_server: harness.EchoServer,
                                                mode: str, per_kernel: int) -> None:  # fmt: skip
    kernels = [kernel_forwards(sshd, "127.0.0.1", echo_server.port, mode, f"k{i}") for i in range(3)]
    try:
        for tunnels in kernels:
            for t in tunnels:
                assert harness.echo_once("127.0.0.1", t.local_port) == b"hello egtunnel\n"
        expected = 1 if mode == "shared" else 3 * per_kernel
        assert sshd.established_connections() == expected
        assert len(conn_status(sshd)) == expected
        assert accepted_logins(sshd) == expected
    finally:
        for tunnels in kernels:
            terminate_all(tunnels)


def test_shared_interval_is_the_smallest_and_follows_forwards(sshd: harness.SshServer) -> None:
    control = egtunnel.open_tunnel(**sshd.connect_kwargs(), remote_host="127.0.0.1", remote_port=9,
                                   channel="CONTROL", mode="shared", cull_idle_timeout=300)  # fmt: skip
    try:
        assert conn_status(sshd)[0]["keep_alive_interval"] == egtunnel.MAX_KEEP_ALIVE_INTERVAL
        shell = egtunnel.open_tunnel(**sshd.connect_kwargs(), remote_host="127.0.0.1", remote_port=9,
                                     channel="SHELL", mode="shared", cull_idle_timeout=300)  # fmt: skip
        hb = egtunnel.open_tunnel(**sshd.connect_kwargs(), remote_host="127.0.0.1", remote_port=9,
                                  channel="HB", mode="shared", cull_idle_timeout=100)  # fmt: skip
        (c,) = conn_status(sshd)
        assert c["keep_alive_interval"] == 160 and len(c["forwards"]) == 3
        hb.terminate()
        assert conn_status(sshd)[0]["keep_alive_interval"] == 360
        shell.terminate()
        assert conn_status(sshd)[0]["keep_alive_interval"] == egtunnel.MAX_KEEP_ALIVE_INTERVAL
    finally:
        control.terminate()


def test_shared_connection_lingers_then_closes(sshd: harness.SshServer, echo_server: harness.EchoServer) -> None:
    first = kernel_forwards(sshd, "127.0.0.1", echo_server.port, "shared", "k1")
    terminate_all(first)
    # A restart within the linger time reuses the connection: no new login.
    second = kernel_forwards(sshd, "127.0.0.1", echo_server.port, "shared", "k1")
    assert accepted_logins(sshd) == 1 and sshd.established_connections() == 1
    terminate_all(second)
    start = time.monotonic()
    harness.wait_until(lambda: sshd.established_connections() == 0, 10, interval=0.1, what="idle connection to close")
    assert 3.0 < time.monotonic() - start < 8.0
    assert conn_status(sshd) == []


# --- remote exec -------------------------------------------------------------------------------


def test_remote_exec_follows_rsh_contract(sshd: harness.SshServer) -> None:
    kw = sshd.connect_kwargs()
    r = egtunnel.remote_exec(kw.pop("host"), "echo out1; echo out2; echo err >&2; exit 3", **kw)
    assert r.lines() == ["out1", "out2"] and r.stdout == b"out1\nout2\n" and r.stderr == b"err\n"
    assert r.exit_status == 3
    r = egtunnel.remote_exec(sshd.host, "echo only-err >&2", **kw)
    assert r.lines() == ["only-err"] and r.exit_status == 0


def test_remote_exec_reuses_one_connection(sshd: harness.SshServer) -> None:
    kw = sshd.connect_kwargs()
    host = kw.pop("host")
    mark = sshd.log_offset()
    for _ in range(10):
        assert egtunnel.remote_exec(host, "kill -0 $$; echo $?", **kw).lines() == ["0"]
    assert accepted_logins(sshd, mark) == 1


def test_remote_exec_closes_stdin_and_times_out(sshd: harness.SshServer) -> None:
    kw = sshd.connect_kwargs()
    host = kw.pop("host")
    assert egtunnel.remote_exec(host, "cat; echo done", **kw).lines() == ["done"]
    start = time.monotonic()
    with pytest.raises(egtunnel.TunnelTimeout, match="remote command"):
        egtunnel.remote_exec(host, "sleep 5", timeout=1, **kw)
    assert time.monotonic() - start < 2.5


def test_remote_exec_auth_failure_is_ssh_auth_error(sshd: harness.SshServer) -> None:
    kw = sshd.connect_kwargs()
    kw["identity_file"] = str(sshd.wrong_identity_file)
    with pytest.raises(egtunnel.SshAuthError):
        egtunnel.remote_exec(kw.pop("host"), "true", **kw)


# --- self-healing ------------------------------------------------------------------------------


def echo_recovers(port: int, timeout: float) -> float:
    """Seconds until an echo through the local port succeeds again."""
    start = time.monotonic()

    def ok() -> bool:
        try:
            return harness.echo_once("127.0.0.1", port, timeout=2) == b"hello egtunnel\n"
        except OSError:
            return False

    harness.wait_until(ok, timeout, interval=0.2, what="echo through the same local port")
    return time.monotonic() - start


@pytest.mark.parametrize("mode", ["shared", "per-port"])
def test_sshd_restart_heals_through_same_local_port(sshd: harness.SshServer, echo_server: harness.EchoServer,
                                                    mode: str, caplog: pytest.LogCaptureFixture) -> None:  # fmt: skip
    caplog.set_level(logging.WARNING, logger="egtunnel")
    t = egtunnel.open_tunnel(**sshd.connect_kwargs(), remote_host="127.0.0.1", remote_port=echo_server.port, mode=mode)
    try:
        port = t.local_port
        assert harness.echo_once("127.0.0.1", port) == b"hello egtunnel\n"
        sshd.restart()  # kills the session too
        harness.wait_until(lambda: not t.is_alive() or conn_status(sshd)[0]["reconnects"] > 0, 5, what="death noticed")
        assert echo_recovers(port, 10) < 10
        assert t.local_port == port and t.is_alive()
        (c,) = conn_status(sshd)
        assert c["reconnects"] == 1 and c["alive"]
        lost = [r for r in caplog.records if "lost" in r.getMessage()]
        back = [r for r in caplog.records if "re-established" in r.getMessage()]
        assert len(lost) == 1 and len(back) == 1
        assert f"127.0.0.1:{sshd.port}" in lost[0].getMessage()
    finally:
        t.terminate()


def test_local_connection_during_outage_waits_then_closes(sshd: harness.SshServer, echo_server: harness.EchoServer) -> None:
    t = egtunnel.open_tunnel(**sshd.connect_kwargs(), remote_host="127.0.0.1", remote_port=echo_server.port)
    try:
        sshd.stop()
        harness.wait_until(lambda: not t.is_alive(), 5, what="death noticed")
        start = time.monotonic()
        with harness.connect("127.0.0.1", t.local_port) as s:
            s.settimeout(20)
            s.sendall(b"x")
            try:
                assert s.recv(1) == b""
            except ConnectionResetError:
                pass
        waited = time.monotonic() - start
        assert 8 <= waited <= 13, waited
        with pytest.raises(egtunnel.ConnectionDown):
            t.send_request(b"{}", timeout=5)
    finally:
        t.terminate()


def test_dead_peer_detected_and_recovered(sshd: harness.SshServer, echo_server: harness.EchoServer) -> None:
    t = egtunnel.open_tunnel(**sshd.connect_kwargs(), remote_host="127.0.0.1", remote_port=echo_server.port,
                             cull_idle_timeout=1, keepalive_margin=1, keepalive_count_max=3)  # fmt: skip
    try:
        assert harness.echo_once("127.0.0.1", t.local_port) == b"hello egtunnel\n"
        stopped = sshd.pause_sessions()
        start = time.monotonic()
        harness.wait_until(lambda: conn_status(sshd)[0]["reconnects"] >= 1 or not t.is_alive(), 10, interval=0.05,
                         what="dead peer declared")  # fmt: skip
        assert time.monotonic() - start <= 8.5
        assert "keep-alive" in (conn_status(sshd)[0]["last_error"] or "keep-alive")
        for pid in stopped:
            try:
                import os, signal

                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        assert echo_recovers(t.local_port, 10) < 10
    finally:
        t.terminate()


def test_changed_host_key_stops_reconnecting(sshd: harness.SshServer, echo_server: harness.EchoServer,
                                            caplog: pytest.LogCaptureFixture) -> None:  # fmt: skip
    caplog.set_level(logging.DEBUG, logger="egtunnel")
    t = egtunnel.open_tunnel(**sshd.connect_kwargs(), remote_host="127.0.0.1", remote_port=echo_server.port)
    try:
        sshd.regenerate_host_key()  # restarts sshd, killing the session
        harness.wait_until(lambda: "host key" in (conn_status(sshd)[0]["last_error"] or ""), 10, what="host key error")
        (c,) = conn_status(sshd)
        assert not c["alive"] and "differs" in c["last_error"]
        mark = sshd.log_offset()
        time.sleep(4)  # backoff would have retried twice by now
        assert sshd.log_count("Connection from", mark) == 0
        assert any("giving up" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
        with harness.connect("127.0.0.1", t.local_port) as s:  # refused at once, not after the outage wait
            s.settimeout(5)
            assert s.recv(1) == b""
    finally:
        t.terminate()


def test_terminate_during_reconnect_stops_attempts(sshd: harness.SshServer, echo_server: harness.EchoServer) -> None:
    t = egtunnel.open_tunnel(**sshd.connect_kwargs(), remote_host="127.0.0.1", remote_port=echo_server.port, mode="shared")
    sshd.stop()
    harness.wait_until(lambda: not t.is_alive(), 5, what="death noticed")
    start = time.monotonic()
    t.terminate()
    assert time.monotonic() - start < 0.1
    assert conn_status(sshd) == []
    sshd.start()
    mark = sshd.log_offset()
    time.sleep(3)
    assert sshd.log_count("Connection from", mark) == 0


@pytest.mark.netns
def test_link_down_20s_then_up_heals(remote_host: harness.RemoteHost) -> None:
    t = egtunnel.open_tunnel(**remote_host.sshd.connect_kwargs(), remote_host=remote_host.address,
                             remote_port=remote_host.echo.port, mode="shared", cull_idle_timeout=300)  # fmt: skip
    try:
        assert harness.echo_once("127.0.0.1", t.local_port) == b"hello egtunnel\n"
        remote_host.link_down()
        time.sleep(20)
        remote_host.link_up()
        assert echo_recovers(t.local_port, 10) < 10
    finally:
        t.terminate()
