//! The Python classes' handles, `Tunnel` and `SshTarget`: what each holds, apart from their methods
//! (`tunnel`, `target`), because each class's methods take the other (a target opens tunnels, a
//! tunnel's background send falls back to a target's remote command).

use std::sync::Arc;

use pyo3::prelude::*;

use crate::config::ConnectSpec;
use crate::forward::Forward;

/// A listening forward; `terminate()` (or leaving a `with` block) closes it.
#[pyclass(frozen, module = "egtunnel._native")]
pub(super) struct Tunnel {
    pub(super) fwd: Arc<Forward>,
}

/// Tunnels for forwards just opened, in their order.
pub(super) fn tunnels(forwards: Vec<Arc<Forward>>) -> Vec<Tunnel> {
    forwards.into_iter().map(|fwd| Tunnel { fwd }).collect()
}

/// One SSH destination with its settings, validated once: remote commands and a kernel's forwards,
/// each as a blocking call or as an asyncio awaitable driven by egtunnel's runtime (no thread of the
/// caller's). Cancelling an awaitable stops the native work and releases what it held.
#[pyclass(frozen, module = "egtunnel._native")]
pub(super) struct SshTarget {
    pub(super) spec: ConnectSpec,
}
