//! Establishing one SSH connection: TCP connect, handshake, host-key check and authentication.
//!
//! Runs entirely on the tokio runtime with libssh2 in non-blocking mode, bounded by the connect
//! timeout, so opening hundreds of connections costs no threads. Handshakes to one (host, port) are
//! limited to a few at a time, because a stock sshd drops unauthenticated connections beyond its
//! MaxStartups; one it drops anyway is retried with jittered backoff until the connect timeout.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use log::{debug, info, warn};
use once_cell::sync::Lazy;
use ssh2::{CheckResult, HostKeyType, KnownHostFileKind, KnownHostKeyFormat};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio::time::{timeout_at, Instant};

use crate::config::ConnectSpec;
use crate::driver::{RetryError, SshIo, Stream};
use crate::jump::{self, Hops};
use crate::keepalive::KeepAlive;
use crate::known_hosts::{self, HostKeyPolicy};
use crate::random;
use crate::error::{Error, Result};

/// A server's handshake budget and the semaphore that enforces it.
type Gate = (usize, Arc<Semaphore>);

/// Handshake slots per (host, port), shared by every connection of the process to that server.
static STARTUPS: Lazy<Mutex<HashMap<(String, u16), Gate>>> = Lazy::new(Mutex::default);

fn startup_gate(spec: &ConnectSpec) -> Arc<Semaphore> {
    let mut gates = STARTUPS.lock().unwrap();
    let entry = gates
        .entry((spec.host.clone(), spec.port))
        .or_insert_with(|| (spec.max_startups, Arc::new(Semaphore::new(spec.max_startups))));
    if entry.0 != spec.max_startups {
        // A changed setting applies to handshakes that start from now on.
        *entry = (spec.max_startups, Arc::new(Semaphore::new(spec.max_startups)));
    }
    entry.1.clone()
}

/// How one attempt ended when it did not succeed.
enum Failure {
    /// The server closed or reset the connection before key exchange finished: worth retrying.
    Dropped(String),
    Final(Error),
}

/// Connects and authenticates, or explains precisely why not. Nothing stays open on failure.
/// `keep_alive` is the connection's policy, which a ProxyJump hop on the way (taken from `hops`) adopts too.
pub async fn establish(spec: &ConnectSpec, keep_alive: KeepAlive, hops: &dyn Hops) -> Result<SshIo> {
    let deadline = Instant::now() + spec.connect_timeout();
    let gate = startup_gate(spec);
    let mut drops: u32 = 0;
    loop {
        let permit = timeout_at(deadline, gate.clone().acquire_owned()).await.map_err(|_| Error::Connect {
            dest: spec.dest(),
            cause: format!(
                "no handshake slot within {} s ({} handshakes to {}:{} in flight, the EG_SSH_MAX_STARTUPS limit)",
                spec.connect_timeout().as_secs_f64(),
                spec.max_startups,
                spec.host,
                spec.port
            ),
        })?;
        match attempt(spec, deadline, keep_alive, hops).await {
            Ok(io) => {
                if let Ok(permit) = permit {
                    io.hold_startup(permit);
                }
                if drops > 0 {
                    debug!("connected to {} after {drops} dropped handshake(s)", spec.dest());
                }
                return Ok(io);
            }
            Err(Failure::Final(e)) => return Err(e),
            Err(Failure::Dropped(cause)) => {
                drop(permit);
                drops += 1;
                let wait = handshake_backoff(drops, nanos_seed(spec, drops));
                if Instant::now() + wait >= deadline {
                    return Err(Error::Connect {
                        dest: spec.dest(),
                        cause: format!(
                            "SSH handshake failed: {cause}; the server dropped {drops} handshake attempt(s) \
                             within the {} s connect timeout (a server past its MaxStartups limit does this: \
                             lower EG_SSH_MAX_STARTUPS, or raise MaxStartups in the server's sshd_config)",
                            spec.connect_timeout().as_secs_f64()
                        ),
                    });
                }
                debug!("handshake with {} dropped ({cause}); retrying in {wait:?}", spec.dest());
                tokio::time::sleep(wait).await;
            }
        }
    }
}

