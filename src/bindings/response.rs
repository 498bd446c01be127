//! `ResponseForward`: a kernel start's hold on its host's remote forward back to the gateway. The
//! launcher is told `127.0.0.1:PORT` on its own host as the response address; the hold keeps the
//! shared connection (and with it the listener) up until the connection info has arrived.

use std::future::Future;
use std::sync::{Arc, Mutex};

use pyo3::prelude::*;

use super::arguments::positive_duration;
use super::awaiting::Call;
use super::errors::invalid;
use crate::config::ConnectSpec;
use crate::connection::Connection;
use crate::error::Result;
use crate::pool;
use crate::remote_listen::LOOPBACK;

/// The remote forward of one kernel start: `address` is what the launcher sends its connection info
/// to. `close()` (idempotent, never waits) lets the connection go once nothing else uses it.
#[pyclass(frozen, module = "egtunnel._native")]
pub(super) struct ResponseForward {
    conn: Mutex<Option<Arc<Connection>>>,
    port: u16,
}

impl ResponseForward {
    fn release(&self) {
        if let Some(conn) = self.conn.lock().unwrap().take() {
            pool::release_shared(&conn);
        }
    }
}

impl Drop for ResponseForward {
    fn drop(&mut self) {
        self.release();
    }
}

#[pymethods]
impl ResponseForward {
    /// The listener's port on the host's loopback.
    #[getter]
    fn port(&self) -> u16 {
        self.port
    }

    /// `127.0.0.1:PORT`, the response address to give the launcher.
    #[getter]
    fn address(&self) -> String {
        format!("{LOOPBACK}:{}", self.port)
    }

    /// Gives back this start's hold on the connection.
    fn close(&self) {
        self.release();
    }

    fn __repr__(&self) -> String {
        let state = if self.conn.lock().unwrap().is_some() { "open" } else { "closed" };
        format!("<ResponseForward {LOOPBACK}:{} {state}>", self.port)
    }
}

/// `response_forward` and `response_forward_async`: the pooled connection's remote listener, once
/// the server has answered for it.
pub(super) fn response_call(spec: &ConnectSpec, timeout: f64) -> PyResult<Call<impl Future<Output = Result<ResponseForward>> + Send + 'static>> {
    let timeout = positive_duration(timeout, "timeout")?;
    if spec.respond_to.is_none() {
        return Err(invalid(format!("{} has no respond_to address: call responding_to(address) first", spec.dest())));
    }
    let spec = spec.clone();
    Ok(Call {
        context: "remote forward".into(),
        work: async move {
            let (conn, port) = pool::response_lease(&spec, timeout).await?;
            Ok(ResponseForward { conn: Mutex::new(Some(conn)), port })
        },
    })
}
