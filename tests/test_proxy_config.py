"""Settings of the EG process proxies: parsing, validation, the tunneling decision and the keep-alive
interval each channel gets. No SSH is involved: proxies are real EG objects (gateway app, mapping kernel
manager, kernel manager) constructed without launching anything.
"""

from __future__ import annotations

import asyncio
import os

import pytest
from enterprise_gateway.enterprisegatewayapp import EnterpriseGatewayApp
from enterprise_gateway.services.kernels.remotemanager import (
    RemoteKernelManager,
    RemoteMappingKernelManager,
)
from enterprise_gateway.services.processproxies import processproxy as eg_processproxy
from tornado import web

import egtunnel
from egtunnel import config
from egtunnel.config import SettingError, SshSettings, TunnelSettings

MAX = 100 * 365 * 24 * 60 * 60
BUSY = ("SHELL", "IOPUB", "STDIN", "HB")
QUIET = ("CONTROL", "EG_COMM")

ENV_NAMES = (
    "EG_SSH_PORT",
    "EG_SSH_KNOWN_HOSTS",
    "EG_SSH_HOST_KEY_POLICY",
    "EG_SSH_IDENTITY_FILE",
    "EG_SSH_CONNECT_TIMEOUT",
    "EG_SSH_TUNNEL_MODE",
    "EG_SSH_KEEPALIVE_MARGIN",
    "EG_SSH_KEEPALIVE_COUNT_MAX",
    "EG_REMOTE_USER",
    "EG_REMOTE_PWD",
    "EG_REMOTE_GSS_SSH",
    "EG_SSH_CONFIG",
)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    # The developer's or CI's shell must not leak settings into these tables.
    for name in ENV_NAMES:
        monkeypatch.delenv(name, raising=False)


# ------------------------------------------------------------------------------------------ tunneling

@pytest.mark.parametrize(
    ("proxy_config", "eg_default", "expected"),
    [
        ({}, False, False),
        ({}, True, True),
        (None, True, True),
        ({"tunneling": None}, True, True),
        ({"tunneling": True}, False, True),
        ({"tunneling": False}, True, False),
        ({"tunneling": "true"}, False, True),
        ({"tunneling": "TRUE"}, False, True),
        ({"tunneling": " False "}, True, False),
    ],
)
def test_tunneling_kernelspec_overrides_eg(proxy_config, eg_default, expected):
    assert config.parse_tunneling(proxy_config, eg_default) is expected


@pytest.mark.parametrize("value", ["yes", "on", "1", "", 1, 0, [True]])
def test_tunneling_rejects_non_booleans(value):
    with pytest.raises(SettingError) as info:
        config.parse_tunneling({"tunneling": value}, False)
    assert "kernelspec process_proxy.config.tunneling" in str(info.value)
    assert repr(value) in str(info.value)


# -------------------------------------------------------------------------------- tunnel settings

