//! What the OpenSSH client configuration says about one destination, and where each value came from.
//!
//! The configuration is resolved by OpenSSH itself when its client is installed: `ssh -G` prints what
//! `ssh` would use for a host (Match, Include, tokens, quoting and first-value-wins are all OpenSSH's
//! own code), and `openssh.rs` turns that into egtunnel's settings, refusing what egtunnel cannot
//! apply. Without an `ssh` client, `builtin.rs` parses the files (the `ssh2-config` crate) and refuses
//! every construct whose meaning it could not reproduce exactly. Either way, one resolution is cached
//! per (files, host, user, port) until any file it read (Included ones too) changes, so a repeated
//! lookup on the gateway's event loop costs a few `stat` calls. `scan.rs` walks the files for what
//! the resolvers do not report: which files were read, and the `file:line` behind a value.
//! `settings.rs` holds what a resolution yields and the rules both resolvers share, so that they
//! import it and never this file.

mod builtin;
mod openssh;
pub mod scan;
mod settings;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use log::debug;
use once_cell::sync::Lazy;

pub use builtin::{parse_hop, Hop};
pub use settings::{policy_of, AlgKind, Algorithms, HostConfig, Setting, Source, OPENSSH_DEFAULTS, REFUSED};

use crate::error::{Error, Result};
use crate::local_user::current_user;

/// A cached resolution, valid while every stamp holds.
struct Cached {
    stamps: Vec<scan::Stamp>,
    config: Arc<HostConfig>,
}

type Key = (Option<PathBuf>, Source, String, Option<String>, Option<u16>, PathBuf);

static CACHE: Lazy<Mutex<HashMap<Key, Cached>>> = Lazy::new(Mutex::default);
/// Ignored options already logged, so a busy gateway logs each once.
static LOGGED: Lazy<Mutex<HashSet<(String, String)>>> = Lazy::new(Mutex::default);

/// The OpenSSH client that resolves configurations: `EG_SSH_CLIENT` (a path, or `none` for the
/// built-in parser), else `ssh` on PATH, else none.
pub fn client() -> Option<PathBuf> {
    match std::env::var("EG_SSH_CLIENT").ok().map(|s| s.trim().to_string()).filter(|s| !s.is_empty()) {
        Some(s) if s.eq_ignore_ascii_case("none") => None,
        Some(s) => Some(PathBuf::from(s)),
        None => std::env::var_os("PATH").and_then(|path| {
            std::env::split_paths(&path).map(|d| d.join("ssh")).find(|p| p.is_file())
        }),
    }
}

/// The effective configuration for `name`, as `ssh [-l user] [-p port] name` would resolve it.
/// `home` is the built-in parser's `~` ($HOME); through OpenSSH, `~` is what `ssh` takes it to be
/// (the password database's home). With `explain`, the
/// built-in parser also finds the line behind each value (the `ssh -G` path always does).
pub fn lookup(name: &str, source: &Source, home: &Path, explain: bool, user: Option<&str>, port: Option<u16>) -> Result<Arc<HostConfig>> {
    if name.starts_with('-') || name.contains(char::is_whitespace) {
        return Err(Error::Invalid(format!("host {name:?} is not a host name")));
    }
    let client = client();
    let key: Key = (client.clone(), source.clone(), name.to_string(), user.map(str::to_string), port, home.to_path_buf());
    if !explain {
        if let Some(c) = CACHE.lock().unwrap().get(&key).filter(|c| scan::fresh(&c.stamps)) {
            return Ok(c.config.clone());
        }
    }
    // `ssh` takes `~` (and so ~/.ssh/config) from the password database, whatever $HOME says.
    let passwd_home = current_user().passwd_home;
    let home = if client.is_some() { passwd_home.as_path() } else { home };
    let files = source.files(home)?;
    let walked = scan::walk(&files, home, name);
    let config = match &client {
        Some(ssh) => openssh::resolve(ssh, source, &walked, name, home, user, port)?,
        None => builtin::resolve(name, &files, &walked, home, explain)?,
    };
    for (option, origin) in &config.ignored {
        if LOGGED.lock().unwrap().insert((origin.clone(), option.clone())) {
            debug!("{origin}: option {option} (set for {name}) is not supported by egtunnel and is ignored");
        }
    }
    let config = Arc::new(config);
    CACHE.lock().unwrap().insert(key, Cached { stamps: walked.stamps, config: config.clone() });
    Ok(config)
}
