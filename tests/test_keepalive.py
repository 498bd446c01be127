"""The keep-alive policy must equal Enterprise Gateway 3.3's `_get_keep_alive_interval` for every input."""

import itertools
import types

import pytest

import egtunnel
from enterprise_gateway.services.processproxies import processproxy as eg

MAX = egtunnel.MAX_KEEP_ALIVE_INTERVAL

TIMEOUTS = [
    -(10**30), -(2**63), -(2**31), -3600, -61, -60, -1, 0, 1, 2, 59, 60, 61, 300, 3600, 86_400,
    2**31 - 1, 2**32, MAX - 61, MAX - 60, MAX - 59, MAX - 1, MAX, MAX + 1, MAX + 60, 2**63 - 1, 2**63, 10**30,
]


def eg_interval(channel: "eg.KernelChannel", cull_idle_timeout: int) -> int:
    """EG's own method, run on an object that has just what it reads: kernel_manager.cull_idle_timeout."""
    holder = types.SimpleNamespace(kernel_manager=types.SimpleNamespace(cull_idle_timeout=cull_idle_timeout))
    return eg.RemoteProcessProxy._get_keep_alive_interval(holder, channel)


def test_maximum_matches_eg() -> None:
    assert MAX == eg.max_keep_alive_interval == 3_153_600_000


def test_channel_names_are_eg_kernel_channel_values() -> None:
    assert sorted(egtunnel.CHANNELS) == sorted(c.value for c in eg.KernelChannel)


@pytest.mark.parametrize(("channel", "timeout"), list(itertools.product(list(eg.KernelChannel), TIMEOUTS)))
def test_interval_equals_eg_method(channel: "eg.KernelChannel", timeout: int) -> None:
    assert egtunnel.keep_alive_interval(channel.value, timeout) == eg_interval(channel, timeout)
    assert egtunnel.keep_alive_interval(channel.value, timeout, 60) == eg_interval(channel, timeout)


@pytest.mark.parametrize(
    ("channel", "timeout", "margin", "expected"),
    [
        ("SHELL", 300, 60, 360),
        ("IOPUB", 300, 0, 300),
        ("HB", 1, 1, 2),
        ("STDIN", 300, 5, 305),
        ("CONTROL", 300, 5, MAX),
        ("EG_COMM", 1, 1, MAX),
        ("SHELL", 0, 5, MAX),
        ("SHELL", MAX + 1, 5, MAX),
    ],
)
def test_margin_replaces_eg_sixty_seconds(channel: str, timeout: int, margin: int, expected: int) -> None:
    assert egtunnel.keep_alive_interval(channel, timeout, margin) == expected


@pytest.mark.parametrize("bad", ["shell", "COMM", "", "HEARTBEAT"])
def test_unknown_channel_lists_valid_values(bad: str) -> None:
    with pytest.raises(ValueError, match="SHELL, IOPUB, STDIN, HB, CONTROL, EG_COMM"):
        egtunnel.keep_alive_interval(bad, 300)


def test_negative_margin_is_refused() -> None:
    with pytest.raises(ValueError, match="non-negative"):
        egtunnel.keep_alive_interval("SHELL", 300, -1)


def test_non_integer_timeout_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="cull_idle_timeout"):
        egtunnel.keep_alive_interval("SHELL", "300")  # type: ignore[arg-type]
