//! `SshTarget`, one destination validated once, with its remote commands and a kernel's forwards, each
//! as a blocking call and as an awaitable built from the same `Call`.

use std::future::Future;

use pyo3::prelude::*;

use super::arguments::{count_max, parse_channel, positive_duration, refused_wait_duration, Seconds};
use super::awaiting::Call;
use super::errors::{invalid, to_py};
use super::exec::ExecResult;
use super::response::{response_call, ResponseForward};
use super::signatures::signatures;
use super::reports::metrics_hook;
use super::classes::{tunnels, SshTarget, Tunnel};
use crate::config::{check_port, TunnelMode};
use crate::error::Result;
use crate::forward::LocalLimits;
use crate::keepalive::KeepAlive;
use crate::metrics::{counted, Operation};
use crate::pool::{self, ForwardRequest};

/// What `SshTarget.open_forwards` takes besides the forwards; parsed once for both call forms.
struct PlanArgs {
    mode: TunnelMode,
    plan: pool::KernelPlan,
}

#[allow(clippy::too_many_arguments)]
fn plan_args(
    forwards: Vec<(String, String, i64)>,
    port_range: (i64, i64),
    bind_attempts: i64,
    mode: &str,
    cull_idle_timeout: i64,
    keepalive_margin: i64,
    keepalive_count_max: u32,
    kernel_id: Option<String>,
    verify: bool,
    refused_wait: f64,
    reserved: Vec<String>,
) -> PyResult<PlanArgs> {
    let mode: TunnelMode = mode.parse().map_err(|e| to_py(e, ""))?;
    if !(1..=10_000).contains(&bind_attempts) {
        return Err(invalid(format!("bind_attempts must be an integer from 1 to 10000, got {bind_attempts}")));
    }
    let lo = check_port("port_range lower bound", port_range.0, true).map_err(|e| to_py(e, ""))?;
    let hi = check_port("port_range upper bound", port_range.1, true).map_err(|e| to_py(e, ""))?;
    let refused_wait = refused_wait_duration(refused_wait)?;
    if forwards.is_empty() {
        return Err(invalid("forwards must name at least one (channel, remote_host, remote_port)".into()));
    }
    let reserved = reserved.iter().map(|c| parse_channel(c)).collect::<PyResult<Vec<_>>>()?;
    let mut reqs = Vec::with_capacity(forwards.len());
    for (channel, remote_host, remote_port) in forwards {
        let ch = parse_channel(&channel)?;
        if reqs.iter().any(|r: &ForwardRequest| r.channel == ch) {
            return Err(invalid(format!("channel {ch} appears twice in forwards")));
        }
        if remote_host.is_empty() {
            return Err(invalid(format!("{ch}: remote_host must not be empty")));
        }
        let keep_alive = KeepAlive::for_channel(ch, cull_idle_timeout, keepalive_margin).map_err(invalid)?;
        reqs.push(ForwardRequest {
            channel: ch,
            remote_host,
            remote_port: check_port(&format!("{ch} remote_port"), remote_port, false).map_err(|e| to_py(e, ""))?,
            local_port: 0,
            keep_alive: keep_alive.with_count_max(keepalive_count_max),
            kernel_id: kernel_id.clone(),
            verify: false,
            refused_wait,
            reserved: reserved.contains(&ch),
            limits: LocalLimits::default(),
        });
    }
    if let Some(ch) = reserved.iter().find(|ch| !reqs.iter().any(|r| r.channel == **ch)) {
        return Err(invalid(format!("reserved names {ch}, which is not among the forwards")));
    }
    let plan = pool::KernelPlan { forwards: reqs, port_range: (lo, hi), bind_attempts: bind_attempts as u32, verify };
    Ok(PlanArgs { mode, plan })
}

impl SshTarget {
    /// `exec` and `exec_async`: `command` on the pooled connection.
    fn exec_call(
        &self,
        py: Python<'_>,
        command: String,
        timeout: f64,
    ) -> PyResult<Call<impl Future<Output = Result<ExecResult>> + Send + 'static>> {
        let timeout = positive_duration(timeout, "timeout")?;
        let spec = self.spec.clone();
        metrics_hook(py);
        Ok(Call {
            context: "remote command".into(),
            work: async move {
                let out = counted(&spec, Operation::Command, pool::exec(&spec, &command, timeout)).await?;
                Ok(ExecResult { out })
            },
        })
    }
}

