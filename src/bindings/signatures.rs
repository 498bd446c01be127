//! `signatures!`: Python entry points whose signatures are written once, in a keyword notation: the
//! connection keywords by group (`options`), and a blocking/awaitable pair as one declaration.
//!
//! ```text
//! signatures! {
//!     /// Doc.
//!     #[pyfunction]
//!     fn name(py, host: &str, *, own: i64 = 0, ..login, ..password, ..host_keys, ..connect_timeout,
//!             ..limits, ..ssh_config) -> PyResult<T> |conn| { ... conn.spec(host)? ... }
//! }
//!
//! signatures! {
//!     #[pymethods]
//!     impl Class {
//!         #[new]
//!         fn new(py, host: &str, *, ..login, ...) -> PyResult<Self> |conn| { ... }
//!
//!         /// Doc of the blocking form.
//!         fn name
//!         /// Doc of the awaitable form.
//!         async fn name_async
//!         (&self, py, first: Type, *, own: i64 = 0, ...) -> T { ... a `Call` resolving to T ... }
//!
//!         // Any other method, unchanged.
//!     }
//! }
//! ```
//!
//! Keywords come in the order the Python signature shows them: `name: Type = default`, or `..group`
//! for a group of connection keywords (borrowed for `'a`, a lifetime the macro declares). `py` names
//! the `Python` token; `conn` is the call's `Connection`, in which a group the call leaves out holds
//! the value the call stands for. A pair's body builds the `Call` both forms share; a pair takes no
//! connection keywords, and its own only after `*` (`exec` and `send_request`, whose `timeout` is
//! positional too, are written out over a shared `Call` builder instead).
//!
//! `__text_signature__` is written here rather than by pyo3, which can only repeat a default's Rust
//! spelling (`"shared"`, and `...` for anything but a literal): a default may give its Python spelling
//! after `=>`, as in `mode: &str = "shared" => "'shared'"`. It is the first line of the doc, the name
//! and the signature followed by `--`, the form CPython reads `__text_signature__` from. A `#[new]`
//! keeps pyo3's, which goes into the class doc and needs no Python spelling so far.