@pytest.mark.parametrize(
    ("env", "proxy_config", "expected"),
    [
        ({}, {}, TunnelSettings("shared", 60, None)),
        ({}, None, TunnelSettings("shared", 60, None)),
        ({"EG_SSH_TUNNEL_MODE": "per-port"}, {}, TunnelSettings("per-port", 60, None)),
        ({"EG_SSH_TUNNEL_MODE": " Shared "}, {}, TunnelSettings("shared", 60, None)),
        ({"EG_SSH_TUNNEL_MODE": "shared"}, {"tunnel_mode": "per-port"}, TunnelSettings("per-port", 60, None)),
        ({"EG_SSH_TUNNEL_MODE": "per-port"}, {"tunnel_mode": "shared"}, TunnelSettings("shared", 60, None)),
        ({"EG_SSH_KEEPALIVE_MARGIN": "0"}, {}, TunnelSettings("shared", 0, None)),
        ({"EG_SSH_KEEPALIVE_MARGIN": "120"}, {}, TunnelSettings("shared", 120, None)),
        ({"EG_SSH_KEEPALIVE_MARGIN": " 7 "}, {}, TunnelSettings("shared", 7, None)),
        ({"EG_SSH_KEEPALIVE_MARGIN": str(MAX)}, {}, TunnelSettings("shared", MAX, None)),
        ({"EG_SSH_KEEPALIVE_MARGIN": "120"}, {"keepalive_margin": 30}, TunnelSettings("shared", 30, None)),
        ({"EG_SSH_KEEPALIVE_MARGIN": "abc"}, {"keepalive_margin": "45"}, TunnelSettings("shared", 45, None)),
        ({"EG_SSH_KEEPALIVE_COUNT_MAX": "1"}, {}, TunnelSettings("shared", 60, 1)),
        ({"EG_SSH_KEEPALIVE_COUNT_MAX": "1"}, {"keepalive_count_max": 5}, TunnelSettings("shared", 60, 5)),
        ({"EG_SSH_KEEPALIVE_MARGIN": "", "EG_SSH_KEEPALIVE_COUNT_MAX": " "}, {}, TunnelSettings("shared", 60, None)),
        ({}, {"keepalive_margin": None}, TunnelSettings("shared", 60, None)),
        ({}, {}, TunnelSettings(response="auto", kernel_ip="127.0.0.1")),
        ({"EG_SSH_RESPONSE": " SSH "}, {}, TunnelSettings(response="ssh")),
        ({"EG_SSH_RESPONSE": "ssh"}, {"response": "direct"}, TunnelSettings(response="direct")),
        ({"EG_SSH_KERNEL_IP": "0.0.0.0"}, {}, TunnelSettings(kernel_ip="0.0.0.0")),
        ({"EG_SSH_KERNEL_IP": "0.0.0.0"}, {"kernel_ip": "127.0.0.1"}, TunnelSettings(kernel_ip="127.0.0.1")),
    ],
)
def test_tunnel_settings(env, proxy_config, expected):
    assert config.parse_tunnel_settings(env, proxy_config) == expected


KS = "kernelspec process_proxy.config."


@pytest.mark.parametrize(
    ("env", "proxy_config", "setting", "value"),
    [
        ({"EG_SSH_KEEPALIVE_MARGIN": "abc"}, {}, "EG_SSH_KEEPALIVE_MARGIN", "abc"),
        ({"EG_SSH_KEEPALIVE_MARGIN": "-1"}, {}, "EG_SSH_KEEPALIVE_MARGIN", "-1"),
        ({"EG_SSH_KEEPALIVE_MARGIN": "1.5"}, {}, "EG_SSH_KEEPALIVE_MARGIN", "1.5"),
        ({"EG_SSH_KEEPALIVE_MARGIN": "1e3"}, {}, "EG_SSH_KEEPALIVE_MARGIN", "1e3"),
        ({"EG_SSH_KEEPALIVE_MARGIN": "0x10"}, {}, "EG_SSH_KEEPALIVE_MARGIN", "0x10"),
        ({"EG_SSH_KEEPALIVE_MARGIN": str(MAX + 1)}, {}, "EG_SSH_KEEPALIVE_MARGIN", str(MAX + 1)),
        ({}, {"keepalive_margin": -5}, KS + "keepalive_margin", -5),
        ({}, {"keepalive_margin": 2.5}, KS + "keepalive_margin", 2.5),
        ({}, {"keepalive_margin": True}, KS + "keepalive_margin", True),
        ({}, {"keepalive_margin": "abc"}, KS + "keepalive_margin", "abc"),
        ({"EG_SSH_KEEPALIVE_COUNT_MAX": "0"}, {}, "EG_SSH_KEEPALIVE_COUNT_MAX", "0"),
        ({"EG_SSH_KEEPALIVE_COUNT_MAX": "-3"}, {}, "EG_SSH_KEEPALIVE_COUNT_MAX", "-3"),
        ({"EG_SSH_KEEPALIVE_COUNT_MAX": "three"}, {}, "EG_SSH_KEEPALIVE_COUNT_MAX", "three"),
        ({}, {"keepalive_count_max": 0}, KS + "keepalive_count_max", 0),
        ({}, {"keepalive_count_max": "2.0"}, KS + "keepalive_count_max", "2.0"),
        ({"EG_SSH_TUNNEL_MODE": "both"}, {}, "EG_SSH_TUNNEL_MODE", "both"),
        ({"EG_SSH_TUNNEL_MODE": "per_port"}, {}, "EG_SSH_TUNNEL_MODE", "per_port"),
        ({}, {"tunnel_mode": "perport"}, KS + "tunnel_mode", "perport"),
        ({}, {"tunnel_mode": 1}, KS + "tunnel_mode", 1),
        ({"EG_SSH_RESPONSE": "tunnel"}, {}, "EG_SSH_RESPONSE", "tunnel"),
        ({}, {"response": True}, KS + "response", True),
        ({"EG_SSH_KERNEL_IP": "localhost"}, {}, "EG_SSH_KERNEL_IP", "localhost"),
        ({}, {"kernel_ip": "::1"}, KS + "kernel_ip", "::1"),
    ],
)
def test_tunnel_settings_name_the_setting_and_the_value(env, proxy_config, setting, value):
    with pytest.raises(SettingError) as info:
        config.parse_tunnel_settings(env, proxy_config)
    message = str(info.value)
    assert info.value.setting == setting
    assert setting in message and repr(value) in message
    if "MODE" in setting.upper():
        assert "'shared'" in message and "'per-port'" in message
    elif "COUNT" in setting.upper():
        assert "positive integer" in message
    elif "RESPONSE" in setting.upper():
        assert "'auto', 'ssh', 'direct'" in message
    elif "KERNEL_IP" in setting.upper():
        assert "IPv4 address" in message
    else:
        assert "non-negative integer" in message


