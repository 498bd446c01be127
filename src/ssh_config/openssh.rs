//! Resolving ssh_config through OpenSSH's own client: `ssh -G` prints every option as `ssh` would use
//! it for a host, after Match, Include, tokens, quoting and first-value-wins.
//!
//! Each lookup runs `ssh -G` twice, at the same time: once with the configuration, once with `-F none`
//! (OpenSSH's defaults for the same host, user and port). An option whose value differs is one the
//! files set; those are the ones egtunnel applies, refuses, or reports as ignored. Nothing here guesses
//! a value: every value comes from OpenSSH's output, and `scan` only says which line set it.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use super::scan::Scan;
use super::settings::{expand_tokens, policy_of, refuse_match_exec, refused, AlgKind, Algorithms, HostConfig, Setting, Source, Tokens, REFUSED};
use crate::error::{Error, Result};
use crate::local_user::current_user;

/// `ssh -G` reads files and prints; anything slower is stuck (an automounted home, a hung NFS).
const TIMEOUT: Duration = Duration::from_secs(5);

/// Options never reported as ignored: the ones honoured under another row, and `updatehostkeys`, which
/// OpenSSH turns off by itself when UserKnownHostsFile is set (so it differs without being set).
const NOT_REPORTED: [&str; 4] = ["host", "hostname", "user", "updatehostkeys"];

/// The lines of one `ssh -G` run, keyword (lower case) and value.
struct Printed(Vec<(String, String)>);

impl Printed {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }
    fn all(&self, key: &str) -> Vec<&str> {
        self.0.iter().filter(|(k, _)| k == key).map(|(_, v)| v.as_str()).collect()
    }
}

pub fn resolve(ssh: &Path, source: &Source, walked: &Scan, name: &str, home: &Path, user: Option<&str>, port: Option<u16>) -> Result<HostConfig> {
    refuse_match_exec(walked)?;
    let file_arg = match source {
        Source::Default => None,
        Source::File(p) => Some(p.display().to_string()),
        Source::Disabled => Some("none".to_string()),
    };
    let described = source.describe();
    let main = spawn(ssh, file_arg.as_deref(), name, user, port, &described)?;
    let base = match source {
        Source::Disabled => None,
        _ => Some(spawn(ssh, Some("none"), name, user, port, &described)?),
    };
    let main = finish(main, &described)?;
    let base = match base {
        Some(b) => finish(b, &described)?,
        None => Printed(main.0.clone()),
    };
    let client = format!("ssh -G ({})", ssh.display());
    build(&main, &base, walked, name, home, &described, client)
}

/// Starts one `ssh -G`: no stdin, no terminal, the caller's user and port as `-l` and `-p` so that
/// `%r`, `%p` and `Match user` see them as OpenSSH would.
fn spawn(ssh: &Path, file: Option<&str>, name: &str, user: Option<&str>, port: Option<u16>, described: &str) -> Result<std::process::Child> {
    let mut cmd = Command::new(ssh);
    cmd.arg("-G");
    if let Some(f) = file {
        cmd.arg("-F").arg(f);
    }
    if let Some(u) = user {
        cmd.arg("-l").arg(u);
    }
    if let Some(p) = port {
        cmd.arg("-p").arg(p.to_string());
    }
    cmd.arg(name).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    cmd.spawn().map_err(|e| Error::Config {
        file: described.to_string(),
        line: 0,
        cause: format!("cannot run {} -G to resolve the configuration: {e} (set EG_SSH_CLIENT=none to use the built-in parser)", ssh.display()),
    })
}

