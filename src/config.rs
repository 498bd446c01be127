//! Connection settings: parsing and validation of what callers pass, with OpenSSH-like defaults.
//!
//! Kept free of I/O beyond reading the current user's identity, so `cargo test` covers the parsing.

use std::ffi::CStr;
use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use crate::error::{Error, Result};

/// How a server's host key is checked against the known_hosts file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum HostKeyPolicy {
    /// Unknown or changed key refused.
    Strict,
    /// Unknown key appended to known_hosts; changed key refused.
    AcceptNew,
    /// No check at all (for throwaway test hosts only).
    Off,
}

impl HostKeyPolicy {
    pub const NAMES: [&'static str; 3] = ["strict", "accept-new", "off"];
}

impl FromStr for HostKeyPolicy {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "strict" => Ok(HostKeyPolicy::Strict),
            "accept-new" => Ok(HostKeyPolicy::AcceptNew),
            "off" => Ok(HostKeyPolicy::Off),
            _ => Err(Error::Invalid(format!(
                "unknown host key policy {s:?}; valid values: {}",
                HostKeyPolicy::NAMES.join(", ")
            ))),
        }
    }
}

/// Whether forwards share one SSH connection per (user, host, port) or each get their own.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TunnelMode {
    Shared,
    PerPort,
}

impl TunnelMode {
    pub const NAMES: [&'static str; 2] = ["shared", "per-port"];

    pub fn as_str(self) -> &'static str {
        match self {
            TunnelMode::Shared => "shared",
            TunnelMode::PerPort => "per-port",
        }
    }
}

impl FromStr for TunnelMode {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "shared" => Ok(TunnelMode::Shared),
            "per-port" => Ok(TunnelMode::PerPort),
            _ => Err(Error::Invalid(format!(
                "unknown tunnel mode {s:?}; valid values: {}",
                TunnelMode::NAMES.join(", ")
            ))),
        }
    }
}

/// Everything needed to establish (and re-establish) one SSH connection.
///
/// `Debug` is hand-written so that the password can never reach a log line.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct ConnectSpec {
    pub host: String,
    pub port: u16,
    pub user: String,
    /// Explicit identity file, tried after the agent and before the default files.
    pub identity_file: Option<PathBuf>,
    pub password: Option<String>,
    pub known_hosts: PathBuf,
    pub host_key_policy: HostKeyPolicy,
    /// Stored in milliseconds so the spec can be a hash key.
    pub connect_timeout_ms: u64,
    /// Most session channels (remote commands) open at once on one connection; kept below the
    /// server's MaxSessions (OpenSSH's default is 10).
    pub max_sessions: usize,
    /// Most handshakes in flight at once to one host and port; kept below the server's MaxStartups
    /// (OpenSSH starts dropping beyond 10 unauthenticated connections).
    pub max_startups: usize,
}

/// Defaults of the two server budgets, with room below OpenSSH's stock limits.
pub const DEFAULT_MAX_SESSIONS: usize = 8;
pub const DEFAULT_MAX_STARTUPS: usize = 3;
/// Anything above this is a typo rather than a server limit.
const MAX_BUDGET: i64 = 10_000;

impl fmt::Debug for ConnectSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConnectSpec")
            .field("dest", &self.dest())
            .field("identity_file", &self.identity_file)
            .field("password", &self.password.as_ref().map(|_| "<hidden>"))
            .field("known_hosts", &self.known_hosts)
            .field("host_key_policy", &self.host_key_policy)
            .finish()
    }
}

impl ConnectSpec {
    /// Builds a spec from caller input, filling OpenSSH's defaults and rejecting nonsense early.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        host: &str,
        port: i64,
        user: Option<&str>,
        identity_file: Option<&str>,
        password: Option<&str>,
        known_hosts: Option<&str>,
        host_key_policy: &str,
        connect_timeout: f64,
    ) -> Result<Self> {
        if host.is_empty() {
            return Err(Error::Invalid("host must not be empty".into()));
        }
        let port = check_port("port", port, false)?;
        if !(connect_timeout.is_finite() && connect_timeout > 0.0) {
            return Err(Error::Invalid(format!(
                "connect_timeout must be a positive number of seconds, got {connect_timeout}"
            )));
        }
        let me = current_user();
        let user = match user {
            Some(u) if !u.is_empty() => u.to_string(),
            _ => me.name.clone().ok_or_else(|| {
                Error::Invalid("cannot tell the current user name; pass user= explicitly".into())
            })?,
        };
        let known_hosts = match known_hosts {
            Some(p) if !p.is_empty() => expand_home(p, &me.home),
            _ => me.home.join(".ssh").join("known_hosts"),
        };
        Ok(ConnectSpec {
            host: host.to_string(),
            port,
            user,
            identity_file: identity_file.filter(|p| !p.is_empty()).map(|p| expand_home(p, &me.home)),
            password: password.map(str::to_string),
            known_hosts,
            host_key_policy: host_key_policy.parse()?,
            connect_timeout_ms: (connect_timeout * 1000.0).ceil() as u64,
            max_sessions: DEFAULT_MAX_SESSIONS,
            max_startups: DEFAULT_MAX_STARTUPS,
        })
    }

    /// Sets the per-connection session budget and the per-host handshake budget (both >= 1).
    pub fn with_limits(mut self, max_sessions: i64, max_startups: i64) -> Result<Self> {
        self.max_sessions = check_budget("max_sessions", max_sessions)?;
        self.max_startups = check_budget("max_startups", max_startups)?;
        Ok(self)
    }

    /// user@host:port, as every message names the destination.
    pub fn dest(&self) -> String {
        format!("{}@{}:{}", self.user, self.host, self.port)
    }

    pub fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.connect_timeout_ms)
    }

    /// The identity files tried when the explicit one (if any) fails, as OpenSSH orders them.
    pub fn default_identities(&self) -> Vec<PathBuf> {
        let dir = current_user().home.join(".ssh");
        ["id_ed25519", "id_ecdsa", "id_rsa"].iter().map(|n| dir.join(n)).collect()
    }
}

