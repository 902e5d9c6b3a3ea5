//! The PD flow's body rewrites. Input: a client body and the prefill's
//! `kv_transfer_params` (split at the first 0xFF byte). Properties: never panics; the
//! prefill body is a JSON object with max_tokens 1 and stream false; the decode body is
//! a JSON object holding the prefill's kv_transfer_params and every other top-level
//! field of the client's body unchanged.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (body, kv) = match data.iter().position(|b| *b == 0xFF) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &b"{\"remote_engine_id\":\"e\"}"[..]),
    };
    // Only bodies the router accepts reach the PD flow.
    let Ok(client) = serde_json::from_slice::<serde_json::Map<String, serde_json::Value>>(body)
    else {
        return;
    };
    if let Ok(p) = vllm_router::pd::prefill_body(body) {
        let v: serde_json::Map<String, serde_json::Value> =
            serde_json::from_slice(&p).expect("prefill body is a JSON object");
        assert_eq!(v["max_tokens"], 1);
        assert_eq!(v["stream"], false);
    }
    let Ok(kv_text) = std::str::from_utf8(kv) else { return };
    let Ok(raw) = serde_json::value::RawValue::from_string(kv_text.to_string()) else {
        return;
    };
    let bytes = bytes::Bytes::copy_from_slice(body);
    if let Ok(d) = vllm_router::pd::decode_body(&bytes, Some(&raw)) {
        let v: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&d)
            .unwrap_or_else(|e| panic!("decode body is not a JSON object: {e}: {}", String::from_utf8_lossy(&d)));
        let want: serde_json::Value = serde_json::from_str(raw.get()).unwrap();
        assert_eq!(v.get("kv_transfer_params"), Some(&want));
        for (k, val) in &client {
            if k != "kv_transfer_params" {
                assert_eq!(v.get(k), Some(val), "field {k} changed");
            }
        }
    }
});