/// One TCP connect (or channel through the hop), handshake, host-key check and authentication, all
/// before `deadline`.
async fn attempt(spec: &ConnectSpec, deadline: Instant, keep_alive: KeepAlive, hops: &dyn Hops) -> std::result::Result<SshIo, Failure> {
    let dest = spec.dest();
    let io = open(spec, deadline, keep_alive, hops).await.map_err(Failure::Final)?;
    match timeout_at(deadline, io.retry(|s| s.clone().handshake())).await {
        Err(_) => return Err(Failure::Final(timed_out(spec, "SSH handshake"))),
        Ok(Err(e)) if is_transport_failure(&e) || is_banner_failure(&e) => return Err(Failure::Dropped(e.to_string())),
        Ok(Err(e)) => {
            return Err(Failure::Final(Error::Connect { dest: dest.clone(), cause: format!("SSH handshake failed: {e}") }))
        }
        Ok(Ok(())) => {}
    }
    check_host_key(&io, spec, false).map_err(Failure::Final)?;
    timeout_at(deadline, authenticate(&io, spec))
        .await
        .map_err(|_| Failure::Final(timed_out(spec, "authentication")))?
        .map_err(Failure::Final)?;
    debug!("connected to {dest}");
    Ok(io)
}

fn timed_out(spec: &ConnectSpec, stage: &str) -> Error {
    Error::Connect { dest: spec.dest(), cause: format!("{stage} timed out after {} s", spec.connect_timeout().as_secs_f64()) }
}

/// The socket for a new session to `spec`: TCP to the host, or a channel through its ProxyJump hop.
pub async fn open(spec: &ConnectSpec, deadline: Instant, keep_alive: KeepAlive, hops: &dyn Hops) -> Result<SshIo> {
    let stream = match &spec.jump {
        None => {
            let tcp = timeout_at(deadline, connect_tcp(spec)).await.map_err(|_| timed_out(spec, "TCP connect"))??;
            Stream::Tcp(tcp.into_std().map_err(|e| connect_err(spec, e))?)
        }
        Some(hop) => {
            let (sock, relay) = jump::connect_via(hops, hop, spec, keep_alive, deadline).await?;
            Stream::Relayed(sock, relay)
        }
    };
    let io = SshIo::new(stream).map_err(|e| connect_err(spec, e))?;
    let known = known_key_algorithms(&io, spec);
    crate::algorithms::apply(&io.sess, &spec.algorithms, &known, &spec.dest())?;
    Ok(io)
}

/// The host key algorithms of the keys known_hosts already holds for this host. OpenSSH puts them first
/// (unless HostKeyAlgorithms is set), so that a known host presents a key that can be verified rather
/// than another type that would look unknown (and be recorded under accept-new).
fn known_key_algorithms(io: &SshIo, spec: &ConnectSpec) -> Vec<&'static str> {
    use base64::Engine;
    if spec.host_key_policy == HostKeyPolicy::Off {
        return Vec::new();
    }
    let Ok(mut kh) = io.sess.known_hosts() else { return Vec::new() };
    let mut files = spec.known_hosts.clone();
    files.extend(spec.global_known_hosts.iter().cloned());
    if known_hosts::read(&mut kh, &files).is_err() {
        return Vec::new();
    }
    let mut names = vec![spec.host.clone()];
    names.extend(io.peer.map(|ip| ip.to_string()).filter(|ip| *ip != spec.host));
    let mut out: Vec<&'static str> = Vec::new();
    for entry in kh.iter().unwrap_or_default() {
        let Ok(blob) = base64::engine::general_purpose::STANDARD.decode(entry.key()) else { continue };
        if !names.iter().any(|n| matches!(kh.check_port(n, spec.port, &blob), CheckResult::Match)) {
            continue;
        }
        let algorithms: &[&'static str] = match key_blob_type(&blob) {
            Some("ssh-rsa") => &["rsa-sha2-512", "rsa-sha2-256", "ssh-rsa"],
            Some("ssh-ed25519") => &["ssh-ed25519"],
            Some("ecdsa-sha2-nistp256") => &["ecdsa-sha2-nistp256"],
            Some("ecdsa-sha2-nistp384") => &["ecdsa-sha2-nistp384"],
            Some("ecdsa-sha2-nistp521") => &["ecdsa-sha2-nistp521"],
            Some("ssh-dss") => &["ssh-dss"],
            _ => &[],
        };
        for a in algorithms {
            if !out.contains(a) {
                out.push(a);
            }
        }
    }
    out
}

