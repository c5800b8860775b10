#![doc = include_str!("../README.md")]
//!
//! Module map:
//! - [`cli`]: flags; [`plan`]: flags and environment validated into a plan; [`env`]: every
//!   environment variable; [`secret`]: redaction.
//! - [`app`]: subcommands; [`session`]: handshake, `Run` and the event stream with one agent;
//!   [`transport`]: gRPC over a byte stream; [`backend`]: where the agent runs (this machine or
//!   a Modal sandbox); [`arch`]: the sandbox's CPU and the agent for it; [`modal`]: a native
//!   client for Modal's gRPC API.
//! - [`render`]: progress, tables and JSON; [`output`]: the only stdout writer; [`error`]: errors
//!   with hints and exit codes.

pub mod app;
pub mod arch;
pub mod backend;
pub mod cli;
pub mod env;
pub mod error;
pub mod modal;
pub mod output;
pub mod plan;
pub mod render;
pub mod secret;
pub mod session;
pub mod transport;
