//! `ExecResult`, a remote command's outcome as Python reads it, and `remote_exec`, which runs one.

use pyo3::prelude::*;
use pyo3::types::PyBytes;

use super::arguments::positive_duration;
use super::awaiting::wait;
use super::errors::to_py;
use super::signatures::signatures;
use super::reports::metrics_hook;
use crate::exec::ExecOutput;
use crate::metrics::{counted, Operation};
use crate::pool;

/// The result of a remote command.
#[pyclass(frozen, module = "egtunnel._native")]
pub(super) struct ExecResult {
    pub(super) out: ExecOutput,
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

signatures! {
    /// Runs `command` on `host` over the pooled SSH connection (opened on first use).
    #[pyfunction]
    pub(super) fn remote_exec(
        py, host: &str, command: &str, *,
        ..login, ..password, ..host_keys, ..connect_timeout,
        timeout: f64 = 30.0,
        ..limits, ..ssh_config
    ) -> PyResult<ExecResult> |conn| {
        let timeout = positive_duration(timeout, "timeout")?;
        let spec = conn.spec(host)?;
        metrics_hook(py);
        let out = wait(py, counted(&spec, Operation::Command, pool::exec(&spec, command, timeout))).map_err(|e| to_py(e, "remote command"))?;
        Ok(ExecResult { out })
    }
}
