//! The thin PyO3 layer: converts arguments, releases the GIL around network waits, and maps the
//! core's `Error` to egtunnel's Python exceptions in exactly one place.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use pyo3::exceptions::{PyConnectionRefusedError, PyOSError, PyValueError};
use pyo3::prelude::*;
use pyo3::PyErrArguments;
use pyo3::sync::PyOnceLock;
use pyo3::types::{IntoPyDict, PyBytes, PyDict, PyList, PyTuple, PyType};

use crate::config::{check_port, ConnectSpec, HostKeyPolicy, Options, TunnelMode};
use crate::error::Error;
use crate::exec::ExecOutput;
use crate::exit_gate::{self, Entry};
use crate::forward::Forward;
use crate::keepalive::{self, Channel, KeepAlive, MAX_KEEP_ALIVE_INTERVAL};
use crate::metrics::{self as native_metrics, counted, Operation};
use crate::pool::{self, ForwardRequest};
use crate::requests;
use crate::runtime;

/// Looks up an exception class of egtunnel.errors once; they are defined in Python so callers can
/// subclass and pickle them.
fn exc_type<'py>(py: Python<'py>, cell: &'static PyOnceLock<Py<PyType>>, name: &str) -> PyResult<&'py Bound<'py, PyType>> {
    let t = cell.get_or_try_init(py, || -> PyResult<Py<PyType>> {
        let module = py.import("egtunnel.errors")?;
        Ok(module.getattr(name)?.cast_into::<PyType>()?.unbind())
    })?;
    Ok(t.bind(py))
}

/// The single mapping from core errors to Python exceptions. `context` names the channel or call.
fn to_py(err: Error, context: &str) -> PyErr {
    to_py_gated(err, context, None)
}

/// Exception arguments that carry an exit-gate entry until Python converts them (under the GIL), so
/// that an error handed to the asyncio bridge keeps the gate waiting until it has reached Python.
struct GatedArgs<A> {
    args: A,
    _entry: Option<Entry>,
}

impl<A: PyErrArguments> PyErrArguments for GatedArgs<A> {
    fn arguments(self, py: Python<'_>) -> Py<PyAny> {
        self.args.arguments(py)
    }
}

fn gated<A>(args: A, entry: &mut Option<Entry>) -> GatedArgs<A> {
    GatedArgs { args, _entry: entry.take() }
}

fn to_py_gated(err: Error, context: &str, entry: Option<Entry>) -> PyErr {
    static TUNNEL: PyOnceLock<Py<PyType>> = PyOnceLock::new();
    static CONNECT: PyOnceLock<Py<PyType>> = PyOnceLock::new();
    static AUTH: PyOnceLock<Py<PyType>> = PyOnceLock::new();
    static HOST_KEY: PyOnceLock<Py<PyType>> = PyOnceLock::new();
    static DOWN: PyOnceLock<Py<PyType>> = PyOnceLock::new();
    static TIMEOUT: PyOnceLock<Py<PyType>> = PyOnceLock::new();
    static PROHIBITED: PyOnceLock<Py<PyType>> = PyOnceLock::new();
    static CONFIG: PyOnceLock<Py<PyType>> = PyOnceLock::new();
    let msg = if context.is_empty() { err.to_string() } else { format!("{context}: {err}") };
    let mut entry = entry;
    Python::attach(|py| {
        let (cell, name) = match err.primary() {
            Error::Invalid(_) => return PyValueError::new_err(gated((msg,), &mut entry)),
            // errno set so code written for sockets (EG checks `e.errno == ECONNREFUSED`) works as is.
            Error::Refused { .. } => return PyConnectionRefusedError::new_err(gated((libc::ECONNREFUSED, msg), &mut entry)),
            Error::Prohibited { .. } => (&PROHIBITED, "ForwardingProhibited"),
            Error::Bind { in_use: true, .. } => return PyOSError::new_err(gated((libc::EADDRINUSE, msg), &mut entry)),
            Error::Bind { .. } => return PyOSError::new_err(gated((msg,), &mut entry)),
            Error::Connect { .. } => (&CONNECT, "SshConnectError"),
            Error::Auth { .. } => (&AUTH, "SshAuthError"),
            Error::HostKey { .. } => (&HOST_KEY, "HostKeyError"),
            Error::Down { .. } => (&DOWN, "ConnectionDown"),
            Error::Timeout { .. } => (&TIMEOUT, "TunnelTimeout"),
            Error::Config { .. } => (&CONFIG, "SshConfigError"),
            Error::Other { .. } | Error::Channels { .. } => (&TUNNEL, "TunnelError"),
        };
        match exc_type(py, cell, name) {
            Ok(t) => PyErr::from_type(t.clone(), gated((msg,), &mut entry)),
            Err(e) => e,
        }
    })
}

