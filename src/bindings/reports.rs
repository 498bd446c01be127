//! What egtunnel reports about itself and about a host: `status`, `metrics` (and the Prometheus
//! endpoint a first open may start), `explain` and `check_host`.

use std::sync::atomic::{AtomicBool, Ordering};

use pyo3::prelude::*;
use pyo3::types::{IntoPyDict, PyDict, PyList};

use super::awaiting::wait;
use super::errors::to_py;
use super::signatures::signatures;
use crate::config::ConnectSpec;
use crate::exit_gate;
use crate::metrics as native_metrics;
use crate::pool;

/// Set once the first open of the process has looked at EG_TUNNEL_METRICS_PORT.
static METRICS_HOOKED: AtomicBool = AtomicBool::new(false);

/// Starts the Prometheus endpoint on the first open when EG_TUNNEL_METRICS_PORT is set; afterwards one
/// atomic load. Never fails or delays the open beyond binding a local socket: whatever goes wrong is
/// logged by `egtunnel.metrics`, or here when that module cannot even be imported.
pub(super) fn metrics_hook(py: Python<'_>) {
    if METRICS_HOOKED.load(Ordering::Relaxed) || METRICS_HOOKED.swap(true, Ordering::AcqRel) {
        return;
    }
    if std::env::var_os(native_metrics::PORT_VAR).is_none() {
        return;
    }
    let started = py.import("egtunnel.metrics").and_then(|m| m.call_method0("start_from_environment"));
    if let Err(e) = started {
        log::error!("{} is set but the metrics endpoint cannot start: {e}", native_metrics::PORT_VAR);
    }
}

/// Every live SSH connection with its forwards.
#[pyfunction]
pub(super) fn status<'py>(py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
    let list = PyList::empty(py);
    for c in pool::status() {
        let d = PyDict::new(py);
        d.set_item("user", &c.user)?;
        d.set_item("host", &c.host)?;
        d.set_item("port", c.port)?;
        d.set_item("mode", c.mode)?;
        d.set_item("lane", c.lane)?;
        d.set_item("alive", c.alive)?;
        d.set_item("state", c.state)?;
        d.set_item("reconnects", c.reconnects)?;
        d.set_item("keep_alive_interval", c.keep_alive_interval)?;
        d.set_item("keepalives_sent", c.keepalives_sent)?;
        d.set_item("keepalives_unanswered", c.keepalives_unanswered)?;
        d.set_item("last_error", &c.last_error)?;
        d.set_item("session_budget", c.session_budget)?;
        d.set_item("session_refusals", c.session_refusals)?;
        d.set_item("unsettled_sleeps", c.unsettled_sleeps)?;
        d.set_item("via", &c.via)?;
        d.set_item("relays", c.relays)?;
        d.set_item("users", c.users)?;
        d.set_item("remote_forward", c.remote_forward)?;
        let forwards = PyList::empty(py);
        for f in &c.forwards {
            let fd = PyDict::new(py);
            fd.set_item("kernel_id", &f.kernel_id)?;
            fd.set_item("channel", f.channel.as_str())?;
            fd.set_item("local_port", f.local_port)?;
            fd.set_item("remote_host", &f.remote_host)?;
            fd.set_item("remote_port", f.remote_port)?;
            fd.set_item("keep_alive_interval", f.keep_alive.interval)?;
            let s = f.stats.snapshot();
            fd.set_item("bytes_in", s.bytes_in)?;
            fd.set_item("bytes_out", s.bytes_out)?;
            fd.set_item("connections", s.connections)?;
            fd.set_item("active_connections", s.active)?;
            fd.set_item("rejected_connections", s.rejected)?;
            fd.set_item("reserved", f.reserved)?;
            forwards.append(fd)?;
        }
        d.set_item("forwards", forwards)?;
        list.append(d)?;
    }
    Ok(list)
}

/// Per-destination totals and live gauges, for `egtunnel.metrics` to turn into Prometheus families.
#[pyfunction]
pub(super) fn metrics<'py>(py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
    let list = PyList::empty(py);
    for m in native_metrics::snapshot(&pool::status()) {
        let d = PyDict::new(py);
        d.set_item("user", &m.key.user)?;
        d.set_item("host", &m.key.host)?;
        d.set_item("port", m.key.port)?;
        let states = PyDict::new(py);
        states.set_item("connected", m.connected)?;
        states.set_item("reconnecting", m.reconnecting)?;
        states.set_item("stopped", m.stopped)?;
        d.set_item("connections", states)?;
        d.set_item("forwards", m.forwards.into_iter().collect::<Vec<_>>().into_py_dict(py)?)?;
        d.set_item("open_channels", m.open_channels)?;
        d.set_item("keepalives_unanswered", m.keepalives_unanswered)?;
        d.set_item("connections_opened", m.connections_opened)?;
        d.set_item("reconnects", m.reconnects)?;
        d.set_item("forwards_opened", m.forwards_opened)?;
        d.set_item("bytes_to_remote", m.bytes_to_remote)?;
        d.set_item("bytes_from_remote", m.bytes_from_remote)?;
        d.set_item("keepalives_sent", m.keepalives_sent)?;
        d.set_item("commands_ok", m.commands_ok)?;
        d.set_item("commands_failed", m.commands_failed)?;
        let h = PyDict::new(py);
        h.set_item("buckets", m.command_latency.buckets)?;
        h.set_item("count", m.command_latency.count)?;
        h.set_item("sum", m.command_latency.sum)?;
        d.set_item("command_seconds", h)?;
        d.set_item("failures", m.failures)?;
        list.append(d)?;
    }
    Ok(list)
}

signatures! {
    /// The effective settings for `host`: (setting, value, origin) rows, origins being `argument`,
    /// `default` or ssh_config `file:line`; and the route, first hop first, `host` last.
    #[pyfunction]
    #[allow(clippy::type_complexity)]
    pub(super) fn explain(
        _py, host: &str, *, ..login, ..host_keys, ..connect_timeout, ..ssh_config
    ) -> PyResult<(Vec<(String, String, String)>, Vec<String>)> |conn| {
        let (spec, rows) = ConnectSpec::explain(host, &conn.options()?, true).map_err(|e| to_py(e, ""))?;
        let rows = rows.into_iter().map(|r| (r.setting.to_string(), r.value, r.origin)).collect();
        Ok((rows, spec.route().iter().map(|s| s.dest()).collect()))
    }
}

signatures! {
    /// Runs every stage of reaching `host`, calling `report(hop, stage, ok, detail, seconds)` after each;
    /// True when all passed. Blocks (GIL released between reports).
    #[pyfunction]
    pub(super) fn check_host(
        py, host: &str, report: Py<PyAny>, *,
        ..login, ..password, ..host_keys, ..connect_timeout, ..ssh_config,
        command: &str = "echo egtunnel-check"
    ) -> PyResult<bool> |conn| {
        let spec = conn.spec(host)?;
        let mut failed_report: Option<PyErr> = None;
        let ok = wait(py, crate::check::run(&spec, command, &mut |step: crate::check::Step| {
            // This thread gave up the GIL to wait; it takes it back only while the exit gate is open.
            let Some(_entry) = exit_gate::enter() else { return };
            Python::attach(|py| {
                if let Err(e) = report.call1(py, (step.hop, step.name, step.ok, step.detail, step.secs)) {
                    failed_report.get_or_insert(e);
                }
            })
        }));
        match failed_report {
            Some(e) => Err(e),
            None => Ok(ok),
        }
    }
}
