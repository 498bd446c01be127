//! Rust `log` records into Python logging, behind the exit gate, and the atexit hook that closes the gate.

use std::time::Duration;

use pyo3::prelude::*;

use crate::exit_gate;

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

/// Rust `log` records go to Python logging under the "egtunnel" logger. Levels are cached too, so a
/// disabled record (every debug line of a busy gateway) never takes the GIL from a runtime thread;
/// `refresh_log_levels()` makes a later change of Python's levels visible.
pub(super) fn install(py: Python<'_>) -> PyResult<()> {
    let logger = pyo3_log::Logger::new(py, pyo3_log::Caching::LoggersAndLevels)?
        .filter_target("egtunnel".to_owned(), log::LevelFilter::Trace);
    let reset = logger.reset_handle();
    if log::set_boxed_logger(Box::new(GatedLogger(logger))).is_ok() {
        log::set_max_level(log::LevelFilter::Trace);
        let _ = LOG_RESET.set(reset);
    }
    Ok(())
}

/// Registered with atexit at import: no thread but this one enters Python from now on, and the calls
/// into Python already in flight finish first (see `exit_gate`).
#[pyfunction]
pub(super) fn _at_exit(py: Python<'_>) {
    let left = py.detach(|| exit_gate::close(Duration::from_secs(2)));
    if left > 0 {
        eprintln!("egtunnel: {left} call(s) into Python still in flight at exit");
    }
}

/// Forgets the cached levels of the `egtunnel` loggers; call after changing them at run time.
#[pyfunction]
pub(super) fn refresh_log_levels() {
    if let Some(handle) = LOG_RESET.get() {
        handle.reset();
    }
}
