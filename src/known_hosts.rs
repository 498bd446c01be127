//! known_hosts files as OpenSSH reads them, where libssh2 alone falls short: marker lines, appends
//! that concurrent first connections cannot race, and the file modes OpenSSH uses.
//!
//! libssh2 parses plain and hashed (`|1|salt|hash`) entries and matches them; it does not know the
//! `@revoked` and `@cert-authority` markers and would read such a line as a host literally named
//! "@revoked". So each file is read line by line here: marker lines are kept aside (a revoked key is
//! refused naming its line, a host whose trust comes from a CA is refused because libssh2 cannot
//! verify host certificates), and so are plain lines whose host patterns use wildcards or negation,
//! which libssh2 matches only literally (they are matched here, as OpenSSH matches them); every other
//! line goes to libssh2 unchanged.
//!
//! `HostKeyPolicy`, what the check does with an unknown or changed key, lives here too: the caller's
//! setting and ssh_config's StrictHostKeyChecking both resolve to it.

use std::fs::{DirBuilder, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Mutex;

use ssh2::{KnownHostFileKind, KnownHosts};

use crate::error::Error;

/// How a server's host key is checked against the known_hosts file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum HostKeyPolicy {
    /// Unknown or changed key refused.
    Strict,
    /// Unknown key appended to known_hosts; changed key refused.
    AcceptNew,
    /// No check at all (for throwaway test hosts only). Only egtunnel's own setting
    /// (EG_SSH_HOST_KEY_POLICY, or the caller's argument) selects it, never ssh_config.
    Off,
}

impl HostKeyPolicy {
    pub const NAMES: [&'static str; 3] = ["strict", "accept-new", "off"];

    pub fn as_str(self) -> &'static str {
        match self {
            HostKeyPolicy::Strict => "strict",
            HostKeyPolicy::AcceptNew => "accept-new",
            HostKeyPolicy::Off => "off",
        }
    }
}

impl FromStr for HostKeyPolicy {
    type Err = Error;
    fn from_str(s: &str) -> crate::error::Result<Self> {
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

/// A line kept aside from libssh2: `@revoked`, `@cert-authority`, or a plain line with wildcard or
/// negated host patterns; its host patterns and key.
#[derive(Clone, Debug)]
pub struct Marker {
    pub revoked: bool,
    /// The key type of a plain line with wildcard patterns (`ssh-ed25519`, ...); None for a marker.
    pub wildcard_type: Option<String>,
    pub patterns: String,
    pub key: Vec<u8>,
    pub file: PathBuf,
    pub line: usize,
}

impl Marker {
    pub fn at(&self) -> String {
        format!("{}:{}", self.file.display(), self.line)
    }
}

/// Reads `files` into `kh` (libssh2's matcher) and returns their marker lines. Missing files are
/// skipped; a line libssh2 cannot parse is skipped, as OpenSSH skips it.
pub fn read(kh: &mut KnownHosts, files: &[PathBuf]) -> std::io::Result<Vec<Marker>> {
    use base64::Engine;
    let mut markers = Vec::new();
    for path in files {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(std::io::Error::new(e.kind(), format!("cannot read {}: {e}", path.display()))),
        };
        for (i, line) in text.lines().enumerate() {
            let t = line.trim();
            if t.is_empty() || t.starts_with('#') {
                continue;
            }
            if t.starts_with('@') {
                let f: Vec<&str> = t.split_whitespace().collect();
                let revoked = f[0].eq_ignore_ascii_case("@revoked");
                if f.len() >= 4 && (revoked || f[0].eq_ignore_ascii_case("@cert-authority")) {
                    let key = base64::engine::general_purpose::STANDARD.decode(f[3]).unwrap_or_default();
                    markers.push(Marker { revoked, wildcard_type: None, patterns: f[1].to_string(), key, file: path.clone(), line: i + 1 });
                }
                continue;
            }
            let f: Vec<&str> = t.split_whitespace().collect();
            if f.len() >= 3 && !f[0].starts_with('|') && f[0].contains(['*', '?', '!']) {
                if let Ok(key) = base64::engine::general_purpose::STANDARD.decode(f[2]) {
                    let wildcard_type = Some(f[1].to_string());
                    markers.push(Marker { revoked: false, wildcard_type, patterns: f[0].to_string(), key, file: path.clone(), line: i + 1 });
                }
                continue;
            }
            let _ = kh.read_str(t, KnownHostFileKind::OpenSSH);
        }
    }
    Ok(markers)
}

/// True when `name` (already in `[host]:port` form for other ports) matches a comma-separated list
/// of OpenSSH host patterns: `*` and `?` wildcards, `!` negation (a negated match vetoes), hashed
/// names (checked by libssh2, via `probe`).
pub fn patterns_match(patterns: &str, name: &str, probe: &dyn Fn(&str) -> bool) -> bool {
    let mut matched = false;
    for p in patterns.split(',') {
        let (negated, p) = match p.strip_prefix('!') {
            Some(rest) => (true, rest),
            None => (false, p),
        };
        let hit = if p.starts_with("|1|") { probe(p) } else { wildmatch::WildMatch::new(&p.to_ascii_lowercase()).matches(&name.to_ascii_lowercase()) };
        if hit && negated {
            return false;
        }
        matched |= hit;
    }
    matched
}

/// Serialises appends within this process; `flock` serialises them with other processes.
static APPEND: Mutex<()> = Mutex::new(());

/// Runs `decide` with the first file locked against every other writer (a process lock plus
/// `flock(LOCK_EX)`), after creating it (0600, its directories 0700) if needed. `decide` re-reads the
/// files under the lock and returns the line to append, if the key is still unknown.
pub fn locked_append<T>(path: &Path, decide: impl FnOnce() -> std::io::Result<(Option<String>, T)>) -> std::io::Result<T> {
    let _guard = APPEND.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty() && !d.exists()) {
        DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
    }
    let mut f = OpenOptions::new().create(true).append(true).mode(0o600).open(path)?;
    // SAFETY: flock on a descriptor we own for the duration of the call; the lock is released when
    // `f` is closed at the end of this function.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let (line, out) = decide()?;
    if let Some(line) = line {
        let mut line = line.trim_end().to_string();
        line.push('\n');
        f.write_all(line.as_bytes())?;
        f.sync_data()?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_follow_openssh() {
        let never = |_: &str| false;
        assert!(patterns_match("*.lab,other", "h.lab", &never));
        assert!(patterns_match("[h.lab]:2222", "[h.lab]:2222", &never));
        assert!(!patterns_match("*.lab,!bad.lab", "bad.lab", &never));
        assert!(!patterns_match("a,b", "c", &never));
        assert!(patterns_match("|1|x|y", "c", &|p: &str| p == "|1|x|y"));
    }

    #[test]
    fn new_files_are_private_and_appends_wait_for_each_other() {
        let d = std::env::temp_dir().join(format!("egtunnel-kh-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        let f = d.join("sub").join("known_hosts");
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let f = f.clone();
                std::thread::spawn(move || {
                    locked_append(&f, || {
                        // Only the first writer finds the file empty: the others see its line.
                        let empty = std::fs::read_to_string(&f).unwrap_or_default().is_empty();
                        Ok((empty.then(|| "h ssh-ed25519 AAAA".to_string()), ()))
                    })
                    .unwrap()
                })
            })
            .collect();
        threads.into_iter().for_each(|t| t.join().unwrap());
        assert_eq!(std::fs::read_to_string(&f).unwrap(), "h ssh-ed25519 AAAA\n");
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&f).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(std::fs::metadata(d.join("sub")).unwrap().permissions().mode() & 0o777, 0o700);
    }
}
