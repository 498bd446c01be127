//! What one resolution of ssh_config yields (`HostConfig` and its parts), and the rules both
//! resolvers apply to it: the refused keywords, StrictHostKeyChecking's meaning, token expansion and
//! OpenSSH's default algorithm lists.

use std::path::{Path, PathBuf};

use super::scan;
use crate::error::{Error, Result};
use crate::known_hosts::HostKeyPolicy;

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

    /// The top-level files in reading order, each with whether it is a system file (relative
    /// Includes under /etc/ssh rather than ~/.ssh). Missing default files are listed too: creating
    /// one later must invalidate a cached lookup.
    pub(super) fn files(&self, home: &Path) -> Result<Vec<(PathBuf, bool)>> {
        match self {
            Source::Disabled => Ok(Vec::new()),
            Source::File(p) if p.is_file() => Ok(vec![(p.clone(), false)]),
            Source::File(p) => Err(Error::Invalid(format!(
                "ssh_config file {} does not exist (set EG_SSH_CONFIG to an existing file, or to none to read no file)",
                p.display()
            ))),
            Source::Default => Ok(vec![(home.join(".ssh").join("config"), false), (PathBuf::from("/etc/ssh/ssh_config"), true)]),
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

/// A value and where it was set (`file:line`, or `default`).
#[derive(Clone, Debug, PartialEq)]
pub struct Setting<T> {
    pub value: T,
    pub origin: String,
}

/// One of the four algorithm lists OpenSSH negotiates, as libssh2 names its method types.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AlgKind {
    Kex,
    HostKey,
    Ciphers,
    Macs,
}

impl AlgKind {
    pub const ALL: [AlgKind; 4] = [AlgKind::Kex, AlgKind::HostKey, AlgKind::Ciphers, AlgKind::Macs];

    /// The ssh_config keyword, lower case (as `ssh -G` prints it).
    pub fn keyword(self) -> &'static str {
        match self {
            AlgKind::Kex => "kexalgorithms",
            AlgKind::HostKey => "hostkeyalgorithms",
            AlgKind::Ciphers => "ciphers",
            AlgKind::Macs => "macs",
        }
    }
}

/// An algorithm list in OpenSSH's order of preference; `explicit` when a file set it (refused when
/// libssh2 supports none of it), otherwise OpenSSH's default (libssh2's own defaults apply if the
/// two share nothing).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Algorithms {
    pub kind: AlgKind,
    pub list: Vec<String>,
    pub origin: String,
    pub explicit: bool,
}

/// The options egtunnel honours, as the files set them for one host name.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct HostConfig {
    pub host_name: Option<Setting<String>>,
    pub port: Option<Setting<u16>>,
    pub user: Option<Setting<String>>,
    /// IdentityFile, in OpenSSH's order; `Some(empty)` for `IdentityFile none`.
    pub identity_files: Option<Setting<Vec<PathBuf>>>,
    pub identities_only: Option<Setting<bool>>,
    pub known_hosts: Option<Setting<Vec<PathBuf>>>,
    /// GlobalKnownHostsFile: consulted for changed and revoked keys, never written.
    pub global_known_hosts: Vec<PathBuf>,
    /// StrictHostKeyChecking as egtunnel applies it, and the word the file used.
    pub host_key_policy: Option<Setting<(HostKeyPolicy, String)>>,
    pub connect_timeout: Option<Setting<f64>>,
    pub count_max: Option<Setting<u32>>,
    /// PasswordAuthentication no: EG_REMOTE_PWD is never sent to this host.
    pub password_authentication: Option<Setting<bool>>,
    /// Empty when ProxyJump is unset or `none`.
    pub proxy_jump: Option<Setting<Vec<String>>>,
    pub algorithms: Vec<Algorithms>,
    /// Options set for this host that egtunnel does not apply, with where they were set.
    pub ignored: Vec<(String, String)>,
    /// Which resolver produced this: `ssh -G` (with the client's path) or the built-in parser.
    pub resolver: String,
}

/// The keywords egtunnel cannot apply and that change where or how securely it would connect: a file
/// that sets one for a host is refused for that host rather than followed halfway.
pub const REFUSED: [(&str, &str); 8] = [
    ("proxycommand", "egtunnel connects natively and cannot run a ProxyCommand; use ProxyJump"),
    ("proxyusefdpass", "egtunnel cannot run a ProxyCommand"),
    ("bindaddress", "egtunnel cannot choose the local address of its connections"),
    ("bindinterface", "egtunnel cannot choose the local interface of its connections"),
    ("hostkeyalias", "egtunnel looks host keys up under the host's name and address only"),
    ("knownhostscommand", "egtunnel cannot run a command to obtain host keys"),
    ("canonicalizehostname", "egtunnel does not canonicalize host names"),
    ("localcommand", "egtunnel runs no local commands"),
];

/// `Match exec` is refused before anything else: `ssh -G` would run its command.
pub(super) fn refuse_match_exec(walked: &scan::Scan) -> Result<()> {
    match walked.match_exec() {
        Some(l) => Err(Error::Config {
            file: l.file.display().to_string(),
            line: l.number,
            cause: "Match exec: egtunnel does not run commands to resolve ssh_config (OpenSSH would); \
                    use Match host/user/originalhost, or Host patterns"
                .into(),
        }),
        None => Ok(()),
    }
}

/// The error for a refused keyword, at the line that sets it.
pub(super) fn refused(walked: &scan::Scan, keyword: &str, why: &str, fallback_file: &str) -> Error {
    let (file, line) = walked
        .origin(keyword, None)
        .map(|l| (l.file.display().to_string(), l.number))
        .unwrap_or((fallback_file.to_string(), 0));
    let shown = walked.origin(keyword, None).map(|l| l.args.join(" ")).unwrap_or_default();
    Error::Config { file, line, cause: format!("{keyword} {shown}: {why}").replace("  ", " ") }
}

