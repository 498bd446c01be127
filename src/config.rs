//! Connection settings: parsing and validation of what callers pass, with OpenSSH-like defaults.
//!
//! Kept free of I/O beyond reading the current user's identity, so `cargo test` covers the parsing.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use crate::error::{Error, Result};
use crate::local_user::current_user;
use crate::ssh_config::{self, Algorithms, Source};

// Part of the settings callers pass; its home is next to the known_hosts checks it selects.
pub use crate::known_hosts::HostKeyPolicy;

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
    /// The name the caller gave (an ssh_config alias, or the host itself).
    pub alias: String,
    /// Where to connect: ssh_config's HostName for the alias, else the alias.
    pub host: String,
    pub port: u16,
    pub user: String,
    /// Identity files in the order tried (after the agent, before the default files).
    pub identity_files: Vec<PathBuf>,
    /// ssh_config's IdentitiesOnly: no agent keys, and no default files when any file is configured.
    pub identities_only: bool,
    pub password: Option<String>,
    /// known_hosts files, all consulted; new keys go to the first.
    pub known_hosts: Vec<PathBuf>,
    /// GlobalKnownHostsFile: consulted for changed and revoked keys, never written.
    pub global_known_hosts: Vec<PathBuf>,
    pub host_key_policy: HostKeyPolicy,
    /// Stored in milliseconds so the spec can be a hash key.
    pub connect_timeout_ms: u64,
    /// ssh_config's ServerAliveCountMax, used where the caller sets no count.
    pub count_max: Option<u32>,
    /// Most session channels (remote commands) open at once on one connection; kept below the
    /// server's MaxSessions (OpenSSH's default is 10).
    pub max_sessions: usize,
    /// Most handshakes in flight at once to one host and port; kept below the server's MaxStartups
    /// (OpenSSH starts dropping beyond 10 unauthenticated connections).
    pub max_startups: usize,
    /// The hop this connection runs through (ProxyJump), itself possibly behind another.
    pub jump: Option<Arc<ConnectSpec>>,
    /// Ciphers, MACs, KexAlgorithms and HostKeyAlgorithms as OpenSSH would offer them.
    pub algorithms: Vec<Algorithms>,
    /// Where connections to the host's remote forward go (the gateway's response address): each
    /// session asks the server, before anything else, for a listener on the host's loopback (see
    /// `remote_listen`). Part of the pool key, so every kernel of a gateway shares one connection.
    pub respond_to: Option<SocketAddr>,
}

/// Defaults of the two server budgets, with room below OpenSSH's stock limits.
pub const DEFAULT_MAX_SESSIONS: usize = 8;
pub const DEFAULT_MAX_STARTUPS: usize = 8;
pub const DEFAULT_CONNECT_TIMEOUT: f64 = 10.0;
/// Anything above this is a typo rather than a server limit.
const MAX_BUDGET: i64 = 10_000;
/// ProxyJump chains longer than this are taken for a loop in the configuration.
const MAX_HOPS: usize = 8;

impl fmt::Debug for ConnectSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConnectSpec")
            .field("dest", &self.dest())
            .field("identity_files", &self.identity_files)
            .field("password", &self.password.as_ref().map(|_| "<hidden>"))
            .field("known_hosts", &self.known_hosts)
            .field("host_key_policy", &self.host_key_policy)
            .field("jump", &self.jump.as_ref().map(|j| j.dest()))
            .field("respond_to", &self.respond_to)
            .finish()
    }
}

/// What the caller set (EG_* settings, kernelspec, arguments): each wins over ssh_config.
#[derive(Clone, Default)]
pub struct Options {
    pub port: Option<u16>,
    pub user: Option<String>,
    pub identity_file: Option<PathBuf>,
    pub password: Option<String>,
    pub known_hosts: Option<PathBuf>,
    pub host_key_policy: Option<HostKeyPolicy>,
    pub connect_timeout: Option<f64>,
    pub max_sessions: Option<usize>,
    pub max_startups: Option<usize>,
    pub ssh_config: Option<Source>,
}

