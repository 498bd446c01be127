"""Prometheus metrics for egtunnel: a collector that reads the native counters at scrape time, and the
HTTP endpoint that `EG_TUNNEL_METRICS_PORT` starts on the first tunnel, connection or remote command.

Nothing is counted here: every scrape asks `_native.metrics()` for the process-wide totals per SSH
destination (kept in Rust, so they never go backwards when a connection closes) and the gauges of the
live connections. Use either the endpoint or `register(registry)` into an existing registry.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Iterable, Iterator, Optional
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, ProcessCollector, start_http_server
from prometheus_client.core import REGISTRY, CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector as _CollectorBase

from . import _native

__all__ = ["ADDR_VAR", "PORT_VAR", "Collector", "register", "start_from_environment", "start_http_endpoint"]

PORT_VAR = "EG_TUNNEL_METRICS_PORT"
ADDR_VAR = "EG_TUNNEL_METRICS_ADDR"
# Loopback by default: the endpoint names hosts and users, which is not for every network to read.
DEFAULT_ADDR = "127.0.0.1"

log = logging.getLogger("egtunnel.metrics")

_DEST = ["user", "host", "port"]


class _Families:
    """Every family egtunnel exports, empty; `Collector.collect` fills them, `describe` names them."""

    def __init__(self) -> None:
        self.connections = GaugeMetricFamily(
            "egtunnel_ssh_connections", "Live SSH connections by state (connected, reconnecting, stopped).",
            labels=[*_DEST, "state"])
        self.connections_opened = CounterMetricFamily(
            "egtunnel_ssh_connections_opened_total", "SSH connections established for a caller (reconnects excluded).",
            labels=_DEST)
        self.reconnects = CounterMetricFamily(
            "egtunnel_ssh_reconnects_total", "SSH connections re-established after they died.", labels=_DEST)
        self.forwards = GaugeMetricFamily(
            "egtunnel_forwards", "Open forwards (listening local ports) by kernel channel.", labels=[*_DEST, "channel"])
        self.forwards_opened = CounterMetricFamily("egtunnel_forwards_opened_total", "Forwards opened.", labels=_DEST)
        self.open_channels = GaugeMetricFamily(
            "egtunnel_open_channels",
            "SSH channels open now: forwarded connections, requests and remote commands.", labels=_DEST)
        self.bytes = CounterMetricFamily(
            "egtunnel_forwarded_bytes_total",
            "Bytes carried by forwards; direction to_remote is local to remote, from_remote the reverse.",
            labels=[*_DEST, "direction"])
        self.keepalives = CounterMetricFamily(
            "egtunnel_keepalive_probes_total", "Keep-alive probes sent.", labels=_DEST)
        self.unanswered = GaugeMetricFamily(
            "egtunnel_keepalive_probes_unanswered",
            "Keep-alive probes sent since the server last sent anything, summed over live connections.",
            labels=_DEST)
        self.commands = CounterMetricFamily(
            "egtunnel_remote_commands_total",
            "Remote commands queued on a connection, by outcome (ok: ran and returned its exit status).",
            labels=[*_DEST, "outcome"])
        self.command_seconds = HistogramMetricFamily(
            "egtunnel_remote_command_duration_seconds",
            "Remote command latency on its connection, from queueing to the exit status.", labels=_DEST)
        self.failures = CounterMetricFamily(
            "egtunnel_open_failures_total",
            "Failed forward opens (one per open_tunnel or open_forwards call) and remote commands, by cause.",
            labels=[*_DEST, "operation", "cause"])

    def all(self) -> list[Metric]:
        return [self.connections, self.connections_opened, self.reconnects, self.forwards, self.forwards_opened,
                self.open_channels, self.bytes, self.keepalives, self.unanswered, self.commands,
                self.command_seconds, self.failures]  # fmt: skip


def _le(bound: float) -> str:
    # The `le` label as Prometheus clients write it ("0.005", "1.0"); the bounds are plain decimals.
    return repr(float(bound))


class Collector(_CollectorBase):
    """egtunnel's metrics for a prometheus_client registry, read from the native side at each scrape."""

    def describe(self) -> Iterable[Metric]:
        # Lets a registry check for name clashes without calling into the native module.
        return _Families().all()

    def collect(self) -> Iterator[Metric]:
        f = _Families()
        for d in _native.metrics():
            dest = [d["user"], d["host"], str(d["port"])]
            for state, n in d["connections"].items():
                f.connections.add_metric([*dest, state], n)
            f.connections_opened.add_metric(dest, d["connections_opened"])
            f.reconnects.add_metric(dest, d["reconnects"])
            for channel in _native.CHANNELS:
                f.forwards.add_metric([*dest, channel], d["forwards"].get(channel, 0))
            f.forwards_opened.add_metric(dest, d["forwards_opened"])
            f.open_channels.add_metric(dest, d["open_channels"])
            f.bytes.add_metric([*dest, "to_remote"], d["bytes_to_remote"])
            f.bytes.add_metric([*dest, "from_remote"], d["bytes_from_remote"])
            f.keepalives.add_metric(dest, d["keepalives_sent"])
            f.unanswered.add_metric(dest, d["keepalives_unanswered"])
            f.commands.add_metric([*dest, "ok"], d["commands_ok"])
            f.commands.add_metric([*dest, "failed"], d["commands_failed"])
            h = d["command_seconds"]
            buckets = [(_le(le), float(n)) for le, n in h["buckets"]] + [("+Inf", float(h["count"]))]
            f.command_seconds.add_metric(dest, buckets, h["sum"])
            for operation, cause, n in d["failures"]:
                f.failures.add_metric([*dest, operation, cause], n)
        yield from f.all()


