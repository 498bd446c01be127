//! The connection keywords (where and how to reach a host), declared once, and their way into the
//! core's `Options`.
//!
//! An entry point names them by group (`..login`) among its own keywords (see `signatures`). Groups
//! rather than one block because the published signatures place keywords of their own between them,
//! and some calls leave a group out (`explain` takes no password). A new keyword goes into a group of
//! `connection_keywords!` and into the `Options::parse` call below it (plus the stubs); every signature
//! whose call takes the group then shows it.

use pyo3::prelude::*;

use super::errors::to_py;
use super::signatures::signatures;
use crate::config::{ConnectSpec, Options};

/// The table: each group's keywords as `name: Type = default | value for a call that leaves the group
/// out`, in signature order. Strings are borrowed for `'a`, a lifetime `signatures!` declares. Called
/// as `connection_keywords!(group, continuation...)`, it hands the group's keywords to `signatures!`.
macro_rules! connection_keywords {
    (login, $($k:tt)*) => { signatures!(@take [
        port: Option<i64> = None | None;
        user: Option<&'a str> = None | None;
        identity_file: Option<&'a str> = None | None;
    ] $($k)*); };
    (password, $($k:tt)*) => { signatures!(@take [
        password: Option<&'a str> = None | None;
    ] $($k)*); };
    (host_keys, $($k:tt)*) => { signatures!(@take [
        known_hosts: Option<&'a str> = None | None;
        host_key_policy: Option<&'a str> = None | None;
    ] $($k)*); };
    (connect_timeout, $($k:tt)*) => { signatures!(@take [
        connect_timeout: Option<f64> = None | None;
    ] $($k)*); };
    // A call that opens no pooled connection (explain, check_host) keeps the budgets it always had.
    (limits, $($k:tt)*) => { signatures!(@take [
        max_sessions: i64 = 8 | 8;
        max_startups: i64 = 8 | 3;
    ] $($k)*); };
    (ssh_config, $($k:tt)*) => { signatures!(@take [
        ssh_config: Option<&'a str> = None | None;
    ] $($k)*); };
}

pub(super) use connection_keywords;

// `Connection`, with a field for every keyword of every group.
signatures!(@munch [..login, ..password, ..host_keys, ..connect_timeout, ..limits, ..ssh_config] {connection} [] []);

impl Connection<'_> {
    /// The caller's settings; every one left unset is taken from ssh_config, then OpenSSH's defaults.
    pub(super) fn options(&self) -> PyResult<Options> {
        Options::parse(self.port, self.user, self.identity_file, self.password, self.known_hosts, self.host_key_policy,
                       self.connect_timeout, self.ssh_config)
            .and_then(|o| o.with_limits(self.max_sessions, self.max_startups))
            .map_err(|e| to_py(e, ""))
    }

    /// The caller's settings resolved for `host` (ssh_config, then OpenSSH's defaults fill what is unset).
    pub(super) fn spec(&self, host: &str) -> PyResult<ConnectSpec> {
        ConnectSpec::resolve(host, &self.options()?).map_err(|e| to_py(e, ""))
    }
}