impl Options {
    /// Validates raw caller input; empty strings count as unset.
    #[allow(clippy::too_many_arguments)]
    pub fn parse(
        port: Option<i64>,
        user: Option<&str>,
        identity_file: Option<&str>,
        password: Option<&str>,
        known_hosts: Option<&str>,
        host_key_policy: Option<&str>,
        connect_timeout: Option<f64>,
        ssh_config: Option<&str>,
    ) -> Result<Options> {
        let home = current_user().home;
        fn set(v: Option<&str>) -> Option<&str> {
            v.filter(|s| !s.is_empty())
        }
        if let Some(t) = connect_timeout {
            if !(t.is_finite() && t > 0.0) {
                return Err(Error::Invalid(format!("connect_timeout must be a positive number of seconds, got {t}")));
            }
        }
        Ok(Options {
            port: port.map(|p| check_port("port", p, false)).transpose()?,
            user: set(user).map(str::to_string),
            identity_file: set(identity_file).map(|p| expand_home(p, &home)),
            password: password.map(str::to_string),
            known_hosts: set(known_hosts).map(|p| expand_home(p, &home)),
            host_key_policy: set(host_key_policy).map(str::parse).transpose()?,
            connect_timeout,
            max_sessions: None,
            max_startups: None,
            ssh_config: Some(Source::from_setting(ssh_config, &home)),
        })
    }

    /// Sets the per-connection session budget and the per-host handshake budget (both >= 1).
    pub fn with_limits(mut self, max_sessions: i64, max_startups: i64) -> Result<Self> {
        self.max_sessions = Some(check_budget("max_sessions", max_sessions)?);
        self.max_startups = Some(check_budget("max_startups", max_startups)?);
        Ok(self)
    }
}

/// One line of the effective settings: what, the value, and where it came from.
#[derive(Clone, Debug, PartialEq)]
pub struct Row {
    pub setting: &'static str,
    pub value: String,
    /// `default`, `argument` (the caller's), or `file:line`.
    pub origin: String,
}