/// The key type named at the start of an SSH public key blob (a length-prefixed string).
fn key_blob_type(blob: &[u8]) -> Option<&str> {
    let len = u32::from_be_bytes(blob.get(..4)?.try_into().ok()?) as usize;
    std::str::from_utf8(blob.get(4..4 + len)?).ok()
}

/// The handshake alone, for diagnostics (`establish` retries dropped ones).
pub async fn handshake(io: &SshIo, spec: &ConnectSpec, deadline: Instant) -> Result<()> {
    match timeout_at(deadline, io.retry(|s| s.clone().handshake())).await {
        Err(_) => Err(timed_out(spec, "SSH handshake")),
        Ok(Err(e)) => Err(Error::Connect { dest: spec.dest(), cause: format!("SSH handshake failed: {e}") }),
        Ok(Ok(())) => Ok(()),
    }
}

/// 50 ms doubling to 1 s, with up to +/-50 % jitter so that retries of many connections spread out.
fn handshake_backoff(drops: u32, seed: u64) -> Duration {
    let base = 50u64.saturating_mul(1u64 << drops.saturating_sub(1).min(5)).min(1000);
    let offset = random::splitmix(seed) % (base + 1);
    Duration::from_millis(base / 2 + offset)
}

fn nanos_seed(spec: &ConnectSpec, drops: u32) -> u64 {
    random::nanos() ^ (u64::from(spec.port) << 32) ^ u64::from(drops)
}

/// libssh2 reports a connection closed before or while the banner is exchanged as a banner failure.
fn is_banner_failure(e: &RetryError) -> bool {
    const BANNER_RECV: i32 = -2;
    const BANNER_SEND: i32 = -3;
    const KEX_FAILURE: i32 = -5;
    const KEY_EXCHANGE_FAILURE: i32 = -8;
    matches!(e, RetryError::Ssh(e) if matches!(e.code(), ssh2::ErrorCode::Session(BANNER_RECV | BANNER_SEND | KEX_FAILURE | KEY_EXCHANGE_FAILURE)))
}

async fn connect_tcp(spec: &ConnectSpec) -> Result<TcpStream> {
    let addrs: Vec<_> = tokio::net::lookup_host((spec.host.as_str(), spec.port))
        .await
        .map_err(|e| Error::Connect { dest: spec.dest(), cause: format!("cannot resolve host: {e}") })?
        .collect();
    let mut last = None;
    for addr in addrs {
        match TcpStream::connect(addr).await {
            Ok(s) => return Ok(s),
            Err(e) => last = Some(e),
        }
    }
    Err(match last {
        Some(e) => connect_err(spec, e),
        None => Error::Connect { dest: spec.dest(), cause: "host resolved to no address".into() },
    })
}

fn connect_err(spec: &ConnectSpec, e: std::io::Error) -> Error {
    Error::Connect { dest: spec.dest(), cause: e.to_string() }
}

fn key_type_name(t: HostKeyType) -> &'static str {
    match t {
        HostKeyType::Rsa => "ssh-rsa",
        HostKeyType::Dss => "ssh-dss",
        HostKeyType::Ecdsa256 => "ecdsa-sha2-nistp256",
        HostKeyType::Ecdsa384 => "ecdsa-sha2-nistp384",
        HostKeyType::Ecdsa521 => "ecdsa-sha2-nistp521",
        HostKeyType::Ed25519 => "ssh-ed25519",
        HostKeyType::Unknown => "unknown",
    }
}

/// OpenSSH writes non-default ports as [host]:port; libssh2 matches the same form.
fn host_pattern(spec: &ConnectSpec) -> String {
    name_pattern(&spec.host, spec.port)
}

fn name_pattern(name: &str, port: u16) -> String {
    if port == 22 {
        name.to_string()
    } else {
        format!("[{name}]:{port}")
    }
}