pub(super) fn expand_home(p: &str, home: &Path) -> PathBuf {
    match p.strip_prefix("~/") {
        Some(rest) => home.join(rest),
        None if p == "~" => home.to_path_buf(),
        None => PathBuf::from(p),
    }
}

/// StrictHostKeyChecking as egtunnel applies it. egtunnel cannot ask anyone, so `ask` (OpenSSH's
/// default) refuses unknown keys like `yes`. `no` records unknown keys and refuses changed ones:
/// OpenSSH's `no` also records them, and on a changed key it disables forwarding and passwords,
/// which would leave a tunnel nothing to do, so egtunnel refuses the connection. Only egtunnel's own
/// setting (EG_SSH_HOST_KEY_POLICY=off) turns checking off.
pub fn policy_of(word: &str) -> Option<HostKeyPolicy> {
    match word.to_ascii_lowercase().as_str() {
        "yes" | "true" | "ask" => Some(HostKeyPolicy::Strict),
        "accept-new" | "no" | "false" | "off" => Some(HostKeyPolicy::AcceptNew),
        _ => None,
    }
}

/// Expands the tokens OpenSSH expands in IdentityFile (ssh -G prints it unexpanded); a token egtunnel
/// cannot reproduce is an error naming it.
pub fn expand_tokens(value: &str, t: &Tokens) -> std::result::Result<String, String> {
    let mut out = String::new();
    let mut chars = value.chars();
    while let Some(c) = chars.next() {
        if c == '$' && value.contains("${") {
            return Err("environment variables (${...}) are not expanded by egtunnel".into());
        }
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('%') => out.push('%'),
            Some('h') => out.push_str(&t.host),
            Some('n') => out.push_str(&t.original),
            Some('p') => out.push_str(&t.port.to_string()),
            Some('r') => out.push_str(&t.user),
            Some('u') => out.push_str(&t.local_user),
            Some('d') => out.push_str(&t.home.display().to_string()),
            Some('i') => out.push_str(&t.uid.to_string()),
            Some(other) => return Err(format!("token %{other} is not expanded by egtunnel")),
            None => return Err("a lone % at the end".into()),
        }
    }
    if let Some(rest) = out.strip_prefix("~/") {
        return Ok(t.home.join(rest).display().to_string());
    }
    Ok(out)
}

/// What the tokens stand for, for one lookup.
pub struct Tokens {
    pub host: String,
    pub original: String,
    pub port: u16,
    pub user: String,
    pub local_user: String,
    pub home: PathBuf,
    pub uid: u32,
}

/// OpenSSH's default algorithm lists (OpenSSH 9.x, ssh_config(5)), for the built-in parser, which has
/// no OpenSSH to ask.
pub const OPENSSH_DEFAULTS: [(AlgKind, &str); 4] = [
    (
        AlgKind::Kex,
        "sntrup761x25519-sha512@openssh.com,curve25519-sha256,curve25519-sha256@libssh.org,ecdh-sha2-nistp256,\
         ecdh-sha2-nistp384,ecdh-sha2-nistp521,diffie-hellman-group-exchange-sha256,diffie-hellman-group16-sha512,\
         diffie-hellman-group18-sha512,diffie-hellman-group14-sha256",
    ),
    (
        AlgKind::HostKey,
        "ssh-ed25519,ecdsa-sha2-nistp256,ecdsa-sha2-nistp384,ecdsa-sha2-nistp521,sk-ssh-ed25519@openssh.com,\
         sk-ecdsa-sha2-nistp256@openssh.com,rsa-sha2-512,rsa-sha2-256",
    ),
    (
        AlgKind::Ciphers,
        "chacha20-poly1305@openssh.com,aes128-ctr,aes192-ctr,aes256-ctr,aes128-gcm@openssh.com,aes256-gcm@openssh.com",
    ),
    (
        AlgKind::Macs,
        "umac-64-etm@openssh.com,umac-128-etm@openssh.com,hmac-sha2-256-etm@openssh.com,hmac-sha2-512-etm@openssh.com,\
         hmac-sha1-etm@openssh.com,umac-64@openssh.com,umac-128@openssh.com,hmac-sha2-256,hmac-sha2-512,hmac-sha1",
    ),
];

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens() -> Tokens {
        Tokens {
            host: "h.example.org".into(),
            original: "h".into(),
            port: 2222,
            user: "bob".into(),
            local_user: "root".into(),
            home: PathBuf::from("/root"),
            uid: 0,
        }
    }

    #[test]
    fn tokens_expand_as_openssh_or_are_refused() {
        assert_eq!(expand_tokens("~/.ssh/k_%h_%r_%p_%%", &tokens()).unwrap(), "/root/.ssh/k_h.example.org_bob_2222_%");
        assert_eq!(expand_tokens("%d/id_%n_%u_%i", &tokens()).unwrap(), "/root/id_h_root_0");
        assert!(expand_tokens("~/.ssh/%C", &tokens()).unwrap_err().contains("%C"));
        assert!(expand_tokens("${HOME}/k", &tokens()).is_err());
    }

    #[test]
    fn policies_never_turn_checking_off() {
        assert_eq!(policy_of("ask"), Some(HostKeyPolicy::Strict));
        assert_eq!(policy_of("true"), Some(HostKeyPolicy::Strict));
        assert_eq!(policy_of("no"), Some(HostKeyPolicy::AcceptNew));
        assert_eq!(policy_of("off"), Some(HostKeyPolicy::AcceptNew));
        assert_eq!(policy_of("false"), Some(HostKeyPolicy::AcceptNew));
        assert_eq!(policy_of("sometimes"), None);
    }
}
