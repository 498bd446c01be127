//! What the OpenSSH client configuration says about one destination, and where each value came from.
//!
//! Parsing is ssh2-config's; this module picks the files (`~/.ssh/config` then `/etc/ssh/ssh_config`,
//! or one file given by the caller, or none), merges them first-match-wins as OpenSSH does, turns the
//! options egtunnel honours into typed values, and finds the line behind an error or a value. The
//! parser reports neither, so both are found by parsing ever shorter prefixes of the file with the
//! same parser: a parse error persists once its line is in the prefix, and a value, once set, is
//! never changed by a later line (first match wins), so a bisection over prefixes finds the line.

use std::collections::{HashMap, HashSet};
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use log::debug;
use once_cell::sync::Lazy;
use ssh2_config::{HostParams, ParseRule, SshConfig};

use crate::config::HostKeyPolicy;
use crate::error::{Error, Result};

/// Which configuration files apply.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Source {
    /// `~/.ssh/config`, then `/etc/ssh/ssh_config`, each only if it exists.
    Default,
    /// Exactly this file (like `ssh -F`), which must exist.
    File(PathBuf),
    /// No file at all.
    Disabled,
}

impl Source {
    /// The caller's setting: unset means the default files, `none` none, anything else a path.
    pub fn from_setting(setting: Option<&str>, home: &Path) -> Source {
        match setting.map(str::trim) {
            None | Some("") => Source::Default,
            Some(s) if s.eq_ignore_ascii_case("none") => Source::Disabled,
            Some(s) => Source::File(expand_home(s, home)),
        }
    }

    fn files(&self, home: &Path) -> Result<Vec<PathBuf>> {
        match self {
            Source::Disabled => Ok(Vec::new()),
            Source::File(p) if p.is_file() => Ok(vec![p.clone()]),
            Source::File(p) => Err(Error::Invalid(format!(
                "ssh_config file {} does not exist (set EG_SSH_CONFIG to an existing file, or to none to read no file)",
                p.display()
            ))),
            Source::Default => Ok([home.join(".ssh").join("config"), PathBuf::from("/etc/ssh/ssh_config")]
                .into_iter()
                .filter(|p| p.is_file())
                .collect()),
        }
    }

    pub fn describe(&self) -> String {
        match self {
            Source::Default => "~/.ssh/config, /etc/ssh/ssh_config".into(),
            Source::File(p) => p.display().to_string(),
            Source::Disabled => "none".into(),
        }
    }
}

/// A value and where it was set (`file:line`).
#[derive(Clone, Debug, PartialEq)]
pub struct Setting<T> {
    pub value: T,
    pub origin: String,
}

/// The options egtunnel honours, as the files set them for one host name.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct HostConfig {
    pub host_name: Option<Setting<String>>,
    pub port: Option<Setting<u16>>,
    pub user: Option<Setting<String>>,
    /// IdentityFile accumulates across matching blocks and files, in order.
    pub identity_files: Vec<Setting<PathBuf>>,
    pub identities_only: Option<Setting<bool>>,
    pub known_hosts: Option<Setting<Vec<PathBuf>>>,
    pub host_key_policy: Option<Setting<HostKeyPolicy>>,
    pub connect_timeout: Option<Setting<f64>>,
    pub count_max: Option<Setting<u32>>,
    /// Empty when ProxyJump is unset or `none`.
    pub proxy_jump: Option<Setting<Vec<String>>>,
    /// Options set for this host that egtunnel does not apply, with where they were set.
    pub ignored: Vec<(String, String)>,
}

/// One parsed file, kept while the file is unchanged.
struct Parsed {
    stamp: (SystemTime, u64),
    config: Arc<SshConfig>,
}

static CACHE: Lazy<Mutex<HashMap<PathBuf, Parsed>>> = Lazy::new(Mutex::default);
/// Ignored options already logged, so a busy gateway logs each once.
static LOGGED: Lazy<Mutex<HashSet<(PathBuf, String)>>> = Lazy::new(Mutex::default);

const RULES: ParseRule = ParseRule::ALLOW_UNKNOWN_FIELDS.union(ParseRule::ALLOW_UNSUPPORTED_FIELDS);

