//! tailscaled's `POST /localapi/v0/ping` answer, as the ping check reads it.
#![no_main]

libfuzzer_sys::fuzz_target!(|bytes: &[u8]| tailbox_agent::fuzzing::localapi_ping(bytes));