/// What the host-key check saw, for diagnostics.
pub struct HostKeyReport {
    pub key_type: &'static str,
    /// SHA-256 of the key blob, as OpenSSH prints fingerprints (base64 of this).
    pub sha256: Vec<u8>,
    /// The known_hosts file and line that matched (only looked up when asked: it costs a pass over the file).
    pub matched: Option<(PathBuf, usize)>,
    /// Where the key was recorded under accept-new.
    pub added: Option<PathBuf>,
    pub checked: bool,
}

/// Destinations already warned about running without host-key checks, so each is logged once.
static UNCHECKED: Lazy<Mutex<std::collections::HashSet<String>>> = Lazy::new(Mutex::default);

/// Checks the server's key against every known_hosts file; `locate` also finds the matching line.
///
/// Never weaker than OpenSSH for the same configuration: a key listed `@revoked` is refused, a host
/// whose trust comes from an `@cert-authority` line is refused (libssh2 cannot verify host
/// certificates), a changed key is refused under every policy but `off`, and `accept-new` records an
/// unknown key under a lock, so concurrent first connections record one key and verify the others.
pub fn check_host_key(io: &SshIo, spec: &ConnectSpec, locate: bool) -> Result<HostKeyReport> {
    let dest = spec.dest();
    let hk_err = |cause: String| Error::HostKey { dest: dest.clone(), cause };
    let (key, ktype) = io.sess.host_key().ok_or_else(|| hk_err("the server sent no host key".into()))?;
    let key = key.to_vec();
    let mut report = HostKeyReport {
        key_type: key_type_name(ktype),
        sha256: io.sess.host_key_hash(ssh2::HashType::Sha256).map(<[u8]>::to_vec).unwrap_or_default(),
        matched: None,
        added: None,
        checked: false,
    };
    if spec.host_key_policy == HostKeyPolicy::Off {
        if UNCHECKED.lock().unwrap().insert(dest.clone()) {
            warn!("host key of {dest} is not checked (EG_SSH_HOST_KEY_POLICY=off): anyone on the path can impersonate it");
        }
        return Ok(report);
    }
    report.checked = true;
    let first = spec.known_hosts.first().cloned().unwrap_or_default();
    let mut files = spec.known_hosts.clone();
    files.extend(spec.global_known_hosts.iter().cloned());
    let names = files.iter().filter(|p| p.exists()).map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ");
    let names = if names.is_empty() { first.display().to_string() } else { names };
    // The host's name first (as OpenSSH checks it), then the address reached, as Enterprise Gateway's own
    // `ssh` tunnels (given addresses) recorded it: either may be what an operator's known_hosts holds.
    let mut candidates = vec![spec.host.clone()];
    if let Some(ip) = io.peer.map(|ip| ip.to_string()).filter(|ip| *ip != spec.host) {
        candidates.push(ip);
    }
    let fingerprint = b64(&report.sha256);
    let verdict = |kh: &mut ssh2::KnownHosts| -> Result<(String, CheckResult, Vec<known_hosts::Marker>)> {
        let markers = known_hosts::read(kh, &files).map_err(|e| hk_err(e.to_string()))?;
        if let Some(m) = markers.iter().find(|m| m.revoked && m.key == key) {
            return Err(hk_err(format!(
                "the {} key the server presented (SHA256:{}) is revoked at {} (@revoked): refused",
                key_type_name(ktype),
                fingerprint,
                m.at()
            )));
        }
        let (name, result) = candidates
            .iter()
            .map(|n| (n.clone(), kh.check_port(n, spec.port, &key)))
            .find(|(_, r)| !matches!(r, CheckResult::NotFound))
            .unwrap_or((spec.host.clone(), CheckResult::NotFound));
        if !matches!(result, CheckResult::NotFound) {
            return Ok((name, result, markers));
        }
        // Lines with wildcard or negated patterns, which libssh2 reads literally: a key of the same type
        // recorded for a pattern the host matches decides, as OpenSSH decides.
        let literal = |_: &str| false;
        let same_type: Vec<&known_hosts::Marker> = markers
            .iter()
            .filter(|m| m.wildcard_type.as_deref() == Some(key_type_name(ktype)))
            .filter(|m| candidates.iter().any(|n| known_hosts::patterns_match(&m.patterns, &name_pattern(n, spec.port), &literal)))
            .collect();
        if same_type.iter().any(|m| m.key == key) {
            return Ok((name, CheckResult::Match, markers));
        }
        if let Some(m) = same_type.first() {
            return Err(hk_err(format!(
                "the {} key the server presented (SHA256:{}) differs from the one recorded for {} at {}: \
                 refused (if the host was reinstalled, replace that line)",
                key_type_name(ktype),
                fingerprint,
                m.patterns,
                m.at()
            )));
        }
        Ok((name, result, markers))
    };
    let mut kh = io.sess.known_hosts().map_err(|e| hk_err(e.message().to_string()))?;
    let (name, result, markers) = verdict(&mut kh)?;
    if matches!(result, CheckResult::NotFound) {
        // A CA trusted for this host: OpenSSH would verify the host's certificate, which libssh2 cannot.
        let probe = |pattern: &str| {
            candidates.iter().any(|n| {
                let Ok(mut one) = io.sess.known_hosts() else { return false };
                one.read_str(&format!("{pattern} {} {}", key_type_name(ktype), b64_padded(&key)), KnownHostFileKind::OpenSSH).is_ok()
                    && matches!(one.check_port(n, spec.port, &key), CheckResult::Match)
            })
        };
        if let Some(m) = markers.iter().find(|m| {
            !m.revoked && m.wildcard_type.is_none() && candidates.iter().any(|n| known_hosts::patterns_match(&m.patterns, &name_pattern(n, spec.port), &probe))
        }) {
            return Err(hk_err(format!(
                "{} is trusted through a certificate authority ({} @cert-authority), and host certificates \
                 cannot be verified by egtunnel (libssh2); record the host's own key (`ssh-keyscan -p {} {}`) in {}",
                host_pattern(spec),
                m.at(),
                spec.port,
                spec.host,
                first.display()
            )));
        }
    }
    match result {
        CheckResult::Match => {
            if locate {
                report.matched = find_line(io, spec, &name, &key, CheckResult::Match);
            }
            Ok(report)
        }
        CheckResult::Mismatch => Err(changed(io, spec, &name, &key, ktype, &report, &names, &first)),
        CheckResult::NotFound if spec.host_key_policy == HostKeyPolicy::AcceptNew => {
            kh.add(&host_pattern(spec), &key, "added by egtunnel", KnownHostKeyFormat::from(ktype))
                .map_err(|e| hk_err(e.message().to_string()))?;
            let added = kh
                .hosts()
                .ok()
                .and_then(|hosts| hosts.last().and_then(|h| kh.write_string(h, KnownHostFileKind::OpenSSH).ok()))
                .ok_or_else(|| hk_err("cannot format the new known_hosts line".into()))?;
            // Another connection may have recorded a key since the files were read: re-read under the lock.
            let outcome = known_hosts::locked_append(&first, || {
                let mut again = io.sess.known_hosts().map_err(|e| std::io::Error::other(e.message().to_string()))?;
                match verdict(&mut again) {
                    Ok((_, CheckResult::NotFound, _)) => Ok((Some(added.clone()), Ok(true))),
                    Ok((n, CheckResult::Mismatch, _)) => Ok((None, Err(n))),
                    Ok(_) => Ok((None, Ok(false))),
                    Err(e) => Err(std::io::Error::other(e.to_string())),
                }
            })
            .map_err(|e| hk_err(format!("cannot record the key in {}: {e}", first.display())))?;
            match outcome {
                Ok(true) => {
                    info!("recorded new {} host key for {} in {}", key_type_name(ktype), host_pattern(spec), first.display());
                    report.added = Some(first);
                    Ok(report)
                }
                Ok(false) => Ok(report),
                Err(n) => Err(changed(io, spec, &n, &key, ktype, &report, &names, &first)),
            }
        }
        CheckResult::NotFound => Err(hk_err(format!(
            "{} is not in {names} (host key policy strict): add its key, e.g. `ssh-keyscan -p {} {} >> {}`, \
             or use accept-new (EG_SSH_HOST_KEY_POLICY, or StrictHostKeyChecking accept-new in ssh_config)",
            host_pattern(spec),
            spec.port,
            spec.host,
            first.display()
        ))),
        CheckResult::Failure => Err(hk_err(format!("libssh2 could not check the key against {names}"))),
    }
}