/// Runs `fut` on the runtime with the GIL released. The GIL is taken back only through the exit gate:
/// a daemon thread still waiting here when Python finalizes never returns (see `exit_gate`).
fn wait<F>(py: Python<'_>, fut: F) -> F::Output
where
    F: Future + Send,
    F::Output: Send,
{
    let (out, entry) = py.detach(|| (runtime::block_on(fut), exit_gate::before_returning_to_python()));
    drop(entry);
    out
}

/// A value on its way to Python through the asyncio bridge, holding the exit gate open until it is
/// converted (under the GIL).
struct Gated<T> {
    value: T,
    _entry: Entry,
}

impl<'py, T: IntoPyObject<'py>> IntoPyObject<'py> for Gated<T> {
    type Target = T::Target;
    type Output = T::Output;
    type Error = T::Error;

    fn into_pyobject(self, py: Python<'py>) -> Result<Self::Output, Self::Error> {
        self.value.into_pyobject(py)
    }
}

/// An asyncio awaitable for `fut`, driven by egtunnel's runtime; errors are mapped under `context`.
/// Once Python is shutting down the awaitable is left pending: completing it would take the GIL from a
/// runtime thread during finalization.
fn awaitable<'py, F, T>(py: Python<'py>, context: String, fut: F) -> PyResult<Bound<'py, PyAny>>
where
    F: Future<Output = crate::error::Result<T>> + Send + 'static,
    T: for<'a> IntoPyObject<'a> + Send + 'static,
{
    pyo3_async_runtimes::tokio::future_into_py(py, async move {
        let r = fut.await;
        let Some(entry) = exit_gate::enter() else {
            return std::future::pending().await;
        };
        match r {
            Ok(value) => Ok(Gated { value, _entry: entry }),
            Err(e) => Err(to_py_gated(e, &context, Some(entry))),
        }
    })
}

fn invalid(msg: String) -> PyErr {
    PyValueError::new_err(msg)
}

/// Set once the first open of the process has looked at EG_TUNNEL_METRICS_PORT.
static METRICS_HOOKED: AtomicBool = AtomicBool::new(false);

/// Starts the Prometheus endpoint on the first open when EG_TUNNEL_METRICS_PORT is set; afterwards one
/// atomic load. Never fails or delays the open beyond binding a local socket: whatever goes wrong is
/// logged by `egtunnel.metrics`, or here when that module cannot even be imported.
fn metrics_hook(py: Python<'_>) {
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

/// A culling timeout as Python gives it: ints are unbounded there and EG compares them as such, so
/// values beyond i64 saturate instead of failing.
struct Seconds(i64);

impl<'py> FromPyObject<'_, 'py> for Seconds {
    type Error = PyErr;

    fn extract(v: Borrowed<'_, 'py, PyAny>) -> PyResult<Self> {
        saturating_i64(&v, "cull_idle_timeout").map(Seconds)
    }
}

fn saturating_i64(v: &Bound<'_, PyAny>, what: &str) -> PyResult<i64> {
    if v.is_instance_of::<pyo3::types::PyBool>() {
        return Err(invalid(format!("{what} must be an integer, got a bool")));
    }
    match v.extract::<i64>() {
        Ok(i) => Ok(i),
        Err(_) if v.is_instance_of::<pyo3::types::PyInt>() => {
            Ok(if v.gt(0)? { i64::MAX } else { i64::MIN })
        }
        Err(_) => Err(pyo3::exceptions::PyTypeError::new_err(format!(
            "{what} must be an integer, got {}",
            v.get_type().name()?
        ))),
    }
}

