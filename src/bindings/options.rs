//! The connection keywords' way into the core's `Options`: a call's `Connection` (declared once, in
//! `signatures`'s table `connection_keywords!`) resolved for a host.
//!
//! A new keyword goes into a group of `connection_keywords!` and into the `Options::parse` call below
//! (plus the stubs); every signature whose call takes the group then shows it.

use pyo3::prelude::*;

use super::errors::to_py;
use super::signatures::Connection;
use crate::config::{ConnectSpec, Options};

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
