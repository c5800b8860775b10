//! tailscaled's IPN bus (`watch-ipn-bus`): newline-delimited JSON arriving in chunks of any size.
//! The input is the stream; its first byte seeds where it is cut into chunks.
#![no_main]

libfuzzer_sys::fuzz_target!(|bytes: &[u8]| {
    let Some((&seed, stream)) = bytes.split_first() else {
        return;
    };
    let step = usize::from(seed % 64) + 1;
    tailbox_agent::fuzzing::localapi_ipn_bus(stream.chunks(step));
});
