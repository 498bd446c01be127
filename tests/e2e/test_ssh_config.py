"""Kernels on hosts that only the gateway's ssh_config knows how to reach: an alias (HostName, Port,
User, IdentityFile, UserKnownHostsFile from the file, nothing from EG_* variables), and a host behind
a bastion (ProxyJump) that the gateway has no route to at all, while the host still reaches the
gateway's response address through NAT on the bastion.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest

import harness

from .conftest import E2EHosts
from .gateway import Gateway
from .kernel_client import GatewayError
from .support import kernel_side_procs, kernel_status, report, require_native, wait_for

pytestmark = pytest.mark.e2e

RECOVERY_BUDGET = 30.0


class Topology:
    def __init__(self, bastion: harness.RemoteHost, behind: harness.RemoteHost, config: Path) -> None:
        self.bastion = bastion
        self.behind = behind
        self.config = config
        self.revoked: Path = config

    def dest(self, host: harness.RemoteHost) -> str:
        return f"{host.sshd.user}@{host.address}:{host.sshd.port}"


@pytest.fixture(scope="module")
def topology(e2e_hosts: E2EHosts, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Topology]:
    bastion = harness.RemoteHost().start()
    behind = harness.RemoteHost().start()
    try:
        # A port other than EG_SSH_PORT's hosts, so that a working start proves the file's Port was used.
        port = harness.free_port()
        for host, name in ((bastion, "bastion"), (behind, "behind")):
            host.ssh_server(workdir=tmp_path_factory.mktemp(f"sshd-{name}"), port=port)
            host.sshd.authorized_keys.write_text(Path(f"{e2e_hosts.identity_file}.pub").read_text())
        behind.move_behind(bastion, reach=[e2e_hosts.a.gateway_address])
        workdir = tmp_path_factory.mktemp("ssh-config")
        known = workdir / "known_hosts"
        known.write_text(bastion.sshd.known_hosts_line() + behind.sshd.known_hosts_line())
        common = (f"  User {bastion.sshd.user}\n  IdentityFile {e2e_hosts.identity_file}\n"
                  f"  UserKnownHostsFile {known}\n  StrictHostKeyChecking yes\n")  # fmt: skip
        # The bastion once more, under a name whose known_hosts lists its key as revoked.
        revoked = workdir / "known_hosts.revoked"
        revoked.write_text(f"@revoked * {bastion.sshd.host_public_key}\n" + bastion.sshd.known_hosts_line())
        config = workdir / "ssh_config"
        config.write_text(
            f"Host kh-revoked\n  HostName {bastion.address}\n  Port {port}\n  UserKnownHostsFile {revoked}\n"
            f"Host kh-alias\n  HostName {bastion.address}\n  Port {port}\n{common}"
            f"Host kh-behind\n  HostName {behind.address}\n  Port {port}\n  ProxyJump kh-alias\n{common}"
            f"Host kh-revoked\n{common}")
        topology = Topology(bastion, behind, config)
        topology.revoked = revoked
        yield topology
    finally:
        behind.close()
        bastion.close()


@pytest.fixture(scope="module")
def ssh_config_gateway(gateway_factory: Callable[..., Gateway], topology: Topology) -> Gateway:
    # Every SSH setting the other gateways take from EG_* variables is left to the file here.
    unset = {name: None for name in ("EG_SSH_PORT", "EG_REMOTE_USER", "EG_SSH_IDENTITY_FILE",
                                     "EG_SSH_KNOWN_HOSTS", "EG_SSH_HOST_KEY_POLICY")}  # fmt: skip
    gw = gateway_factory("ssh-config", remote_hosts=["kh-alias"], private_ssh_config=False,
                         env={**unset, "EG_SSH_CONFIG": str(topology.config)})  # fmt: skip
    require_native(gw)
    return gw


def test_the_gateway_cannot_reach_the_host_behind_the_bastion(topology: Topology) -> None:
    with pytest.raises(OSError):
        socket.create_connection((topology.behind.address, topology.behind.sshd.port), timeout=2).close()
    assert harness.port_accepts(topology.bastion.address, topology.bastion.sshd.port)


def test_kernel_on_an_ssh_config_alias_runs_through_eg(ssh_config_gateway: Gateway, topology: Topology) -> None:
    gw = ssh_config_gateway
    client = gw.client(timeout=120)
    try:
        kernel = client.start_kernel("egt", timeout=120)  # EG_REMOTE_HOSTS names the alias only
        assert kernel.execute("print(6 * 7)").stdout == "42\n"
        status = kernel_status(gw, kernel)
        assert status["assigned_host"] == "kh-alias" and status["assigned_ip"] == topology.bastion.address
        conns = [c for c in gw.status()["connections"] if c["host"] == topology.bastion.address]
        assert [(c["user"], c["port"], c["via"]) for c in conns] == [
            (topology.bastion.sshd.user, topology.bastion.sshd.port, None)]
        kernel.delete()
    finally:
        client.close()
    wait_for(lambda: not kernel_side_procs(topology.bastion), 30, what="nothing left on the alias host")


def test_kernel_behind_a_bastion_starts_via_proxyjump_and_recovers(ssh_config_gateway: Gateway, topology: Topology) -> None:
    gw = ssh_config_gateway
    behind, bastion = topology.behind, topology.bastion
    client = gw.client(timeout=120)
    try:
        started = time.monotonic()
        kernel = client.start_kernel("egt", env={"KERNEL_REMOTE_HOST": "kh-behind"}, timeout=120)
        start_seconds = time.monotonic() - started
        assert kernel.execute("state = 41; print('behind')").stdout == "behind\n"
        assert kernel_status(gw, kernel)["assigned_ip"] == behind.address
        conns = {(c["host"], c["port"]): c for c in gw.status()["connections"]}
        inner = conns[(behind.address, behind.sshd.port)]
        outer = conns[(bastion.address, bastion.sshd.port)]
        assert inner["via"] == topology.dest(bastion) and inner["alive"]
        assert outer["relays"] >= 1 and outer["via"] is None and outer["alive"]
        assert {f["channel"] for f in inner["forwards"]} == {"SHELL", "IOPUB", "STDIN", "HB", "CONTROL", "EG_COMM"}
        assert gw.ssh_children() == []

        # The bastion's sshd restarts, killing the sessions that carried the kernel's connection.
        bastion.sshd.restart(kill_sessions=True)
        cut = time.monotonic()
        recovered = None
        while time.monotonic() - cut < RECOVERY_BUDGET:
            try:
                if kernel.execute("print(state + 1)", timeout=2.5).stdout == "42\n":
                    recovered = time.monotonic() - cut
                    break
            except TimeoutError:
                continue
        assert recovered is not None, f"no cell through the bastion within {RECOVERY_BUDGET} s"
        conns = {(c["host"], c["port"]): c for c in gw.status()["connections"]}
        assert conns[(behind.address, behind.sshd.port)]["reconnects"] >= 1
        assert kernel.lifecycle_states == [], "the gateway restarted or gave up on a healthy kernel"
        kernel.delete()
    finally:
        client.close()
    wait_for(lambda: not kernel_side_procs(behind), 30, what="nothing left on the host behind the bastion")
    report("proxyjump", start=start_seconds, recovery=recovered)


def test_check_walks_both_hops_to_the_host_behind_the_bastion(topology: Topology, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EG_")}
    env["EG_SSH_CONFIG"] = str(topology.config)
    r = subprocess.run([sys.executable, "-m", "egtunnel", "check", "kh-behind", "--cull-idle-timeout", "300"],
                       env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
    print(r.stdout)
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    assert f"Route: gateway -> {topology.dest(topology.bastion)} -> {topology.dest(topology.behind)}  (ProxyJump)" in out
    assert "[ ok ] 1/2 TCP connect" in out and "[ ok ] 2/2 channel through the previous hop" in out
    assert f"{topology.config}:" in out and "proxyjump" in out
    assert "Result: OK, all 10 steps passed" in out
    # The host itself is out of the gateway's reach: a check without the hop fails at TCP connect.
    r = subprocess.run([sys.executable, "-m", "egtunnel", "check", topology.behind.address, "--port",
                        str(topology.behind.sshd.port), "--ssh-config", "none"],
                       env={**env, "EG_SSH_CONNECT_TIMEOUT": "2"}, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode == 1 and "[FAIL] TCP connect" in r.stdout, r.stdout


def test_a_kernel_start_on_a_revoked_host_key_fails_naming_the_line(ssh_config_gateway: Gateway, topology: Topology) -> None:
    gw = ssh_config_gateway
    client = gw.client(timeout=120)
    try:
        with pytest.raises(GatewayError) as failure:
            client.start_kernel("egt", env={"KERNEL_REMOTE_HOST": "kh-revoked"}, timeout=120)
    finally:
        client.close()
    error = failure.value
    # A refused host key is a 403 in egtunnel, as an unknown or changed one (EG's own refusal status).
    assert error.status == 403, error
    assert f"{topology.revoked}:1" in error.reason and "revoked" in error.reason, error.reason
    assert not kernel_side_procs(topology.bastion)
    report("revoked host key", status=error.status, reason=error.reason[:300])
