//! A client's request body: the JSON peek (model, stream), the lazy field index, body
//! fields by dotted path, and the routing text policies see. Properties: never panics;
//! a field index range always lies inside the body; a body the router accepts keeps its
//! bytes untouched.
#![no_main]
use libfuzzer_sys::fuzz_target;
use vllm_router::request::RequestInfo;

fuzz_target!(|data: &[u8]| {
    let body = bytes::Bytes::copy_from_slice(data);
    let idx = vllm_router_sdk::routing::FieldIndex::new(data);
    for name in ["model", "messages", "prompt", "user", "session_id"] {
        if let Some(r) = idx.range(name) {
            assert!(r.start <= r.end && r.end <= data.len(), "range {r:?} outside the body");
        }
    }
    let Ok(info) = RequestInfo::from_json(
        http::Method::POST,
        "/v1/chat/completions".into(),
        "/v1/chat/completions".into(),
        http::HeaderMap::new(),
        body,
    ) else {
        return;
    };
    assert_eq!(&info.body[..], data, "the body must be forwarded byte for byte");
    let _ = info.routing_text();
    for path in ["model", "user", "metadata.session_id", "messages.0.content", "a.b.c.d"] {
        let _ = info.body_field(path);
    }
});