/// Waits for one run (killing it after TIMEOUT) and reads its lines; OpenSSH's own error, which names
/// the file and line, becomes an SshConfigError at that line.
fn finish(child: std::process::Child, described: &str) -> Result<Printed> {
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let output = match rx.recv_timeout(TIMEOUT) {
        Ok(r) => r,
        Err(_) => {
            // SAFETY: kill(2) on the pid of our own child, which the waiting thread has not reaped yet
            // (its wait_with_output is still blocked on it).
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
            return Err(Error::Config { file: described.into(), line: 0, cause: format!("ssh -G did not finish within {} s", TIMEOUT.as_secs()) });
        }
    }
    .map_err(|e| Error::Config { file: described.into(), line: 0, cause: format!("ssh -G failed: {e}") })?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        return Err(openssh_error(&stderr, described));
    }
    let text = String::from_utf8_lossy(&output.stdout);
    Ok(Printed(
        text.lines()
            .filter_map(|l| {
                let (k, v) = l.split_once(' ').unwrap_or((l, ""));
                (!k.is_empty()).then(|| (k.to_ascii_lowercase(), v.to_string()))
            })
            .collect(),
    ))
}

/// `FILE line N: message` from OpenSSH's stderr, as an error at that line.
fn openssh_error(stderr: &str, described: &str) -> Error {
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.starts_with("Pseudo-terminal")).collect();
    for l in &lines {
        if let Some((file, rest)) = l.split_once(" line ") {
            if let Some((n, msg)) = rest.split_once(": ") {
                if let Ok(line) = n.trim().parse::<usize>() {
                    // OpenSSH's message rarely names the keyword; the line itself does.
                    let text = std::fs::read_to_string(file).ok().and_then(|t| t.lines().nth(line.saturating_sub(1)).map(|l| l.trim().to_string()));
                    let cause = match text {
                        Some(t) => format!("{} in {t:?} (OpenSSH's ssh -G)", msg.trim().trim_end_matches('.')),
                        None => format!("{} (OpenSSH's ssh -G)", msg.trim()),
                    };
                    return Error::Config { file: file.to_string(), line, cause };
                }
            }
        }
    }
    Error::Config { file: described.into(), line: 0, cause: format!("ssh -G refused the configuration: {}", lines.join("; ")) }
}