signatures! {
    #[pymethods]
    impl SshTarget {
        #[new]
        fn new(
            _py, host: &str, *, ..login, ..password, ..host_keys, ..connect_timeout, ..limits, ..ssh_config
        ) -> PyResult<Self> |conn| {
            Ok(SshTarget { spec: conn.spec(host)? })
        }

        /// Where the connection goes: ssh_config's HostName for the name given, else the name itself.
        #[getter]
        fn host_name(&self) -> String {
            self.spec.host.clone()
        }

        /// The ProxyJump hops on the way, first hop first, as user@host:port.
        #[getter]
        fn jumps(&self) -> Vec<String> {
            self.spec.route().iter().rev().skip(1).rev().map(|s| s.dest()).collect()
        }

        /// user@host:port, as every message names it.
        #[getter]
        fn destination(&self) -> String {
            self.spec.dest()
        }

        /// Runs `command` on the pooled connection; blocks the calling thread (GIL released).
        #[pyo3(signature = (command, timeout = 30.0))]
        fn exec(&self, py: Python<'_>, command: String, timeout: f64) -> PyResult<ExecResult> {
            self.exec_call(py, command, timeout)?.block(py)
        }

        /// Awaitable form of `exec`.
        #[pyo3(signature = (command, timeout = 30.0))]
        fn exec_async<'py>(&self, py: Python<'py>, command: String, timeout: f64) -> PyResult<Bound<'py, PyAny>> {
            self.exec_call(py, command, timeout)?.into_awaitable(py)
        }

        /// Opens a kernel's forwards, all or nothing; returns the tunnels in the order given. Blocks.
        /// The channels named in `reserved` get a local port that is bound but never listens.
        fn open_forwards
        /// Awaitable form of `open_forwards`; cancelling it closes whatever it had opened.
        async fn open_forwards_async
        (
            &self, py, forwards: Vec<(String, String, i64)>, *,
            port_range: (i64, i64) = (0, 0),
            bind_attempts: i64 = 6,
            mode: &str = "shared" => "'shared'",
            cull_idle_timeout: Seconds = (Seconds(0)) => "0",
            keepalive_margin: i64 = 60,
            keepalive_count_max: Option<i64> = None,
            kernel_id: Option<String> = None,
            verify: bool = true => "True",
            refused_wait: f64 = 30.0,
            reserved: Vec<String> = (Vec::new()) => "()"
        ) -> Vec<Tunnel> {
            let count = count_max(keepalive_count_max, &self.spec)?;
            let args = plan_args(forwards, port_range, bind_attempts, mode, cull_idle_timeout.0, keepalive_margin,
                                 count, kernel_id, verify, refused_wait, reserved)?;
            let spec = self.spec.clone();
            metrics_hook(py);
            Call {
                context: String::new(),
                work: async move {
                    let opened = pool::open_kernel_forwards(&spec, args.mode, args.plan);
                    counted(&spec, Operation::Forward, opened).await.map(tunnels)
                },
            }
        }

        /// This destination with connection info carried back over SSH to `address` (the gateway's
        /// response address, IP:PORT): its connection holds a remote forward on the host's 127.0.0.1.
        /// An empty address gives the destination without one.
        fn responding_to(&self, address: &str) -> PyResult<SshTarget> {
            Ok(SshTarget { spec: self.spec.clone().responding_to(address).map_err(|e| to_py(e, ""))? })
        }

        /// Where the remote forward's connections go (IP:PORT), or None.
        #[getter]
        fn respond_to(&self) -> Option<String> {
            self.spec.respond_to.map(|a| a.to_string())
        }

        /// The remote forward back to the gateway on the pooled connection (see `responding_to`),
        /// once the server has answered for it; blocks. ForwardingProhibited if the server refuses.
        #[pyo3(signature = (timeout = 30.0))]
        fn response_forward(&self, py: Python<'_>, timeout: f64) -> PyResult<ResponseForward> {
            response_call(&self.spec, timeout)?.block(py)
        }

        /// Awaitable form of `response_forward`.
        #[pyo3(signature = (timeout = 30.0))]
        fn response_forward_async<'py>(&self, py: Python<'py>, timeout: f64) -> PyResult<Bound<'py, PyAny>> {
            response_call(&self.spec, timeout)?.into_awaitable(py)
        }

        fn __repr__(&self) -> String {
            format!("<SshTarget {}>", self.spec.dest())
        }
    }
}