def register(registry: CollectorRegistry = REGISTRY) -> Collector:
    """Registers egtunnel's collector into `registry` (prometheus_client's default one unless given),
    e.g. one a server already exposes; returns the collector (for `registry.unregister`)."""
    collector = Collector()
    registry.register(collector)
    return collector


def parse_port(value: str) -> int:
    """The port EG_TUNNEL_METRICS_PORT names; ValueError naming the variable and the value otherwise."""
    try:
        port = int(value.strip())
    except ValueError:
        port = 0
    if not 1 <= port <= 65535:
        raise ValueError(f"{PORT_VAR} must be an integer from 1 to 65535, got {value!r}")
    return port


_lock = threading.Lock()
_endpoint: Optional[WSGIServer] = None


def start_http_endpoint(port: int, addr: str = DEFAULT_ADDR) -> WSGIServer:
    """Serves /metrics on addr:port from a daemon thread: egtunnel's collector and the process's own
    (CPU, memory, file descriptors), in a registry of its own so that nothing registered elsewhere in
    the process is exported twice. One endpoint per process: a second call returns the first one.
    Raises OSError when the address cannot be bound."""
    global _endpoint
    with _lock:
        if _endpoint is None:
            registry = CollectorRegistry(auto_describe=True)
            register(registry)
            ProcessCollector(registry=registry)
            _endpoint, _ = start_http_server(port, addr=addr, registry=registry)
            log.info("egtunnel metrics at http://%s:%d/metrics", addr, _endpoint.server_address[1])
        return _endpoint


def start_from_environment() -> Optional[WSGIServer]:
    """Starts the endpoint when EG_TUNNEL_METRICS_PORT is set (called once, on the first open).

    Never raises: metrics must not fail or delay a tunnel. An invalid value or an address that cannot
    be bound is logged once at error level, naming the variable, the value and the address, and the
    process runs without the endpoint. (Failing the open instead would turn a typo in a monitoring
    setting into every kernel start failing, for as long as the gateway runs.)
    """
    value = os.environ.get(PORT_VAR)
    if value is None or not value.strip():
        return None
    addr = os.environ.get(ADDR_VAR, "").strip() or DEFAULT_ADDR
    try:
        port = parse_port(value)
    except ValueError as e:
        log.error("no metrics endpoint: %s", e)
        return None
    try:
        return start_http_endpoint(port, addr)
    except OSError as e:
        log.error("no metrics endpoint: cannot listen on %s:%d (from %s and %s): %s", addr, port, PORT_VAR,
                  ADDR_VAR, e)
        return None