fn build(main: &Printed, base: &Printed, walked: &Scan, name: &str, home: &Path, described: &str, resolver: String) -> Result<HostConfig> {
    let differs = |key: &str| main.all(key) != base.all(key);
    let origin = |key: &str, value: Option<&str>| {
        walked.origin(key, value).map(|l| l.origin()).unwrap_or_else(|| described.to_string())
    };
    let set = |key: &str| -> Option<Setting<String>> {
        let v = main.get(key)?;
        differs(key).then(|| Setting { value: v.to_string(), origin: origin(key, Some(v)) })
    };
    let bad = |key: &str, value: &str, why: &str| {
        let l = walked.origin(key, Some(value));
        Error::Config {
            file: l.map(|l| l.file.display().to_string()).unwrap_or_else(|| described.to_string()),
            line: l.map(|l| l.number).unwrap_or(0),
            cause: format!("{key} {value}: {why}"),
        }
    };
    for (keyword, why) in REFUSED {
        let value = main.get(keyword).unwrap_or("");
        let harmless = value.is_empty() || matches!(value, "no" | "false" | "none");
        if differs(keyword) && !harmless {
            return Err(refused(walked, keyword, why, described));
        }
    }
    let mut hc = HostConfig { resolver, ..HostConfig::default() };
    hc.host_name = set("hostname");
    hc.user = set("user");
    let port: u16 = match main.get("port") {
        Some(p) => p.parse().map_err(|_| bad("port", p, "not a port number"))?,
        None => 22,
    };
    if differs("port") {
        hc.port = Some(Setting { value: port, origin: origin("port", main.get("port")) });
    }
    if differs("identityfile") {
        let me = current_user();
        let tokens = Tokens {
            host: main.get("hostname").unwrap_or(name).to_string(),
            original: name.to_string(),
            port,
            user: main.get("user").unwrap_or("").to_string(),
            local_user: me.name.clone().unwrap_or_default(),
            home: home.to_path_buf(),
            // SAFETY: geteuid has no preconditions and cannot fail.
            uid: unsafe { libc::geteuid() },
        };
        let mut files = Vec::new();
        for raw in main.all("identityfile").into_iter().filter(|f| !f.eq_ignore_ascii_case("none")) {
            let expanded = expand_tokens(raw, &tokens).map_err(|why| bad("identityfile", raw, &why))?;
            files.push(PathBuf::from(expanded));
        }
        let first = main.all("identityfile").first().map(|s| s.to_string());
        hc.identity_files = Some(Setting { value: files, origin: origin("identityfile", first.as_deref()) });
    }
    if let Some(s) = set("identitiesonly") {
        hc.identities_only = Some(Setting { value: matches!(s.value.as_str(), "yes" | "true"), origin: s.origin });
    }
    if let Some(s) = set("userknownhostsfile") {
        if walked.origin("userknownhostsfile", None).is_some_and(|l| l.args.iter().any(|a| a.contains(char::is_whitespace))) {
            return Err(bad("userknownhostsfile", &s.value, "file names with spaces are not supported by egtunnel"));
        }
        let files = s.value.split_whitespace().filter(|f| !f.eq_ignore_ascii_case("none")).map(PathBuf::from).collect();
        hc.known_hosts = Some(Setting { value: files, origin: s.origin });
    }
    hc.global_known_hosts = main
        .get("globalknownhostsfile")
        .unwrap_or("")
        .split_whitespace()
        .filter(|f| !f.eq_ignore_ascii_case("none"))
        .map(PathBuf::from)
        .collect();
    if let Some(s) = set("stricthostkeychecking") {
        let policy = policy_of(&s.value).ok_or_else(|| bad("stricthostkeychecking", &s.value, "unknown value"))?;
        let word = walked.origin("stricthostkeychecking", None).and_then(|l| l.args.first().cloned()).unwrap_or(s.value.clone());
        hc.host_key_policy = Some(Setting { value: (policy, word), origin: s.origin });
    }
    if let Some(s) = set("connecttimeout") {
        let secs: f64 = s.value.parse().map_err(|_| bad("connecttimeout", &s.value, "not a number of seconds"))?;
        hc.connect_timeout = Some(Setting { value: secs, origin: s.origin });
    }
    if let Some(s) = set("serveralivecountmax") {
        let n = s.value.parse::<u32>().ok().filter(|n| *n > 0).ok_or_else(|| bad("serveralivecountmax", &s.value, "expected a positive integer"))?;
        hc.count_max = Some(Setting { value: n, origin: s.origin });
    }
    if let Some(s) = set("passwordauthentication") {
        hc.password_authentication = Some(Setting { value: matches!(s.value.as_str(), "yes" | "true"), origin: s.origin });
    }
    if let Some(v) = main.get("proxyjump") {
        let hops: Vec<String> = if v.eq_ignore_ascii_case("none") { Vec::new() } else { v.split(',').map(str::to_string).collect() };
        hc.proxy_jump = Some(Setting { value: hops, origin: origin("proxyjump", Some(v)) });
    }
    for kind in AlgKind::ALL {
        let list: Vec<String> = main.get(kind.keyword()).unwrap_or("").split(',').filter(|s| !s.is_empty()).map(str::to_string).collect();
        let explicit = differs(kind.keyword());
        let origin = if explicit { origin(kind.keyword(), None) } else { "default".into() };
        hc.algorithms.push(Algorithms { kind, list, origin, explicit });
    }
    let honoured = [
        "port", "identityfile", "identitiesonly", "userknownhostsfile", "globalknownhostsfile", "stricthostkeychecking",
        "connecttimeout", "serveralivecountmax", "passwordauthentication", "proxyjump",
        // Keep-alives follow Enterprise Gateway's per-channel policy on purpose.
        "serveraliveinterval",
    ];
    let mut seen = Vec::new();
    for (key, _) in &main.0 {
        if seen.contains(key) || NOT_REPORTED.contains(&key.as_str()) || honoured.contains(&key.as_str()) {
            continue;
        }
        if AlgKind::ALL.iter().any(|k| k.keyword() == key) {
            continue;
        }
        seen.push(key.clone());
        if differs(key) {
            hc.ignored.push((key.clone(), origin(key, None)));
        }
    }
    if differs("serveraliveinterval") {
        hc.ignored.push(("serveraliveinterval".into(), origin("serveraliveinterval", None)));
    }
    Ok(hc)
}
