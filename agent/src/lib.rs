//! The in-sandbox half of tailbox, as a library so tests can run the real service in memory.
//!
//! Module map:
//! - [`stdio`]: takes fds 0/1 for the gRPC wire and points them at /dev/null and stderr.
//! - [`server`]: serves the tonic service over one duplex byte stream (HTTP/2 via hyper).
//! - [`service`]: the `tailbox.agent.v1.Agent` implementation (handshake and `Run`).
//! - [`run`]: one job from request to report: phases, checks, verdict ([`verdict`]);
//!   [`bringup`] (daemon, login, teardown) and [`targets`] (the checks runner) are shared with
//!   the sidecar.
//! - [`sidecar`]: the long-lived agent that keeps the sandbox on the tailnet; [`commands`]: its
//!   commands for scripts, whose data goes to stdout through [`output`] only.
//! - [`events`]: the ordered event stream and the record the final report is built from.
//! - [`preflight`]: facts about the sandbox.
//! - [`daemon`]: finding tailscaled (and a loader if needed), supervising and restarting it.
//! - [`localapi`]: tailscaled's LocalAPI over its unix socket (its own crate, `tailbox-localapi`, which
//!   the bench shares); [`login`]: the `up` sequence.
//! - [`checks`]: status, netmap and ping (LocalAPI, targets by IP or name); HTTP and git
//!   (through the SOCKS5 proxy).
//! - `fuzzing` (feature `fuzzing`): the entry points of the fuzz targets in `fuzz/`.
//! - [`redact`]: keeping a target URL's credentials out of output; [`logging`]: tracing to
//!   stderr and the panic hook.
#![deny(clippy::print_stdout, clippy::disallowed_methods)]

pub mod bringup;
pub mod checks;
pub mod commands;
pub mod daemon;
pub mod events;
#[cfg(feature = "fuzzing")]
pub mod fuzzing;
pub use tailbox_localapi as localapi;
pub mod logging;
pub mod login;
pub mod output;
pub mod preflight;
pub mod redact;
pub mod run;
pub mod server;
pub mod service;
pub mod sidecar;
pub mod stdio;
pub mod targets;
pub mod verdict;

/// Version of this agent, from Cargo.
pub const AGENT_VERSION: &str = env!("CARGO_PKG_VERSION");

/// Capabilities announced in the handshake. "sidecar": the `sidecar` and `attach` commands and
/// the `Sidecar` service exist; "grpc-health": the sidecar serves `grpc.health.v1`.
pub const FEATURES: &[&str] = &[
    "preflight",
    "tailnet",
    "ping",
    "ping-by-name",
    "http",
    "git",
    "sidecar",
    "grpc-health",
];

/// Renders an error with its sources, skipping sources already contained in the text.
pub fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        let part = s.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        source = s.source();
    }
    text
}