fn parse_channel(channel: &str) -> PyResult<Channel> {
    channel.parse::<Channel>().map_err(invalid)
}

/// The keep-alive interval EG would use for `channel` given the culling timeout.
#[pyfunction]
#[pyo3(signature = (channel, cull_idle_timeout, margin = 60))]
fn keep_alive_interval(channel: &str, cull_idle_timeout: Seconds, margin: i64) -> PyResult<i64> {
    let ch = parse_channel(channel)?;
    keepalive::keep_alive_interval(ch, cull_idle_timeout.0, margin).map_err(invalid)
}

/// A listening forward; `terminate()` (or leaving a `with` block) closes it.
#[pyclass(frozen, module = "egtunnel._native")]
struct Tunnel {
    fwd: Arc<Forward>,
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
        d.set_item("keepalives_sent", self.fwd.conn.snapshot().counts.keepalives_sent)?;
        Ok(d)
    }

    /// Delivers `data` to the remote port on a fresh channel and waits for the remote end to close.
    #[pyo3(signature = (data, timeout = 10.0))]
    fn send_request(&self, py: Python<'_>, data: Vec<u8>, timeout: f64) -> PyResult<()> {
        let timeout = positive_duration(timeout, "timeout")?;
        let fwd = self.fwd.clone();
        let ctx = format!("{} request", fwd.info.channel);
        let Some(in_flight) = fwd.begin_request() else {
            return Err(to_py(terminated(&fwd), &ctx));
        };
        let r = wait(py, pool::send_request(&fwd, data, timeout));
        drop(in_flight);
        r.map_err(|e| to_py(e, &ctx))
    }

    /// Awaitable form of `send_request`: driven by egtunnel's runtime, no thread of the caller's.
    /// Closing the tunnel meanwhile lets the request finish first.
    #[pyo3(signature = (data, timeout = 10.0))]
    fn request<'py>(&self, py: Python<'py>, data: Vec<u8>, timeout: f64) -> PyResult<Bound<'py, PyAny>> {
        let timeout = positive_duration(timeout, "timeout")?;
        let fwd = self.fwd.clone();
        let ctx = format!("{} request", fwd.info.channel);
        let Some(in_flight) = fwd.begin_request() else {
            return Err(to_py(terminated(&fwd), &ctx));
        };
        awaitable(py, ctx, async move {
            let r = pool::send_request(&fwd, data, timeout).await;
            drop(in_flight);
            // Resolves to None, as `send_request` returns: a bare `()` would become an empty tuple.
            r.map(|()| None::<()>)
        })
    }

    /// The last known liveness of what listens behind the tunnel ("alive", "dead" or "unknown") and,
    /// unless one is already out, a background probe delivering `data` whose answer the next call
    /// returns. Never waits on the network.
    #[pyo3(signature = (data, timeout = 10.0))]
    fn probe(&self, data: Vec<u8>, timeout: f64) -> PyResult<&'static str> {
        let timeout = positive_duration(timeout, "timeout")?;
        Ok(requests::probe(&self.fwd, data, timeout).as_str())
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
    fn __exit__(&self, _exc: &Bound<'_, pyo3::types::PyTuple>) {
        self.terminate();
    }

    fn __repr__(&self) -> String {
        let i = &self.fwd.info;
        format!(
            "<Tunnel {} 127.0.0.1:{} -> {}:{} via {} ({})>",
            i.channel,
            i.local_port,
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

fn positive_duration(secs: f64, what: &str) -> PyResult<Duration> {
    if secs.is_finite() && secs > 0.0 {
        Ok(Duration::from_secs_f64(secs))
    } else {
        Err(invalid(format!("{what} must be a positive number of seconds, got {secs}")))
    }
}

/// The caller's settings; every one left unset is taken from ssh_config, then OpenSSH's defaults.
#[allow(clippy::too_many_arguments)]
fn options(
    port: Option<i64>,
    user: Option<&str>,
    identity_file: Option<&str>,
    password: Option<&str>,
    known_hosts: Option<&str>,
    host_key_policy: Option<&str>,
    connect_timeout: Option<f64>,
    ssh_config: Option<&str>,
    max_sessions: i64,
    max_startups: i64,
) -> PyResult<Options> {
    Options::parse(port, user, identity_file, password, known_hosts, host_key_policy, connect_timeout, ssh_config)
        .and_then(|o| o.with_limits(max_sessions, max_startups))
        .map_err(|e| to_py(e, ""))
}

/// The caller's settings resolved for `host` (ssh_config, then OpenSSH's defaults fill what is unset).
fn spec(host: &str, opts: Options) -> PyResult<ConnectSpec> {
    ConnectSpec::resolve(host, &opts).map_err(|e| to_py(e, ""))
}

/// The keep-alive probe count: the caller's, else ssh_config's ServerAliveCountMax, else 3.
fn count_max(explicit: Option<i64>, spec: &ConnectSpec) -> PyResult<u32> {
    match explicit {
        None => Ok(spec.count_max.unwrap_or(3)),
        Some(n) if (1..=u32::MAX as i64).contains(&n) => Ok(n as u32),
        Some(n) => Err(invalid(format!("keepalive_count_max must be a positive integer, got {n}"))),
    }
}

/// Opens a local forward 127.0.0.1:local_port → remote_host:remote_port through SSH to `host`.
#[pyfunction]
#[pyo3(signature = (
    host, remote_host, remote_port, *, channel = "SHELL", cull_idle_timeout = Seconds(0), keepalive_margin = 60,
    keepalive_count_max = None, port = None, user = None, identity_file = None, password = None, known_hosts = None,
    host_key_policy = None, local_port = 0, connect_timeout = None, mode = "per-port", kernel_id = None,
    verify = false, max_sessions = 8, max_startups = 8, refused_wait = 30.0, ssh_config = None
), text_signature = "(host, remote_host, remote_port, *, channel='SHELL', cull_idle_timeout=0, \
keepalive_margin=60, keepalive_count_max=None, port=None, user=None, identity_file=None, password=None, known_hosts=None, \
host_key_policy=None, local_port=0, connect_timeout=None, mode='per-port', kernel_id=None, verify=False, \
max_sessions=8, max_startups=8, refused_wait=30.0, ssh_config=None)")]
#[allow(clippy::too_many_arguments)]
fn open_tunnel(
    py: Python<'_>,
    host: &str,
    remote_host: &str,
    remote_port: i64,
    channel: &str,
    cull_idle_timeout: Seconds,
    keepalive_margin: i64,
    keepalive_count_max: Option<i64>,
    port: Option<i64>,
    user: Option<&str>,
    identity_file: Option<&str>,
    password: Option<&str>,
    known_hosts: Option<&str>,
    host_key_policy: Option<&str>,
    local_port: i64,
    connect_timeout: Option<f64>,
    mode: &str,
    kernel_id: Option<String>,
    verify: bool,
    max_sessions: i64,
    max_startups: i64,
    refused_wait: f64,
    ssh_config: Option<&str>,
) -> PyResult<Tunnel> {
    let refused_wait = if refused_wait == 0.0 { Duration::ZERO } else { positive_duration(refused_wait, "refused_wait")? };
    let ch = parse_channel(channel)?;
    let keep_alive = KeepAlive::for_channel(ch, cull_idle_timeout.0, keepalive_margin).map_err(invalid)?;
    let remote_port = check_port("remote_port", remote_port, false).map_err(|e| to_py(e, ""))?;
    let local_port = check_port("local_port", local_port, true).map_err(|e| to_py(e, ""))?;
    let mode: TunnelMode = mode.parse().map_err(|e| to_py(e, ""))?;
    let spec = spec(host, options(port, user, identity_file, password, known_hosts, host_key_policy, connect_timeout, ssh_config, max_sessions, max_startups)?)?;
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
    };
    let fwd = wait(py, counted(&spec, Operation::Forward, pool::open_forward(&spec, mode, req))).map_err(|e| to_py(e, &ctx))?;
    Ok(Tunnel { fwd })
}