/// The refusal of a key that differs from the one recorded, naming the line.
#[allow(clippy::too_many_arguments)]
fn changed(io: &SshIo, spec: &ConnectSpec, name: &str, key: &[u8], ktype: HostKeyType, report: &HostKeyReport, names: &str, first: &Path) -> Error {
    let at = find_line(io, spec, name, key, CheckResult::Mismatch).map(|(p, n)| format!("{}:{n}", p.display())).unwrap_or(names.to_string());
    Error::HostKey {
        dest: spec.dest(),
        cause: format!(
            "the {} key the server presented (SHA256:{}) differs from the one recorded for {} in {at} \
             (possible man-in-the-middle, or the host was reinstalled: verify, then remove the old line, \
             e.g. `ssh-keygen -R '{}' -f {}`)",
            key_type_name(ktype),
            b64(&report.sha256),
            name_pattern(name, spec.port),
            name_pattern(name, spec.port),
            first.display()
        ),
    }
}

/// The first known_hosts line whose entry for this host gives `want`, each line checked alone by
/// libssh2's own parser (so hashed names and markers are understood as in the check itself).
fn find_line(io: &SshIo, spec: &ConnectSpec, name: &str, key: &[u8], want: CheckResult) -> Option<(PathBuf, usize)> {
    for path in spec.known_hosts.iter().chain(&spec.global_known_hosts) {
        let Ok(text) = std::fs::read_to_string(path) else { continue };
        for (i, line) in text.lines().enumerate() {
            let t = line.trim();
            if t.is_empty() || t.starts_with('#') || t.starts_with('@') {
                continue;
            }
            let Ok(mut one) = io.sess.known_hosts() else { return None };
            if one.read_str(t, KnownHostFileKind::OpenSSH).is_err() {
                continue;
            }
            let r = one.check_port(name, spec.port, key);
            if std::mem::discriminant(&r) == std::mem::discriminant(&want) {
                return Some((path.clone(), i + 1));
            }
        }
    }
    None
}

