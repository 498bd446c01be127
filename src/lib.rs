//! egtunnel: native SSH tunnels and remote exec for Jupyter Enterprise Gateway kernels.
//!
//! Layout, one concern per module, listed from the bottom up: each module imports only modules listed
//! before it (`python tests/import_graph.py` draws the graph; tests/test_layout.py fails on a circle or
//! on a module importing one listed after it).
//! - `keepalive`: keep-alive, all of it: EG's policy per kernel channel, what a connection with several
//!   users applies (`KeepAlive`), and the probe schedule.
//! - `error`: the one error type; `bindings` maps it to Python exceptions.
//! - `net`: socket options std lacks (TCP_QUICKACK, TCP_INFO).
//! - `random`: cheap randomness for jitter and port picks.
//! - `ready`: which channels the actor must step, as their local sides announce it.
//! - `raw_channel`: channels through libssh2's C API (exit-status arrival, reads past EOF, queue checks under one lock).
//! - `runtime`: the process-wide tokio runtime.
//! - `exit_gate`: keeps other threads out of Python once the interpreter starts shutting down.
//! - `local_user`: who egtunnel runs as (user name, home directories).
//! - `known_hosts`: the host-key policy; markers (@revoked, @cert-authority), locked appends and file modes.
//! - `liveness`: a kernel's liveness as its polls last found it, and the rules for recording an answer.
//! - `ssh_config`: what ~/.ssh/config and /etc/ssh/ssh_config say about a destination (as `ssh -G`).
//! - `algorithms`: OpenSSH's Ciphers, MACs, KexAlgorithms and HostKeyAlgorithms applied to libssh2.
//! - `config`: connection settings (tunnel mode, budgets, defaults) and their validation.
//! - `metrics`: every counter, in one place: per destination (for Prometheus, outliving connections),
//!   per connection and per forward (for status()); and the scrape-time snapshot.
//! - `driver`: libssh2 in non-blocking mode driven by socket readiness.
//! - `forward_channel`: one forwarded byte stream over a direct-tcpip channel, both halves.
//! - `exec`: remote commands over the same connection.
//! - `remote_listen`: a remote forward on the kernel host's loopback back to the gateway (tcpip-forward).
//! - `idle_reader`: reads the transport of a connection with no channel (server keep-alives).
//! - `jump`: sessions through a ProxyJump hop (a channel on the hop's pooled connection).
//! - `session`: connect (directly or through ProxyJump hops), host-key check, authentication, backoff.
//! - `connection`: the actor owning one SSH session: channel opens, pumping, keep-alive, reconnects.
//! - `lanes`: extra connections to a shared host that take channel opens while they queue up.
//! - `forward`: local listeners (or reserved local ports), each local connection carried over its own
//!   channel, within the forward's caps on local use.
//! - `pool`: one connection per host (shared) or per port, lingering and status.
//! - `requests`: background requests to a forward's remote port (liveness probes, signals).
//! - `command_probe`: liveness polls by remote command (`kill -0 PID`), under `requests`' probe rule.
//! - `check`: every stage of reaching a host, reported one by one (`python -m egtunnel check`).
//! - `bindings`: the thin PyO3 layer (`egtunnel._native`), one file per concern (listed in `bindings/mod.rs`).

pub mod algorithms;
pub mod bindings;
pub mod check;
pub mod command_probe;
pub mod config;
pub mod connection;
pub mod driver;
pub mod error;
pub mod exec;
pub mod exit_gate;
pub mod forward;
pub mod forward_channel;
pub mod idle_reader;
pub mod jump;
pub mod keepalive;
pub mod known_hosts;
pub mod lanes;
pub mod liveness;
pub mod local_user;
pub mod metrics;
pub mod net;
pub mod pool;
pub mod random;
pub mod raw_channel;
pub mod ready;
pub mod remote_listen;
pub mod requests;
pub mod runtime;
pub mod session;
pub mod ssh_config;