impl ConnectSpec {
    /// Builds a spec from explicit values only (no ssh_config), filling OpenSSH's defaults.
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
        let mut opts =
            Options::parse(Some(port), user, identity_file, password, known_hosts, Some(host_key_policy), Some(connect_timeout), None)?;
        opts.ssh_config = Some(Source::Disabled);
        Self::resolve(host, &opts)
    }

    /// The settings for `name`: the caller's, then ssh_config's, then OpenSSH's defaults.
    pub fn resolve(name: &str, opts: &Options) -> Result<Self> {
        Ok(Self::explain(name, opts, false)?.0)
    }

    /// `resolve`, also listing each setting's value and origin (file lines only with `lines`).
    pub fn explain(name: &str, opts: &Options, lines: bool) -> Result<(Self, Vec<Row>)> {
        Self::explain_at(name, opts, None, lines, 0)
    }

    /// `explain` for a host `depth` hops into a ProxyJump chain. A hop's `opts` are what its hop string
    /// says; `inherited` (the caller's settings) fills what neither that nor the hop's ssh_config entry
    /// sets, ahead of OpenSSH's defaults.
    fn explain_at(name: &str, opts: &Options, inherited: Option<&Options>, lines: bool, depth: usize) -> Result<(Self, Vec<Row>)> {
        if name.trim().is_empty() {
            return Err(Error::Invalid("host must not be empty".into()));
        }
        let me = current_user();
        let source = opts.ssh_config.clone().unwrap_or(Source::Default);
        let file = ssh_config::lookup(name, &source, &me.home, lines, opts.user.as_deref(), opts.port)?;
        let mut rows = Vec::new();
        let fallback = inherited.cloned().unwrap_or_default();
        // `explicit` and `fallback` are both the caller's (explicit for this host, fallback inherited by a hop).
        fn pick(
            rows: &mut Vec<Row>,
            setting: &'static str,
            explicit: Option<String>,
            from_file: Option<(String, String)>,
            fallback: Option<String>,
            default: String,
        ) -> String {
            let (value, origin) = match (explicit, from_file, fallback) {
                (Some(v), _, _) | (None, None, Some(v)) => (v, "argument".to_string()),
                (None, Some((v, o)), _) => (v, o),
                (None, None, None) => (default, "default".to_string()),
            };
            rows.push(Row { setting, value: value.clone(), origin });
            value
        }
        let host = pick(&mut rows, "hostname", None, file.host_name.clone().map(|s| (s.value, s.origin)), None, name.to_string());
        let port: u16 = pick(&mut rows, "port", opts.port.map(|p| p.to_string()), file.port.as_ref().map(|s| (s.value.to_string(), s.origin.clone())), None, "22".into())
            .parse()
            .expect("validated port");
        let default_user = me.name.clone().unwrap_or_default();
        let user = pick(&mut rows, "user", opts.user.clone(), file.user.clone().map(|s| (s.value, s.origin)), fallback.user.clone(), default_user);
        if user.is_empty() {
            return Err(Error::Invalid("cannot tell the current user name; set the user explicitly".into()));
        }
        let policy: HostKeyPolicy = pick(
            &mut rows,
            "stricthostkeychecking",
            opts.host_key_policy.map(|p| p.as_str().to_string()),
            file.host_key_policy.as_ref().map(|s| (s.value.0.as_str().to_string(), s.origin.clone())),
            fallback.host_key_policy.map(|p| p.as_str().to_string()),
            "strict".into(),
        )
        .parse()?;
        if let (Some(row), Some(s)) = (rows.last_mut(), &file.host_key_policy) {
            if row.origin == s.origin && !s.value.1.eq_ignore_ascii_case(s.value.0.as_str()) {
                // The file's word, so that `no` visibly means "unknown keys recorded, changed keys refused".
                row.value = format!("{} (StrictHostKeyChecking {})", row.value, s.value.1);
            }
        }
        let file_known_hosts = file.known_hosts.as_ref().filter(|s| !s.value.is_empty());
        let known_hosts: Vec<PathBuf> = match (&opts.known_hosts, file_known_hosts, &fallback.known_hosts) {
            (Some(p), _, _) | (None, None, Some(p)) => vec![p.clone()],
            (None, Some(s), _) => s.value.clone(),
            (None, None, None) => vec![me.home.join(".ssh").join("known_hosts"), me.home.join(".ssh").join("known_hosts2")],
        };
        let kh_text = known_hosts.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(" ");
        pick(
            &mut rows,
            "userknownhostsfile",
            opts.known_hosts.as_ref().map(|_| kh_text.clone()),
            file_known_hosts.map(|s| (kh_text.clone(), s.origin.clone())),
            fallback.known_hosts.as_ref().map(|_| kh_text.clone()),
            kh_text.clone(),
        );
        let mut identity_files: Vec<PathBuf> = opts.identity_file.iter().cloned().collect();
        identity_files.extend(file.identity_files.iter().flat_map(|s| s.value.iter().cloned()));
        if identity_files.is_empty() {
            identity_files.extend(fallback.identity_file.iter().cloned());
        }
        let ids_origin = match (&opts.identity_file, file.identity_files.as_ref().filter(|s| !s.value.is_empty()), &fallback.identity_file) {
            (Some(_), _, _) | (None, None, Some(_)) => Some("argument".to_string()),
            (None, Some(s), _) => Some(s.origin.clone()),
            (None, None, None) => None,
        };
        rows.push(Row {
            setting: "identityfile",
            value: if identity_files.is_empty() {
                "agent, then ~/.ssh/id_rsa, id_ecdsa, id_ed25519, id_dsa".into()
            } else {
                identity_files.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(" ")
            },
            origin: ids_origin.unwrap_or_else(|| "default".into()),
        });
        let identities_only = pick(
            &mut rows,
            "identitiesonly",
            None,
            file.identities_only.as_ref().map(|s| (yes_no(s.value), s.origin.clone())),
            None,
            "no".into(),
        ) == "yes";
        let timeout: f64 = pick(
            &mut rows,
            "connecttimeout",
            opts.connect_timeout.map(|t| t.to_string()),
            file.connect_timeout.as_ref().map(|s| (s.value.to_string(), s.origin.clone())),
            fallback.connect_timeout.map(|t| t.to_string()),
            DEFAULT_CONNECT_TIMEOUT.to_string(),
        )
        .parse()
        .unwrap_or(DEFAULT_CONNECT_TIMEOUT);
        if !(timeout.is_finite() && timeout > 0.0) {
            return Err(Error::Invalid(format!("ConnectTimeout must be a positive number of seconds, got {timeout}")));
        }
        let count_max = file.count_max.as_ref().map(|s| s.value);
        if let Some(s) = &file.count_max {
            rows.push(Row { setting: "serveralivecountmax", value: s.value.to_string(), origin: s.origin.clone() });
        }
        let hops = file.proxy_jump.as_ref().map(|s| s.value.clone()).unwrap_or_default();
        if let Some(s) = &file.proxy_jump {
            rows.push(Row {
                setting: "proxyjump",
                value: if hops.is_empty() { "none".into() } else { hops.join(",") },
                origin: s.origin.clone(),
            });
        }
        let password = match &file.password_authentication {
            Some(s) if !s.value => {
                rows.push(Row { setting: "passwordauthentication", value: "no (EG_REMOTE_PWD is not sent)".into(), origin: s.origin.clone() });
                None
            }
            _ => opts.password.clone(),
        };
        let mut algorithms = file.algorithms.clone();
        if algorithms.is_empty() {
            // No configuration was resolved (EG_SSH_CONFIG=none without an OpenSSH client): OpenSSH's defaults.
            algorithms = ssh_config::OPENSSH_DEFAULTS
                .iter()
                .map(|(kind, list)| Algorithms { kind: *kind, list: list.split(',').map(str::to_string).collect(), origin: "default".into(), explicit: false })
                .collect();
        }
        for a in &algorithms {
            // Refused here, at resolution, when the file asks for algorithms libssh2 does not have.
            let offered = crate::algorithms::preference(a)?.unwrap_or_else(|| "libssh2's defaults".into());
            rows.push(Row { setting: a.kind.keyword(), value: offered, origin: a.origin.clone() });
        }
        let global_known_hosts = if file.global_known_hosts.is_empty() {
            vec![PathBuf::from("/etc/ssh/ssh_known_hosts"), PathBuf::from("/etc/ssh/ssh_known_hosts2")]
        } else {
            file.global_known_hosts.clone()
        };
        if !file.resolver.is_empty() {
            rows.push(Row { setting: "resolved by", value: file.resolver.clone(), origin: source.describe() });
        }
        for (option, origin) in &file.ignored {
            rows.push(Row { setting: "ignored", value: option.clone(), origin: origin.clone() });
        }
        let jump = jump_chain(&hops, inherited.unwrap_or(opts), &source, depth + 1)?;
        let spec = ConnectSpec {
            alias: name.to_string(),
            host,
            port,
            user,
            identity_files,
            identities_only,
            password,
            known_hosts,
            global_known_hosts,
            host_key_policy: policy,
            connect_timeout_ms: (timeout * 1000.0).ceil() as u64,
            count_max,
            max_sessions: opts.max_sessions.unwrap_or(DEFAULT_MAX_SESSIONS),
            max_startups: opts.max_startups.unwrap_or(DEFAULT_MAX_STARTUPS),
            jump,
            algorithms,
            respond_to: None,
        };
        Ok((spec, rows))
    }

    /// Sets the per-connection session budget and the per-host handshake budget (both >= 1).
    pub fn with_limits(mut self, max_sessions: i64, max_startups: i64) -> Result<Self> {
        self.max_sessions = check_budget("max_sessions", max_sessions)?;
        self.max_startups = check_budget("max_startups", max_startups)?;
        Ok(self)
    }

    /// The same destination with remote forwarding back to `address` (`IP:PORT`, the gateway's
    /// response address); an empty address turns it off. A name is refused rather than resolved: the
    /// gateway's response address is an IP, and resolving would block.
    pub fn responding_to(mut self, address: &str) -> Result<Self> {
        self.respond_to = match address.trim() {
            "" => None,
            text => Some(text.parse().map_err(|_| {
                Error::Invalid(format!("respond_to must be IP:PORT (the gateway's response address), got {text:?}"))
            })?),
        };
        if self.respond_to.is_some_and(|a| a.port() == 0) {
            return Err(Error::Invalid(format!("respond_to must name a port above 0, got {address:?}")));
        }
        let respond_to = self.respond_to;
        Ok(self.with_hops_responding(respond_to))
    }

    /// The ProxyJump hops carry the same `respond_to`: a hop that also runs kernels is then one
    /// connection for both (the spec is the pool's key), at the cost of an unused listener on a hop
    /// that runs none.
    fn with_hops_responding(mut self, respond_to: Option<SocketAddr>) -> Self {
        self.respond_to = respond_to;
        if let Some(jump) = self.jump.take() {
            self.jump = Some(Arc::new(Arc::unwrap_or_clone(jump).with_hops_responding(respond_to)));
        }
        self
    }

    /// user@host:port, as every message names the destination.
    pub fn dest(&self) -> String {
        format!("{}@{}:{}", self.user, self.host, self.port)
    }

    /// The hops from the gateway to this host, first hop first, this host last.
    pub fn route(&self) -> Vec<&ConnectSpec> {
        let mut hops = vec![self];
        while let Some(j) = hops.last().and_then(|s| s.jump.as_deref()) {
            hops.push(j);
        }
        hops.reverse();
        hops
    }

    pub fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.connect_timeout_ms)
    }

    /// The identity files tried when the explicit one (if any) fails, as OpenSSH orders them.
    pub fn default_identities(&self) -> Vec<PathBuf> {
        if self.identities_only && !self.identity_files.is_empty() {
            return Vec::new();
        }
        let dir = current_user().home.join(".ssh");
        // OpenSSH's order, without the key types libssh2 cannot load (security keys, XMSS).
        ["id_rsa", "id_ecdsa", "id_ed25519", "id_dsa"].iter().map(|n| dir.join(n)).collect()
    }
}