/// The result of a remote command.
#[pyclass(frozen, module = "egtunnel._native")]
struct ExecResult {
    out: ExecOutput,
}

#[pymethods]
impl ExecResult {
    #[getter]
    fn exit_status(&self) -> Option<i32> {
        self.out.exit_status
    }
    #[getter]
    fn stdout<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, &self.out.stdout)
    }
    #[getter]
    fn stderr<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, &self.out.stderr)
    }
    /// stdout lines, or stderr lines when stdout is empty (Enterprise Gateway's `rsh` contract).
    fn lines(&self) -> Vec<String> {
        self.out.lines()
    }
    fn __repr__(&self) -> String {
        format!("<ExecResult exit_status={:?} stdout={}B stderr={}B>", self.out.exit_status, self.out.stdout.len(), self.out.stderr.len())
    }
}

/// Runs `command` on `host` over the pooled SSH connection (opened on first use).
#[pyfunction]
#[pyo3(signature = (
    host, command, *, port = None, user = None, identity_file = None, password = None, known_hosts = None,
    host_key_policy = None, connect_timeout = None, timeout = 30.0, max_sessions = 8, max_startups = 8, ssh_config = None
))]
#[allow(clippy::too_many_arguments)]
fn remote_exec(
    py: Python<'_>,
    host: &str,
    command: &str,
    port: Option<i64>,
    user: Option<&str>,
    identity_file: Option<&str>,
    password: Option<&str>,
    known_hosts: Option<&str>,
    host_key_policy: Option<&str>,
    connect_timeout: Option<f64>,
    timeout: f64,
    max_sessions: i64,
    max_startups: i64,
    ssh_config: Option<&str>,
) -> PyResult<ExecResult> {
    let timeout = positive_duration(timeout, "timeout")?;
    let spec = spec(host, options(port, user, identity_file, password, known_hosts, host_key_policy, connect_timeout, ssh_config, max_sessions, max_startups)?)?;
    metrics_hook(py);
    let out = wait(py, counted(&spec, Operation::Command, pool::exec(&spec, command, timeout))).map_err(|e| to_py(e, "remote command"))?;
    Ok(ExecResult { out })
}

