//! The thin PyO3 layer (`egtunnel._native`): converts arguments, releases the GIL around network
//! waits, and maps the core's `Error` to egtunnel's Python exceptions in exactly one place.
//!
//! - `errors`: the Error → Python exception mapping (`to_py`), gated exception arguments.
//! - `awaiting`: blocking waits and asyncio awaitables, both behind the exit gate; `Call`, the one
//!   implementation behind each blocking/awaitable pair of entry points.
//! - `arguments`: Python arguments into the core's types (`Seconds`, durations, channels).
//! - `signatures`: `signatures!`, entry points whose keyword lists and `__text_signature__` are
//!   written once (connection keywords by group, a blocking/awaitable pair as one declaration), and
//!   the table of connection keywords (`connection_keywords!`).
//! - `options`: a call's connection keywords into the core's `Options`.
//! - `classes`: what a `Tunnel` and an `SshTarget` hold (their methods are in `tunnel` and `target`).
//! - `tunnel`: `Tunnel`, `open_tunnel`, `keep_alive_interval`.
//! - `target`: `SshTarget` (remote commands and a kernel's forwards).
//! - `exec`: `ExecResult`, `remote_exec`.
//! - `response`: `ResponseForward`, a kernel start's hold on the remote forward back to the gateway.
//! - `liveness`: `Liveness`, a kernel's liveness as its remote-command polls find it.
//! - `reports`: `status`, `metrics`, `explain`, `check_host`, and the metrics endpoint's start.
//! - `logging`: Rust `log` into Python logging, and the atexit hook that closes the exit gate.

mod arguments;
mod awaiting;
mod classes;
mod errors;
mod exec;
mod liveness;
mod logging;
mod options;
mod reports;
mod response;
mod signatures;
mod target;
mod tunnel;

use pyo3::prelude::*;
use pyo3::types::PyTuple;

use crate::config::{HostKeyPolicy, TunnelMode};
use crate::keepalive::{Channel, MAX_KEEP_ALIVE_INTERVAL};
use crate::runtime;

// PyO3 0.28 made modules declare free-threading support by default; egtunnel keeps declaring that it
// needs the GIL, as its exit gate and GIL-holding calls were reasoned about with one.
#[pymodule(gil_used = true)]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    // The bridge's own bookkeeping runs on its small runtime; the work itself on egtunnel's (see `runtime`).
    let _ = pyo3_async_runtimes::tokio::init_with_runtime(runtime::bridge());
    logging::install(m.py())?;
    // Closes the exit gate before the interpreter finalizes (atexit runs its handlers last registered
    // first, so the gateway's own handlers, which may still close tunnels and log, run before this one).
    m.py().import("atexit")?.call_method1("register", (wrap_pyfunction!(logging::_at_exit, m)?,))?;
    m.add("MAX_KEEP_ALIVE_INTERVAL", MAX_KEEP_ALIVE_INTERVAL)?;
    let py = m.py();
    m.add("CHANNELS", PyTuple::new(py, Channel::ALL.iter().map(|c| c.as_str()))?)?;
    m.add("TUNNEL_MODES", PyTuple::new(py, TunnelMode::NAMES)?)?;
    m.add("HOST_KEY_POLICIES", PyTuple::new(py, HostKeyPolicy::NAMES)?)?;
    m.add_function(wrap_pyfunction!(tunnel::keep_alive_interval, m)?)?;
    m.add_function(wrap_pyfunction!(tunnel::open_tunnel, m)?)?;
    m.add_function(wrap_pyfunction!(exec::remote_exec, m)?)?;
    m.add_function(wrap_pyfunction!(reports::status, m)?)?;
    m.add_function(wrap_pyfunction!(reports::metrics, m)?)?;
    m.add_function(wrap_pyfunction!(logging::refresh_log_levels, m)?)?;
    m.add_function(wrap_pyfunction!(reports::explain, m)?)?;
    m.add_function(wrap_pyfunction!(reports::check_host, m)?)?;
    m.add_class::<classes::Tunnel>()?;
    m.add_class::<exec::ExecResult>()?;
    m.add_class::<response::ResponseForward>()?;
    m.add_class::<classes::SshTarget>()?;
    m.add_class::<liveness::KernelLiveness>()?;
    Ok(())
}