fn yes_no(b: bool) -> String {
    if b { "yes" } else { "no" }.to_string()
}

/// The spec of the last of `hops` (each reached through the one before it), or None without hops.
///
/// A hop gets its own ssh_config entry (HostName, User, Port, IdentityFile, known hosts; the first hop
/// also its own ProxyJump); where that says nothing, the caller's (`opts`) user, identity file, known
/// hosts, host key policy and timeout apply, but never the caller's port or password, which belong to
/// the kernel hosts.
fn jump_chain(hops: &[String], opts: &Options, source: &Source, depth: usize) -> Result<Option<Arc<ConnectSpec>>> {
    if hops.is_empty() {
        return Ok(None);
    }
    if depth + hops.len() > MAX_HOPS + 1 {
        return Err(Error::Invalid(format!(
            "ProxyJump chain longer than {MAX_HOPS} hops (a loop in the ssh_config?): {}",
            hops.join(",")
        )));
    }
    let mut prev: Option<Arc<ConnectSpec>> = None;
    for (i, raw) in hops.iter().enumerate() {
        let hop = ssh_config::parse_hop(raw)?;
        let hop_opts = Options {
            port: hop.port,
            user: hop.user.clone(),
            max_sessions: opts.max_sessions,
            max_startups: opts.max_startups,
            ssh_config: Some(source.clone()),
            ..Options::default()
        };
        let (mut spec, _) = ConnectSpec::explain_at(&hop.host, &hop_opts, Some(opts), false, depth + i).map_err(|e| match e {
            Error::Invalid(m) => Error::Invalid(format!("ProxyJump hop {raw}: {m}")),
            e => e,
        })?;
        if i > 0 {
            // Listed hops go through the one before them; only the first keeps its own ProxyJump.
            spec.jump = prev.clone();
        }
        prev = Some(Arc::new(spec));
    }
    Ok(prev)
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
    fn respond_to_is_an_address_carried_by_every_hop_and_part_of_the_key() {
        let hop = spec("strict").unwrap();
        let inner = ConnectSpec { jump: Some(Arc::new(ConnectSpec { jump: Some(Arc::new(hop.clone())), ..hop.clone() })), ..hop.clone() };
        let responding = inner.clone().responding_to("10.0.0.1:8877").unwrap();
        let chain: Vec<_> = responding.route().iter().map(|s| s.respond_to).collect();
        assert_eq!(chain, vec![Some("10.0.0.1:8877".parse().unwrap()); 3]);
        assert_ne!(responding, inner);
        assert_eq!(responding.clone().responding_to("").unwrap(), inner);
        for bad in ["gateway:8877", "10.0.0.1", "10.0.0.1:0", "10.0.0.1:70000"] {
            let err = inner.clone().responding_to(bad).unwrap_err().to_string();
            assert!(err.contains("respond_to"), "{bad}: {err}");
        }
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
        assert_eq!((s.max_sessions, s.max_startups), (8, 8));
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
        assert!(s.known_hosts[0].ends_with(".ssh/known_hosts"));
        assert_eq!(s.connect_timeout(), Duration::from_secs(10));
    }
}
