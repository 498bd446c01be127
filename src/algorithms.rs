//! The algorithm lists OpenSSH would offer (Ciphers, MACs, KexAlgorithms, HostKeyAlgorithms), applied
//! to a libssh2 session in OpenSSH's order.
//!
//! libssh2 implements a subset of OpenSSH's algorithms, so the preference sent is the part of OpenSSH's
//! list that libssh2 supports, in OpenSSH's order. A list the user's file set that libssh2 cannot meet
//! at all is refused at its line; OpenSSH's defaults always share algorithms with libssh2, and if they
//! ever did not, libssh2's own defaults would be left in place rather than failing every connection.

use once_cell::sync::Lazy;
use ssh2::{MethodType, Session};

use crate::error::{Error, Result};
use crate::ssh_config::{AlgKind, Algorithms};

fn method_type(kind: AlgKind) -> [MethodType; 2] {
    match kind {
        AlgKind::Kex => [MethodType::Kex, MethodType::Kex],
        AlgKind::HostKey => [MethodType::HostKey, MethodType::HostKey],
        AlgKind::Ciphers => [MethodType::CryptCs, MethodType::CryptSc],
        AlgKind::Macs => [MethodType::MacCs, MethodType::MacSc],
    }
}

/// What this libssh2 build implements, per kind (read once: it is compiled in).
static SUPPORTED: Lazy<Vec<(AlgKind, Vec<String>)>> = Lazy::new(|| {
    let Ok(sess) = Session::new() else { return Vec::new() };
    AlgKind::ALL
        .iter()
        .map(|k| (*k, sess.supported_algs(method_type(*k)[0]).map(|v| v.iter().map(|s| s.to_string()).collect()).unwrap_or_default()))
        .collect()
});

pub fn supported(kind: AlgKind) -> &'static [String] {
    SUPPORTED.iter().find(|(k, _)| *k == kind).map(|(_, v)| v.as_slice()).unwrap_or(&[])
}

/// The preference string for one list: OpenSSH's order, libssh2's algorithms only. None when they
/// share nothing and the list is OpenSSH's default (libssh2's defaults stay); an error when the
/// user's file set it.
pub fn preference(a: &Algorithms) -> Result<Option<String>> {
    let have = supported(a.kind);
    // A host certificate cannot be verified here (no CA support in the host-key check), so the server
    // must present its plain key, which known_hosts can vouch for.
    let usable: Vec<&str> = a
        .list
        .iter()
        .map(String::as_str)
        .filter(|n| have.iter().any(|h| h == n))
        .filter(|n| a.kind != AlgKind::HostKey || !n.contains("-cert-"))
        .collect();
    if !usable.is_empty() {
        return Ok(Some(usable.join(",")));
    }
    if !a.explicit || a.list.is_empty() {
        return Ok(None);
    }
    let (file, line) = match a.origin.rsplit_once(':') {
        Some((f, l)) if l.parse::<usize>().is_ok() => (f.to_string(), l.parse().unwrap_or(0)),
        _ => (a.origin.clone(), 0),
    };
    Err(Error::Config {
        file,
        line,
        cause: format!(
            "{} {}: libssh2 supports none of these (it supports {})",
            a.kind.keyword(),
            a.list.join(","),
            have.join(",")
        ),
    })
}

/// Sets the session's preferences before the handshake. `known` are the host key algorithms of keys
/// already recorded for the host: unless the file set HostKeyAlgorithms, they go first, as in OpenSSH.
pub fn apply(sess: &Session, algorithms: &[Algorithms], known: &[&str], dest: &str) -> Result<()> {
    for a in algorithms {
        let a = &prefer_known(a, known);
        let Some(pref) = preference(a)? else { continue };
        for t in method_type(a.kind) {
            sess.method_pref(t, &pref)
                .map_err(|e| Error::Connect { dest: dest.to_string(), cause: format!("cannot set {} {pref}: {e}", a.kind.keyword()) })?;
        }
    }
    Ok(())
}

/// OpenSSH's ordering of HostKeyAlgorithms when the user did not set it: the algorithms of known keys
/// first, each group in the list's own order.
fn prefer_known(a: &Algorithms, known: &[&str]) -> Algorithms {
    if a.kind != AlgKind::HostKey || a.explicit || known.is_empty() {
        return a.clone();
    }
    let (first, rest): (Vec<String>, Vec<String>) = a.list.iter().cloned().partition(|n| known.contains(&n.as_str()));
    Algorithms { list: first.into_iter().chain(rest).collect(), ..a.clone() }
}

/// What the handshake negotiated, per kind, for `check`.
pub fn negotiated(sess: &Session) -> Vec<(&'static str, String)> {
    AlgKind::ALL
        .iter()
        .map(|k| {
            let [cs, sc] = method_type(*k);
            let (a, b) = (sess.methods(cs).unwrap_or("?"), sess.methods(sc).unwrap_or("?"));
            (k.keyword(), if a == b { a.to_string() } else { format!("{a} (to server), {b} (from server)") })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(kind: AlgKind, names: &str, explicit: bool) -> Algorithms {
        Algorithms { kind, list: names.split(',').map(str::to_string).collect(), origin: "/etc/x:3".into(), explicit }
    }

    #[test]
    fn openssh_order_libssh2_subset() {
        let a = list(AlgKind::Ciphers, "no-such-cipher,aes256-ctr,aes128-ctr", true);
        assert_eq!(preference(&a).unwrap().unwrap(), "aes256-ctr,aes128-ctr");
    }

    #[test]
    fn known_key_types_go_first_unless_the_file_set_the_list() {
        let a = list(AlgKind::HostKey, "ssh-ed25519,ecdsa-sha2-nistp256,rsa-sha2-512,rsa-sha2-256", false);
        let known = ["rsa-sha2-512", "rsa-sha2-256", "ssh-rsa"];
        assert_eq!(prefer_known(&a, &known).list, ["rsa-sha2-512", "rsa-sha2-256", "ssh-ed25519", "ecdsa-sha2-nistp256"]);
        let set = list(AlgKind::HostKey, "ssh-ed25519,rsa-sha2-512", true);
        assert_eq!(prefer_known(&set, &known).list, set.list);
    }

    #[test]
    fn host_certificates_are_never_asked_for() {
        let a = list(AlgKind::HostKey, "ssh-ed25519-cert-v01@openssh.com,ssh-ed25519,rsa-sha2-512", false);
        assert_eq!(preference(&a).unwrap().unwrap(), "ssh-ed25519,rsa-sha2-512");
    }

    #[test]
    fn an_explicit_list_libssh2_cannot_meet_is_refused_at_its_line() {
        let a = list(AlgKind::Macs, "no-such-mac", true);
        match preference(&a) {
            Err(Error::Config { file, line, cause }) => {
                assert_eq!((file.as_str(), line), ("/etc/x", 3));
                assert!(cause.starts_with("macs no-such-mac"), "{cause}");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(preference(&list(AlgKind::Macs, "no-such-mac", false)).unwrap(), None);
    }
}
