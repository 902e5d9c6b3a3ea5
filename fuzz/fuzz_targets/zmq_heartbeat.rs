//! A vLLM P2P-NCCL discovery heartbeat (msgpack over ZMQ) from the network. Property:
//! never panics; an accepted one names a role and an HTTP address.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok((_role, hb)) = vllm_router::discovery::parse(data) {
        assert!(!hb.http_address.is_empty());
    }
});