macro_rules! signatures {
    // ---- Entry points ----
    (
        #[pymethods]
        impl $ty:ident { $($items:tt)* }
    ) => {
        $crate::bindings::signatures::signatures!(@items $ty [] $($items)*);
    };
    (
        $(#[$($attr:tt)*])*
        $vis:vis fn $name:ident($py:ident, $($pos:ident: $pty:ty,)* *, $($kw:tt)*) -> $ret:ty |$conn:ident| $body:block
    ) => {
        $crate::bindings::signatures::signatures!(@munch [$($kw)*]
            {function [$(#[$($attr)*])*] ($vis) $name $py [$($pos ($pty))*] ($ret) $conn $body} [] []);
    };

    // ---- The items of a #[pymethods] block, one at a time: `$ty [items done] items left` ----
    (@items $ty:ident [$($done:tt)*]) => {
        #[pymethods]
        impl $ty { $($done)* }
    };
    // A blocking/awaitable pair.
    (@items $ty:ident $done:tt
        $(#[$($attr:tt)*])* fn $name:ident
        $(#[$($async_attr:tt)*])* async fn $async_name:ident
        (&$slf:ident, $py:ident, $($pos:ident: $pty:ty,)* *, $($kw:tt)*) -> $ret:ty $body:block
        $($rest:tt)*
    ) => {
        $crate::bindings::signatures::signatures!(@munch [$($kw)*]
            {pair $ty $done [$(#[$($attr)*])*] $name [$(#[$($async_attr)*])*] $async_name $slf $py
             [$($pos ($pty))*] ($ret) $body [$($rest)*]} [] []);
    };
    // A method taking connection keywords (`#[new]`).
    (@items $ty:ident $done:tt
        $(#[$($attr:tt)*])* fn $name:ident($py:ident, $($pos:ident: $pty:ty,)* *, $($kw:tt)*) -> $ret:ty |$conn:ident| $body:block
        $($rest:tt)*
    ) => {
        $crate::bindings::signatures::signatures!(@munch [$($kw)*]
            {method $ty $done [$(#[$($attr)*])*] $name $py [$($pos ($pty))*] ($ret) $conn $body [$($rest)*]} [] []);
    };
    // Anything else passes unchanged.
    (@items $ty:ident [$($done:tt)*]
        $(#[$($attr:tt)*])* fn $name:ident $(<$($lt:lifetime),*>)? ($($params:tt)*) $(-> $ret:ty)? $body:block
        $($rest:tt)*
    ) => {
        $crate::bindings::signatures::signatures!(@items $ty
            [$($done)* $(#[$($attr)*])* fn $name $(<$($lt),*>)? ($($params)*) $(-> $ret)? $body] $($rest)*);
    };

    // ---- The keyword list, one entry at a time: `[left] {what to write} [keywords] [connection keywords]` ----
    (@munch [] $head:tt $kws:tt $conn:tt) => {
        $crate::bindings::signatures::signatures!(@emit $head $kws $conn);
    };
    (@munch [..$group:ident $(, $($rest:tt)*)?] $head:tt $kws:tt $conn:tt) => {
        $crate::bindings::signatures::connection_keywords!($group, [$($($rest)*)?] $head $kws $conn);
    };
    (@munch [$name:ident: $t:ty = $default:tt => $python:literal $(, $($rest:tt)*)?] $head:tt [$($kws:tt)*] $conn:tt) => {
        $crate::bindings::signatures::signatures!(@munch [$($($rest)*)?] $head
            [$($kws)* {$name ($t) $default ($python)}] $conn);
    };
    (@munch [$name:ident: $t:ty = $default:tt $(, $($rest:tt)*)?] $head:tt [$($kws:tt)*] $conn:tt) => {
        $crate::bindings::signatures::signatures!(@munch [$($($rest)*)?] $head
            [$($kws)* {$name ($t) $default (stringify!($default))}] $conn);
    };
    // A group's keywords, from `connection_keywords!`.
    (@take [$($name:ident: $t:ty = $default:tt | $absent:tt;)*] $rest:tt $head:tt [$($kws:tt)*] [$($conn:tt)*]) => {
        $crate::bindings::signatures::signatures!(@munch $rest $head
            [$($kws)* $({$name ($t) $default (stringify!($default))})*] [$($conn)* $({$name ($t) $absent})*]);
    };

    // ---- What the keywords go into ----
    (@emit {function [$($attr:tt)*] ($vis:vis) $fn_name:ident $py:ident [$($pos:ident ($pty:ty))*] ($ret:ty) $conn_var:ident $body:block}
           [$({$name:ident ($t:ty) $default:tt ($python:expr)})*] [$({$conn:ident ($ct:ty) $absent:tt})*]) => {
        #[doc = concat!(
            stringify!($fn_name), "(", $(stringify!($pos), ", ",)* "*", $(", ", stringify!($name), "=", $python,)* ")\n--\n"
        )]
        $($attr)*
        #[pyo3(signature = ($($pos,)* *, $($name = $default),*), text_signature = None)]
        #[allow(clippy::too_many_arguments)]
        $vis fn $fn_name<'a>($py: Python<'_>, $($pos: $pty,)* $($name: $t),*) -> $ret {
            #[allow(clippy::needless_update)]
            let $conn_var = $crate::bindings::signatures::Connection {
                $($conn,)*
                ..$crate::bindings::signatures::Connection::absent()
            };
            $body
        }
    };
    (@emit {method $ty:ident [$($done:tt)*] [$($attr:tt)*] $fn_name:ident $py:ident [$($pos:ident ($pty:ty))*] ($ret:ty) $conn_var:ident $body:block [$($rest:tt)*]}
           [$({$name:ident ($t:ty) $default:tt ($python:expr)})*] [$({$conn:ident ($ct:ty) $absent:tt})*]) => {
        $crate::bindings::signatures::signatures!(@items $ty [$($done)*
            $($attr)*
            #[pyo3(signature = ($($pos,)* *, $($name = $default),*))]
            #[allow(clippy::too_many_arguments)]
            fn $fn_name<'a>($py: Python<'_>, $($pos: $pty,)* $($name: $t),*) -> $ret {
                #[allow(clippy::needless_update)]
                let $conn_var = $crate::bindings::signatures::Connection {
                    $($conn,)*
                    ..$crate::bindings::signatures::Connection::absent()
                };
                $body
            }
        ] $($rest)*);
    };
    (@emit {pair $ty:ident [$($done:tt)*] [$($attr:tt)*] $fn_name:ident [$($async_attr:tt)*] $async_name:ident $slf:ident $py:ident
            [$($pos:ident ($pty:ty))*] ($ret:ty) $body:block [$($rest:tt)*]}
           [$({$name:ident ($t:ty) $default:tt ($python:expr)})*] []) => {
        $crate::bindings::signatures::signatures!(@items $ty [$($done)*
            #[doc = concat!(
                stringify!($fn_name), "(self, /, ", $(stringify!($pos), ", ",)* "*",
                $(", ", stringify!($name), "=", $python,)* ")\n--\n"
            )]
            $($attr)*
            #[pyo3(signature = ($($pos,)* *, $($name = $default),*), text_signature = None)]
            #[allow(clippy::too_many_arguments)]
            fn $fn_name(&$slf, $py: Python<'_>, $($pos: $pty,)* $($name: $t),*) -> PyResult<$ret> {
                let call = $body;
                call.block($py)
            }

            #[doc = concat!(
                stringify!($async_name), "(self, /, ", $(stringify!($pos), ", ",)* "*",
                $(", ", stringify!($name), "=", $python,)* ")\n--\n"
            )]
            $($async_attr)*
            #[pyo3(signature = ($($pos,)* *, $($name = $default),*), text_signature = None)]
            #[allow(clippy::too_many_arguments)]
            fn $async_name<'py>(&$slf, $py: Python<'py>, $($pos: $pty,)* $($name: $t),*) -> PyResult<Bound<'py, PyAny>> {
                let call = $body;
                call.into_awaitable($py)
            }
        ] $($rest)*);
    };
    (@emit {connection} $kws:tt [$({$conn:ident ($ct:ty) $absent:tt})*]) => {
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

pub(super) use signatures;

// ---- The connection keywords (where and how to reach a host), declared once ----
//
// An entry point names them by group (`..login`) among its own keywords. Groups rather than one block
// because the published signatures place keywords of their own between them, and some calls leave a
// group out (`explain` takes no password). The table lives beside the notation because each expands
// into the other: `signatures!` asks the table for a group, the table hands it back to `signatures!`.

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
