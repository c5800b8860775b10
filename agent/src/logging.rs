//! Logging goes to stderr only: stdout is the gRPC wire.

use std::io::Write;

use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

/// Installs a tracing subscriber that writes to stderr with the given filter, a comma-separated
/// list of `level` and `target=level` (tracing-subscriber's `Targets` syntax).
pub fn init(filter: &str) {
    let filter = filter.parse::<Targets>().unwrap_or_else(|err| {
        emergency(&format!(
            "invalid --log filter {filter:?} ({err}); using the default"
        ));
        Targets::new()
            .with_default(LevelFilter::WARN)
            .with_target("tailbox_agent", LevelFilter::INFO)
    });
    let layer = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .with_target(false);
    // A second init (tests in one process) is harmless, so its error is ignored.
    let _ = tracing_subscriber::registry()
        .with(layer)
        .with(filter)
        .try_init();
}

/// Replaces the default panic message with one line on stderr, so a panic never touches the wire
/// and is easy to find in the controller's stderr tail.
pub fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        let location = info
            .location()
            .map(|l| format!("{}:{}", l.file(), l.line()))
            .unwrap_or_default();
        let message = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "non-string panic payload".to_owned());
        emergency(&format!("panic at {location}: {message}"));
    }));
}

/// Writes one line to stderr without going through tracing (used before logging is set up).
pub fn emergency(line: &str) {
    let _ = writeln!(std::io::stderr().lock(), "tailbox-agent: {line}");
}
