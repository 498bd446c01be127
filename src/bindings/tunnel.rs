//! `Tunnel`, one listening forward as Python holds it, and `open_tunnel`, which opens one on its own.

use std::future::Future;
use std::time::Duration;

use pyo3::prelude::*;
use pyo3::types::{PyDict, PyTuple};

use super::arguments::{count_max, parse_channel, positive_duration, refused_wait_duration, Seconds};
use super::awaiting::{wait, Call};
use super::errors::{invalid, to_py};
use super::signatures::signatures;
use super::reports::metrics_hook;
use super::classes::{SshTarget, Tunnel};
use crate::config::{check_port, TunnelMode};
use crate::error::Error;
use crate::forward::{Forward, LocalLimits};
use crate::keepalive::{self, KeepAlive};
use crate::metrics::{counted, Operation};
use crate::pool::{self, ForwardRequest};
use crate::requests;

/// The keep-alive interval EG would use for `channel` given the culling timeout.
#[pyfunction]
#[pyo3(signature = (channel, cull_idle_timeout, margin = 60))]
pub(super) fn keep_alive_interval(channel: &str, cull_idle_timeout: Seconds, margin: i64) -> PyResult<i64> {
    let ch = parse_channel(channel)?;
    keepalive::keep_alive_interval(ch, cull_idle_timeout.0, margin).map_err(invalid)
}

impl Tunnel {
    /// `send_request` and `request`: delivers `data` on a fresh channel and waits for the remote end to
    /// close, the forward counting the request in flight until then.
    fn request_call(
        &self,
        data: Vec<u8>,
        timeout: f64,
    ) -> PyResult<Call<impl Future<Output = crate::error::Result<Option<()>>> + Send + 'static>> {
        let timeout = positive_duration(timeout, "timeout")?;
        let fwd = self.fwd.clone();
        let context = format!("{} request", fwd.info.channel);
        let Some(in_flight) = fwd.begin_request() else {
            return Err(to_py(terminated(&fwd), &context));
        };
        let delivery = requests::deliver(&fwd, data, timeout);
        Ok(Call {
            context,
            work: async move {
                let r = delivery.await;
                drop(in_flight);
                // Resolves to None, as a Python function without a result: a bare `()` would become an empty tuple.
                r.map(|()| None::<()>)
            },
        })
    }
}

#[pymethods]
impl Tunnel {
    #[getter]
    fn local_port(&self) -> u16 {
        self.fwd.info.local_port
    }
    #[getter]
    fn channel(&self) -> &'static str {
        self.fwd.info.channel.as_str()
    }
    #[getter]
    fn keep_alive_interval(&self) -> u64 {
        self.fwd.info.keep_alive.interval
    }
    #[getter]
    fn remote_host(&self) -> String {
        self.fwd.info.remote_host.clone()
    }
    #[getter]
    fn remote_port(&self) -> u16 {
        self.fwd.info.remote_port
    }
    #[getter]
    fn kernel_id(&self) -> Option<String> {
        self.fwd.info.kernel_id.clone()
    }
    #[getter]
    fn mode(&self) -> &'static str {
        self.fwd.conn.mode().as_str()
    }
    /// user@host:port of the SSH connection this forward rides on.
    #[getter]
    fn destination(&self) -> String {
        self.fwd.conn.dest()
    }

    /// False once the forward is terminated or its SSH connection is down (e.g. keep-alive limit hit).
    fn is_alive(&self) -> bool {
        !self.fwd.is_terminated() && self.fwd.conn.is_alive()
    }

    fn is_connected(&self) -> bool {
        self.fwd.conn.is_alive()
    }

    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let s = self.fwd.info.stats.snapshot();
        let d = PyDict::new(py);
        d.set_item("bytes_in", s.bytes_in)?;
        d.set_item("bytes_out", s.bytes_out)?;
        d.set_item("connections", s.connections)?;
        d.set_item("active_connections", s.active)?;
        d.set_item("rejected_connections", s.rejected)?;
        d.set_item("keepalives_sent", self.fwd.conn.snapshot().counts.keepalives_sent)?;
        Ok(d)
    }

    /// Delivers `data` to the remote port on a fresh channel and waits for the remote end to close.
    #[pyo3(signature = (data, timeout = 10.0))]
    fn send_request(&self, py: Python<'_>, data: Vec<u8>, timeout: f64) -> PyResult<Option<()>> {
        self.request_call(data, timeout)?.block(py)
    }

    /// Awaitable form of `send_request`: driven by egtunnel's runtime, no thread of the caller's.
    /// Closing the tunnel meanwhile lets the request finish first.
    #[pyo3(signature = (data, timeout = 10.0))]
    fn request<'py>(&self, py: Python<'py>, data: Vec<u8>, timeout: f64) -> PyResult<Bound<'py, PyAny>> {
        self.request_call(data, timeout)?.into_awaitable(py)
    }

    /// The last known liveness of what listens behind the tunnel ("alive", "dead" or "unknown") and,
    /// unless one is already out, a background probe delivering `data` whose answer the next call
    /// returns. Never waits on the network. A probe without an answer is logged (see `Liveness::no_answer`).
    #[pyo3(signature = (data, timeout = 10.0))]
    fn probe(&self, data: Vec<u8>, timeout: f64) -> PyResult<&'static str> {
        let timeout = positive_duration(timeout, "timeout")?;
        Ok(requests::probe(&self.fwd, data, timeout).as_str())
    }

    /// The blocking form of `probe`, for callers off the event loop: delivers `data`, records the
    /// answer and returns it (a terminated tunnel's is "unknown"). Blocks (GIL released).
    #[pyo3(signature = (data, timeout = 10.0))]
    fn probe_blocking(&self, py: Python<'_>, data: Vec<u8>, timeout: f64) -> PyResult<&'static str> {
        let timeout = positive_duration(timeout, "timeout")?;
        Ok(wait(py, requests::probe_wait(&self.fwd, data, timeout)).as_str())
    }

    /// Delivers `data` in the background and logs the outcome under `what`; never waits on the network.
    /// When the remote port cannot take it (other than refusing, or the connection being down),
    /// `fallback_command` runs on `fallback_target` instead.
    #[pyo3(signature = (data, what, timeout = 10.0, fallback_target = None, fallback_command = None))]
    fn send_background(
        &self,
        data: Vec<u8>,
        what: String,
        timeout: f64,
        fallback_target: Option<PyRef<'_, SshTarget>>,
        fallback_command: Option<String>,
    ) -> PyResult<()> {
        let timeout = positive_duration(timeout, "timeout")?;
        let fallback = match (fallback_target, fallback_command) {
            (Some(t), Some(command)) => {
                Some(requests::Fallback { spec: t.spec.clone(), command, timeout: Duration::from_secs(30) })
            }
            (None, None) => None,
            _ => return Err(invalid("fallback_target and fallback_command go together".into())),
        };
        let ctx = format!("{} request", self.fwd.info.channel);
        requests::send(&self.fwd, data, timeout, what, fallback).map_err(|e| to_py(e, &ctx))
    }

    /// Stops listening (the port is free on return) and hands draining to the background; returns
    /// without waiting on the network. Idempotent.
    fn terminate(&self) {
        // Quick enough to keep the GIL: no runtime or network wait.
        pool::close_forward(&self.fwd);
    }

    fn __enter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    #[pyo3(signature = (*_exc))]
    fn __exit__(&self, _exc: &Bound<'_, PyTuple>) {
        self.terminate();
    }

    fn __repr__(&self) -> String {
        let i = &self.fwd.info;
        format!(
            "<Tunnel {} 127.0.0.1:{}{} -> {}:{} via {} ({})>",
            i.channel,
            i.local_port,
            if i.reserved { " (reserved)" } else { "" },
            i.remote_host,
            i.remote_port,
            self.fwd.conn.dest(),
            if self.fwd.is_terminated() { "terminated" } else { "open" }
        )
    }
}

