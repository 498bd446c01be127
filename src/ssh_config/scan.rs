//! A line-level walk over the ssh_config files one lookup reads, Includes followed in place.
//!
//! This does not resolve anything (OpenSSH, or the built-in parser, does that). It exists for what a
//! resolver does not report: which files a lookup depends on (so a cached result notices an edit to an
//! Included file), where a keyword is set (`file:line` for `check` and for errors), and the lines that
//! must be refused before anything runs (`Match exec`, which `ssh -G` would execute).

use std::path::{Path, PathBuf};
use std::time::SystemTime;

/// Includes nested deeper than this are a loop (OpenSSH stops at 16 too).
const MAX_DEPTH: usize = 16;

/// One keyword line: where it is, its keyword in lower case, and its arguments (quotes removed).
#[derive(Clone, Debug)]
pub struct Line {
    pub file: PathBuf,
    pub number: usize,
    pub keyword: String,
    pub args: Vec<String>,
    /// False inside a `Host` block whose patterns exclude the host looked up (`Match` blocks may apply).
    pub may_apply: bool,
}

impl Line {
    pub fn origin(&self) -> String {
        format!("{}:{}", self.file.display(), self.number)
    }
}

/// What a walk found: every keyword line in reading order, and the state of every file and
/// directory the lookup depends on (a changed stamp means the lookup must run again).
#[derive(Clone, Debug, Default)]
pub struct Scan {
    pub lines: Vec<Line>,
    pub stamps: Vec<Stamp>,
}

/// A file's or directory's modification time and size; None when it does not exist.
pub type Stamp = (PathBuf, Option<(SystemTime, u64)>);

pub fn stamp(path: &Path) -> Stamp {
    let meta = std::fs::metadata(path).ok().map(|m| (m.modified().unwrap_or(SystemTime::UNIX_EPOCH), m.len()));
    (path.to_path_buf(), meta)
}

/// True when every stamp still holds.
pub fn fresh(stamps: &[Stamp]) -> bool {
    stamps.iter().all(|(p, s)| stamp(p).1 == *s)
}

/// Splits a line into keyword and arguments as OpenSSH does: `Keyword value`, `Keyword=value`,
/// `Keyword = value`; double-quoted arguments may hold spaces.
pub fn split(line: &str) -> Option<(String, Vec<String>)> {
    let t = line.trim();
    if t.is_empty() || t.starts_with('#') {
        return None;
    }
    let end = t.find(|c: char| c.is_whitespace() || c == '=').unwrap_or(t.len());
    let keyword = t[..end].to_ascii_lowercase();
    let mut rest = t[end..].trim_start();
    if let Some(r) = rest.strip_prefix('=') {
        rest = r.trim_start();
    }
    let mut args = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let mut any = false;
    for c in rest.chars() {
        match c {
            '"' => {
                quoted = !quoted;
                any = true;
            }
            c if c.is_whitespace() && !quoted => {
                if any {
                    args.push(std::mem::take(&mut cur));
                    any = false;
                }
            }
            c => {
                cur.push(c);
                any = true;
            }
        }
    }
    if any {
        args.push(cur);
    }
    Some((keyword, args))
}

/// Walks `files` (each a top-level file; `system` tells which are system files, whose relative
/// Includes are under /etc/ssh rather than ~/.ssh), for the host `name`.
pub fn walk(files: &[(PathBuf, bool)], home: &Path, name: &str) -> Scan {
    let mut scan = Scan::default();
    for (file, system) in files {
        visit(file, *system, home, name, true, 0, &mut scan);
    }
    scan
}

/// `may_apply` is the state of the block an Include sits in; a file's own Host lines change it for the
/// rest of that file only, as OpenSSH scopes them.
fn visit(file: &Path, system: bool, home: &Path, name: &str, mut may_apply: bool, depth: usize, scan: &mut Scan) {
    scan.stamps.push(stamp(file));
    if depth > MAX_DEPTH {
        return;
    }
    let Ok(text) = std::fs::read_to_string(file) else { return };
    for (i, raw) in text.lines().enumerate() {
        let Some((keyword, args)) = split(raw) else { continue };
        match keyword.as_str() {
            "host" => may_apply = crate::known_hosts::patterns_match(&args.join(","), &name.to_ascii_lowercase(), &|_| false),
            "match" => may_apply = true,
            _ => {}
        }
        let line = Line { file: file.to_path_buf(), number: i + 1, keyword, args, may_apply };
        let include = if line.keyword == "include" { line.args.clone() } else { Vec::new() };
        scan.lines.push(line);
        for pattern in include {
            let full = include_path(&pattern, system, home);
            // A new file matching the glob changes its directory's stamp.
            if let Some(dir) = full.parent() {
                scan.stamps.push(stamp(dir));
            }
            let mut found: Vec<PathBuf> = glob::glob(&full.to_string_lossy())
                .map(|paths| paths.filter_map(|p| p.ok()).collect())
                .unwrap_or_default();
            found.sort();
            for f in found.iter().filter(|f| f.is_file()) {
                visit(f, system, home, name, may_apply, depth + 1, scan);
            }
        }
    }
}

