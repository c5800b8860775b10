//! tailscaled's `GET /localapi/v0/status` answer, as the status check and the netmap lookups read it.
#![no_main]

libfuzzer_sys::fuzz_target!(|bytes: &[u8]| tailbox_agent::fuzzing::localapi_status(bytes));