impl Drop for Tunnel {
    fn drop(&mut self) {
        // An unreferenced tunnel must not keep a port and a connection alive behind the caller's back.
        if !self.fwd.is_terminated() {
            pool::close_forward(&self.fwd);
        }
    }
}

fn terminated(fwd: &Forward) -> Error {
    Error::Other { dest: fwd.conn.dest(), cause: format!("the {} tunnel was terminated", fwd.info.channel) }
}

signatures! {
    /// Opens a local forward 127.0.0.1:local_port → remote_host:remote_port through SSH to `host`.
    #[pyfunction]
    pub(super) fn open_tunnel(
        py, host: &str, remote_host: &str, remote_port: i64, *,
        channel: &str = "SHELL" => "'SHELL'",
        cull_idle_timeout: Seconds = (Seconds(0)) => "0",
        keepalive_margin: i64 = 60,
        keepalive_count_max: Option<i64> = None,
        ..login, ..password, ..host_keys,
        local_port: i64 = 0,
        ..connect_timeout,
        mode: &str = "per-port" => "'per-port'",
        kernel_id: Option<String> = None,
        verify: bool = false => "False",
        ..limits,
        refused_wait: f64 = 30.0,
        ..ssh_config
    ) -> PyResult<Tunnel> |conn| {
        let refused_wait = refused_wait_duration(refused_wait)?;
        let ch = parse_channel(channel)?;
        let keep_alive = KeepAlive::for_channel(ch, cull_idle_timeout.0, keepalive_margin).map_err(invalid)?;
        let remote_port = check_port("remote_port", remote_port, false).map_err(|e| to_py(e, ""))?;
        let local_port = check_port("local_port", local_port, true).map_err(|e| to_py(e, ""))?;
        let mode: TunnelMode = mode.parse().map_err(|e| to_py(e, ""))?;
        let spec = conn.spec(host)?;
        let keepalive_count_max = count_max(keepalive_count_max, &spec)?;
        let ctx = format!("{ch} tunnel to {remote_host}:{remote_port}");
        metrics_hook(py);
        let req = ForwardRequest {
            channel: ch,
            remote_host: remote_host.to_string(),
            remote_port,
            local_port,
            keep_alive: keep_alive.with_count_max(keepalive_count_max),
            kernel_id,
            verify,
            refused_wait,
            reserved: false,
            limits: LocalLimits::default(),
        };
        let fwd = wait(py, counted(&spec, Operation::Forward, pool::open_forward(&spec, mode, req))).map_err(|e| to_py(e, &ctx))?;
        Ok(Tunnel { fwd })
    }
}
