//! The single mapping from the core's `Error` to egtunnel's Python exceptions, and the exception
//! arguments that keep the exit gate open until Python has them.

use pyo3::exceptions::{PyConnectionRefusedError, PyOSError, PyValueError};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::PyType;
use pyo3::PyErrArguments;

use crate::error::Error;
use crate::exit_gate::Entry;

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
pub(super) fn to_py(err: Error, context: &str) -> PyErr {
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

pub(super) fn to_py_gated(err: Error, context: &str, entry: Option<Entry>) -> PyErr {
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

/// A caller's mistake that the bindings catch themselves, as the ValueError the core's `Invalid` maps to.
pub(super) fn invalid(msg: String) -> PyErr {
    PyValueError::new_err(msg)
}
