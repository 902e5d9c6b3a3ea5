//! A worker's Prometheus text (`/metrics`), read for engine load and merged into the
//! fleet metrics. Properties: never panics; merging a text with itself never panics
//! and yields text.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let _ = vllm_router::engine::parse_vllm_metrics(text, None);
    let _ = vllm_router::engine::parse_vllm_metrics(text, Some(1));
    let merged = vllm_router::fleet::merge(&[text, text]);
    assert!(std::str::from_utf8(merged.as_bytes()).is_ok());
});
