//! Test support shared by tailbox's crates. Not part of the product; `publish = false`.
//!
//! - [`agent`]: the real `tailbox-agent` binary, built on demand.
//! - [`lab`]: a real tailnet on loopback (Tailscale's own testcontrol + DERP + STUN, a real
//!   tailscaled peer, a real HTTP server and a real `git http-backend`).
//! - [`fake_modal`]: Modal's control plane and Task Command Router on loopback, over real tonic,
//!   with sandboxes that are local process trees.
//! - [`modal_descriptors`]: checks our Modal proto subset against Modal's published one.

pub mod agent;
pub mod fake_modal;
pub mod lab;
pub mod modal_descriptors;
