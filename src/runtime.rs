//! The one process-wide tokio runtime every connection and forward runs on, and the small one the
//! asyncio bridge hands results to Python from.
//!
//! Two worker threads serve any number of tunnels; Python threads block on it (with the GIL
//! released) only while waiting for a result.

use std::future::Future;

use once_cell::sync::Lazy;
use tokio::runtime::Runtime;

static RUNTIME: Lazy<Runtime> = Lazy::new(|| {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(4)
        .thread_name("egtunnel")
        .enable_io()
        .enable_time()
        .build()
        .expect("egtunnel: cannot start the tokio runtime")
});

/// The runtime itself, for awaitables' work.
pub fn handle() -> &'static Runtime {
    &RUNTIME
}

/// Where the asyncio bridge (pyo3-async-runtimes) runs: one worker that waits for the work on
/// `RUNTIME`, and one blocking thread through which the bridge hands every result to Python. The
/// bridge takes the GIL for each result on a blocking thread; on a pool that may grow, many awaitables
/// finishing at once (ten kernel starts answered by one connection coming up) would each get a thread
/// of its own to wait for the GIL in. Here they queue on the one, which lives as long as the process.
static BRIDGE: Lazy<Runtime> = Lazy::new(|| {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .max_blocking_threads(1)
        .thread_keep_alive(std::time::Duration::from_secs(365 * 86_400))
        .thread_name("egtunnel-py")
        .enable_time()
        .build()
        .expect("egtunnel: cannot start the asyncio bridge's runtime")
});

pub fn bridge() -> &'static Runtime {
    &BRIDGE
}

/// Runs `fut` to completion from a thread outside the runtime.
pub fn block_on<F: Future>(fut: F) -> F::Output {
    RUNTIME.block_on(fut)
}

/// Starts `fut` in the background (used where Python drops an object without closing it).
pub fn spawn<F>(fut: F)
where
    F: Future<Output = ()> + Send + 'static,
{
    RUNTIME.spawn(fut);
}