/// Options the parser keeps raw that egtunnel turns into settings.
const HONOURED_RAW: [&str; 4] = ["identitiesonly", "userknownhostsfile", "stricthostkeychecking", "serveralivecountmax"];

fn parse_text(text: &str, home: &Path) -> std::result::Result<SshConfig, ssh2_config::SshParserError> {
    SshConfig::default().home_dir(home).parse(&mut BufReader::new(text.as_bytes()), RULES)
}

/// The first `n` lines of `text`.
fn prefix(text: &str, n: usize) -> String {
    text.lines().take(n).collect::<Vec<_>>().join("\n")
}

fn load(path: &Path, home: &Path) -> Result<Arc<SshConfig>> {
    let meta = std::fs::metadata(path)
        .map_err(|e| Error::Invalid(format!("cannot read ssh_config file {}: {e}", path.display())))?;
    let stamp = (meta.modified().unwrap_or(SystemTime::UNIX_EPOCH), meta.len());
    if let Some(p) = CACHE.lock().unwrap().get(path).filter(|p| p.stamp == stamp) {
        return Ok(p.config.clone());
    }
    let text = std::fs::read_to_string(path)
        .map_err(|e| Error::Invalid(format!("cannot read ssh_config file {}: {e}", path.display())))?;
    let config = match parse_text(&text, home) {
        Ok(c) => Arc::new(c),
        Err(e) => {
            // The shortest prefix that fails ends with the offending line.
            let lo = first_line(text.lines().count(), |n| parse_text(&prefix(&text, n), home).is_err());
            let line = text.lines().nth(lo - 1).unwrap_or("").trim();
            return Err(Error::Config {
                file: path.display().to_string(),
                line: lo,
                cause: format!("{e} in {line:?}"),
            });
        }
    };
    CACHE.lock().unwrap().insert(path.to_path_buf(), Parsed { stamp, config: config.clone() });
    Ok(config)
}

fn raw<'a>(params: &'a HostParams, name: &str) -> Option<&'a Vec<String>> {
    params.unsupported_fields.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v)
}

