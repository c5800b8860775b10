//! Test support shared by tailbox's crates. Not part of the product; `publish = false`.
//!
//! - [`lab`]: a real tailnet on loopback (Tailscale's own testcontrol + DERP + STUN, a real
//!   tailscaled peer, a real HTTP server and a real `git http-backend`).

pub mod lab;
