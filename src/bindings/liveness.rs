//! `Liveness`, a kernel's liveness as its remote-command polls find it: the record lives here, in
//! Rust, and Python only asks it (see `command_probe` for the rule).

use std::sync::Arc;

use pyo3::prelude::*;

use super::arguments::positive_duration;
use super::awaiting::wait;
use super::classes::SshTarget;
use super::reports::metrics_hook;
use crate::command_probe;
use crate::liveness::{Liveness, State};

/// One kernel's liveness, polled by a remote command; `what` names the poll in log lines.
#[pyclass(frozen, name = "Liveness", module = "egtunnel._native")]
pub(super) struct KernelLiveness {
    live: Arc<Liveness>,
    what: Arc<str>,
}

#[pymethods]
impl KernelLiveness {
    #[new]
    fn new(what: String) -> Self {
        KernelLiveness { live: Arc::default(), what: what.into() }
    }

    /// "alive", "dead" or "unknown", as the last poll found it ("alive" before any).
    #[getter]
    fn state(&self) -> &'static str {
        self.live.get().as_str()
    }

    /// Records that the kernel is gone, as something other than a poll found (a signal `kill` could
    /// not deliver).
    fn mark_dead(&self) {
        self.live.set(State::Dead);
    }

    /// The last known state and, unless a poll is already out, `command` started on `target`'s pooled
    /// connection in the background; its answer is what the next call returns. Never waits on the network.
    #[pyo3(signature = (target, command, timeout = 30.0))]
    fn probe_command(&self, py: Python<'_>, target: PyRef<'_, SshTarget>, command: &str, timeout: f64) -> PyResult<&'static str> {
        let timeout = positive_duration(timeout, "timeout")?;
        metrics_hook(py);
        Ok(command_probe::probe(&self.live, &self.what, &target.spec, command, timeout).as_str())
    }

    /// The blocking form of `probe_command`, for callers off the event loop: runs `command`, records
    /// its answer and returns the resulting state. Blocks (GIL released).
    #[pyo3(signature = (target, command, timeout = 30.0))]
    fn probe_command_blocking(&self, py: Python<'_>, target: PyRef<'_, SshTarget>, command: &str, timeout: f64) -> PyResult<&'static str> {
        let timeout = positive_duration(timeout, "timeout")?;
        metrics_hook(py);
        let spec = target.spec.clone();
        Ok(wait(py, command_probe::probe_wait(&self.live, &self.what, &spec, command, timeout)).as_str())
    }

    fn __repr__(&self) -> String {
        format!("<Liveness {}: {}>", self.what, self.live.get().as_str())
    }
}