/// One SSH destination with its settings, validated once: remote commands and a kernel's forwards,
/// each as a blocking call or as an asyncio awaitable driven by egtunnel's runtime (no thread of the
/// caller's). Cancelling an awaitable stops the native work and releases what it held.
#[pyclass(frozen, module = "egtunnel._native")]
struct SshTarget {
    spec: ConnectSpec,
}

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
) -> PyResult<PlanArgs> {
    let mode: TunnelMode = mode.parse().map_err(|e| to_py(e, ""))?;
    if !(1..=10_000).contains(&bind_attempts) {
        return Err(invalid(format!("bind_attempts must be an integer from 1 to 10000, got {bind_attempts}")));
    }
    let lo = check_port("port_range lower bound", port_range.0, true).map_err(|e| to_py(e, ""))?;
    let hi = check_port("port_range upper bound", port_range.1, true).map_err(|e| to_py(e, ""))?;
    let refused_wait = if refused_wait == 0.0 { Duration::ZERO } else { positive_duration(refused_wait, "refused_wait")? };
    if forwards.is_empty() {
        return Err(invalid("forwards must name at least one (channel, remote_host, remote_port)".into()));
    }
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
        });
    }
    let plan = pool::KernelPlan { forwards: reqs, port_range: (lo, hi), bind_attempts: bind_attempts as u32, verify };
    Ok(PlanArgs { mode, plan })
}

fn tunnels(forwards: Vec<Arc<Forward>>) -> Vec<Tunnel> {
    forwards.into_iter().map(|fwd| Tunnel { fwd }).collect()
}

