//! A native Modal client over Modal's real gRPC API (no Rust SDK exists), following the Go SDK.
//!
//! - [`config`]: credentials and settings (env > `~/.modal.toml` profile > defaults).
//! - [`client`]: the control plane: headers, auth token, retries; apps, images, sandboxes.
//! - [`router`]: the Task Command Router: exec, offset-addressed stdio, JWT refresh.
//! - [`stdio`]: an exec's stdout/stderr as `AsyncRead` and its stdin as `AsyncWrite`, with
//!   resume after cuts, so gRPC to the agent runs over them.
//! - [`fs`]: files in the sandbox through `modal-sandbox-fs-tools` (no tools needed in the image).
//! - [`jwt`], [`retry`]: token expiry and the one retry policy every call follows.
//! - [`error`]: what can go wrong; the CLI words it.

pub mod client;
pub mod config;
pub mod error;
pub mod fs;
pub mod jwt;
pub mod retry;
pub mod router;
pub mod stdio;

pub use error::{ModalError, RpcStatus};

use std::time::Duration;

use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};

use error::EndpointProblem;

/// Largest gRPC message either way (what Modal's SDKs allow).
pub const MAX_MESSAGE_SIZE: usize = 100 * 1024 * 1024;

/// A lazily connected channel to `url`: TLS with the webpki roots for https; plaintext http
/// only when `plaintext_ok` (a control plane on this machine, i.e. tests). `handed_out` says the
/// control plane gave us the URL (a router), for the hint.
pub fn channel(url: &str, plaintext_ok: bool, handed_out: bool) -> Result<Channel, ModalError> {
    let bad = |source: EndpointProblem| ModalError::Endpoint {
        url: url.to_owned(),
        source,
        handed_out,
    };
    let parsed =
        url::Url::parse(url).map_err(|e| bad(EndpointProblem::Unparsable(e.to_string())))?;
    let mut endpoint = Endpoint::from_shared(url.to_owned())
        .map_err(|e| bad(EndpointProblem::Unparsable(e.to_string())))?
        .connect_timeout(Duration::from_secs(15))
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(10))
        .keep_alive_while_idle(true)
        .initial_stream_window_size(64 * 1024 * 1024)
        .initial_connection_window_size(64 * 1024 * 1024);
    match parsed.scheme() {
        "https" => {
            let host = parsed.host_str().unwrap_or_default().to_owned();
            endpoint = endpoint
                .tls_config(ClientTlsConfig::new().with_webpki_roots().domain_name(host))
                .map_err(|e| bad(EndpointProblem::Tls(e.to_string())))?;
        }
        "http" if plaintext_ok => {}
        "http" => return Err(bad(EndpointProblem::Plaintext)),
        other => return Err(bad(EndpointProblem::Scheme(other.to_owned()))),
    }
    Ok(endpoint.connect_lazy())
}

/// A header value for a secret, marked sensitive (kept out of HTTP/2 header compression tables
/// and printed as `Sensitive` by `Debug`); `None`, with a warning, when it is not valid ASCII.
pub(crate) fn sensitive_header(key: &str, value: &str) -> Option<MetadataValue<Ascii>> {
    match MetadataValue::try_from(value) {
        Ok(mut value) => {
            value.set_sensitive(true);
            Some(value)
        }
        Err(_) => {
            tracing::warn!("header {key} is not valid ASCII; not sent");
            None
        }
    }
}