/// What one file says for `name`, each value's origin being the file (lines are filled in on demand).
fn from_params(params: &HostParams, file: &Path, home: &Path) -> Result<HostConfig> {
    let origin = file.display().to_string();
    let set = |v| Setting { value: v, origin: origin.clone() };
    let bad = |option: &str, value: &str, expected: &str| Error::Config {
        file: file.display().to_string(),
        line: 0,
        cause: format!("{option} {value:?}: {expected}"),
    };
    let mut hc = HostConfig {
        host_name: params.host_name.clone().map(set),
        port: params.port.map(|p| Setting { value: p, origin: origin.clone() }),
        user: params.user.clone().map(set),
        identity_files: params
            .identity_file
            .iter()
            .flatten()
            .map(|p| Setting { value: p.clone(), origin: origin.clone() })
            .collect(),
        connect_timeout: params
            .connect_timeout
            .map(|d| Setting { value: d.as_secs_f64(), origin: origin.clone() }),
        proxy_jump: params.proxy_jump.clone().map(|hops| {
            let hops = if hops.len() == 1 && hops[0].eq_ignore_ascii_case("none") { Vec::new() } else { hops };
            Setting { value: hops, origin: origin.clone() }
        }),
        ..HostConfig::default()
    };
    if let Some(v) = raw(params, "identitiesonly").and_then(|v| v.first()) {
        let value = match v.to_ascii_lowercase().as_str() {
            "yes" | "true" => true,
            "no" | "false" => false,
            _ => return Err(bad("IdentitiesOnly", v, "expected yes or no")),
        };
        hc.identities_only = Some(Setting { value, origin: origin.clone() });
    }
    if let Some(v) = raw(params, "userknownhostsfile") {
        let files: Vec<PathBuf> = v.iter().filter(|f| !f.eq_ignore_ascii_case("none")).map(|f| expand_home(f, home)).collect();
        hc.known_hosts = Some(Setting { value: files, origin: origin.clone() });
    }
    if let Some(v) = raw(params, "stricthostkeychecking").and_then(|v| v.first()) {
        let value = match v.to_ascii_lowercase().as_str() {
            // egtunnel cannot ask anyone, so `ask` (OpenSSH's default) refuses unknown keys like `yes`.
            "yes" | "ask" => HostKeyPolicy::Strict,
            "accept-new" => HostKeyPolicy::AcceptNew,
            "no" | "off" => HostKeyPolicy::Off,
            _ => return Err(bad("StrictHostKeyChecking", v, "expected yes, accept-new, no, off or ask")),
        };
        hc.host_key_policy = Some(Setting { value, origin: origin.clone() });
    }
    if let Some(v) = raw(params, "serveralivecountmax").and_then(|v| v.first()) {
        let value = v.parse::<u32>().ok().filter(|n| *n > 0).ok_or_else(|| {
            bad("ServerAliveCountMax", v, "expected a positive integer")
        })?;
        hc.count_max = Some(Setting { value, origin: origin.clone() });
    }
    let mut ignored: Vec<String> = params
        .unsupported_fields
        .keys()
        .filter(|k| !HONOURED_RAW.iter().any(|h| k.eq_ignore_ascii_case(h)))
        .chain(params.ignored_fields.keys())
        .cloned()
        .collect();
    // Parsed by the library but not applied: keep-alives follow Enterprise Gateway's per-channel policy,
    // and the rest would change how egtunnel connects in ways it does not implement.
    let typed_unused: [(&str, bool); 7] = [
        ("serveraliveinterval", params.server_alive_interval.is_some()),
        ("forwardagent", params.forward_agent.is_some()),
        ("certificatefile", params.certificate_file.is_some()),
        ("bindaddress", params.bind_address.is_some()),
        ("compression", params.compression.is_some()),
        ("connectionattempts", params.connection_attempts.is_some()),
        ("remoteforward", !params.remote_forward.is_empty()),
    ];
    ignored.extend(typed_unused.iter().filter(|(_, set)| *set).map(|(n, _)| n.to_string()));
    ignored.sort();
    hc.ignored = ignored.into_iter().map(|n| (n, origin.clone())).collect();
    Ok(hc)
}

/// Fills `into` with what `other` sets and `into` does not: the earlier file wins, as in OpenSSH.
fn merge(into: &mut HostConfig, other: HostConfig) {
    macro_rules! first {
        ($($f:ident),*) => { $( if into.$f.is_none() { into.$f = other.$f; } )* };
    }
    first!(host_name, port, user, identities_only, known_hosts, host_key_policy, connect_timeout, count_max, proxy_jump);
    into.identity_files.extend(other.identity_files);
    for (name, origin) in other.ignored {
        if !into.ignored.iter().any(|(n, _)| *n == name) {
            into.ignored.push((name, origin));
        }
    }
}

/// The effective configuration for `name`. With `explain`, each origin names the line that set it.
pub fn lookup(name: &str, source: &Source, home: &Path, explain: bool) -> Result<HostConfig> {
    let mut out = HostConfig::default();
    for file in source.files(home)? {
        let config = load(&file, home)?;
        let params = config.query(name);
        let mut hc = from_params(&params, &file, home).map_err(|e| locate(e, &file, home, name))?;
        if explain {
            add_lines(&mut hc, &file, home, name);
        }
        for (option, _) in &hc.ignored {
            if LOGGED.lock().unwrap().insert((file.clone(), option.clone())) {
                debug!("{}: option {option} (set for {name}) is not supported by egtunnel and is ignored", file.display());
            }
        }
        merge(&mut out, hc);
    }
    Ok(out)
}

/// Gives a value error of `from_params` the line that set the value.
fn locate(e: Error, file: &Path, home: &Path, name: &str) -> Error {
    let Error::Config { file: f, cause, .. } = e else { return e };
    let Ok(text) = std::fs::read_to_string(file) else { return Error::Config { file: f, line: 0, cause } };
    let fails = |n: usize| {
        parse_text(&prefix(&text, n), home).map(|c| from_params(&c.query(name), file, home).is_err()).unwrap_or(true)
    };
    let line = first_line(text.lines().count(), fails);
    Error::Config { file: f, line, cause }
}