def test_allowed_values_match_the_native_module():
    assert tuple(config.ALLOWED_TUNNEL_MODES) == tuple(egtunnel.TUNNEL_MODES)
    assert tuple(config.ALLOWED_HOST_KEY_POLICIES) == tuple(egtunnel.HOST_KEY_POLICIES)


# ----------------------------------------------------------------------------------- SSH settings

@pytest.mark.parametrize(
    ("env", "expected"),
    [
        # Unset values stay None: the native side takes them from ssh_config, else OpenSSH's defaults.
        ({}, SshSettings(None, "alice", None, None, None, None, None)),
        ({"EG_SSH_PORT": "2222"}, SshSettings(2222, "alice", None, None, None, None, None)),
        ({"EG_SSH_HOST_KEY_POLICY": "accept-new"}, SshSettings(None, "alice", None, None, "accept-new", None, None)),
        ({"EG_SSH_HOST_KEY_POLICY": "OFF"}, SshSettings(None, "alice", None, None, "off", None, None)),
        ({"EG_SSH_CONNECT_TIMEOUT": "2.5"}, SshSettings(None, "alice", None, None, None, None, 2.5)),
        ({"EG_SSH_CONNECT_TIMEOUT": "30"}, SshSettings(None, "alice", None, None, None, None, 30.0)),
        (
            {"EG_SSH_KNOWN_HOSTS": "/etc/kh", "EG_SSH_IDENTITY_FILE": "/keys/id"},
            SshSettings(None, "alice", None, "/etc/kh", None, "/keys/id", None),
        ),
        (
            {"EG_SSH_PORT": "", "EG_SSH_HOST_KEY_POLICY": " "},
            SshSettings(None, "alice", None, None, None, None, None),
        ),
        ({"EG_SSH_CONFIG": "/etc/egt/ssh_config"}, SshSettings(None, "alice", ssh_config="/etc/egt/ssh_config")),
        ({"EG_SSH_CONFIG": "None"}, SshSettings(None, "alice", ssh_config="None")),
    ],
)
def test_ssh_settings(env, expected):
    assert config.parse_ssh_settings(env, user="alice") == expected


def test_ssh_paths_expand_home():
    settings = config.parse_ssh_settings({"EG_SSH_IDENTITY_FILE": "~/.ssh/id_ed25519"}, user="alice")
    assert settings.identity_file == os.path.expanduser("~/.ssh/id_ed25519")
    assert not settings.identity_file.startswith("~")


def test_password_never_printed():
    settings = config.parse_ssh_settings({}, user="alice", password="s3cret-pw")
    assert settings.password == "s3cret-pw"
    assert settings.native_kwargs()["password"] == "s3cret-pw"
    assert "s3cret-pw" not in repr(settings) and "s3cret-pw" not in str(settings)
    assert settings.destination("10.0.0.5") == "alice@10.0.0.5:22"