#[pymethods]
impl SshTarget {
    #[new]
    #[pyo3(signature = (
        host, *, port = None, user = None, identity_file = None, password = None, known_hosts = None,
        host_key_policy = None, connect_timeout = None, max_sessions = 8, max_startups = 8, ssh_config = None
    ))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        host: &str,
        port: Option<i64>,
        user: Option<&str>,
        identity_file: Option<&str>,
        password: Option<&str>,
        known_hosts: Option<&str>,
        host_key_policy: Option<&str>,
        connect_timeout: Option<f64>,
        max_sessions: i64,
        max_startups: i64,
        ssh_config: Option<&str>,
    ) -> PyResult<Self> {
        let spec = spec(host, options(port, user, identity_file, password, known_hosts, host_key_policy, connect_timeout, ssh_config, max_sessions, max_startups)?)?;
        Ok(SshTarget { spec })
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
    fn exec(&self, py: Python<'_>, command: &str, timeout: f64) -> PyResult<ExecResult> {
        let timeout = positive_duration(timeout, "timeout")?;
        let spec = self.spec.clone();
        metrics_hook(py);
        let out = wait(py, counted(&spec, Operation::Command, pool::exec(&spec, command, timeout)))
            .map_err(|e| to_py(e, "remote command"))?;
        Ok(ExecResult { out })
    }

    /// Awaitable form of `exec`.
    #[pyo3(signature = (command, timeout = 30.0))]
    fn exec_async<'py>(&self, py: Python<'py>, command: String, timeout: f64) -> PyResult<Bound<'py, PyAny>> {
        let timeout = positive_duration(timeout, "timeout")?;
        let spec = self.spec.clone();
        metrics_hook(py);
        awaitable(py, "remote command".into(), async move {
            counted(&spec, Operation::Command, pool::exec(&spec, &command, timeout)).await.map(|out| ExecResult { out })
        })
    }

    /// Opens a kernel's forwards, all or nothing; returns the tunnels in the order given. Blocks.
    #[pyo3(signature = (
        forwards, *, port_range = (0, 0), bind_attempts = 6, mode = "shared", cull_idle_timeout = Seconds(0),
        keepalive_margin = 60, keepalive_count_max = None, kernel_id = None, verify = true, refused_wait = 30.0
    ), text_signature = "(self, /, forwards, *, port_range=(0, 0), bind_attempts=6, mode='shared', \
cull_idle_timeout=0, keepalive_margin=60, keepalive_count_max=None, kernel_id=None, verify=True, refused_wait=30.0)")]
    #[allow(clippy::too_many_arguments)]
    fn open_forwards(
        &self,
        py: Python<'_>,
        forwards: Vec<(String, String, i64)>,
        port_range: (i64, i64),
        bind_attempts: i64,
        mode: &str,
        cull_idle_timeout: Seconds,
        keepalive_margin: i64,
        keepalive_count_max: Option<i64>,
        kernel_id: Option<String>,
        verify: bool,
        refused_wait: f64,
    ) -> PyResult<Vec<Tunnel>> {
        let count = count_max(keepalive_count_max, &self.spec)?;
        let args = plan_args(forwards, port_range, bind_attempts, mode, cull_idle_timeout.0, keepalive_margin,
                             count, kernel_id, verify, refused_wait)?;
        let spec = self.spec.clone();
        metrics_hook(py);
        let opened = wait(py, counted(&spec, Operation::Forward, pool::open_kernel_forwards(&spec, args.mode, args.plan)));
        opened.map(tunnels).map_err(|e| to_py(e, ""))
    }

    /// Awaitable form of `open_forwards`; cancelling it closes whatever it had opened.
    #[pyo3(signature = (
        forwards, *, port_range = (0, 0), bind_attempts = 6, mode = "shared", cull_idle_timeout = Seconds(0),
        keepalive_margin = 60, keepalive_count_max = None, kernel_id = None, verify = true, refused_wait = 30.0
    ), text_signature = "(self, /, forwards, *, port_range=(0, 0), bind_attempts=6, mode='shared', \
cull_idle_timeout=0, keepalive_margin=60, keepalive_count_max=None, kernel_id=None, verify=True, refused_wait=30.0)")]
    #[allow(clippy::too_many_arguments)]
    fn open_forwards_async<'py>(
        &self,
        py: Python<'py>,
        forwards: Vec<(String, String, i64)>,
        port_range: (i64, i64),
        bind_attempts: i64,
        mode: &str,
        cull_idle_timeout: Seconds,
        keepalive_margin: i64,
        keepalive_count_max: Option<i64>,
        kernel_id: Option<String>,
        verify: bool,
        refused_wait: f64,
    ) -> PyResult<Bound<'py, PyAny>> {
        let count = count_max(keepalive_count_max, &self.spec)?;
        let args = plan_args(forwards, port_range, bind_attempts, mode, cull_idle_timeout.0, keepalive_margin,
                             count, kernel_id, verify, refused_wait)?;
        let spec = self.spec.clone();
        metrics_hook(py);
        awaitable(py, String::new(), async move {
            counted(&spec, Operation::Forward, pool::open_kernel_forwards(&spec, args.mode, args.plan)).await.map(tunnels)
        })
    }

    fn __repr__(&self) -> String {
        format!("<SshTarget {}>", self.spec.dest())
    }
}