/// The smallest n in 1..=total with `holds(n)`, for a property that stays true once true.
fn first_line(total: usize, holds: impl Fn(usize) -> bool) -> usize {
    let (mut lo, mut hi) = (1usize, total.max(1));
    while lo < hi {
        let mid = (lo + hi) / 2;
        if holds(mid) {
            hi = mid;
        } else {
            lo = mid + 1;
        }
    }
    lo
}

/// Replaces each origin `file` with `file:line`, the first line after which the value is set.
fn add_lines(hc: &mut HostConfig, file: &Path, home: &Path, name: &str) {
    let Ok(text) = std::fs::read_to_string(file) else { return };
    let total = text.lines().count();
    let at = |n: usize| -> HostConfig {
        parse_text(&prefix(&text, n), home)
            .ok()
            .and_then(|c| from_params(&c.query(name), file, home).ok())
            .unwrap_or_default()
    };
    let origin = |line: usize| format!("{}:{line}", file.display());
    macro_rules! line_of {
        ($($f:ident),*) => { $(
            if let Some(s) = hc.$f.as_mut() {
                s.origin = origin(first_line(total, |n| at(n).$f.is_some()));
            }
        )* };
    }
    line_of!(host_name, port, user, identities_only, known_hosts, host_key_policy, connect_timeout, count_max, proxy_jump);
    for i in 0..hc.identity_files.len() {
        hc.identity_files[i].origin = origin(first_line(total, |n| at(n).identity_files.len() > i));
    }
    for i in 0..hc.ignored.len() {
        let option = hc.ignored[i].0.clone();
        hc.ignored[i].1 = origin(first_line(total, |n| at(n).ignored.iter().any(|(o, _)| *o == option)));
    }
}

fn expand_home(p: &str, home: &Path) -> PathBuf {
    match p.strip_prefix("~/") {
        Some(rest) => home.join(rest),
        None if p == "~" => home.to_path_buf(),
        None => PathBuf::from(p),
    }
}

/// One ProxyJump hop: `[user@]host[:port]`, `ssh://[user@]host[:port]`, IPv6 addresses in brackets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hop {
    pub user: Option<String>,
    pub host: String,
    pub port: Option<u16>,
}

