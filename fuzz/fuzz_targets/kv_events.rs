//! A vLLM KV-event batch (msgpack, map or array form) from the network, applied to an
//! index. Properties: decoding never panics; applying any decoded batch never panics;
//! a prompt's match never reports more leading blocks than the prompt has.
#![no_main]
use libfuzzer_sys::fuzz_target;
use vllm_router::kv::events::decode_batch;
use vllm_router::kv::index::{KvIndex, SourceState, prompt_keys};

fuzz_target!(|data: &[u8]| {
    let Ok(batch) = decode_batch(data) else { return };
    let ix = KvIndex::new(64, 4);
    ix.set_state(1, SourceState::Exact);
    ix.apply(1, &batch.events);
    ix.apply(1, &batch.events);
    let tokens: Vec<u32> = (0..32).collect();
    let keys = prompt_keys(&tokens, ix.block_size());
    let mut out = Vec::new();
    ix.match_prefix(&keys, &[1, 2], &mut out);
    assert_eq!(out.len(), 2);
    assert!(out.iter().all(|w| (*w as u32) as usize <= keys.len()));
});
