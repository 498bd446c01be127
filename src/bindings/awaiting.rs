//! The two ways a call waits on the network: blocking with the GIL released (`wait`), or as an asyncio
//! awaitable driven by egtunnel's runtime (`awaitable`); both return to Python only through the exit gate.

use std::future::Future;

use pyo3::prelude::*;

use super::errors::{to_py, to_py_gated};
use crate::exit_gate::{self, Entry};
use crate::runtime;

/// Runs `fut` on the runtime with the GIL released. The GIL is taken back only through the exit gate:
/// a daemon thread still waiting here when Python finalizes never returns (see `exit_gate`).
pub(super) fn wait<F>(py: Python<'_>, fut: F) -> F::Output
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
pub(super) fn awaitable<'py, F, T>(py: Python<'py>, context: String, fut: F) -> PyResult<Bound<'py, PyAny>>
where
    F: Future<Output = crate::error::Result<T>> + Send + 'static,
    T: for<'a> IntoPyObject<'a> + Send + 'static,
{
    // The work runs on egtunnel's runtime; the bridge only waits for it (and cancels it by dropping
    // the wait).
    let work = Spawned(runtime::handle().spawn(fut));
    pyo3_async_runtimes::tokio::future_into_py(py, async move {
        let r = match work.await {
            Ok(r) => r,
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        };
        let Some(entry) = exit_gate::enter() else {
            return std::future::pending().await;
        };
        match r {
            Ok(value) => Ok(Gated { value, _entry: entry }),
            Err(e) => Err(to_py_gated(e, &context, Some(entry))),
        }
    })
}

/// A task on egtunnel's runtime that is aborted when whoever waits for it stops waiting (an awaitable
/// cancelled from Python).
struct Spawned<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for Spawned<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl<T> Future for Spawned<T> {
    type Output = Result<T, tokio::task::JoinError>;

    fn poll(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<Self::Output> {
        std::pin::Pin::new(&mut self.0).poll(cx)
    }
}

/// The network part of a call that Python can make blocking or awaitable: what to name in errors,
/// and the work itself, ready to run on the runtime. Each pair of entry points builds one and hands it
/// to `block` or `into_awaitable`, so the two forms cannot drift apart.
pub(super) struct Call<F> {
    pub context: String,
    pub work: F,
}

impl<F, T> Call<F>
where
    F: Future<Output = crate::error::Result<T>> + Send + 'static,
    T: for<'a> IntoPyObject<'a> + Send + 'static,
{
    /// The blocking form: waits with the GIL released.
    pub fn block(self, py: Python<'_>) -> PyResult<T> {
        wait(py, self.work).map_err(|e| to_py(e, &self.context))
    }

    /// The awaitable form, driven by egtunnel's runtime.
    pub fn into_awaitable(self, py: Python<'_>) -> PyResult<Bound<'_, PyAny>> {
        awaitable(py, self.context, self.work)
    }
}
