//! Filled in by the lab work.