/// An Include argument as OpenSSH reads it: `~` is the home directory, and a relative path is under
/// ~/.ssh for user files, /etc/ssh for system files.
fn include_path(pattern: &str, system: bool, home: &Path) -> PathBuf {
    if let Some(rest) = pattern.strip_prefix("~/") {
        return home.join(rest);
    }
    let p = PathBuf::from(pattern);
    if p.is_absolute() {
        p
    } else if system {
        Path::new("/etc/ssh").join(p)
    } else {
        home.join(".ssh").join(p)
    }
}

impl Scan {
    /// The first `Match` line with an `exec` criterion: `ssh -G` would run its command.
    pub fn match_exec(&self) -> Option<&Line> {
        self.lines.iter().find(|l| {
            l.keyword == "match" && l.args.iter().any(|a| a.eq_ignore_ascii_case("exec") || a.eq_ignore_ascii_case("!exec"))
        })
    }

    /// Where `keyword` is set: among the lines in blocks that may apply to the host, the first whose
    /// arguments are `value` (case-insensitive), else the first that sets it; failing both, the same
    /// among all lines. A line is only a candidate: OpenSSH decided which block applied.
    pub fn origin(&self, keyword: &str, value: Option<&str>) -> Option<&Line> {
        let same = |l: &&Line| {
            value.is_some_and(|v| l.args.join(" ").eq_ignore_ascii_case(v) || l.args.first().is_some_and(|a| a.eq_ignore_ascii_case(v)))
        };
        let applying = || self.lines.iter().filter(|l| l.keyword == keyword && l.may_apply);
        let all = || self.lines.iter().filter(|l| l.keyword == keyword);
        applying().find(same).or_else(|| applying().next()).or_else(|| all().find(same)).or_else(|| all().next())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_split_like_openssh() {
        assert_eq!(split("  Port=2222").unwrap(), ("port".into(), vec!["2222".to_string()]));
        assert_eq!(split("HostName = h").unwrap(), ("hostname".into(), vec!["h".to_string()]));
        assert_eq!(split("IdentityFile \"/a b/c\" d").unwrap(), ("identityfile".into(), vec!["/a b/c".to_string(), "d".to_string()]));
        assert!(split("# comment").is_none());
        assert!(split("   ").is_none());
    }

    #[test]
    fn origins_prefer_blocks_that_match_the_host() {
        let d = std::env::temp_dir().join(format!("egtunnel-scan-origin-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("c"), "Host a\n  Port 2222\nHost b !c\n  Port 2222\nHost *\n  User u\n").unwrap();
        let scan = walk(&[(d.join("c"), false)], Path::new("/h"), "b");
        assert_eq!(scan.origin("port", Some("2222")).unwrap().number, 4);
        assert_eq!(scan.origin("user", None).unwrap().number, 6);
        let scan = walk(&[(d.join("c"), false)], Path::new("/h"), "c");
        assert_eq!(scan.origin("port", Some("2222")).unwrap().number, 2); // no block applies: the first
    }

    #[test]
    fn includes_are_followed_and_stamped() {
        let d = std::env::temp_dir().join(format!("egtunnel-scan-{}", std::process::id()));
        std::fs::create_dir_all(d.join("conf.d")).unwrap();
        std::fs::write(d.join("conf.d/a.conf"), "Match exec \"true\"\n").unwrap();
        std::fs::write(d.join("main"), format!("Host x\n  Include {}/conf.d/*.conf\n  User u\n", d.display())).unwrap();
        let scan = walk(&[(d.join("main"), false)], Path::new("/nonexistent"), "x");
        assert_eq!(scan.match_exec().unwrap().origin(), format!("{}/conf.d/a.conf:1", d.display()));
        assert_eq!(scan.origin("user", None).unwrap().number, 3);
        assert!(scan.stamps.iter().any(|(p, _)| p.ends_with("conf.d")));
        assert!(fresh(&scan.stamps));
        std::fs::write(d.join("conf.d/a.conf"), "User v\n").unwrap();
        // The Included file changed size, so a cached lookup must run again.
        assert!(!fresh(&scan.stamps));
    }
}
