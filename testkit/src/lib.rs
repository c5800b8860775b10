//! Test support shared by tailbox's crates. Not part of the product; `publish = false`.
//!
//! - [`agent`]: the real `tailbox-agent` binary, built on demand.
//! - [`lab`]: a real tailnet on loopback (Tailscale's own testcontrol + DERP + STUN, a real
//!   tailscaled peer, a real HTTP server and a real `git http-backend`).

pub mod agent;
pub mod lab;