/// Every live SSH connection with its forwards.
#[pyfunction]
fn status<'py>(py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
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
            forwards.append(fd)?;
        }
        d.set_item("forwards", forwards)?;
        list.append(d)?;
    }
    Ok(list)
}

/// Per-destination totals and live gauges, for `egtunnel.metrics` to turn into Prometheus families.
#[pyfunction]
fn metrics<'py>(py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
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

/// The effective settings for `host`: (setting, value, origin) rows, origins being `argument`,
/// `default` or ssh_config `file:line`; and the route, first hop first, `host` last.
#[pyfunction]
#[pyo3(signature = (
    host, *, port = None, user = None, identity_file = None, known_hosts = None, host_key_policy = None,
    connect_timeout = None, ssh_config = None
))]
#[allow(clippy::too_many_arguments, clippy::type_complexity)]
fn explain(
    host: &str,
    port: Option<i64>,
    user: Option<&str>,
    identity_file: Option<&str>,
    known_hosts: Option<&str>,
    host_key_policy: Option<&str>,
    connect_timeout: Option<f64>,
    ssh_config: Option<&str>,
) -> PyResult<(Vec<(String, String, String)>, Vec<String>)> {
    let opts = options(port, user, identity_file, None, known_hosts, host_key_policy, connect_timeout, ssh_config, 8, 3)?;
    let (spec, rows) = ConnectSpec::explain(host, &opts, true).map_err(|e| to_py(e, ""))?;
    let rows = rows.into_iter().map(|r| (r.setting.to_string(), r.value, r.origin)).collect();
    Ok((rows, spec.route().iter().map(|s| s.dest()).collect()))
}

