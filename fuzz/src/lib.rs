//! What the fuzz targets share: one tokio runtime per fuzzing process, for the targets whose
//! code under test is async.

use std::sync::OnceLock;

use tokio::runtime::Runtime;

/// A current-thread runtime, built on first use and kept for every input.
pub fn runtime() -> &'static Runtime {
    static RUNTIME: OnceLock<Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a tokio runtime")
    })
}
