//! `python -m egtunnel check`: each stage of reaching a host, one at a time, with its outcome and time.
//!
//! The stages run through the same code the tunnels use (session opening, host-key check,
//! authentication, the pool's connections and channels), so a host that passes here works for
//! kernels; the difference is that each stage reports on its own instead of only the first failure.

use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::config::ConnectSpec;
use crate::error::{Error, Result};
use crate::forward_channel::DirectTcpip;
use crate::keepalive::KeepAlive;
use crate::metrics::ForwardStats;
use crate::pool;
use crate::session;

/// One stage's outcome.
pub struct Step {
    /// Which hop (1-based, the target last) of how many.
    pub hop: usize,
    pub name: &'static str,
    pub ok: bool,
    /// What was found, or the cause and what to do about it.
    pub detail: String,
    pub secs: f64,
}

/// Runs every stage to `spec` through its hops, reporting each; true when all passed.
pub async fn run(spec: &ConnectSpec, command: &str, report: &mut (dyn FnMut(Step) + Send)) -> bool {
    let route = spec.route();
    let hops = route.len();
    let mut step = |hop: usize, name: &'static str, started: Instant, outcome: Result<String>| {
        let secs = started.elapsed().as_secs_f64();
        let ok = outcome.is_ok();
        let detail = outcome.unwrap_or_else(|e| e.to_string());
        report(Step { hop, name, ok, detail, secs });
        ok
    };
    for (i, hop) in route.iter().enumerate() {
        let n = i + 1;
        let deadline = Instant::now() + hop.connect_timeout();
        let started = Instant::now();
        let stage = if hop.jump.is_some() { "channel through the previous hop" } else { "TCP connect" };
        let io = match session::open(hop, deadline, KeepAlive::NEVER, &*pool::hops()).await {
            Ok(io) => {
                let how = match &hop.jump {
                    Some(j) => format!("{}:{} reached through {}", hop.host, hop.port, j.dest()),
                    None => format!("{}:{} accepted the connection", hop.host, hop.port),
                };
                step(n, stage, started, Ok(how));
                io
            }
            Err(e) => return step(n, stage, started, Err(e)),
        };
        let started = Instant::now();
        match session::handshake(&io, hop, deadline).await {
            Ok(()) => {
                let banner = io.sess.banner().unwrap_or("").to_string();
                let agreed = crate::algorithms::negotiated(&io.sess)
                    .iter()
                    .map(|(k, v)| format!("{k} {v}"))
                    .collect::<Vec<_>>()
                    .join("; ");
                step(n, "SSH handshake", started, Ok(format!("server {banner}; negotiated {agreed}")));
            }
            Err(e) => return step(n, "SSH handshake", started, Err(e)),
        }
        let started = Instant::now();
        let key = session::check_host_key(&io, hop, true).map(|r| {
            let fp = format!("{} SHA256:{}", r.key_type, session::b64(&r.sha256));
            match (r.checked, r.matched, r.added) {
                (false, _, _) => format!("{fp} (not checked: host key policy off)"),
                (true, _, Some(file)) => format!("{fp} was unknown and is now recorded in {} (accept-new)", file.display()),
                (true, Some((file, line)), None) => format!("{fp} matches {}:{line}", file.display()),
                (true, None, None) => format!("{fp} matches {}", hop.known_hosts.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")),
            }
        });
        if !step(n, "host key", started, key) {
            return false;
        }
        let started = Instant::now();
        let offered = io.retry(|s| s.auth_methods(&hop.user).map(str::to_string)).await.unwrap_or_default();
        let auth = match tokio::time::timeout_at(deadline, session::authenticate(&io, hop)).await {
            Err(_) => Err(Error::Connect { dest: hop.dest(), cause: "authentication timed out".into() }),
            Ok(Err(Error::Auth { dest, cause })) => Err(Error::Auth {
                dest,
                cause: format!("{cause}; the server offers: {}", if offered.is_empty() { "?" } else { &offered }),
            }),
            Ok(r) => r.map(|a| {
                let before = if a.tried.is_empty() { String::new() } else { format!(" after {}", a.tried.join("; ")) };
                format!("as {} with {}{before} (server offers: {offered})", hop.user, a.method)
            }),
        };
        if !step(n, "authentication", started, auth) {
            return false;
        }
        let _ = io.sess.disconnect(None, "egtunnel check", None);
    }
    let n = hops;
    let started = Instant::now();
    let channel = test_channel(spec, Duration::from_secs(10)).await;
    if !step(n, "test channel", started, channel) {
        return false;
    }
    let started = Instant::now();
    let out = pool::exec(spec, command, Duration::from_secs(10)).await.and_then(|o| {
        let text = String::from_utf8_lossy(&o.stdout).trim().to_string();
        match o.exit_status {
            Some(0) => Ok(format!("`{command}` exited 0, printed {text:?}")),
            other => Err(Error::Other {
                dest: spec.dest(),
                cause: format!("`{command}` exited {other:?}: {}", String::from_utf8_lossy(&o.stderr).trim()),
            }),
        }
    });
    step(n, "remote command", started, out)
}

/// A direct-tcpip channel from the host to its own SSH port, through the pooled connection: the
/// forwarding kernels need. Reading the server's banner back proves bytes flow both ways.
async fn test_channel(spec: &ConnectSpec, timeout: Duration) -> Result<String> {
    let conn = pool::acquire_shared(spec).await?;
    let (to_remote, to_remote_rx) = mpsc::channel::<Vec<u8>>(1);
    let (from_remote_tx, mut from_remote) = mpsc::channel::<Vec<u8>>(4);
    let deadline = Instant::now() + timeout;
    let stats = std::sync::Arc::new(ForwardStats::default());
    let open = DirectTcpip { host: spec.host.clone(), port: spec.port, to_remote: to_remote_rx, from_remote: from_remote_tx, stats };
    let (reply_rx, nudge) = conn.open_channel(open, deadline);
    let target = format!("{}:{}", spec.host, spec.port);
    let outcome = tokio::time::timeout_at(deadline, async {
        reply_rx.await.map_err(|_| Error::Other { dest: conn.dest(), cause: "connection closed".into() })??;
        let first = from_remote.recv().await;
        nudge.raise();
        match first {
            Some(bytes) => Ok(format!(
                "direct-tcpip to {target} answered {:?}",
                String::from_utf8_lossy(&bytes).lines().next().unwrap_or("").trim()
            )),
            None => Ok(format!("direct-tcpip to {target} opened (closed without data)")),
        }
    })
    .await
    .unwrap_or_else(|_| Err(Error::Timeout { dest: conn.dest(), what: format!("test channel to {target}"), secs: timeout.as_secs_f64() }));
    drop(to_remote);
    drop(from_remote);
    drop(nudge);
    pool::release_shared(&conn);
    outcome
}