/// Standard base64 without padding, as OpenSSH prints SHA256 fingerprints.
pub fn b64(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD_NO_PAD.encode(bytes)
}

/// Standard base64 with padding, as known_hosts lines hold keys.
fn b64_padded(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// How authentication went: the method that worked and everything tried before it.
pub struct AuthReport {
    pub method: String,
    pub tried: Vec<String>,
}

/// Tries, in OpenSSH's order: agent (unless IdentitiesOnly), identity files, default identities,
/// password. Messages name files, never their contents or the password.
pub async fn authenticate(io: &SshIo, spec: &ConnectSpec) -> Result<AuthReport> {
    let user = spec.user.as_str();
    let mut tried: Vec<String> = Vec::new();
    let done = |method: String, tried: Vec<String>| Ok(AuthReport { method, tried });

    if std::env::var_os("SSH_AUTH_SOCK").is_some() && !spec.identities_only {
        match agent_auth(io, user).await {
            Ok(Some(comment)) => return done(format!("ssh-agent key {comment}"), tried),
            Ok(None) => tried.push("ssh-agent: no key accepted".into()),
            Err(e) if is_transport_failure(&e) => return Err(lost(spec, &e)),
            Err(e) => tried.push(format!("ssh-agent: {e}")),
        }
    }

    let mut files: Vec<PathBuf> = Vec::new();
    for f in &spec.identity_files {
        if !f.exists() {
            tried.push(format!("{}: no such file", f.display()));
        } else if !files.contains(f) {
            files.push(f.clone());
        }
    }
    files.extend(spec.default_identities().into_iter().filter(|p| p.exists() && !spec.identity_files.contains(p)));
    for f in &files {
        match io.retry(|s| s.userauth_pubkey_file(user, None, f, None)).await {
            Ok(()) if io.sess.authenticated() => return done(format!("publickey {}", f.display()), tried),
            Ok(()) => tried.push(format!("{}: not accepted", f.display())),
            Err(e) if is_transport_failure(&e) => return Err(lost(spec, &e)),
            Err(e) => tried.push(format!("{}: {e}", f.display())),
        }
    }

    if let Some(pw) = &spec.password {
        match io.retry(|s| s.userauth_password(user, pw)).await {
            Ok(()) if io.sess.authenticated() => return done("password".into(), tried),
            Ok(()) => tried.push("password: not accepted".into()),
            Err(e) if is_transport_failure(&e) => return Err(lost(spec, &e)),
            // libssh2's message never contains the password itself.
            Err(e) => tried.push(format!("password: {e}")),
        }
    }

    if tried.is_empty() {
        tried.push("no method available (no agent, no identity file, no password)".into());
    }
    Err(Error::Auth { dest: spec.dest(), cause: tried.join("; ") })
}

async fn agent_auth(io: &SshIo, user: &str) -> std::result::Result<Option<String>, RetryError> {
    let mut agent = io.sess.agent().map_err(RetryError::Ssh)?;
    agent.connect().map_err(RetryError::Ssh)?;
    agent.list_identities().map_err(RetryError::Ssh)?;
    let ids = agent.identities().map_err(RetryError::Ssh)?;
    for id in &ids {
        if io.retry(|_| agent.userauth(user, id)).await.is_ok() && io.sess.authenticated() {
            let _ = agent.disconnect();
            return Ok(Some(id.comment().to_string()));
        }
    }
    let _ = agent.disconnect();
    Ok(None)
}

/// A dropped socket during authentication is a connection problem, not a refused key.
fn is_transport_failure(e: &RetryError) -> bool {
    const SOCKET_SEND: i32 = -7;
    const SOCKET_DISCONNECT: i32 = -13;
    const SOCKET_RECV: i32 = -43;
    match e {
        RetryError::Io(_) => true,
        RetryError::Ssh(e) => matches!(
            e.code(),
            ssh2::ErrorCode::Session(SOCKET_SEND | SOCKET_DISCONNECT | SOCKET_RECV)
        ),
    }
}

fn lost(spec: &ConnectSpec, e: &RetryError) -> Error {
    Error::Connect { dest: spec.dest(), cause: format!("connection lost during authentication: {e}") }
}

/// How long to wait before reconnect attempt `attempt` (0-based): 1 s doubling to 30 s, with jitter.
pub fn backoff(attempt: u32, jitter_seed: u64) -> Duration {
    let base = 1000u64.saturating_mul(1u64 << attempt.min(5)).min(30_000);
    // Up to +/-20 % so that many gateways' connections to one host do not retry in lockstep.
    let span = base / 5;
    let offset = random::splitmix(jitter_seed) % (2 * span + 1);
    Duration::from_millis(base - span + offset)
}

/// How long to wait before the first reconnect attempt after a live connection died: 0 to 100 ms,
/// enough to spread the handshakes of many connections that died together (every lane of a host,
/// several gateways; the startup gate keeps them within MaxStartups anyway), far less than the
/// backoff a failed attempt earns.
pub fn retry_after_loss(jitter_seed: u64) -> Duration {
    Duration::from_millis(random::splitmix(jitter_seed) % 101)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_from_one_second_to_a_thirty_second_cap() {
        for seed in 0..200u64 {
            let d: Vec<u64> = (0..10).map(|a| backoff(a, seed).as_millis() as u64).collect();
            assert!((800..=1200).contains(&d[0]), "{d:?}");
            assert!((1600..=2400).contains(&d[1]), "{d:?}");
            assert!((3200..=4800).contains(&d[2]), "{d:?}");
            for late in &d[5..] {
                assert!((24_000..=36_000).contains(late), "{d:?}");
            }
        }
    }

    #[test]
    fn handshake_backoff_is_short_jittered_and_capped() {
        for seed in 0..200u64 {
            let first = handshake_backoff(1, seed).as_millis();
            assert!((25..=75).contains(&first), "{first}");
            let late = handshake_backoff(20, seed).as_millis();
            assert!((500..=1500).contains(&late), "{late}");
        }
        let distinct: std::collections::HashSet<_> = (0..50u64).map(|s| handshake_backoff(3, s)).collect();
        assert!(distinct.len() > 10);
    }

    #[test]
    fn backoff_has_jitter() {
        let distinct: std::collections::HashSet<_> = (0..50u64).map(|s| backoff(3, s)).collect();
        assert!(distinct.len() > 10);
    }
}
