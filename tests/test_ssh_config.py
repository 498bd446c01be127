"""egtunnel follows the OpenSSH client configuration, against real sshd servers on loopback: aliases,
precedence of explicit settings, StrictHostKeyChecking accept-new, errors naming file and line,
ProxyJump through a real hop, and `python -m egtunnel check` with its exit codes.
"""

from __future__ import annotations

import logging
import re
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import egtunnel
import harness
from egtunnel.config import parse_ssh_settings


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _alias_block(name: str, server: harness.SshServer, known_hosts: Path, **extra: str) -> str:
    lines = [
        f"Host {name}",
        f"  HostName {server.host}",
        f"  Port {server.port}",
        f"  User {server.user}",
        f"  IdentityFile {server.identity_file}",
        f"  UserKnownHostsFile {known_hosts}",
    ]
    lines += [f"  {k} {v}" for k, v in extra.items()]
    return "\n".join(lines) + "\n"


def test_alias_supplies_hostname_port_user_identity_and_known_hosts(sshd: harness.SshServer, tmp_path: Path) -> None:
    kh = sshd.write_known_hosts(tmp_path / "known_hosts")
    cfg = _write(tmp_path / "ssh_config", _alias_block("kernel-host", sshd, kh))
    target = egtunnel.SshTarget("kernel-host", ssh_config=str(cfg))
    assert target.destination == f"{sshd.user}@{sshd.host}:{sshd.port}"
    assert target.host_name == sshd.host
    assert target.jumps == []
    assert target.exec("echo through-the-alias").lines() == ["through-the-alias"]
    # The same through the module-level calls, which every other entry point shares.
    assert egtunnel.remote_exec("kernel-host", "echo again", ssh_config=str(cfg)).lines() == ["again"]


def test_explicit_settings_win_over_the_file(sshd: harness.SshServer, tmp_path: Path) -> None:
    kh = sshd.write_known_hosts(tmp_path / "known_hosts")
    closed = harness.free_port()
    cfg = _write(tmp_path / "ssh_config", (
        f"Host kernel-host\n  HostName {sshd.host}\n  Port {closed}\n  User nobody\n"
        f"  IdentityFile {sshd.wrong_identity_file}\n  UserKnownHostsFile {kh}\n  ConnectTimeout 3\n"))  # fmt: skip
    # The file alone points at a closed port.
    with pytest.raises(egtunnel.SshConnectError) as failure:
        egtunnel.SshTarget("kernel-host", ssh_config=str(cfg)).exec("true")
    assert f"nobody@{sshd.host}:{closed}" in str(failure.value)
    # Explicit port, user and identity (EG_SSH_PORT, EG_REMOTE_USER, EG_SSH_IDENTITY_FILE) win.
    target = egtunnel.SshTarget("kernel-host", ssh_config=str(cfg), port=sshd.port, user=sshd.user,
                                identity_file=str(sshd.identity_file))  # fmt: skip
    assert target.destination == f"{sshd.user}@{sshd.host}:{sshd.port}"
    assert target.exec("echo explicit").lines() == ["explicit"]
    # The same through the gateway's settings, as the proxies build them from EG_* variables.
    env = {"EG_SSH_CONFIG": str(cfg), "EG_SSH_PORT": str(sshd.port), "EG_SSH_IDENTITY_FILE": str(sshd.identity_file)}
    ssh = parse_ssh_settings(env, user=sshd.user)
    assert ssh.port == sshd.port and ssh.ssh_config == str(cfg) and ssh.known_hosts is None
    target = egtunnel.SshTarget("kernel-host", **ssh.native_kwargs())
    assert target.destination == f"{sshd.user}@{sshd.host}:{sshd.port}"  # HostName and known hosts from the file
    assert target.exec("echo from-eg-settings").lines() == ["from-eg-settings"]