@pytest.mark.parametrize(
    ("env", "setting", "value"),
    [
        ({"EG_SSH_PORT": "0"}, "EG_SSH_PORT", "0"),
        ({"EG_SSH_PORT": "65536"}, "EG_SSH_PORT", "65536"),
        ({"EG_SSH_PORT": "ssh"}, "EG_SSH_PORT", "ssh"),
        ({"EG_SSH_HOST_KEY_POLICY": "yes"}, "EG_SSH_HOST_KEY_POLICY", "yes"),
        ({"EG_SSH_HOST_KEY_POLICY": "accept_new"}, "EG_SSH_HOST_KEY_POLICY", "accept_new"),
        ({"EG_SSH_CONNECT_TIMEOUT": "0"}, "EG_SSH_CONNECT_TIMEOUT", "0"),
        ({"EG_SSH_CONNECT_TIMEOUT": "-1"}, "EG_SSH_CONNECT_TIMEOUT", "-1"),
        ({"EG_SSH_CONNECT_TIMEOUT": "nan"}, "EG_SSH_CONNECT_TIMEOUT", "nan"),
        ({"EG_SSH_CONNECT_TIMEOUT": "inf"}, "EG_SSH_CONNECT_TIMEOUT", "inf"),
        ({"EG_SSH_CONNECT_TIMEOUT": "soon"}, "EG_SSH_CONNECT_TIMEOUT", "soon"),
    ],
)
def test_ssh_settings_name_the_setting_and_the_value(env, setting, value):
    with pytest.raises(SettingError) as info:
        config.parse_ssh_settings(env, user="alice")
    assert setting in str(info.value) and repr(value) in str(info.value)
    if setting == "EG_SSH_HOST_KEY_POLICY":
        assert all(repr(p) in str(info.value) for p in ("strict", "accept-new", "off"))


# ------------------------------------------------------------------------- real EG kernel managers

def _kernel_manager(cull_idle_timeout):
    """A RemoteKernelManager as the gateway builds it; `None` means one without a parent."""
    if cull_idle_timeout is None:
        return RemoteKernelManager()
    app = EnterpriseGatewayApp()
    mapping = RemoteMappingKernelManager(parent=app, cull_idle_timeout=cull_idle_timeout)
    return RemoteKernelManager(parent=mapping, log=app.log)


def _proxy(cls, kernel_manager, proxy_config):
    # EG's response manager starts a periodic callback on first use, which needs a running loop.
    async def build():
        return cls(kernel_manager, proxy_config)

    return asyncio.run(build())


@pytest.mark.parametrize(
    ("cull", "proxy_config", "busy"),
    [
        (300, {}, 360),
        (300, {"keepalive_margin": 0}, 300),
        (300, {"keepalive_margin": "30"}, 330),
        (1, {}, 61),
        (MAX - 60, {}, MAX),
        (MAX, {}, MAX + 60),
        (MAX + 1, {}, MAX),
        (0, {}, MAX),
        (-5, {}, MAX),
        (None, {}, MAX),
    ],
)
@pytest.mark.parametrize(
    "cls", [egtunnel.DistributedProcessProxy, egtunnel.YarnClusterProcessProxy]
)
def test_keep_alive_interval_per_channel(cls, cull, proxy_config, busy):
    kernel_manager = _kernel_manager(cull)
    proxy = _proxy(cls, kernel_manager, {"tunneling": True, **proxy_config})
    expected = {**{c: busy for c in BUSY}, **{c: MAX for c in QUIET}}
    got = {c: proxy._get_keep_alive_interval(c) for c in egtunnel.CHANNELS}
    assert got == expected
    # EG passes its KernelChannel enum, not the name.
    for channel in eg_processproxy.KernelChannel:
        assert proxy._get_keep_alive_interval(channel) == expected[channel.value]


def test_keep_alive_margin_from_environment(monkeypatch):
    monkeypatch.setenv("EG_SSH_KEEPALIVE_MARGIN", "15")
    proxy = _proxy(egtunnel.DistributedProcessProxy, _kernel_manager(300), {"tunneling": True})
    assert [proxy._get_keep_alive_interval(c) for c in egtunnel.CHANNELS] == [315] * 4 + [MAX] * 2


