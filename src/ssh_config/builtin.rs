//! The fallback resolver, for machines without an OpenSSH client: the `ssh2-config` crate parses the
//! files, and everything whose meaning it might not reproduce exactly as OpenSSH is refused at its
//! line before anything is read: Match and Include (OpenSSH's evaluation order), tokens and
//! environment variables in honoured options, an honoured option repeated in one block (OpenSSH keeps
//! the first, the crate the last), IdentityFile in several blocks (OpenSSH accumulates them),
//! algorithm lists, and the keywords egtunnel refuses anyway. What remains (Host patterns, negation,
//! first-match-wins across blocks) the crate implements as OpenSSH does; the line behind a value is
//! found by parsing ever shorter prefixes of the file (a value, once set, is never changed by a later
//! line, so a bisection over prefixes finds it).

use std::collections::HashSet;
use std::io::BufReader;
use std::path::{Path, PathBuf};

use ssh2_config::{HostParams, ParseRule, SshConfig};

use super::scan::Scan;
use super::settings::{expand_home, policy_of, AlgKind, Algorithms, HostConfig, Setting, OPENSSH_DEFAULTS, REFUSED};
use crate::error::{Error, Result};

const RULES: ParseRule = ParseRule::ALLOW_UNKNOWN_FIELDS.union(ParseRule::ALLOW_UNSUPPORTED_FIELDS);

/// Options the parser keeps raw that egtunnel turns into settings.
const HONOURED_RAW: [&str; 5] = ["identitiesonly", "userknownhostsfile", "stricthostkeychecking", "serveralivecountmax", "passwordauthentication"];

/// Honoured options whose value OpenSSH expands (tokens, `${VAR}`).
const EXPANDED: [&str; 5] = ["hostname", "user", "identityfile", "userknownhostsfile", "proxyjump"];

/// Every option egtunnel applies: one of them set twice in one block is ambiguous to this parser.
const HONOURED: [&str; 11] = [
    "hostname", "port", "user", "identityfile", "identitiesonly", "userknownhostsfile", "stricthostkeychecking",
    "connecttimeout", "serveralivecountmax", "passwordauthentication", "proxyjump",
];

fn refuse(l: &super::scan::Line, why: &str) -> Error {
    Error::Config {
        file: l.file.display().to_string(),
        line: l.number,
        cause: format!("{} {}: {why}", l.keyword, l.args.join(" ")).replace("  ", " "),
    }
}

/// Refuses, at its line, whatever this parser could resolve differently from OpenSSH.
fn refuse_unreproducible(walked: &Scan) -> Result<()> {
    const NEEDS_OPENSSH: &str = "only resolved through OpenSSH's client (ssh -G), which is not installed here or is turned off by EG_SSH_CLIENT=none \
                                 (install openssh-client, or set EG_SSH_CLIENT to its path)";
    let mut in_block: HashSet<String> = HashSet::new();
    let mut identity_blocks = 0;
    let mut block_has_identity = false;
    for l in &walked.lines {
        match l.keyword.as_str() {
            "match" | "include" => return Err(refuse(l, NEEDS_OPENSSH)),
            "host" => {
                in_block.clear();
                block_has_identity = false;
                continue;
            }
            _ => {}
        }
        if let Some((_, why)) = REFUSED.iter().find(|(k, _)| *k == l.keyword) {
            let harmless = l.args.first().is_some_and(|a| matches!(a.to_ascii_lowercase().as_str(), "no" | "false" | "none"));
            if !harmless {
                return Err(refuse(l, why));
            }
        }
        if AlgKind::ALL.iter().any(|k| k.keyword() == l.keyword) {
            return Err(refuse(l, NEEDS_OPENSSH));
        }
        if EXPANDED.contains(&l.keyword.as_str()) && l.args.iter().any(|a| a.contains('%') || a.contains("${")) {
            return Err(refuse(l, &format!("tokens and environment variables are {NEEDS_OPENSSH}")));
        }
        if l.keyword == "identityfile" {
            if !block_has_identity {
                identity_blocks += 1;
                block_has_identity = true;
            }
            if identity_blocks > 1 {
                return Err(refuse(l, &format!("IdentityFile in several blocks is {NEEDS_OPENSSH}")));
            }
            continue;
        }
        if HONOURED.contains(&l.keyword.as_str()) && !in_block.insert(l.keyword.clone()) {
            return Err(refuse(l, &format!("set twice in one block (OpenSSH keeps the first value); {NEEDS_OPENSSH}")));
        }
    }
    Ok(())
}