def test_accept_new_from_the_file_records_an_unknown_key(sshd: harness.SshServer, tmp_path: Path) -> None:
    kh = _write(tmp_path / "known_hosts", "")
    strict = _write(tmp_path / "strict", _alias_block("kernel-host", sshd, kh))
    with pytest.raises(egtunnel.HostKeyError) as failure:
        egtunnel.SshTarget("kernel-host", ssh_config=str(strict)).exec("true")
    assert str(kh) in str(failure.value)
    assert kh.read_text() == ""
    accept = _write(tmp_path / "accept", _alias_block("kernel-host", sshd, kh, StrictHostKeyChecking="accept-new"))
    assert egtunnel.SshTarget("kernel-host", ssh_config=str(accept)).exec("echo ok").lines() == ["ok"]
    recorded = kh.read_text()
    assert f"[{sshd.host}]:{sshd.port}" in recorded and sshd.host_public_key.split()[1] in recorded
    # The explicit policy still wins over the file.
    kh.write_text("")
    with pytest.raises(egtunnel.HostKeyError):
        egtunnel.SshTarget("kernel-host", ssh_config=str(accept), host_key_policy="strict").exec("true")


def test_malformed_file_fails_naming_file_and_line(tmp_path: Path) -> None:
    cfg = _write(tmp_path / "ssh_config", "# kernel hosts\nHost kernel-host\n  HostName 10.0.0.1\n  Port twenty-two\n")
    with pytest.raises(egtunnel.SshConfigError) as failure:
        egtunnel.SshTarget("kernel-host", ssh_config=str(cfg))
    assert f"{cfg}:4" in str(failure.value), failure.value
    assert isinstance(failure.value, ValueError)
    bad_value = _write(tmp_path / "bad_value", "Host *\n  User u\n  StrictHostKeyChecking sometimes\n")
    with pytest.raises(egtunnel.SshConfigError) as failure:
        egtunnel.SshTarget("kernel-host", ssh_config=str(bad_value))
    assert f"{bad_value}:3" in str(failure.value) and "StrictHostKeyChecking" in str(failure.value)
    with pytest.raises(ValueError, match="does not exist"):
        egtunnel.SshTarget("kernel-host", ssh_config=str(tmp_path / "missing"))
    # `none` reads no file at all: the name is the host.
    assert egtunnel.SshTarget("kernel-host", ssh_config="none", port=22, user="u").destination == "u@kernel-host:22"


