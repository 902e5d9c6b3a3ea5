//! The client API keys file (`--client-api-keys-file`, TOML). Property: never panics;
//! an accepted file has only valid limits.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let _ = vllm_router::clients::parse_keys_file(text);
});