fn parse_text(text: &str, home: &Path) -> std::result::Result<SshConfig, ssh2_config::SshParserError> {
    SshConfig::default().home_dir(home).parse(&mut BufReader::new(text.as_bytes()), RULES)
}

/// The first `n` lines of `text`.
fn prefix(text: &str, n: usize) -> String {
    text.lines().take(n).collect::<Vec<_>>().join("\n")
}

fn load(path: &Path, home: &Path) -> Result<SshConfig> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Error::Invalid(format!("cannot read ssh_config file {}: {e}", path.display())))?;
    parse_text(&text, home).map_err(|e| {
        // The shortest prefix that fails ends with the offending line.
        let lo = first_line(text.lines().count(), |n| parse_text(&prefix(&text, n), home).is_err());
        let line = text.lines().nth(lo - 1).unwrap_or("").trim();
        Error::Config { file: path.display().to_string(), line: lo, cause: format!("{e} in {line:?}") }
    })
}

fn raw<'a>(params: &'a HostParams, name: &str) -> Option<&'a Vec<String>> {
    params.unsupported_fields.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v)
}

/// The effective configuration for `name` from `files` (the existing ones, in order), or a refusal.
pub fn resolve(name: &str, files: &[(PathBuf, bool)], walked: &Scan, home: &Path, explain: bool) -> Result<HostConfig> {
    refuse_unreproducible(walked)?;
    let mut out = HostConfig { resolver: "built-in parser (no OpenSSH client)".into(), ..HostConfig::default() };
    // OpenSSH matches and connects with the host name in lower case.
    let name = name.to_ascii_lowercase();
    let name = name.as_str();
    for (file, _) in files.iter().filter(|(f, _)| f.is_file()) {
        let config = load(file, home)?;
        let mut hc = from_params(&config.query(name), file, home).map_err(|e| locate(e, file, home, name))?;
        if explain {
            add_lines(&mut hc, file, home, name);
        }
        merge(&mut out, hc);
    }
    for (kind, list) in OPENSSH_DEFAULTS {
        out.algorithms.push(Algorithms { kind, list: list.split(',').map(str::to_string).collect(), origin: "default".into(), explicit: false });
    }
    Ok(out)
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
        host_name: params.host_name.as_ref().map(|h| set(h.to_ascii_lowercase())),
        port: params.port.map(|p| Setting { value: p, origin: origin.clone() }),
        user: params.user.clone().map(set),
        identity_files: params.identity_file.clone().map(|files| Setting {
            value: files.into_iter().filter(|p| !p.as_os_str().eq_ignore_ascii_case("none")).collect(),
            origin: origin.clone(),
        }),
        connect_timeout: params
            .connect_timeout
            .map(|d| Setting { value: d.as_secs_f64(), origin: origin.clone() }),
        proxy_jump: params.proxy_jump.clone().map(|hops| {
            let hops = if hops.len() == 1 && hops[0].eq_ignore_ascii_case("none") { Vec::new() } else { hops };
            Setting { value: hops, origin: origin.clone() }
        }),
        ..HostConfig::default()
    };
    let yes_no = |option: &str, v: &str| match v.to_ascii_lowercase().as_str() {
        "yes" | "true" => Ok(true),
        "no" | "false" => Ok(false),
        _ => Err(bad(option, v, "expected yes or no")),
    };
    if let Some(v) = raw(params, "identitiesonly").and_then(|v| v.first()) {
        hc.identities_only = Some(Setting { value: yes_no("IdentitiesOnly", v)?, origin: origin.clone() });
    }
    if let Some(v) = raw(params, "passwordauthentication").and_then(|v| v.first()) {
        hc.password_authentication = Some(Setting { value: yes_no("PasswordAuthentication", v)?, origin: origin.clone() });
    }
    if let Some(v) = raw(params, "userknownhostsfile") {
        let files: Vec<PathBuf> = v.iter().filter(|f| !f.eq_ignore_ascii_case("none")).map(|f| expand_home(f, home)).collect();
        hc.known_hosts = Some(Setting { value: files, origin: origin.clone() });
    }
    if let Some(v) = raw(params, "stricthostkeychecking").and_then(|v| v.first()) {
        let value = policy_of(v).ok_or_else(|| bad("StrictHostKeyChecking", v, "expected yes, accept-new, no, off or ask"))?;
        hc.host_key_policy = Some(Setting { value: (value, v.to_ascii_lowercase()), origin: origin.clone() });
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
        .map(|k| k.to_ascii_lowercase())
        .collect();
    // Parsed by the library but not applied: keep-alives follow Enterprise Gateway's per-channel policy,
    // and the rest would change how egtunnel connects in ways it does not implement.
    let typed_unused: [(&str, bool); 5] = [
        ("serveraliveinterval", params.server_alive_interval.is_some()),
        ("forwardagent", params.forward_agent.is_some()),
        ("certificatefile", params.certificate_file.is_some()),
        ("compression", params.compression.is_some()),
        ("connectionattempts", params.connection_attempts.is_some()),
    ];
    ignored.extend(typed_unused.iter().filter(|(_, set)| *set).map(|(n, _)| n.to_string()));
    if !params.remote_forward.is_empty() {
        ignored.push("remoteforward".into());
    }
    ignored.sort();
    ignored.dedup();
    hc.ignored = ignored.into_iter().map(|n| (n, origin.clone())).collect();
    Ok(hc)
}