def test_unsupported_options_are_ignored_with_one_debug_line(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cfg = _write(tmp_path / "ssh_config", "Host kernel-host\n  HostName 10.0.0.1\n  ForwardAgent yes\n  VisualHostKey yes\n")
    caplog.set_level(logging.DEBUG, logger="egtunnel")
    egtunnel.refresh_log_levels()
    for _ in range(3):
        assert egtunnel.SshTarget("kernel-host", ssh_config=str(cfg), user="u").host_name == "10.0.0.1"
    for option in ("forwardagent", "visualhostkey"):
        lines = [r.getMessage() for r in caplog.records if option in r.getMessage()]
        assert len(lines) == 1, lines
        assert "not supported by egtunnel" in lines[0] and str(cfg) in lines[0]


def _jump_config(tmp_path: Path, hop: harness.SshServer, host: harness.SshServer) -> tuple[Path, Path]:
    kh = _write(tmp_path / "known_hosts", hop.known_hosts_line() + host.known_hosts_line())
    cfg = _write(tmp_path / "ssh_config", (
        _alias_block("bastion", hop, kh) + f"Host behind\n  HostName {host.host}\n  Port {host.port}\n"
        f"  User {host.user}\n  IdentityFile {host.identity_file}\n  UserKnownHostsFile {kh}\n  ProxyJump bastion\n"))  # fmt: skip
    return cfg, kh


def _connections(host: str, port: int) -> list[dict]:
    return [c for c in egtunnel.status() if c["host"] == host and c["port"] == port]


def test_proxyjump_runs_the_session_through_the_hop_and_heals(sshd_factory, tmp_path: Path) -> None:
    hop, host = sshd_factory(), sshd_factory()
    cfg, _ = _jump_config(tmp_path, hop, host)
    target = egtunnel.SshTarget("behind", ssh_config=str(cfg))
    assert target.jumps == [f"{hop.user}@{hop.host}:{hop.port}"]
    assert target.exec("echo behind").lines() == ["behind"]
    # Both hops are pooled connections; the host's names the hop it runs through.
    (inner,) = _connections(host.host, host.port)
    (outer,) = _connections(hop.host, hop.port)
    assert inner["via"] == f"{hop.user}@{hop.host}:{hop.port}" and inner["alive"]
    assert outer["relays"] == 1 and outer["via"] is None
    assert hop.established_connections() == 1
    # The hop's sshd restarts with its sessions killed: the relayed connection comes back through it.
    hop.restart(kill_sessions=True)
    deadline = time.monotonic() + 30
    while True:
        try:
            assert target.exec("echo again", 5.0).lines() == ["again"]
            break
        except (egtunnel.TunnelError, AssertionError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def test_proxyjump_hop_failure_names_the_hop(sshd_factory, tmp_path: Path) -> None:
    hop, host = sshd_factory(), sshd_factory()
    cfg, _ = _jump_config(tmp_path, hop, host)
    hop.authorized_keys.write_text("")
    with pytest.raises(egtunnel.SshAuthError) as failure:
        egtunnel.SshTarget("behind", ssh_config=str(cfg)).exec("true")
    assert f"@{hop.host}:{hop.port}" in str(failure.value)


# -- python -m egtunnel check ----------------------------------------------------------------------


def _check(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "egtunnel", "check", *args], env={**os.environ, **env},
                          capture_output=True, text=True, timeout=120)  # fmt: skip


def test_check_passes_every_step_and_prints_origins_route_and_keepalive(sshd: harness.SshServer, tmp_path: Path) -> None:
    kh = sshd.write_known_hosts(tmp_path / "known_hosts")
    cfg = _write(tmp_path / "ssh_config", _alias_block("kernel-host", sshd, kh))
    gateway_config = _write(tmp_path / "gateway_config.py", "c.MappingKernelManager.cull_idle_timeout = 120\n")
    r = _check("kernel-host", "--config", str(gateway_config), env={"EG_SSH_CONFIG": str(cfg), "EG_REMOTE_PWD": "pw-secret"})
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    assert f"hostname                 {sshd.host}" in out and f"{cfg}:2" in out
    assert f"{cfg}:3" in out and f"{cfg}:6" in out  # Port and UserKnownHostsFile lines
    assert f"Route: gateway -> {sshd.user}@{sshd.host}:{sshd.port}" in out
    for step in ("TCP connect", "SSH handshake", "host key", "authentication", "test channel", "remote command"):
        assert f"[ ok ] {step}" in out, out
    assert f"SHA256:" in out and f"matches {kh}:1" in out
    assert f"publickey {sshd.identity_file}" in out
    assert "SHELL    180 s" in out and "CONTROL  3153600000 s" in out and f"from {gateway_config}" in out
    assert "Result: OK, all 6 steps passed" in out
    assert "pw-secret" not in out + r.stderr


def test_check_unknown_host_key_fails_and_says_what_to_do(sshd: harness.SshServer, tmp_path: Path) -> None:
    r = _check(sshd.host, "--port", str(sshd.port), "--identity-file", str(sshd.identity_file),
               "--known-hosts", str(sshd.empty_known_hosts()), env={"EG_SSH_CONFIG": "none"})  # fmt: skip
    assert r.returncode == 1, r.stdout
    assert "[ ok ] SSH handshake" in r.stdout and "[FAIL] host key" in r.stdout
    assert "ssh-keyscan" in r.stdout and "accept-new" in r.stdout
    assert "authentication" not in r.stdout.split("[FAIL] host key", 1)[1].split("Keep-alive")[0]
    assert "Result: FAILED at host key" in r.stdout


def test_check_changed_host_key_names_the_offending_line(sshd: harness.SshServer, tmp_path: Path) -> None:
    kh = _write(tmp_path / "known_hosts", "# recorded earlier\n" + sshd.known_hosts_line())
    sshd.regenerate_host_key()
    r = _check(sshd.host, "--port", str(sshd.port), "--identity-file", str(sshd.identity_file),
               "--known-hosts", str(kh), env={"EG_SSH_CONFIG": "none"})  # fmt: skip
    assert r.returncode == 1, r.stdout
    assert "[FAIL] host key" in r.stdout and "differs" in r.stdout and f"{kh}:2" in r.stdout, r.stdout


def test_check_unreachable_host_fails_at_tcp_connect(tmp_path: Path) -> None:
    closed = harness.free_port()
    r = _check("127.0.0.1", "--port", str(closed), "--user", "u", env={"EG_SSH_CONFIG": "none"})
    assert r.returncode == 1, r.stdout
    assert "[FAIL] TCP connect" in r.stdout and f"u@127.0.0.1:{closed}" in r.stdout and "refused" in r.stdout.lower()


def test_check_reports_a_malformed_config(tmp_path: Path) -> None:
    cfg = _write(tmp_path / "ssh_config", "Host x\n  Port 0x16\n")
    r = _check("x", env={"EG_SSH_CONFIG": str(cfg)})
    assert r.returncode == 1 and f"{cfg}:2" in r.stdout, r.stdout


def test_the_hop_keeps_alive_as_often_as_the_sessions_through_it(sshd_factory, tmp_path: Path) -> None:
    hop, host = sshd_factory(), sshd_factory()
    cfg, _ = _jump_config(tmp_path, hop, host)
    target = egtunnel.SshTarget("behind", ssh_config=str(cfg))
    (tunnel,) = target.open_forwards([("SHELL", host.host, host.port)], cull_idle_timeout=300)
    try:
        (inner,) = _connections(host.host, host.port)
        # The hop learns the session's policy when the session's own interval changes, asynchronously.
        deadline = time.monotonic() + 5
        while _connections(hop.host, hop.port)[0]["keep_alive_interval"] != 360 and time.monotonic() < deadline:
            time.sleep(0.05)
        (outer,) = _connections(hop.host, hop.port)
        assert inner["keep_alive_interval"] == 360 and outer["keep_alive_interval"] == 360, (inner, outer)
    finally:
        tunnel.terminate()


def test_known_hosts_keyed_by_address_still_match_a_host_named_by_name(sshd: harness.SshServer, tmp_path: Path) -> None:
    # Enterprise Gateway's own tunnels connect to addresses, so operators' known_hosts often name hosts
    # that way; a host egtunnel reaches by name (an alias, EG_REMOTE_HOSTS) must still match them.
    assert sshd.host == "127.0.0.1"
    by_address = _write(tmp_path / "by_address", sshd.known_hosts_line())
    target = egtunnel.SshTarget("localhost", port=sshd.port, user=sshd.user, identity_file=str(sshd.identity_file),
                                known_hosts=str(by_address), ssh_config="none")  # fmt: skip
    assert target.exec("echo by-address").lines() == ["by-address"]
    # A different key recorded under the name itself is still a changed key.
    other = harness.SshServer(workdir=tmp_path / "other")
    try:
        wrong = other.known_hosts_line().replace(f"[{other.host}]:{other.port}", f"[localhost]:{sshd.port}")
    finally:
        other.close()
    conflicting = _write(tmp_path / "conflicting", wrong + sshd.known_hosts_line())
    with pytest.raises(egtunnel.HostKeyError, match="differs"):
        egtunnel.SshTarget("localhost", port=sshd.port, user=sshd.user, identity_file=str(sshd.identity_file),
                           known_hosts=str(conflicting), ssh_config="none").exec("true")  # fmt: skip


# -- host keys: never trusting less than OpenSSH ------------------------------------------------------


_RACER = """
import os, sys, time
import egtunnel
barrier = sys.argv[2]
while not os.path.exists(barrier):
    time.sleep(0.001)
print(egtunnel.SshTarget("kernel-host", ssh_config=sys.argv[1]).exec("echo connected").lines()[0], flush=True)
"""


def test_three_concurrent_first_connections_record_one_key(sshd: harness.SshServer, tmp_path: Path) -> None:
    # Three gateway processes meet a host for the first time at the same moment, with accept-new: one
    # records the key (under flock, in a new 0700 directory and 0600 file), the others verify against it.
    kh = tmp_path / "fresh" / "ssh" / "known_hosts"
    cfg = _write(tmp_path / "ssh_config", _alias_block("kernel-host", sshd, kh, StrictHostKeyChecking="accept-new"))
    barrier = tmp_path / "go"
    racers = [subprocess.Popen([sys.executable, "-c", _RACER, str(cfg), str(barrier)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True) for _ in range(3)]  # fmt: skip
    time.sleep(1.0)  # all three imported egtunnel and wait for the barrier
    barrier.write_text("")
    outputs = [p.communicate(timeout=60) for p in racers]
    assert [p.returncode for p in racers] == [0, 0, 0], outputs
    assert [o.strip() for o, _ in outputs] == ["connected"] * 3
    lines = kh.read_text().splitlines()
    assert len(lines) == 1 and sshd.host_public_key.split()[1] in lines[0], lines
    assert kh.stat().st_mode & 0o777 == 0o600
    assert kh.parent.stat().st_mode & 0o777 == 0o700


def test_a_revoked_key_is_refused_naming_the_line(sshd: harness.SshServer, tmp_path: Path) -> None:
    kh = _write(tmp_path / "known_hosts", "# revoked after the incident\n"
                f"@revoked * {sshd.host_public_key}\n" + sshd.known_hosts_line())  # fmt: skip
    before = kh.read_text()
    for policy in ("yes", "accept-new"):
        cfg = _write(tmp_path / f"ssh_config.{policy}", _alias_block("kernel-host", sshd, kh, StrictHostKeyChecking=policy))
        with pytest.raises(egtunnel.HostKeyError) as failure:
            egtunnel.SshTarget("kernel-host", ssh_config=str(cfg)).exec("true")
        assert f"{kh}:2" in str(failure.value) and "revoked" in str(failure.value), failure.value
    # Revoked and nothing else: accept-new must not record it either.
    only = _write(tmp_path / "only_revoked", f"@revoked * {sshd.host_public_key}\n")
    cfg = _write(tmp_path / "ssh_config.only", _alias_block("kernel-host", sshd, only, StrictHostKeyChecking="no"))
    with pytest.raises(egtunnel.HostKeyError, match="revoked"):
        egtunnel.SshTarget("kernel-host", ssh_config=str(cfg)).exec("true")
    assert only.read_text() == f"@revoked * {sshd.host_public_key}\n"
    assert kh.read_text() == before
    r = _check("kernel-host", env={"EG_SSH_CONFIG": str(tmp_path / "ssh_config.yes")})
    assert r.returncode == 1 and "[FAIL] host key" in r.stdout and f"{kh}:2" in r.stdout, r.stdout


def test_a_host_trusted_through_a_cert_authority_is_refused_clearly(sshd: harness.SshServer, tmp_path: Path) -> None:
    other = harness.SshServer(workdir=tmp_path / "ca")
    try:
        ca_key = other.host_public_key
    finally:
        other.close()
    kh = _write(tmp_path / "known_hosts", f"@cert-authority [{sshd.host}]:*,*.lab {ca_key}\n")
    cfg = _write(tmp_path / "ssh_config", _alias_block("kernel-host", sshd, kh, StrictHostKeyChecking="accept-new"))
    with pytest.raises(egtunnel.HostKeyError) as failure:
        egtunnel.SshTarget("kernel-host", ssh_config=str(cfg)).exec("true")
    assert "certificate authority" in str(failure.value) and f"{kh}:1" in str(failure.value), failure.value
    assert kh.read_text().count("\n") == 1  # nothing recorded on trust OpenSSH would have checked against the CA
    # The host's own key next to it is what egtunnel can verify.
    kh.write_text(kh.read_text() + sshd.known_hosts_line())
    assert egtunnel.SshTarget("kernel-host", ssh_config=str(cfg)).exec("echo own-key").lines() == ["own-key"]


def test_hashed_known_hosts_keep_working(sshd: harness.SshServer, tmp_path: Path) -> None:
    kh = sshd.write_known_hosts(tmp_path / "known_hosts")
    subprocess.run(["ssh-keygen", "-H", "-f", str(kh)], check=True, capture_output=True)
    assert kh.read_text().startswith("|1|")
    cfg = _write(tmp_path / "ssh_config", _alias_block("kernel-host", sshd, kh))
    assert egtunnel.SshTarget("kernel-host", ssh_config=str(cfg)).exec("echo hashed").lines() == ["hashed"]


def test_wildcard_known_hosts_lines_are_matched_as_openssh_matches_them(sshd: harness.SshServer, tmp_path: Path) -> None:
    # libssh2 reads host patterns literally; OpenSSH applies `*`, `?` and `!`. A key recorded for a
    # pattern the host matches must verify it, and a different key under such a pattern must be refused.
    other = harness.SshServer(workdir=tmp_path / "other")
    try:
        wrong_key = other.host_public_key
    finally:
        other.close()
    ktype, kb64 = sshd.host_public_key.split()[:2]
    pattern = f"[{sshd.host.rsplit('.', 1)[0]}.*]:{sshd.port}"
    good = _write(tmp_path / "known_hosts.good", f"{pattern},!*.invalid {ktype} {kb64}\n")
    cfg = _write(tmp_path / "ssh_config.good", _alias_block("kernel-host", sshd, good, StrictHostKeyChecking="yes"))
    assert egtunnel.SshTarget("kernel-host", ssh_config=str(cfg)).exec("echo by-pattern").lines() == ["by-pattern"]
    assert ssh_accepts(sshd, good)
    bad = _write(tmp_path / "known_hosts.bad", f"{pattern} {wrong_key}\n")
    cfg = _write(tmp_path / "ssh_config.bad", _alias_block("kernel-host", sshd, bad, StrictHostKeyChecking="accept-new"))
    with pytest.raises(egtunnel.HostKeyError) as failure:
        egtunnel.SshTarget("kernel-host", ssh_config=str(cfg)).exec("true")
    assert "differs" in str(failure.value) and f"{bad}:1" in str(failure.value), failure.value
    assert bad.read_text() == f"{pattern} {wrong_key}\n"  # accept-new recorded nothing beside it
    assert not ssh_accepts(sshd, bad)
    # A negated pattern vetoes the line: the host is then unknown, and accept-new records it.
    vetoed = _write(tmp_path / "known_hosts.vetoed", f"{pattern},![{sshd.host}]:{sshd.port} {wrong_key}\n")
    cfg = _write(tmp_path / "ssh_config.vetoed", _alias_block("kernel-host", sshd, vetoed, StrictHostKeyChecking="accept-new"))
    assert egtunnel.SshTarget("kernel-host", ssh_config=str(cfg)).exec("echo vetoed").lines() == ["vetoed"]
    assert kb64 in vetoed.read_text()


def ssh_accepts(server: harness.SshServer, known_hosts: Path) -> bool:
    """What OpenSSH itself says of the same known_hosts file (StrictHostKeyChecking yes)."""
    return server.ssh("true", known_hosts=known_hosts, timeout=30).returncode == 0


def test_strict_host_key_checking_no_records_unknown_and_refuses_changed(sshd_factory, tmp_path: Path) -> None:
    server = sshd_factory()
    kh = _write(tmp_path / "known_hosts", "")
    cfg = _write(tmp_path / "ssh_config", _alias_block("kernel-host", server, kh, StrictHostKeyChecking="no"))
    assert egtunnel.SshTarget("kernel-host", ssh_config=str(cfg)).exec("echo recorded").lines() == ["recorded"]
    assert server.host_public_key.split()[1] in kh.read_text()
    server.regenerate_host_key()
    # OpenSSH's `no` would connect with forwarding disabled, which leaves a tunnel nothing to carry.
    cfg2 = _write(tmp_path / "ssh_config2", _alias_block("kernel-host", server, kh, StrictHostKeyChecking="no",
                                                         ConnectTimeout="4"))  # fmt: skip
    with pytest.raises(egtunnel.HostKeyError, match="differs"):
        egtunnel.SshTarget("kernel-host", ssh_config=str(cfg2)).exec("true")


def test_host_key_checks_off_only_from_egtunnels_setting_and_warned_once(sshd: harness.SshServer, tmp_path: Path,
                                                                       caplog: pytest.LogCaptureFixture) -> None:  # fmt: skip
    caplog.set_level(logging.WARNING, logger="egtunnel")
    egtunnel.refresh_log_levels()
    cfg = _write(tmp_path / "ssh_config", _alias_block("kernel-host", sshd, tmp_path / "none_here",
                                                       StrictHostKeyChecking="off"))  # fmt: skip
    rows, _ = egtunnel._native.explain("kernel-host", ssh_config=str(cfg))
    assert dict((k, v) for k, v, _ in rows)["stricthostkeychecking"].startswith("accept-new")
    for i in range(2):
        target = egtunnel.SshTarget("kernel-host", ssh_config=str(cfg), host_key_policy="off", connect_timeout=5.0 + i)
        assert target.exec("echo unchecked").lines() == ["unchecked"]
    warnings = [r.getMessage() for r in caplog.records if "not checked" in r.getMessage()]
    assert len(warnings) == 1 and f"{sshd.user}@{sshd.host}:{sshd.port}" in warnings[0], warnings


def test_edits_to_an_included_file_are_noticed(tmp_path: Path) -> None:
    conf_d = tmp_path / "conf.d"
    conf_d.mkdir()
    _write(conf_d / "10-port.conf", "Port 2201\n")
    cfg = _write(tmp_path / "ssh_config", f"Host kernel-host\n  HostName 10.0.0.1\n  Include {conf_d}/*.conf\n")
    assert egtunnel.SshTarget("kernel-host", ssh_config=str(cfg), user="u").destination == "u@10.0.0.1:2201"
    _write(conf_d / "10-port.conf", "Port 22022\n")
    assert egtunnel.SshTarget("kernel-host", ssh_config=str(cfg), user="u").destination == "u@10.0.0.1:22022"
    # A new file matching the glob comes first in glob order: its value wins, as in OpenSSH.
    _write(conf_d / "05-port.conf", "Port 2305\n")
    assert egtunnel.SshTarget("kernel-host", ssh_config=str(cfg), user="u").destination == "u@10.0.0.1:2305"


def test_algorithms_are_applied_and_check_prints_what_was_negotiated(sshd: harness.SshServer, tmp_path: Path) -> None:
    kh = sshd.write_known_hosts(tmp_path / "known_hosts")
    cfg = _write(tmp_path / "ssh_config", _alias_block("kernel-host", sshd, kh, Ciphers="aes256-ctr,aes128-ctr",
                                                       MACs="umac-64@openssh.com,hmac-sha2-512"))  # fmt: skip
    r = _check("kernel-host", env={"EG_SSH_CONFIG": str(cfg)})
    assert r.returncode == 0, r.stdout + r.stderr
    assert "ciphers aes256-ctr;" in r.stdout and "macs hmac-sha2-512" in r.stdout, r.stdout
    # OpenSSH's umac is not in libssh2: the usable rest of the list is offered, in OpenSSH's order.
    assert re.search(r"macs\s+hmac-sha2-512\s", r.stdout), r.stdout


@pytest.mark.parametrize("line", ["KexAlgorithms sntrup761x25519-sha512@openssh.com", "MACs umac-128-etm@openssh.com"])
def test_algorithm_lists_libssh2_cannot_meet_are_refused_at_their_line(tmp_path: Path, line: str) -> None:
    cfg = _write(tmp_path / "ssh_config", f"Host kernel-host\n  HostName 10.0.0.1\n  {line}\n")
    with pytest.raises(egtunnel.SshConfigError) as failure:
        egtunnel.SshTarget("kernel-host", ssh_config=str(cfg), user="u")
    assert f"{cfg}:3" in str(failure.value) and line.split()[0].lower() in str(failure.value), failure.value


def test_constructs_egtunnel_cannot_apply_are_refused_at_their_line(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    cfg = _write(tmp_path / "ssh_config", f"Host kernel-host\n  User u\nMatch exec \"touch {marker}\"\n  Port 2\n")
    with pytest.raises(egtunnel.SshConfigError, match=f"{cfg}:3: Match exec"):
        egtunnel.SshTarget("kernel-host", ssh_config=str(cfg))
    assert not marker.exists()  # refused before OpenSSH could run it
    cfg = _write(tmp_path / "proxy", "Host kernel-host\n  ProxyCommand nc %h %p\n")
    with pytest.raises(egtunnel.SshConfigError, match=f"{cfg}:2: proxycommand"):
        egtunnel.SshTarget("kernel-host", ssh_config=str(cfg))


def test_a_host_known_by_another_key_type_presents_that_key(sshd_factory, tmp_path: Path) -> None:
    # The server has an ECDSA key besides its Ed25519 one, and only the ECDSA key is recorded. OpenSSH
    # prefers the algorithms of recorded keys, so it verifies the host; egtunnel must too, rather than
    # take the Ed25519 key for unknown (and, under accept-new, record a second key unverified).
    ecdsa = tmp_path / "ssh_host_ecdsa_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ecdsa", "-N", "", "-f", str(ecdsa)], check=True)
    server = sshd_factory(extra_config=[f"HostKey {ecdsa}"])
    ecdsa_public = " ".join(ecdsa.with_suffix(".pub").read_text().split()[:2])
    kh = _write(tmp_path / "known_hosts", f"{server.known_hosts_name} {ecdsa_public}\n")
    for policy in ("yes", "accept-new"):
        cfg = _write(tmp_path / f"ssh_config.{policy}", _alias_block("kernel-host", server, kh, StrictHostKeyChecking=policy))
        assert egtunnel.SshTarget("kernel-host", ssh_config=str(cfg)).exec("echo known-type").lines() == ["known-type"]
    assert kh.read_text() == f"{server.known_hosts_name} {ecdsa_public}\n"


def test_password_authentication_no_is_honoured_and_shown(sshd: harness.SshServer, tmp_path: Path) -> None:
    # EG_REMOTE_PWD is not sent where the file says PasswordAuthentication no (check shows it); keys still work.
    kh = sshd.write_known_hosts(tmp_path / "known_hosts")
    cfg = _write(tmp_path / "ssh_config", _alias_block("kernel-host", sshd, kh, PasswordAuthentication="no"))
    rows, _ = egtunnel._native.explain("kernel-host", ssh_config=str(cfg))
    assert ("passwordauthentication", "no (EG_REMOTE_PWD is not sent)", f"{cfg}:7") in rows, rows
    target = egtunnel.SshTarget("kernel-host", ssh_config=str(cfg), password="never-sent")
    assert target.exec("echo key-only").lines() == ["key-only"]
