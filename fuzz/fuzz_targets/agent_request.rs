//! The agent's request decoding: a `Run` (first input byte even) or a sidecar `Check` request as
//! protobuf, then everything the agent works out from it before starting anything.
#![no_main]

use prost::Message as _;
use tailbox_proto::agent::v1::{CheckRequest, RunRequest};

libfuzzer_sys::fuzz_target!(|bytes: &[u8]| {
    let Some((&which, message)) = bytes.split_first() else {
        return;
    };
    if which % 2 == 0 {
        if let Ok(request) = RunRequest::decode(message) {
            tailbox_agent::fuzzing::run_request(&request);
        }
    } else if let Ok(request) = CheckRequest::decode(message) {
        tailbox_agent::fuzzing::check_request(&request);
    }
});
