//! egtunnel: native SSH tunnels and remote exec for Jupyter Enterprise Gateway kernels.
//!
//! Layout, one concern per module:
//! - `keepalive`: EG's keep-alive policy per kernel channel, and the probe schedule.
//! - `config`: connection settings (host-key policy, tunnel mode, defaults) and their validation.
//! - `error`: the one error type; `bindings` maps it to Python exceptions.
//! - `net`: socket options std lacks (TCP_QUICKACK, TCP_INFO).
//! - `driver`: libssh2 in non-blocking mode driven by socket readiness.
//! - `ssh_config`: what ~/.ssh/config and /etc/ssh/ssh_config say about a destination (as `ssh -G`).
//! - `algorithms`: OpenSSH's Ciphers, MACs, KexAlgorithms and HostKeyAlgorithms applied to libssh2.
//! - `known_hosts`: markers (@revoked, @cert-authority), locked appends and file modes.
//! - `session`: connect (directly or through ProxyJump hops), host-key check, authentication, backoff.
//! - `raw_channel`: channels through libssh2's C API (exit-status arrival, reads past EOF, queue checks under one lock).
//! - `idle_reader`: reads the transport of a connection with no channel (server keep-alives).
//! - `jump`: sessions through a ProxyJump hop (a channel on the hop's pooled connection).
//! - `connection`: the actor owning one SSH session: channel opens, pumping, keep-alive, reconnects.
//! - `ready`: which channels the actor must step, as their local sides announce it.
//! - `forward`: local listeners and the per-connection byte pump.
//! - `exec`: remote commands over the same connection.
//! - `requests`: background requests to a forward's remote port (liveness probes, signals).
//! - `pool`: one connection per host (shared) or per port, lingering and status.
//! - `lanes`: extra connections to a shared host that take channel opens while they queue up.
//! - `stats`: counters read without disturbing the actor.
//! - `metrics`: process-wide totals per destination for Prometheus, and the scrape-time snapshot.
//! - `runtime`: the process-wide tokio runtime.
//! - `exit_gate`: keeps other threads out of Python once the interpreter starts shutting down.
//! - `check`: every stage of reaching a host, reported one by one (`python -m egtunnel check`).
//! - `bindings/`: the thin PyO3 layer (`egtunnel._native`), one file per concern (listed in `bindings/mod.rs`).

pub mod algorithms;
pub mod bindings;
pub mod check;
pub mod config;
pub mod connection;
pub mod driver;
pub mod error;
pub mod exec;
pub mod exit_gate;
pub mod forward;
pub mod idle_reader;
pub mod jump;
pub mod keepalive;
pub mod known_hosts;
pub mod lanes;
pub mod metrics;
pub mod net;
pub mod pool;
pub mod raw_channel;
pub mod ready;
pub mod requests;
pub mod runtime;
pub mod session;
pub mod ssh_config;
pub mod stats;
