//! The PD flow's body rewrites. Input: a client body and the prefill's
//! `kv_transfer_params` (split at the first 0xFF byte). Properties: never panics; the
//! prefill body is a JSON object with max_tokens 1 and stream false; the decode body is
//! a syntactically valid JSON object holding the prefill's kv_transfer_params and every
//! other top-level field of the client's body unchanged (byte for byte, or, when the
//! client sent its own kv_transfer_params and the object was rebuilt, the same value).
//! Validity is checked at the syntax level: JSON numbers have no range (RFC 8259), and
//! the first crash this target found was this harness parsing `8E663…` into an f64
//! (now the unit test `decode_body_splices_numbers_beyond_f64_byte_for_byte`).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (body, kv) = match data.iter().position(|b| *b == 0xFF) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &b"{\"remote_engine_id\":\"e\"}"[..]),
    };
    // Only JSON objects reach the PD flow.
    type Raw = std::collections::HashMap<String, Box<serde_json::value::RawValue>>;
    let Ok(client_raw) = serde_json::from_slice::<Raw>(body) else {
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
    let same = |a: &str, b: &str| {
        a == b
            || matches!(
                (serde_json::from_str::<serde_json::Value>(a), serde_json::from_str::<serde_json::Value>(b)),
                (Ok(x), Ok(y)) if x == y
            )
    };
    if let Ok(d) = vllm_router::pd::decode_body(&bytes, Some(&raw)) {
        let out: Raw = serde_json::from_slice(&d).unwrap_or_else(|e| {
            panic!("decode body is not a JSON object: {e}: {}", String::from_utf8_lossy(&d))
        });
        let kv_out = out.get("kv_transfer_params").expect("kv_transfer_params present");
        assert!(same(kv_out.get(), raw.get()), "kv_transfer_params changed");
        for (k, val) in &client_raw {
            if k != "kv_transfer_params" {
                let got = out.get(k).unwrap_or_else(|| panic!("field {k} lost"));
                assert!(same(got.get(), val.get()), "field {k} changed");
            }
        }
    }
});