/// Runs every stage of reaching `host`, calling `report(hop, stage, ok, detail, seconds)` after each;
/// True when all passed. Blocks (GIL released between reports).
#[pyfunction]
#[pyo3(signature = (
    host, report, *, port = None, user = None, identity_file = None, password = None, known_hosts = None,
    host_key_policy = None, connect_timeout = None, ssh_config = None, command = "echo egtunnel-check"
))]
#[allow(clippy::too_many_arguments)]
fn check_host(
    py: Python<'_>,
    host: &str,
    report: Py<PyAny>,
    port: Option<i64>,
    user: Option<&str>,
    identity_file: Option<&str>,
    password: Option<&str>,
    known_hosts: Option<&str>,
    host_key_policy: Option<&str>,
    connect_timeout: Option<f64>,
    ssh_config: Option<&str>,
    command: &str,
) -> PyResult<bool> {
    let spec = spec(host, options(port, user, identity_file, password, known_hosts, host_key_policy, connect_timeout, ssh_config, 8, 3)?)?;
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

static LOG_RESET: once_cell::sync::OnceCell<pyo3_log::ResetHandle> = once_cell::sync::OnceCell::new();

/// pyo3-log behind the exit gate: records from threads that would have to take the GIL go to Python
/// logging while the interpreter lives, and warnings and errors to stderr once it is shutting down.
struct GatedLogger(pyo3_log::Logger);

impl log::Log for GatedLogger {
    fn enabled(&self, metadata: &log::Metadata) -> bool {
        self.0.enabled(metadata)
    }

    fn log(&self, record: &log::Record) {
        if !self.0.enabled(record.metadata()) {
            return;
        }
        match exit_gate::enter() {
            Some(_entry) => self.0.log(record),
            None if record.level() <= log::Level::Warn => {
                eprintln!("{} {}: {}", record.level(), record.target(), record.args())
            }
            None => {}
        }
    }

    fn flush(&self) {}
}

/// Registered with atexit at import: no thread but this one enters Python from now on, and the calls
/// into Python already in flight finish first (see `exit_gate`).
#[pyfunction]
fn _at_exit(py: Python<'_>) {
    let left = py.detach(|| exit_gate::close(Duration::from_secs(2)));
    if left > 0 {
        eprintln!("egtunnel: {left} call(s) into Python still in flight at exit");
    }
}

/// Forgets the cached levels of the `egtunnel` loggers; call after changing them at run time.
#[pyfunction]
fn refresh_log_levels() {
    if let Some(handle) = LOG_RESET.get() {
        handle.reset();
    }
}

// PyO3 0.28 made modules declare free-threading support by default; egtunnel keeps declaring that it
// needs the GIL, as its exit gate and GIL-holding calls were reasoned about with one.
#[pymodule(gil_used = true)]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    // Awaitables run on egtunnel's one runtime rather than a second one of the bridge's.
    let _ = pyo3_async_runtimes::tokio::init_with_runtime(runtime::handle());
    // Rust `log` records go to Python logging under the "egtunnel" logger. Levels are cached too, so a
    // disabled record (every debug line of a busy gateway) never takes the GIL from a runtime thread;
    // `refresh_log_levels()` makes a later change of Python's levels visible.
    let logger = pyo3_log::Logger::new(m.py(), pyo3_log::Caching::LoggersAndLevels)?
        .filter_target("egtunnel".to_owned(), log::LevelFilter::Trace);
    let reset = logger.reset_handle();
    if log::set_boxed_logger(Box::new(GatedLogger(logger))).is_ok() {
        log::set_max_level(log::LevelFilter::Trace);
        let _ = LOG_RESET.set(reset);
    }
    // Closes the exit gate before the interpreter finalizes (atexit runs its handlers last registered
    // first, so the gateway's own handlers, which may still close tunnels and log, run before this one).
    m.py().import("atexit")?.call_method1("register", (wrap_pyfunction!(_at_exit, m)?,))?;
    m.add("MAX_KEEP_ALIVE_INTERVAL", MAX_KEEP_ALIVE_INTERVAL)?;
    let py = m.py();
    m.add("CHANNELS", PyTuple::new(py, Channel::ALL.iter().map(|c| c.as_str()))?)?;
    m.add("TUNNEL_MODES", PyTuple::new(py, TunnelMode::NAMES)?)?;
    m.add("HOST_KEY_POLICIES", PyTuple::new(py, HostKeyPolicy::NAMES)?)?;
    m.add_function(wrap_pyfunction!(keep_alive_interval, m)?)?;
    m.add_function(wrap_pyfunction!(open_tunnel, m)?)?;
    m.add_function(wrap_pyfunction!(remote_exec, m)?)?;
    m.add_function(wrap_pyfunction!(status, m)?)?;
    m.add_function(wrap_pyfunction!(metrics, m)?)?;
    m.add_function(wrap_pyfunction!(refresh_log_levels, m)?)?;
    m.add_function(wrap_pyfunction!(explain, m)?)?;
    m.add_function(wrap_pyfunction!(check_host, m)?)?;
    m.add_class::<Tunnel>()?;
    m.add_class::<ExecResult>()?;
    m.add_class::<SshTarget>()?;
    Ok(())
}