@pytest.mark.parametrize(
    ("eg_flag", "proxy_config", "expected"),
    [
        (False, {}, False),
        (True, {}, True),
        (False, {"tunneling": True}, True),
        (True, {"tunneling": False}, False),
        (True, {"tunneling": "false"}, False),
    ],
)
def test_proxy_tunneling_follows_eg_then_kernelspec(monkeypatch, eg_flag, proxy_config, expected):
    monkeypatch.setattr(eg_processproxy, "tunneling_enabled", eg_flag)
    proxy = _proxy(egtunnel.DistributedProcessProxy, _kernel_manager(300), proxy_config)
    assert proxy.native_tunneling is expected


@pytest.mark.parametrize(
    ("env", "proxy_config", "named"),
    [
        ({"EG_SSH_KEEPALIVE_MARGIN": "abc"}, {"tunneling": True}, ("EG_SSH_KEEPALIVE_MARGIN", "'abc'")),
        ({}, {"tunneling": True, "keepalive_count_max": 0}, (KS + "keepalive_count_max", "0")),
        (
            {"EG_SSH_TUNNEL_MODE": "mesh"},
            {"tunneling": True},
            ("EG_SSH_TUNNEL_MODE", "'mesh'", "'shared'", "'per-port'"),
        ),
        ({"EG_SSH_HOST_KEY_POLICY": "trust"}, {"tunneling": True}, ("EG_SSH_HOST_KEY_POLICY", "'trust'")),
        ({}, {"tunneling": "maybe"}, (KS + "tunneling", "'maybe'")),
        # Remote launch and signalling are native even without tunneling, so their settings count.
        ({"EG_SSH_PORT": "99999"}, {"tunneling": False}, ("EG_SSH_PORT", "'99999'")),
    ],
)
def test_bad_settings_fail_the_start_with_500(monkeypatch, env, proxy_config, named):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    kernel_manager = _kernel_manager(300)
    with pytest.raises(web.HTTPError) as info:
        _proxy(egtunnel.DistributedProcessProxy, kernel_manager, proxy_config)
    assert info.value.status_code == 500
    for text in named:
        assert text in info.value.reason
    assert kernel_manager.kernel_id in info.value.reason


@pytest.mark.parametrize(
    "env",
    [{"EG_SSH_KEEPALIVE_MARGIN": "abc"}, {"EG_SSH_TUNNEL_MODE": "mesh"}, {"EG_SSH_HOST_KEY_POLICY": "trust"}],
)
def test_tunnel_settings_ignored_without_tunneling(monkeypatch, env):
    # A YARN kernelspec with tunneling off uses no SSH of ours: EG's behaviour, whatever these say.
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(eg_processproxy, "tunneling_enabled", False)
    proxy = _proxy(egtunnel.YarnClusterProcessProxy, _kernel_manager(300), {})
    assert proxy.native_tunneling is False


def test_proxy_uses_eg_remote_user_and_password(monkeypatch):
    monkeypatch.setenv("EG_REMOTE_USER", "kerneluser")
    monkeypatch.setenv("EG_REMOTE_PWD", "pw-not-logged")
    monkeypatch.setenv("EG_SSH_PORT", "2022")
    proxy = _proxy(egtunnel.DistributedProcessProxy, _kernel_manager(300), {"tunneling": True})
    ssh = proxy.egtunnel.ssh
    assert (ssh.user, ssh.password, ssh.port) == ("kerneluser", "pw-not-logged", 2022)
    assert proxy.egtunnel.destination("10.1.2.3") == "kerneluser@10.1.2.3:2022"
    assert "pw-not-logged" not in repr(ssh)


@pytest.mark.parametrize(
    ("parent", "expected"),
    [
        (type("Parent", (), {"cull_idle_timeout": 300})(), 300),
        (type("Parent", (), {"cull_idle_timeout": 0})(), 0),
        (type("Parent", (), {})(), 0),
        (None, 0),
    ],
)
def test_cull_idle_timeout_read_from_parent(parent, expected):
    kernel_manager = type("KM", (), {"parent": parent})()
    assert config.cull_idle_timeout_of(kernel_manager) == expected
    assert config.cull_idle_timeout_of(object()) == 0