pub fn parse_hop(s: &str) -> Result<Hop> {
    let bad = |why: &str| Error::Invalid(format!("ProxyJump hop {s:?}: {why}; expected [user@]host[:port]"));
    let rest = s.trim().strip_prefix("ssh://").unwrap_or(s.trim());
    let (user, hostport) = match rest.rsplit_once('@') {
        Some((u, h)) if !u.is_empty() => (Some(u.to_string()), h),
        Some(_) => return Err(bad("empty user")),
        None => (None, rest),
    };
    let (host, port) = if let Some(inner) = hostport.strip_prefix('[') {
        let (h, after) = inner.split_once(']').ok_or_else(|| bad("unclosed ["))?;
        match after {
            "" => (h, None),
            p => (h, Some(p.strip_prefix(':').ok_or_else(|| bad("junk after ]"))?)),
        }
    } else {
        match hostport.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (hostport, None),
        }
    };
    if host.is_empty() || host.contains(char::is_whitespace) {
        return Err(bad("empty or malformed host"));
    }
    let port = match port {
        None => None,
        Some(p) => Some(p.parse::<u16>().ok().filter(|p| *p > 0).ok_or_else(|| bad("port must be 1-65535"))?),
    };
    Ok(Hop { user, host: host.to_string(), port })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    fn tmpdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("egtunnel-sshcfg-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn first_match_wins_and_origins_name_lines() {
        let d = tmpdir("first");
        let f = write(
            &d,
            "config",
            "# comment\nHost kh\n  HostName 10.0.0.5\n  Port 2200\n  IdentityFile ~/k1\n  StrictHostKeyChecking accept-new\n  \
             UserKnownHostsFile ~/kh1 ~/kh2\n  ServerAliveCountMax 7\n  Ciphers aes128-ctr\n  ServerAliveInterval 5\n\
             Host *\n  Port 22\n  User bob\n  IdentityFile ~/k2\n  IdentitiesOnly yes\n  ProxyJump j1,alice@j2:2022\n",
        );
        let hc = lookup("kh", &Source::File(f.clone()), Path::new("/home/x"), true).unwrap();
        assert_eq!(hc.host_name.as_ref().unwrap().value, "10.0.0.5");
        assert_eq!(hc.host_name.as_ref().unwrap().origin, format!("{}:3", f.display()));
        assert_eq!(hc.port.as_ref().unwrap().value, 2200);
        assert_eq!(hc.port.as_ref().unwrap().origin, format!("{}:4", f.display()));
        assert_eq!(hc.user.as_ref().unwrap().value, "bob");
        assert_eq!(hc.user.as_ref().unwrap().origin, format!("{}:13", f.display()));
        let ids: Vec<_> = hc.identity_files.iter().map(|s| s.value.clone()).collect();
        assert_eq!(ids, vec![PathBuf::from("/home/x/k1"), PathBuf::from("/home/x/k2")]);
        assert_eq!(hc.identity_files[1].origin, format!("{}:14", f.display()));
        assert_eq!(hc.host_key_policy.as_ref().unwrap().value, HostKeyPolicy::AcceptNew);
        assert_eq!(hc.known_hosts.as_ref().unwrap().value, vec![PathBuf::from("/home/x/kh1"), PathBuf::from("/home/x/kh2")]);
        assert_eq!(hc.count_max.as_ref().unwrap().value, 7);
        assert!(hc.identities_only.as_ref().unwrap().value);
        assert_eq!(hc.proxy_jump.as_ref().unwrap().value, vec!["j1".to_string(), "alice@j2:2022".to_string()]);
        let ignored: Vec<_> = hc.ignored.iter().map(|(n, _)| n.as_str()).collect();
        assert!(ignored.contains(&"serveraliveinterval"), "{ignored:?}");
        // Another name only gets the catch-all block.
        let other = lookup("other", &Source::File(f), Path::new("/home/x"), false).unwrap();
        assert_eq!(other.port.unwrap().value, 22);
        assert!(other.host_name.is_none());
    }

    #[test]
    fn malformed_files_name_file_and_line() {
        let d = tmpdir("bad");
        let f = write(&d, "config", "Host a\n  HostName x\n  Port notaport\n  User u\n");
        match lookup("a", &Source::File(f.clone()), Path::new("/h"), false) {
            Err(Error::Config { file, line, .. }) => assert_eq!((file, line), (f.display().to_string(), 3)),
            other => panic!("{other:?}"),
        }
        let g = write(&d, "config2", "Host a\n  User u\n  StrictHostKeyChecking maybe\n");
        match lookup("a", &Source::File(g), Path::new("/h"), false) {
            Err(Error::Config { line, cause, .. }) => assert!(line == 3 && cause.contains("StrictHostKeyChecking"), "{line} {cause}"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(lookup("a", &Source::File(d.join("missing")), Path::new("/h"), false), Err(Error::Invalid(_))));
        assert_eq!(lookup("a", &Source::Disabled, Path::new("/h"), false).unwrap(), HostConfig::default());
    }

    #[test]
    fn hops_parse() {
        assert_eq!(parse_hop("j").unwrap(), Hop { user: None, host: "j".into(), port: None });
        assert_eq!(parse_hop("u@j:2022").unwrap(), Hop { user: Some("u".into()), host: "j".into(), port: Some(2022) });
        assert_eq!(parse_hop("ssh://u@[::1]:22").unwrap(), Hop { user: Some("u".into()), host: "::1".into(), port: Some(22) });
        assert!(parse_hop("u@j:0").is_err());
        assert!(parse_hop("@j").is_err());
        assert!(parse_hop("").is_err());
    }

    #[test]
    fn source_setting() {
        let home = Path::new("/h");
        assert_eq!(Source::from_setting(None, home), Source::Default);
        assert_eq!(Source::from_setting(Some("NONE"), home), Source::Disabled);
        assert_eq!(Source::from_setting(Some("~/c"), home), Source::File(PathBuf::from("/h/c")));
    }
}