fn check_budget(what: &str, n: i64) -> Result<usize> {
    if !(1..=MAX_BUDGET).contains(&n) {
        return Err(Error::Invalid(format!("{what} must be an integer from 1 to {MAX_BUDGET}, got {n}")));
    }
    Ok(n as usize)
}

/// Validates a TCP port; `allow_zero` for "pick any" local ports.
pub fn check_port(what: &str, port: i64, allow_zero: bool) -> Result<u16> {
    let lo = if allow_zero { 0 } else { 1 };
    if port < lo || port > 65535 {
        return Err(Error::Invalid(format!("{what} must be an integer from {lo} to 65535, got {port}")));
    }
    Ok(port as u16)
}

struct Me {
    name: Option<String>,
    home: PathBuf,
}

fn current_user() -> Me {
    // The passwd entry is what OpenSSH uses; $HOME wins for the home directory so tests can relocate it.
    let mut name = None;
    let mut pw_home = None;
    let mut buf = vec![0u8; 16 * 1024];
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut result: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: getpwuid_r writes into `pwd` and `buf`, both live for the whole call; `result` is
    // either null or points at `pwd`, whose string fields point into `buf`.
    let rc = unsafe {
        libc::getpwuid_r(libc::geteuid(), &mut pwd, buf.as_mut_ptr().cast(), buf.len(), &mut result)
    };
    if rc == 0 && !result.is_null() {
        // SAFETY: on success pw_name and pw_dir are NUL-terminated strings inside `buf`.
        unsafe {
            name = Some(CStr::from_ptr(pwd.pw_name).to_string_lossy().into_owned());
            pw_home = Some(PathBuf::from(CStr::from_ptr(pwd.pw_dir).to_string_lossy().into_owned()));
        }
    }
    let name = name.or_else(|| std::env::var("USER").ok());
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .or(pw_home)
        .unwrap_or_else(|| PathBuf::from("/"));
    Me { name, home }
}

fn expand_home(p: &str, home: &std::path::Path) -> PathBuf {
    match p.strip_prefix("~/") {
        Some(rest) => home.join(rest),
        None => PathBuf::from(p),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(policy: &str) -> Result<ConnectSpec> {
        ConnectSpec::new("h", 2222, Some("alice"), None, Some("s3cret"), Some("/k"), policy, 10.0)
    }

    #[test]
    fn policies_parse_and_unknown_lists_valid() {
        assert_eq!(spec("strict").unwrap().host_key_policy, HostKeyPolicy::Strict);
        assert_eq!(spec("accept-new").unwrap().host_key_policy, HostKeyPolicy::AcceptNew);
        assert_eq!(spec("off").unwrap().host_key_policy, HostKeyPolicy::Off);
        let err = spec("yes").unwrap_err().to_string();
        assert!(err.contains("strict, accept-new, off"), "{err}");
    }

    #[test]
    fn modes_parse_and_unknown_lists_valid() {
        assert_eq!("shared".parse::<TunnelMode>().unwrap(), TunnelMode::Shared);
        assert_eq!("per-port".parse::<TunnelMode>().unwrap(), TunnelMode::PerPort);
        let err = "pooled".parse::<TunnelMode>().unwrap_err().to_string();
        assert!(err.contains("shared, per-port"), "{err}");
    }

    #[test]
    fn ports_and_timeouts_are_validated() {
        assert!(ConnectSpec::new("h", 0, None, None, None, None, "strict", 1.0).is_err());
        assert!(ConnectSpec::new("h", 65536, None, None, None, None, "strict", 1.0).is_err());
        assert!(ConnectSpec::new("h", 22, None, None, None, None, "strict", 0.0).is_err());
        assert!(ConnectSpec::new("h", 22, None, None, None, None, "strict", f64::NAN).is_err());
        assert!(ConnectSpec::new("", 22, None, None, None, None, "strict", 1.0).is_err());
        assert_eq!(check_port("local_port", 0, true).unwrap(), 0);
        assert!(check_port("local_port", -1, true).unwrap_err().to_string().contains("local_port"));
    }

    #[test]
    fn limits_default_below_openssh_and_are_validated() {
        let s = spec("strict").unwrap();
        assert_eq!((s.max_sessions, s.max_startups), (8, 3));
        let s = s.with_limits(1, 5).unwrap();
        assert_eq!((s.max_sessions, s.max_startups), (1, 5));
        let err = spec("strict").unwrap().with_limits(0, 3).unwrap_err().to_string();
        assert!(err.contains("max_sessions") && err.contains("got 0"), "{err}");
        assert!(spec("strict").unwrap().with_limits(8, -1).is_err());
    }

    #[test]
    fn dest_names_user_host_port_and_debug_hides_password() {
        let s = spec("strict").unwrap();
        assert_eq!(s.dest(), "alice@h:2222");
        let dbg = format!("{s:?}");
        assert!(!dbg.contains("s3cret"), "{dbg}");
        assert!(dbg.contains("<hidden>"));
    }

    #[test]
    fn defaults_fill_user_and_known_hosts() {
        let s = ConnectSpec::new("h", 22, None, None, None, None, "strict", 10.0).unwrap();
        assert!(!s.user.is_empty());
        assert!(s.known_hosts.ends_with(".ssh/known_hosts"));
        assert_eq!(s.connect_timeout(), Duration::from_secs(10));
    }
}
