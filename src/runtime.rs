//! The one process-wide tokio runtime every connection and forward runs on.
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

/// The runtime itself, for the asyncio bridge to drive awaitables on.
pub fn handle() -> &'static Runtime {
    &RUNTIME
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
