//! The connection keywords (where and how to reach a host), declared once for every entry point that
//! takes them, and their way into the core's `Options`.
//!
//! `connection_keywords!` writes such an entry point. Its keyword list names the connection keywords by
//! group (`..login`) among its own keywords (`name: Type = default`), in the order its Python signature
//! shows them. Groups rather than one block because the published signatures place keywords of their
//! own between them, and some calls leave a group out (`explain` takes no password). A new keyword goes
//! into a group of the table at the top of the macro and into the `Options::parse` call below it (plus
//! the stubs); every signature whose call takes the group then shows it.

use pyo3::prelude::*;

use super::errors::to_py;
use crate::config::{ConnectSpec, Options};

/// Writes a `#[pyfunction]` (of any visibility), or the `#[new]` of a `#[pymethods]` block (the rest
/// of the block follows it unchanged), taking the connection keywords of the groups it names:
///
/// ```text
/// connection_keywords! {
///     /// Doc.
///     #[pyfunction]
///     fn name(py, host: &str, *, own: i64 = 0, ..login, ..password, ..host_keys, ..connect_timeout,
///             ..limits, ..ssh_config) -> PyResult<T> |conn| { ... conn.spec(host)? ... }
/// }
/// ```
///
/// `py` names the `Python` token; `conn` is the call's `Connection`, in which a group the call leaves
/// out holds the value the call stands for. The connection keywords are borrowed for `'a`, a lifetime
/// the macro declares.
///
/// A pyfunction's `__text_signature__` is written here rather than by pyo3, which can only repeat a
/// default's Rust spelling (`"shared"`, and `...` for anything but a literal): a default may give its
/// Python spelling after `=>`, as in `mode: &str = "shared" => "'shared'"`. It is the first line of
/// the doc, `name(signature)` followed by `--`, the form CPython reads `__text_signature__` from. A
/// `#[new]` keeps pyo3's, which goes into the class doc and needs no Python spelling so far.
macro_rules! connection_keywords {
    // The table: each group's keywords as `name: Type = default | value for a call that leaves the
    // group out`, in signature order.
    (@group login $($k:tt)*) => { connection_keywords!(@take [
        port: Option<i64> = None | None;
        user: Option<&'a str> = None | None;
        identity_file: Option<&'a str> = None | None;
    ] $($k)*); };
    (@group password $($k:tt)*) => { connection_keywords!(@take [
        password: Option<&'a str> = None | None;
    ] $($k)*); };
    (@group host_keys $($k:tt)*) => { connection_keywords!(@take [
        known_hosts: Option<&'a str> = None | None;
        host_key_policy: Option<&'a str> = None | None;
    ] $($k)*); };
    (@group connect_timeout $($k:tt)*) => { connection_keywords!(@take [
        connect_timeout: Option<f64> = None | None;
    ] $($k)*); };
    // A call that opens no pooled connection (explain, check_host) keeps the budgets it always had.
    (@group limits $($k:tt)*) => { connection_keywords!(@take [
        max_sessions: i64 = 8 | 8;
        max_startups: i64 = 8 | 3;
    ] $($k)*); };
    (@group ssh_config $($k:tt)*) => { connection_keywords!(@take [
        ssh_config: Option<&'a str> = None | None;
    ] $($k)*); };
    // Every group, for the `Connection` struct.
    (@struct) => {
        connection_keywords!(@munch [..login, ..password, ..host_keys, ..connect_timeout, ..limits, ..ssh_config]
                             {struct} [] []);
    };

    // The entry points.
    (
        #[pymethods]
        impl $ty:ident {
            $(#[$($attr:tt)*])*
            fn $name:ident($py:ident, $($pos:ident: $pty:ty,)* *, $($kw:tt)*) -> $ret:ty |$conn:ident| $body:block
            $($rest:tt)*
        }
    ) => {
        connection_keywords!(@munch [$($kw)*]
            {method $ty [$(#[$($attr)*])*] $name $py [$($pos ($pty))*] ($ret) $conn $body [$($rest)*]} [] []);
    };
    (
        $(#[$($attr:tt)*])*
        $vis:vis fn $name:ident($py:ident, $($pos:ident: $pty:ty,)* *, $($kw:tt)*) -> $ret:ty |$conn:ident| $body:block
    ) => {
        connection_keywords!(@munch [$($kw)*]
            {function [$(#[$($attr)*])*] ($vis) $name $py [$($pos ($pty))*] ($ret) $conn $body} [] []);
    };

    // The keyword list, one entry at a time: `[remaining] {entry point} [keywords] [connection keywords]`.
    (@munch [] $head:tt $kws:tt $conn:tt) => {
        connection_keywords!(@emit $head $kws $conn);
    };
    (@munch [..$group:ident $(, $($rest:tt)*)?] $head:tt $kws:tt $conn:tt) => {
        connection_keywords!(@group $group [$($($rest)*)?] $head $kws $conn);
    };
    (@munch [$name:ident: $t:ty = $default:tt => $python:literal $(, $($rest:tt)*)?] $head:tt [$($kws:tt)*] $conn:tt) => {
        connection_keywords!(@munch [$($($rest)*)?] $head [$($kws)* {$name ($t) $default ($python)}] $conn);
    };
    (@munch [$name:ident: $t:ty = $default:tt $(, $($rest:tt)*)?] $head:tt [$($kws:tt)*] $conn:tt) => {
        connection_keywords!(@munch [$($($rest)*)?] $head [$($kws)* {$name ($t) $default (stringify!($default))}] $conn);
    };
    (@take [$($name:ident: $t:ty = $default:tt | $absent:tt;)*] $rest:tt $head:tt [$($kws:tt)*] [$($conn:tt)*]) => {
        connection_keywords!(@munch $rest $head
            [$($kws)* $({$name ($t) $default (stringify!($default))})*] [$($conn)* $({$name ($t) $absent})*]);
    };

    (@emit {function [$($attr:tt)*] ($vis:vis) $fn_name:ident $py:ident [$($pos:ident ($pty:ty))*] ($ret:ty) $conn_var:ident $body:block}
           [$({$name:ident ($t:ty) $default:tt ($python:expr)})*] [$({$conn:ident ($ct:ty) $absent:tt})*]) => {
        // What pyo3 would put first in the doc, so that Python reads it as `__text_signature__`.
        #[doc = concat!(
            stringify!($fn_name), "(", $(stringify!($pos), ", ",)* "*", $(", ", stringify!($name), "=", $python,)* ")\n--\n"
        )]
        $($attr)*
        #[pyo3(signature = ($($pos,)* *, $($name = $default),*), text_signature = None)]
        #[allow(clippy::too_many_arguments)]
        $vis fn $fn_name<'a>($py: Python<'_>, $($pos: $pty,)* $($name: $t),*) -> $ret {
            #[allow(clippy::needless_update)]
            let $conn_var = $crate::bindings::options::Connection {
                $($conn,)*
                ..$crate::bindings::options::Connection::absent()
            };
            $body
        }
    };
    (@emit {method $ty:ident [$($attr:tt)*] $fn_name:ident $py:ident [$($pos:ident ($pty:ty))*] ($ret:ty) $conn_var:ident $body:block [$($rest:tt)*]}
           [$({$name:ident ($t:ty) $default:tt ($python:expr)})*] [$({$conn:ident ($ct:ty) $absent:tt})*]) => {
        #[pymethods]
        impl $ty {
            $($attr)*
            #[pyo3(signature = ($($pos,)* *, $($name = $default),*))]
            #[allow(clippy::too_many_arguments)]
            fn $fn_name<'a>($py: Python<'_>, $($pos: $pty,)* $($name: $t),*) -> $ret {
                #[allow(clippy::needless_update)]
                let $conn_var = $crate::bindings::options::Connection {
                    $($conn,)*
                    ..$crate::bindings::options::Connection::absent()
                };
                $body
            }
            $($rest)*
        }
    };
    (@emit {struct} $kws:tt [$({$conn:ident ($ct:ty) $absent:tt})*]) => {
        /// One call's connection keywords as Python gave them; a group the call does not take holds
        /// the value the call stands for.
        pub(super) struct Connection<'a> {
            $(pub(super) $conn: $ct,)*
        }

        impl<'a> Connection<'a> {
            pub(super) fn absent() -> Self {
                Connection { $($conn: $absent,)* }
            }
        }
    };
}

pub(super) use connection_keywords;

connection_keywords!(@struct);

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
