//! Python arguments turned into the core's types, with the messages a caller sees when one is wrong.

use std::time::Duration;

use pyo3::prelude::*;

use super::errors::invalid;
use crate::config::ConnectSpec;
use crate::keepalive::Channel;

/// A culling timeout as Python gives it: ints are unbounded there and EG compares them as such, so
/// values beyond i64 saturate instead of failing.
pub(super) struct Seconds(pub i64);

impl<'py> FromPyObject<'_, 'py> for Seconds {
    type Error = PyErr;

    fn extract(v: Borrowed<'_, 'py, PyAny>) -> PyResult<Self> {
        saturating_i64(&v, "cull_idle_timeout").map(Seconds)
    }
}

fn saturating_i64(v: &Bound<'_, PyAny>, what: &str) -> PyResult<i64> {
    if v.is_instance_of::<pyo3::types::PyBool>() {
        return Err(invalid(format!("{what} must be an integer, got a bool")));
    }
    match v.extract::<i64>() {
        Ok(i) => Ok(i),
        Err(_) if v.is_instance_of::<pyo3::types::PyInt>() => {
            Ok(if v.gt(0)? { i64::MAX } else { i64::MIN })
        }
        Err(_) => Err(pyo3::exceptions::PyTypeError::new_err(format!(
            "{what} must be an integer, got {}",
            v.get_type().name()?
        ))),
    }
}

pub(super) fn parse_channel(channel: &str) -> PyResult<Channel> {
    channel.parse::<Channel>().map_err(invalid)
}

pub(super) fn positive_duration(secs: f64, what: &str) -> PyResult<Duration> {
    if secs.is_finite() && secs > 0.0 {
        Ok(Duration::from_secs_f64(secs))
    } else {
        Err(invalid(format!("{what} must be a positive number of seconds, got {secs}")))
    }
}

/// How long an open retries a refused forward; 0 turns the retries off.
pub(super) fn refused_wait_duration(secs: f64) -> PyResult<Duration> {
    if secs == 0.0 { Ok(Duration::ZERO) } else { positive_duration(secs, "refused_wait") }
}

/// The keep-alive probe count: the caller's, else ssh_config's ServerAliveCountMax, else 3.
pub(super) fn count_max(explicit: Option<i64>, spec: &ConnectSpec) -> PyResult<u32> {
    match explicit {
        None => Ok(spec.count_max.unwrap_or(3)),
        Some(n) if (1..=u32::MAX as i64).contains(&n) => Ok(n as u32),
        Some(n) => Err(invalid(format!("keepalive_count_max must be a positive integer, got {n}"))),
    }
}