/// Fills `into` with what `other` sets and `into` does not: the earlier file wins, as in OpenSSH;
/// identity files accumulate.
fn merge(into: &mut HostConfig, other: HostConfig) {
    macro_rules! first {
        ($($f:ident),*) => { $( if into.$f.is_none() { into.$f = other.$f; } )* };
    }
    first!(host_name, port, user, identities_only, known_hosts, host_key_policy, connect_timeout, count_max, proxy_jump, password_authentication);
    match (&mut into.identity_files, other.identity_files) {
        (Some(a), Some(b)) => a.value.extend(b.value),
        (slot @ None, b) => *slot = b,
        _ => {}
    }
    for (name, origin) in other.ignored {
        if !into.ignored.iter().any(|(n, _)| *n == name) {
            into.ignored.push((name, origin));
        }
    }
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
    line_of!(host_name, port, user, identities_only, known_hosts, host_key_policy, connect_timeout, count_max, proxy_jump, password_authentication, identity_files);
    for i in 0..hc.ignored.len() {
        let option = hc.ignored[i].0.clone();
        hc.ignored[i].1 = origin(first_line(total, |n| at(n).ignored.iter().any(|(o, _)| *o == option)));
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
    use super::super::scan;
    use super::*;
    use crate::known_hosts::HostKeyPolicy;

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

    fn lookup(name: &str, f: &Path, home: &Path, explain: bool) -> Result<HostConfig> {
        let files = vec![(f.to_path_buf(), false)];
        resolve(name, &files, &scan::walk(&files, home, name), home, explain)
    }

    #[test]
    fn first_match_wins_and_origins_name_lines() {
        let d = tmpdir("first");
        let f = write(
            &d,
            "config",
            "# comment\nHost kh\n  HostName 10.0.0.5\n  Port 2200\n  IdentityFile ~/k1\n  StrictHostKeyChecking no\n  \
             UserKnownHostsFile ~/kh1 ~/kh2\n  ServerAliveCountMax 7\n  ServerAliveInterval 5\n  IdentityFile ~/k2\n\
             Host *\n  Port 22\n  User bob\n  IdentitiesOnly yes\n  ProxyJump j1,alice@j2:2022\n",
        );
        let hc = lookup("kh", &f, Path::new("/home/x"), true).unwrap();
        assert_eq!(hc.host_name.as_ref().unwrap().value, "10.0.0.5");
        assert_eq!(hc.host_name.as_ref().unwrap().origin, format!("{}:3", f.display()));
        assert_eq!(hc.port.as_ref().unwrap().value, 2200);
        assert_eq!(hc.port.as_ref().unwrap().origin, format!("{}:4", f.display()));
        assert_eq!(hc.user.as_ref().unwrap().value, "bob");
        assert_eq!(hc.user.as_ref().unwrap().origin, format!("{}:13", f.display()));
        let ids = hc.identity_files.as_ref().unwrap();
        assert_eq!(ids.value, vec![PathBuf::from("/home/x/k1"), PathBuf::from("/home/x/k2")]);
        // StrictHostKeyChecking no records unknown keys and refuses changed ones; it never turns checks off.
        assert_eq!(hc.host_key_policy.as_ref().unwrap().value.0, HostKeyPolicy::AcceptNew);
        assert_eq!(hc.known_hosts.as_ref().unwrap().value, vec![PathBuf::from("/home/x/kh1"), PathBuf::from("/home/x/kh2")]);
        assert_eq!(hc.count_max.as_ref().unwrap().value, 7);
        assert!(hc.identities_only.as_ref().unwrap().value);
        assert_eq!(hc.proxy_jump.as_ref().unwrap().value, vec!["j1".to_string(), "alice@j2:2022".to_string()]);
        let ignored: Vec<_> = hc.ignored.iter().map(|(n, _)| n.as_str()).collect();
        assert!(ignored.contains(&"serveraliveinterval"), "{ignored:?}");
        // Another name only gets the catch-all block.
        let other = lookup("other", &f, Path::new("/home/x"), false).unwrap();
        assert_eq!(other.port.unwrap().value, 22);
        assert!(other.host_name.is_none());
    }

    #[test]
    fn what_the_parser_might_read_differently_is_refused_at_its_line() {
        let d = tmpdir("refuse");
        let cases = [
            ("Host a\n  User u\nMatch host *.lab\n  User v\n", 3, "match"),
            ("Host a\n  Include other\n", 2, "include"),
            ("Host a\n  HostName %h.example.org\n", 2, "hostname"),
            ("Host a\n  User u\n  Port 1\n  User v\n", 4, "user"),
            ("Host a\n  IdentityFile ~/a\nHost *\n  IdentityFile ~/b\n", 4, "identityfile"),
            ("Host a\n  Ciphers aes128-ctr\n", 2, "ciphers"),
            ("Host *\n  ProxyCommand nc %h %p\n", 2, "proxycommand"),
        ];
        for (i, (text, line, keyword)) in cases.iter().enumerate() {
            let f = write(&d, &format!("c{i}"), text);
            match lookup("a", &f, Path::new("/h"), false) {
                Err(Error::Config { file, line: l, cause }) => {
                    assert_eq!((file, l), (f.display().to_string(), *line), "{text}");
                    assert!(cause.starts_with(keyword), "{cause}");
                }
                other => panic!("{text}: {other:?}"),
            }
        }
    }

    #[test]
    fn malformed_files_name_file_and_line() {
        let d = tmpdir("bad");
        let f = write(&d, "config", "Host a\n  HostName x\n  Port notaport\n  User u\n");
        match lookup("a", &f, Path::new("/h"), false) {
            Err(Error::Config { file, line, .. }) => assert_eq!((file, line), (f.display().to_string(), 3)),
            other => panic!("{other:?}"),
        }
        let g = write(&d, "config2", "Host a\n  User u\n  StrictHostKeyChecking maybe\n");
        match lookup("a", &g, Path::new("/h"), false) {
            Err(Error::Config { line, cause, .. }) => assert!(line == 3 && cause.contains("StrictHostKeyChecking"), "{line} {cause}"),
            other => panic!("{other:?}"),
        }
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
        use super::super::settings::Source;
        let home = Path::new("/h");
        assert_eq!(Source::from_setting(None, home), Source::Default);
        assert_eq!(Source::from_setting(Some("NONE"), home), Source::Disabled);
        assert_eq!(Source::from_setting(Some("~/c"), home), Source::File(PathBuf::from("/h/c")));
    }
}
